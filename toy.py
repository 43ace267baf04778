"""The CPU-sized world that needs no download: models built in code and tasks generated here.

- `--model tiny`: a random-weight Qwen2 (2 layers, width 64) with a byte-level BPE tokenizer trained offline,
  for smoke runs and tests of every code path. `--dataset synthetic`: arithmetic word problems, levels 1-5.
- `--model toy` and `--dataset addition`: the toy lab (README "Toy lab"). n-digit addition, and a 3-layer
  character-level Qwen2 trained here (or shipped, for the quick lab) on its own digit-by-digit chain of thought to
  solve 1-3 digit sums, (almost) never 5-6 digit ones, but to explain those when shown the answer: ExPO's situation
  in miniature, where GRPO sees only zero rewards and self-explanations are a positive sample the model can write.
  The data sets' expert solutions are written as a person would (`addition`, `addition_columns`), not in the
  model's format (`addition_own`).

Everything here goes through common.py's prompts, sampler, reward and log-probs, as MATH does; common.py names
none of it. Importing this module registers the names above with common (`register_model`, `register_dataset`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import EXPLAIN_SENTENCE, SYSTEM_PROMPT, explanation_prompt, extract_boxed, question_prompt, register_dataset
from engine import CACHE_DIR, cosine_schedule, make_batch, register_model, sample

# ----------------------------------------------------------------------------------------------------
# The tiny model and the synthetic task (smoke runs, tests)
# ----------------------------------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def built_once(path: str, write) -> str:
    """`path`, written once by `write(tmp_dir)` if it is not there yet. Concurrent callers (the ranks of a job,
    runs started together) wait on a file lock while one builds; the directory appears by an atomic rename,
    so no one ever reads half a model."""
    import fcntl

    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path.rstrip("/") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not os.path.exists(os.path.join(path, "config.json")):  # nobody built it meanwhile
            tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write(tmp)
            if not os.path.exists(os.path.join(tmp, "config.json")):
                raise RuntimeError(f"building {path} wrote no config.json")
            os.replace(tmp, path)
    return path


def save_pretrained(model, tokenizer, path: str) -> None:
    """model.save_pretrained on whatever rank builds: under torch.distributed, transformers writes a model only
    on rank 0 (and silently nothing elsewhere), but the builder is whichever rank took the lock first."""
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def small_qwen2(tokenizer, num_layers: int, num_kv_heads: int, max_positions: int):
    """A width-64 Qwen2 with random weights over `tokenizer`'s vocabulary, its EOS and pad wired into generation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def build_tiny_model(path: str | None = None, seed: int = 0) -> str:
    """Build (once) a small Qwen2-architecture causal LM with random weights and its own BPE tokenizer.

    Nothing is downloaded: the byte-level BPE tokenizer is trained on text generated here (synthetic
    problems, their solutions, both prompts), so the CPU demo and the tests run offline.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def write(tmp):
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        corpus = []
        for row in synthetic_problems(2000, seed=seed):
            corpus += [row["question"], row["solution"], SYSTEM_PROMPT, EXPLAIN_SENTENCE.format(answer=row["answer"])]
        corpus.append(r"\frac{1}{2} \sqrt{3} \pi \dfrac{a}{b} x^2 + y^2 = z^2 (1, 2) [0, \infty)")
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus, trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                            bos_token=None)
        tokenizer.chat_template = CHAT_TEMPLATE
        with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
            torch.manual_seed(seed)
            model = small_qwen2(tokenizer, num_layers=2, num_kv_heads=2, max_positions=2048)
        save_pretrained(model, tokenizer, tmp)

    return built_once(path or os.path.join(CACHE_DIR, f"tiny-v1-seed{seed}"), write)


_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
_ITEMS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "shells", "cards"]


def synthetic_problems(n: int, seed: int = 0, levels=None) -> list[dict]:
    """Arithmetic word problems of difficulty 1-5 with a worked solution ending in `\\boxed{}`.

    Level L chains L operations on numbers that grow with L, so a tiny model solves level 1 long before
    level 5: a stand-in for MATH's levels that needs no download.
    """
    rng = random.Random(seed)
    rows = []
    levels = list(levels or range(1, 6))
    for i in range(n):
        level = levels[i % len(levels)]
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        total = rng.randint(2, 5 * 10 ** (level // 2 + 1))
        q = [f"{name} has {total} {item}."]
        steps = [f"{name} starts with {total} {item}."]
        for _ in range(level):
            op = rng.choice(["gets", "gives away", "doubles"] if total > 1 else ["gets"])
            if op == "gets":
                k = rng.randint(1, 10 ** (level // 2 + 1))
                q.append(f"Then {name} gets {k} more.")
                steps.append(f"After getting {k} more: {total} + {k} = {total + k}.")
                total += k
            elif op == "gives away":
                k = rng.randint(1, total - 1)
                q.append(f"Then {name} gives away {k}.")
                steps.append(f"After giving away {k}: {total} - {k} = {total - k}.")
                total -= k
            else:
                q.append(f"Then the number of {item} doubles.")
                steps.append(f"After doubling: 2 * {total} = {2 * total}.")
                total *= 2
        q.append(f"How many {item} does {name} have now?")
        steps.append(f"The answer is \\boxed{{{total}}}.")
        rows.append({"question": " ".join(q), "answer": str(total), "solution": "\n".join(steps),
                     "level": level, "subject": "Arithmetic"})
    return rows


# ----------------------------------------------------------------------------------------------------
# The toy lab: n-digit addition and the toy base model
# ----------------------------------------------------------------------------------------------------
# `--dataset addition --model toy` reproduces ExPO's effect without a GPU (README "Toy lab"): the toy
# base model solves 1-3 digit sums, solves no 5-6 digit ones, but explains those when given the answer.
# Everything here goes through the same prompts, sampler and reward (`verify_answer`) as MATH does.

TOY_ANSWER_WIDTH = 7  # a 6-digit sum has at most 7 digits
TOY_EASY_LEVELS, TOY_HARD_LEVELS = (1, 2, 3), (5, 6)
_TOY_CHARS = "0123456789+Q|?> \\boxed{}"
_TOY_SPECIALS = ["<pad>", "<eos>", "<unk>"]
_EXPLAIN_MARK = "\n\n" + EXPLAIN_SENTENCE.split("{answer}")[0]  # "\n\nThe correct final answer is "

# The toy tokenizer's chat template: it drops the system message and renders the user message compactly,
# `Q12345+67890|???????>` (question prompt) or `Q12345+67890|0080235>` (explanation prompt, the answer read
# back out of EXPLAIN_SENTENCE). Both share one fixed-width answer slot, so the chain of thought sits at the
# same positions under both prompts: in TOYLAB's prototype, without it even SFT on the true chain of
# thought never solved a hard problem.
TOY_CHAT_TEMPLATE = (
    "{%- for m in messages if m['role'] == 'user' -%}"
    "{%- set parts = m['content'].split(" + json.dumps(_EXPLAIN_MARK) + ") -%}"
    "Q{{ parts[0] }}|"
    "{%- if parts | length > 1 -%}{{ '%0" + str(TOY_ANSWER_WIDTH) + "d' | format(parts[1].split('.')[0] | int) }}"
    "{%- else -%}" + "?" * TOY_ANSWER_WIDTH + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}>{%- endif -%}"
)


def addition_solution(a: int, b: int) -> str:
    """The chain of thought: one 4-character step per digit, right to left (digit of a, digit of b, carry
    in, sum digit), then the answer boxed.

    >>> addition_solution(12345, 67890)
    '5005 4903 3812 2710 1618 \\\\boxed{80235}'
    """
    return " ".join(f"{x}{y}{carry}{total % 10}" for x, y, carry, total in _columns(a, b)) + f" \\boxed{{{a + b}}}"


def _columns(a: int, b: int):
    """(digit of a, digit of b, carry in, column total) of each column, right to left."""
    n = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(n), str(b).zfill(n)
    carry = 0
    for i in range(n - 1, -1, -1):
        total = int(da[i]) + int(db[i]) + carry
        yield int(da[i]), int(db[i]), carry, total
        carry = total // 10


# An expert's solution, the positive sample of `--sft_source expert` and `--chosen expert`, is written as a person
# would, not in the base model's format: that is the paper's situation (Property 1: an expert CoT is out of the
# model's distribution, a self-explanation is not). Two styles tell apart "foreign" and "skips steps the model
# needs"; SFT on the model's own format (`addition_own`) is an upper bound that no real data set provides.

def addition_terse(a: int, b: int) -> str:
    """The expert as a person writes it, carries done in the head: column sums left to right, then the answer.
    Out of the model's distribution and missing the carries the model's own procedure writes down.

    >>> addition_terse(12345, 67890)
    '7 9 11 13 5 \\\\boxed{80235}'
    """
    n = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(n), str(b).zfill(n)
    return " ".join(str(int(x) + int(y)) for x, y in zip(da, db)) + f" \\boxed{{{a + b}}}"


def addition_columns(a: int, b: int) -> str:
    """A complete expert derivation in a foreign layout: right to left, each column as `x+y>tt`, tt its two-digit
    total with the carry in, whose first digit is the carry out. Every carry is written, so nothing is skipped.

    >>> addition_columns(12345, 67890)
    '5+0>05 4+9>13 3+8>12 2+7>10 1+6>08 \\\\boxed{80235}'
    """
    return " ".join(f"{x}+{y}>{total:02d}" for x, y, _, total in _columns(a, b)) + f" \\boxed{{{a + b}}}"


SOLUTION_STYLES = {"own": addition_solution, "terse": addition_terse, "columns": addition_columns}


def addition_problem(rng: random.Random, digits: int, style: str = "own") -> dict:
    """One row of the `addition` data: two `digits`-digit numbers (no leading zero; 0-9 for one digit), with the
    solution in `style` (see SOLUTION_STYLES); the numbers drawn do not depend on the style."""
    lo = 10 ** (digits - 1) if digits > 1 else 0
    a, b = rng.randint(lo, 10**digits - 1), rng.randint(lo, 10**digits - 1)
    return {"question": f"{a}+{b}", "answer": str(a + b), "solution": SOLUTION_STYLES[style](a, b),
            "level": digits, "subject": "Addition"}


def addition_problems(n: int, split: str = "train", levels=None, style: str = "terse") -> list[dict]:
    """n rows cycling over `levels` (default 1-6 digits). Each (split, level) is its own random stream,
    so train and test are different draws and the level-5 rows of a smaller set are a prefix of a larger
    one's. (Only 100 one-digit problems exist, so easy train and test rows overlap; hard ones practically
    never do.) The same questions in every style."""
    levels = list(levels or range(1, 7))
    if not all(1 <= lv <= 6 for lv in levels):
        raise ValueError(f"addition levels are digit counts 1-6, got {levels}")
    streams = {lv: random.Random(f"addition/{split}/{lv}") for lv in levels}
    return [addition_problem(streams[levels[i % len(levels)]], levels[i % len(levels)], style) for i in range(n)]


def correct_steps(question: str, completion: str) -> int:
    """How many of the steps of a chain of thought in the model's own format equal the true steps, position by
    position (the toy's exact stand-in for the paper's judge of reasoning steps, Figure 2 right).

    >>> correct_steps("47+38", r"7805 4307 \\boxed{75}")   # the second step drops the carry
    1
    """
    m = re.fullmatch(r"(\d+)\+(\d+)", question.strip())
    if not m:
        return 0
    truth = addition_solution(int(m.group(1)), int(m.group(2))).split(" ")[:-1]
    return sum(s == t for s, t in zip(completion.strip().split(" "), truth))


def step_check(question: str, completion: str) -> bool:
    """True iff every step of an addition chain of thought is right, and the boxed answer is what the steps
    give. Answer-free: it reads the question only, never the gold answer, so an explanation that copies the
    given answer after wrong steps fails. Malformed text fails.

    >>> step_check("47+38", r"7805 4318 \\boxed{85}")
    True
    >>> step_check("47+38", r"7805 4307 \\boxed{85}")   # the second step drops the carry
    False
    """
    m = re.fullmatch(r"(\d+)\+(\d+)", question.strip())
    if not m:
        return False
    n = max(len(m.group(1)), len(m.group(2)))
    da, db = m.group(1).zfill(n), m.group(2).zfill(n)
    *steps, boxed = completion.strip().split(" ")
    if len(steps) != n:
        return False
    carry, digits = 0, ""
    for k, step in enumerate(steps):
        i = n - 1 - k  # digits are read right to left
        if not re.fullmatch(r"\d{4}", step) or step[:3] != f"{da[i]}{db[i]}{carry}":
            return False
        s = int(da[i]) + int(db[i]) + carry
        if int(step[3]) != s % 10:
            return False
        digits, carry = step[3] + digits, s // 10
    return boxed == f"\\boxed{{{int(str(carry) + digits)}}}"


def toy_tokenizer():
    """Character-level tokenizer: one token per character of `_TOY_CHARS`, plus pad, eos and unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_TOY_SPECIALS + list(_TOY_CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                        bos_token=None, clean_up_tokenization_spaces=False, model_max_length=96)
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer


# The quick lab's base, shipped so that the README's first command trains no base model (its build takes 2.5 to 6
# minutes by CPU). Written by `python -c "import toy; toy.build_toy_model(path='examples/toy_base')"`; its
# toy_build.json records the build's settings and rates, and tests/test_toy.py checks that the files give them.
SHIPPED_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples", "toy_base")


def build_toy_model(path: str | None = None, seed: int = 0, steps: int = 600, batch_size: int = 128,
                    lr: float = 3e-3, eval_size: int = 200, threads: int = 1, verbose: bool = True,
                    shipped: bool = True) -> str:
    """Build (once) and cache the toy base model: a 3-layer Qwen2 over characters, trained on addition.
    With `shipped` (and no `path`), the shipped base (SHIPPED_BASE) is returned when it is this build.

    Stage 1 of TOYLAB: each batch is 80% easy problems (1-3 digits), half under the question prompt and half
    under the explanation prompt, and 20% hard ones (5-6 digits) under the explanation prompt only; the
    loss is on the completion (true chain of thought + answer + EOS) only. So the model learns the
    procedure on easy problems and to explain hard ones given the answer, and solves few or no hard ones:
    with rotary positions the solve skill starts to carry over to 5-6 digits as stage 1 goes on, sooner on
    some seeds (600 steps at lr 3e-3: hard_solve 0.00 on seed 0, 0.14 on seed 1, 0.12 on seed 2).
    It then prints its three rates on held-out test problems (see `toy_rates`).

    Deterministic: the same seed (and `threads`) gives identical weights; training always runs on CPU, on one
    thread by default: on a busy 2-core machine two threads were 5-10x slower than one.
    """
    def write(tmp):
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
                model, tokenizer, seconds = _train_toy_model(seed, steps, batch_size, lr, verbose)
                rates = toy_rates(model, tokenizer, eval_size) if eval_size else {}
        finally:
            torch.set_num_threads(prev_threads)
        if verbose:
            print(f"toy model: {steps} steps in {seconds:.0f}s; " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
        save_pretrained(model, tokenizer, tmp)
        with open(os.path.join(tmp, "toy_build.json"), "w") as f:
            json.dump({"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "threads": threads,
                       "train_seconds": round(seconds, 1), **rates}, f, indent=1)

    settings = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "threads": threads}
    if shipped and path is None and os.path.exists(os.path.join(SHIPPED_BASE, "toy_build.json")):
        with open(os.path.join(SHIPPED_BASE, "toy_build.json")) as f:
            if {k: v for k, v in json.load(f).items() if k in settings} == settings:
                return SHIPPED_BASE
    name = f"toy-v2-seed{seed}-steps{steps}-lr{lr:g}-batch{batch_size}"
    return built_once(path or os.path.join(CACHE_DIR, name), write)


def _train_toy_model(seed: int, steps: int, batch_size: int, lr: float, verbose: bool):
    tokenizer = toy_tokenizer()
    torch.manual_seed(seed)
    model = small_qwen2(tokenizer, num_layers=3, num_kv_heads=4, max_positions=96)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = cosine_schedule(optimizer, steps, warmup_ratio=1 / 15)  # TOYLAB: 100 of 1500 steps
    vocab = tokenizer.get_vocab()
    encode = lambda text: [vocab[c] for c in text]  # noqa: E731 (character-level: no tokenizer call per row)
    rng = random.Random(f"toy-model/{seed}")
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        # hard rows first (explanation prompt only), then easy rows alternating the two prompts
        rows = [(addition_problem(rng, rng.choice(TOY_HARD_LEVELS if j < batch_size // 5 else TOY_EASY_LEVELS)),
                 j < batch_size // 5 or j % 2 == 0) for j in range(batch_size)]
        # two micro-batches, hard and easy, so the short easy sequences are not padded to the hard length
        chunks = [rows[: batch_size // 5], rows[batch_size // 5 :]]
        n_tokens = sum(len(r["solution"]) + 1 for r, _ in rows)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in chunks:
            prompt_ids = [encode(explanation_prompt(tokenizer, r["question"], r["answer"]) if explain
                                 else question_prompt(tokenizer, r["question"])) for r, explain in chunk]
            completion_ids = [encode(r["solution"]) + [tokenizer.eos_token_id] for r, _ in chunk]
            batch = make_batch(prompt_ids, completion_ids, tokenizer.pad_token_id)
            # right padding: causal attention never looks at the pads, so no attention mask is needed
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]  # (B, T-1, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1),
                                  reduction="none").view_as(batch["completion_mask"])
            loss = (nll * batch["completion_mask"]).sum() / n_tokens  # mean over the whole batch's tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"toy model step {step:>5} | loss {total:.4f} | {time.perf_counter() - start:.0f}s")
    return model.eval(), tokenizer, time.perf_counter() - start


def toy_rates(model, tokenizer, n: int = 200, micro_batch_size: int = 256) -> dict:
    """The three rates that make a good toy base model, on held-out test problems:
      easy_solve     greedy, question prompt, 1-3 digits: should be ~1
      hard_solve     greedy, question prompt, 5-6 digits: should be ~0 (GRPO then sees only zero rewards)
      hard_explain   T=1, explanation prompt, 5-6 digits: steps pass `step_check` and reach the answer (~1)
    """
    easy = addition_problems(n, "test", TOY_EASY_LEVELS)
    hard = addition_problems(n, "test", TOY_HARD_LEVELS)
    kw = dict(max_new_tokens=48, micro_batch_size=micro_batch_size)
    solve_easy = sample(model, tokenizer, [question_prompt(tokenizer, r["question"]) for r in easy], temperature=0, **kw)
    solve_hard = sample(model, tokenizer, [question_prompt(tokenizer, r["question"]) for r in hard], temperature=0, **kw)
    explain = sample(model, tokenizer, [explanation_prompt(tokenizer, r["question"], r["answer"]) for r in hard],
                     temperature=1.0, seeds=list(range(len(hard))), **kw)  # the same draws for every model
    right = lambda rows, texts: [extract_boxed(t) == r["answer"] for r, t in zip(rows, texts)]  # noqa: E731
    return {
        "easy_solve": float(np.mean(right(easy, solve_easy["texts"]))),
        "hard_solve": float(np.mean(right(hard, solve_hard["texts"]))),
        "hard_explain": float(np.mean([ok and step_check(r["question"], t)
                                       for r, t, ok in zip(hard, explain["texts"], right(hard, explain["texts"]))])),
    }


# ----------------------------------------------------------------------------------------------------
# Registration: `--model tiny|toy`, `--dataset synthetic|addition` in every script
# ----------------------------------------------------------------------------------------------------

register_model("tiny", build_tiny_model)
register_model("toy", build_toy_model)
# the synthetic train and test splits are different draws, so evaluation is held out
register_dataset("synthetic", lambda n, split, levels: synthetic_problems(n, seed=1 if split == "train" else 2))
# `addition`: the expert solution as a person writes it (terse); `addition_columns`: complete, foreign layout;
# `addition_own`: the model's own format (upper bound). The same questions, answers and step checker in all three.
for _name, _style in (("addition", "terse"), ("addition_columns", "columns"), ("addition_own", "own")):
    register_dataset(_name, lambda n, split, levels, style=_style: addition_problems(n, split, levels, style),
                     step_checker=step_check)
