"""The ExPO science both algorithms share: the two prompts, answers and rewards, the data. Read it whole.

ExPO shows the model a question q *and* its gold answer a*, and asks it to explain how to reach a*
(`explanation_prompt`); the explanation is then trained on as an answer to the question alone
(`question_prompt`): the two prompts differ only in `EXPLAIN_SENTENCE`. A response is rewarded 1 when its last
`\\boxed{}` verifies against a* (`check_answer`, math-verify under a hard time limit), else 0. The data are
rows {question, answer, solution, level, subject} read from MATH- or GSM8K-style files, hub data sets or the
built-in ones toy.py registers (`load_problems`), and each step takes its questions from `global_batch`.
Nothing here imports torch or another file of the project.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import subprocess
import sys
import threading
from collections import Counter


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------


SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
EXPLAIN_SENTENCE = (
    "The correct final answer is {answer}. Explain step by step how to solve the problem and reach this "
    "answer. Write it as a normal solution, without mentioning that the answer was given, and end with "
    "\\boxed{{{answer}}}."
)


def question_prompt(tokenizer, question: str) -> str:
    """The prompt every response is sampled, scored and trained under: the question alone."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def explanation_prompt(tokenizer, question: str, answer: str) -> str:
    """The question followed by the answer sentence: the only difference from `question_prompt`."""
    return question_prompt(tokenizer, question + "\n\n" + EXPLAIN_SENTENCE.format(answer=answer))


# ----------------------------------------------------------------------------------------------------
# Answers and rewards
# ----------------------------------------------------------------------------------------------------


_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed(text: str | None) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), braces balanced; else None.

    >>> extract_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{3}")
    '3'
    >>> extract_boxed(r"\\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    if not text:
        return None
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    # one pass pairs every `{` with its `}`: a text of thousands of unclosed boxes stays linear, not quadratic
    closing, open_ = {}, []
    for b in re.finditer(r"[{}]", text):
        if b.group() == "{":
            open_.append(b.start())
        elif open_:
            closing[open_.pop()] = b.start()
    for m in reversed(boxes):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if i in closing:
                return text[i + 1 : closing[i]].strip()
            continue  # unbalanced: try an earlier box
        if m.group(0).startswith("\\boxed") and m.end() > m.start() + len("\\boxed"):
            tail = re.match(r"[^\s$]+", text[i:])  # `\boxed 5`: up to the next space or `$`
            if tail:
                return tail.group(0)
    return None


def gsm8k_answer(text: str | None) -> str | None:
    """GSM8K's final answer: the text after `####`, without thousands separators. '#### 1,234' -> '1234'."""
    if not text or "####" not in text:
        return None
    ans = text.split("####")[-1].strip().replace(",", "")
    return ans or None


_MAX_ANSWER_CHARS = 512  # longer "answers" are junk; parsing them is where sympy can take minutes
_INTEGER = re.compile(r"-?\d{1,30}")
# sympy evaluates what it parses: 10^{10^{10}}, (10^9)! or 9^{99999999} run for minutes (or fill the
# memory) and a batch of them would cost a full time limit each. No gold answer of MATH or GSM8K has these
# shapes, so such an answer counts only if it equals the gold string (checked before). `x!` is a power
# tower of a kind too: it is allowed on a literal of at most 5 digits.
_TOO_COMPLEX = re.compile(
    r"\^\s*\{[^{}]*\^"                        # a power in an exponent: 10^{10^{10}}, e^{e^{x}}
    r"|\^\s*[\w.]+\s*\^"                      # 10^10^10
    r"|\^\s*\{?\s*[-+]?\d{5,}"                # an exponent of 5+ digits: 2^{99999999}
    r"|(?:[)}!]|\d{6,})\s*!"                  # a factorial of an expression, of a factorial, of 6+ digits
    r"|\\(?:binom|sum|prod|int|lim)\b.*(?:\^|\d{4})"  # big operators with large bounds
)
_MAX_NESTING = 12  # braces or parentheses deeper than this: generated junk (MATH answers stay below 5)


def too_complex(answer: str) -> bool:
    """True for an answer whose verification could outlast any time limit (see _TOO_COMPLEX).

    >>> too_complex("10^{10^{10^{10}}}"), too_complex("(10^{10})!"), too_complex("2^{2007}"), too_complex("5!")
    (True, True, False, False)
    """
    if _TOO_COMPLEX.search(answer):
        return True
    depth = deepest = 0
    for ch in re.findall(r"[{}()\[\]]", answer):
        depth = depth + 1 if ch in "{([" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest > _MAX_NESTING


_WORKER_SRC = r"""
import json, sys, time
from math_verify import parse, verify
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    gold, pred, t = json.loads(line)
    start = time.monotonic()
    try:
        ok = verify(parse(gold, parsing_timeout=t, raise_on_error=True),
                    parse(pred, parsing_timeout=t, raise_on_error=True), timeout_seconds=t)
        # verify answers False when its own time limit stopped it: the clock tells that apart
        out = [1.0 if ok else 0.0, "TimeoutException" if not ok and time.monotonic() - start >= t else None]
    except BaseException as e:
        out = [0.0, type(e).__name__]
    sys.stdout.write(json.dumps(out) + "\n"); sys.stdout.flush()
"""


class _Verifier:
    """math-verify in a child process, so that a hard time limit holds in any thread (math-verify's own timeout uses
    signal.alarm: main thread only). The child runs it with a soft limit of a third of the time for each of parsing
    the gold, the answer, comparing; the parent kills a child that has not answered in time (the hard limit) and
    starts the next at once, so it imports sympy while the caller goes on (its start-up is not counted in the limit).
    """

    def __init__(self, source: str = _WORKER_SRC):
        self.source, self.proc = source, None
        self.lock = threading.Lock()

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", self.source], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.ready = False

    def _read(self, seconds: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        return self.proc.stdout.readline() if ready else None

    def __call__(self, gold: str, pred: str, timeout: float) -> tuple[float, str | None]:
        with self.lock:
            try:
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                if not self.ready:
                    self.ready = self._read(120) == "ready\n"
                    if not self.ready:
                        raise OSError("the verifier process did not start")
                self.proc.stdin.write(json.dumps([gold, pred, max(1, int(timeout / 3))]) + "\n")
                self.proc.stdin.flush()
                line = self._read(timeout)
                if line:
                    return tuple(json.loads(line))
            except (OSError, ValueError):
                pass
            self.proc.kill()
            self.proc.wait()
            self._start()
            return 0.0, "timeout"


_VERIFIER = _Verifier()


def check_answer(completion: str, gold: str, timeout: float = 5.0,
                 exact_shortcut: bool = True) -> tuple[float, str | None]:
    """(1.0 if the last `\\boxed{}` of `completion` equals `gold` by math-verify else 0.0, what went wrong).

    What went wrong: None, or `too_long` / `too_complex` (an answer sympy could spend minutes on: 0 unless it
    is the very string of the gold), `timeout`, `error`. Never raises. Identical strings (spaces aside) are
    accepted without calling math-verify (`exact_shortcut`). Returns within `timeout` seconds (plus the
    start of a verifier process after one was killed), in any thread.

    >>> check_answer(r"... so the answer is \\boxed{\\dfrac{1}{2}}", "0.5")
    (1.0, None)
    """
    try:
        pred = extract_boxed(completion)
        if pred is None or not gold:
            return 0.0, None
        if exact_shortcut:
            p, g = pred.replace(" ", ""), str(gold).replace(" ", "")
            if p == g:
                return 1.0, None
            if _INTEGER.fullmatch(p) and _INTEGER.fullmatch(g):  # most wrong answers: no subprocess round trip
                return float(int(p) == int(g)), None
        if len(pred) > _MAX_ANSWER_CHARS:
            return 0.0, "too_long"
        if too_complex(pred):
            return 0.0, "too_complex"
        score, err = _VERIFIER("\\boxed{" + str(gold) + "}", "\\boxed{" + pred + "}", timeout)
        return float(score), None if not err else "timeout" if err in ("timeout", "TimeoutException") else "error"
    except Exception:
        return 0.0, "error"


def verify_answer(completion: str, gold: str, timeout: float = 5.0, exact_shortcut: bool = True) -> float:
    """`check_answer`'s score alone."""
    return check_answer(completion, gold, timeout, exact_shortcut)[0]


def score_answers(completions: list[str], golds: list[str]) -> tuple[list[float], dict[str, float]]:
    """The reward of each completion (1 if its last \\boxed{} verifies against its gold answer, else 0; no
    format reward), and what the verifier saw: counts of `verify_timeouts`, `verify_errors` and
    `verify_prefiltered` (answers too long or too complex for sympy), for the log."""
    checked = [check_answer(c, g) for c, g in zip(completions, golds)]
    seen = Counter(what for _, what in checked)
    return [score for score, _ in checked], {"verify_timeouts": float(seen["timeout"]),
                                             "verify_errors": float(seen["error"]),
                                             "verify_prefiltered": float(seen["too_long"] + seen["too_complex"])}


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------


# Data sets built in code rather than read from disk or a hub (toy.py registers `synthetic` and `addition`): the
# loaders look names up here and name none of them.
BUILT_DATASETS: dict = {}  # name -> rows(n, split, levels) -> [{question, answer, solution, level, subject}]
STEP_CHECKERS: dict = {}  # dataset name -> check(question, completion) -> bool, an answer-free check of each step


def register_dataset(name: str, rows, step_checker=None) -> None:
    BUILT_DATASETS[name] = rows
    if step_checker is not None:
        STEP_CHECKERS[name] = step_checker


def _not_utf8(path: str, line: int, raw: bytes, e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8")


def text_lines(path: str):
    """(line number, line) of each non-blank line of a UTF-8 text file, counted from 1. A byte that is not UTF-8
    is a ValueError naming the file and the line (Python's own error names neither)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, number, raw, e) from None
            if line.strip():
                yield number, line


def _read_local(path: str, stats: Counter) -> list[dict]:
    if path.endswith(".jsonl"):
        rows = []
        for _, line in text_lines(path):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError
                rows.append(row)
            except ValueError:
                stats["malformed_lines"] += 1
        return rows
    if path.endswith(".json"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _not_utf8(path, raw[: e.start].count(b"\n") + 1, raw, e) from None
        data = data if isinstance(data, list) else data.get("data", data.get("rows", []))
        stats["malformed_lines"] += sum(not isinstance(r, dict) for r in data)
        return [r for r in data if isinstance(r, dict)]
    if path.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    raise ValueError(f"unsupported file type {path!r}: use .jsonl, .json or .parquet")


def normalize_row(row: dict) -> dict | None:
    """Map a MATH / MATH500 / GSM8K style row to {question, answer, solution, level, subject}.

    Returns None when the row has no question or no usable answer (empty: nothing after `####` or in the last
    `\\boxed{}`; or unbalanced braces; the caller counts it). An answer column that holds a worked solution
    (with a `\\boxed{}`) gives the content of its last box, never the whole text.
    """
    question = row.get("problem", row.get("question"))
    solution = row.get("solution")
    answer = row.get("answer")
    if solution is None and isinstance(answer, str) and "####" in answer:  # GSM8K: rationale + '#### N'
        solution, answer = answer, gsm8k_answer(answer)
        if answer is None:  # `#### ` and nothing after it: no gold answer (and not the text "None")
            return None
        solution = re.sub(r"<<[^>]*>>", "", solution.split("####")[0]).strip() + f"\nThe answer is \\boxed{{{answer}}}."
    elif isinstance(answer, str) and _BOX_RE.search(answer):
        solution, answer = solution or answer, extract_boxed(answer)
    if answer is None or str(answer).strip() == "":
        answer = extract_boxed(solution)
    if not isinstance(question, str) or not question.strip() or answer is None or not str(answer).strip():
        return None
    if str(answer).count("{") != str(answer).count("}"):  # cut or garbled: no completion could match it
        return None
    level = re.search(r"\d+", str(row.get("level")))  # 5, "5" or "Level 5"; None has no digit
    return {
        "question": question.strip(),
        "answer": str(answer).strip(),
        "solution": solution if isinstance(solution, str) else None,
        "level": int(level.group(0)) if level else None,
        "subject": row.get("type", row.get("subject")),
    }


def check_columns(columns, source: str) -> None:
    """Fail before any model is loaded if the data has no question column or no answer column."""
    columns = set(columns)
    if not columns & {"problem", "question"} or not columns & {"solution", "answer"}:
        raise ValueError(f"dataset {source!r} needs a question column (problem|question) and an answer column "
                         f"(solution|answer); found columns: {sorted(columns)}")


def prompt_fits(tokenizer, context: int | None, max_new_tokens: int, with_answer: bool):
    """`load_problems`' `fits` for a model of `context` positions: rows -> whether each row's prompt and
    `max_new_tokens` more fit (None where the model does not say its context). The prompt is the explanation
    prompt (question and answer, the longest a trainer writes) `with_answer`, else the question prompt. A longer
    question would reach the model: skipped, counted as `too_long`.
    """
    if context is None:
        return None
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                         f"of {context} positions")
    # no token covers more characters than its own text has: a prompt longer than this is too long untokenized
    most_chars = room * max(map(len, tokenizer.get_vocab()))

    def fits(rows: list[dict]) -> list[bool]:
        prompts = [explanation_prompt(tokenizer, r["question"], r["answer"]) if with_answer
                   else question_prompt(tokenizer, r["question"]) for r in rows]
        short = [p for p in prompts if len(p) <= most_chars]
        lengths = iter([len(ids) for ids in tokenizer(short, add_special_tokens=False)["input_ids"]] if short else [])
        return [len(p) <= most_chars and next(lengths) <= room for p in prompts]

    return fits


def load_problems(source: str, split: str = "train", config: str | None = None, levels=None,
                  limit: int | None = None, seed: int = 0, synthetic_size: int = 2000,
                  levels_flag: str | None = None, fits=None) -> tuple[list[dict], Counter]:
    """Rows {question, answer, solution, level, subject} and a Counter of what was skipped and why.

    `source`: a built-in data set (`register_dataset`: `synthetic_size` rows), a local .jsonl/.json/.parquet file,
    or a hub dataset id (with `split`, `config`). Rows are shuffled deterministically by `seed`, then filtered
    by `levels` and by `fits` (rows -> [bool], `prompt_fits`: a row too long for the model, counted as `too_long`),
    then cut to `limit`.
    Data with no level at all (GSM8K) is a ValueError naming `levels_flag` when `levels` keeps nothing, or, with
    `levels_flag` None (the caller's default levels, not the user's), is kept whole (counted as `no_levels`).
    """
    stats: Counter = Counter()
    if source in BUILT_DATASETS:
        raw = BUILT_DATASETS[source](synthetic_size, split, levels)
    elif os.path.isfile(source):
        raw = _read_local(source, stats)
    elif os.path.exists(source) or source.endswith((".jsonl", ".json", ".parquet")):
        raise FileNotFoundError(f"dataset file {source!r} not found")
    else:
        import datasets

        try:
            raw = list(datasets.load_dataset(source, config, split=split))
        except ConnectionError as e:
            raise ValueError(f"cannot load the dataset {source!r}: {e} (no network? a hub data set needs it the first "
                             "time, or give a local .jsonl file)") from None
    if raw:
        check_columns(set().union(*(r.keys() for r in raw[:100])), source)
    rows = [normalize_row(r) for r in raw]
    if levels and not any(row and row["level"] is not None for row in rows):
        if levels_flag is not None:
            raise ValueError(f"dataset {source!r} has no difficulty levels (no `level` column), so {levels_flag} "
                             f"keeps none of its {len(rows)} rows: drop that flag or pass it as `all`")
        levels, stats["no_levels"] = None, len(rows)
    kept = []
    for r, row in zip(raw, rows):
        if row is None:
            question = r.get("problem", r.get("question"))
            stats["no_question" if not isinstance(question, str) or not question.strip() else "no_answer"] += 1
        elif levels and row["level"] not in levels:
            stats["other_level"] += 1
        else:
            kept.append(row)
    rows = [row for row, ok in zip(kept, fits(kept) if fits and kept else [True] * len(kept)) if ok]
    if len(rows) < len(kept):
        stats["too_long"] = len(kept) - len(rows)
    random.Random(seed).shuffle(rows)
    if limit:
        rows = rows[:limit]
    stats["kept"] = len(rows)
    return rows, stats


def parse_levels(text: str | None, flag: str = "--levels") -> list[int] | None:
    """'5' -> [5]; '3-5' -> [3, 4, 5]; '1,3-5' -> [1, 3, 4, 5]; '' or 'all' -> None (every level).
    Anything else is a ValueError naming `flag` and the forms accepted: '7-3' would keep no level, which a
    filter would read as "all"."""
    if not text or text == "all":
        return None
    out = []
    for part in str(text).split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"{flag} {text}: give all, a level (5), a range (3-5) or a list (1,3-5)")
        if dash and int(high) < int(low):
            raise ValueError(f"{flag} {text}: a range runs from low to high ({high}-{low})")
        out += list(range(int(low), int(high or low) + 1))
    return out


def global_batch(rows: list, step: int, batch_size: int, seed: int) -> list:
    """The rows of optimizer step `step` (counted from 1) for all ranks together; epochs wrap around, each in an
    order of its own that resuming recomputes (nothing is stored). Each rank then takes `batch[rank::world_size]`,
    so the data position is a function of the step alone.
    """
    per_epoch = len(rows) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} rows cannot fill one batch of {batch_size}")
    epoch, i = divmod(step - 1, per_epoch)
    order = list(range(len(rows)))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return [rows[j] for j in order[i * batch_size : (i + 1) * batch_size]]

