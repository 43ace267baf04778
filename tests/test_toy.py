"""The toy world (common.py, "Toy world"): addition data, the step checker, the compact prompts, the toy model.

Expected values are written by hand or computed here by a separate implementation, never read back from
the code under test.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common
import engine
import runs
import toy
from conftest import ROOT, run_torchrun


def true_chain(a: int, b: int) -> str:
    """The chain of thought computed independently: digits by integer division, right to left."""
    n = max(len(str(a)), len(str(b)))
    steps, carry = [], 0
    for i in range(n):
        x, y = a // 10**i % 10, b // 10**i % 10
        steps.append(f"{x}{y}{carry}{(x + y + carry) % 10}")
        carry = (x + y + carry) // 10
    return " ".join(steps) + " \\boxed{" + str(a + b) + "}"


def random_pairs(count: int = 300, seed: int = 0):
    rng = random.Random(seed)
    for k in range(count):
        digits = 1 + k % 6
        lo = 10 ** (digits - 1) if digits > 1 else 0
        yield rng.randint(lo, 10**digits - 1), rng.randint(lo, 10**digits - 1)


# ---------------------------------------------------------------- data and the step checker


@pytest.mark.parametrize("a, b, chain", [
    (12345, 67890, r"5005 4903 3812 2710 1618 \boxed{80235}"),
    (5, 7, r"5702 \boxed{12}"),
    (0, 0, r"0000 \boxed{0}"),
    (47, 38, r"7805 4318 \boxed{85}"),
    (999999, 999999, r"9908 9919 9919 9919 9919 9919 \boxed{1999998}"),
])
def test_solution_hand_written(a, b, chain):
    assert toy.addition_solution(a, b) == chain
    assert toy.step_check(f"{a}+{b}", chain)
    assert true_chain(a, b) == chain


def test_step_checker_accepts_every_true_chain():
    for a, b in random_pairs():
        chain = true_chain(a, b)
        assert toy.step_check(f"{a}+{b}", chain), (a, b, chain)
        assert toy.step_check(f"{a}+{b}", chain + "\n")  # trailing whitespace is not a step
    assert toy.step_check("999+1", r"9100 9010 9010 \boxed{1000}")  # unequal lengths too


def test_step_checker_rejects_any_altered_step():
    for a, b in random_pairs(60, seed=1):
        question, steps = f"{a}+{b}", true_chain(a, b).split(" ")
        for k in range(len(steps) - 1):  # every step ...
            for pos in range(4):  # ... every character of it ...
                for d in "0123456789":  # ... every other digit
                    if d == steps[k][pos]:
                        continue
                    altered = steps[:k] + [steps[k][:pos] + d + steps[k][pos + 1 :]] + steps[k + 1 :]
                    assert not toy.step_check(question, " ".join(altered)), (question, altered)


@pytest.mark.parametrize("completion", [
    r"5005 4903 3812 2710 1618 \boxed{80234}",  # right steps, answer not what they give
    r"5005 4903 3812 2710 1618 \boxed{080235}",
    r"5005 4903 3812 2710 \boxed{80235}",  # a step missing
    r"5005 4903 3812 2710 1618 0000 \boxed{80235}",  # a step too many
    r"4903 5005 3812 2710 1618 \boxed{80235}",  # steps out of order
    r"50054903381227101618\boxed{80235}",
    r"5005 4903 3812 2710 1618 80235",
    r"5005 4903 3812 2710 1618 \boxed{80235",
    r"5005  4903 3812 2710 1618 \boxed{80235}",
    r"5005 49o3 3812 2710 1618 \boxed{80235}",
    r"\boxed{80235}",
    "",
])
def test_step_checker_rejects_malformed(completion):
    assert not toy.step_check("12345+67890", completion)


def test_step_checker_rejects_bad_question():
    assert not toy.step_check("what is 2+2?", r"2204 \boxed{4}")
    assert common.STEP_CHECKERS["addition"] is toy.step_check


def test_load_problems_addition():
    rows, stats = common.load_problems("addition", split="train", levels=[5, 6], synthetic_size=100)
    assert stats["kept"] == 100 and {r["level"] for r in rows} == {5, 6}
    for r in rows:
        a, b = map(int, r["question"].split("+"))
        assert len(str(a)) == len(str(b)) == r["level"]
        assert r["answer"] == str(a + b) and r["subject"] == "Addition"
        assert common.verify_answer(r["solution"], r["answer"]) == 1.0  # exact-string path, no math-verify
    own, _ = common.load_problems("addition_own", split="train", levels=[5, 6], synthetic_size=100)
    assert [r["solution"] for r in own] == [true_chain(*map(int, r["question"].split("+"))) for r in rows]
    again, _ = common.load_problems("addition", split="train", levels=[5, 6], synthetic_size=100)
    test, _ = common.load_problems("addition", split="test", levels=[5, 6], synthetic_size=100)
    assert again == rows
    assert not {r["question"] for r in rows} & {r["question"] for r in test}  # held out
    everything, _ = common.load_problems("addition", synthetic_size=600)
    assert sorted({r["level"] for r in everything}) == [1, 2, 3, 4, 5, 6]
    runs.check_dataset_name("addition")
    runs.check_model_name("toy")


def terse_is_right(question: str, solution: str) -> bool:
    """The terse expert style read back: left-to-right column sums whose place values add up to a + b."""
    a, b = map(int, question.split("+"))
    *sums, boxed = solution.split(" ")
    n = max(len(str(a)), len(str(b)))
    digits = lambda x: [x // 10 ** (n - 1 - i) % 10 for i in range(n)]  # noqa: E731 (left to right)
    return (len(sums) == n and [int(s) for s in sums] == [x + y for x, y in zip(digits(a), digits(b))]
            and sum(int(s) * 10 ** (n - 1 - i) for i, s in enumerate(sums)) == a + b and boxed == f"\\boxed{{{a + b}}}")


def columns_is_right(question: str, solution: str) -> bool:
    """The columns style read back: right to left `x+y>tt`, tt = x + y + the previous tens digit, the answer made
    of the last tens digit and every units digit."""
    a, b = map(int, question.split("+"))
    *steps, boxed = solution.split(" ")
    carry, units = 0, ""
    for i, step in enumerate(steps):
        x, y, tt = int(step[0]), int(step[2]), int(step[4:])
        if step[1] != "+" or step[3] != ">" or len(step) != 6 or (x, y) != (a // 10**i % 10, b // 10**i % 10):
            return False
        if tt != x + y + carry:
            return False
        carry, units = tt // 10, str(tt % 10) + units
    return len(steps) == max(len(str(a)), len(str(b))) and int(str(carry) + units) == a + b == int(boxed[7:-1])


@pytest.mark.parametrize("a, b, terse, columns", [
    (12345, 67890, "7 9 11 13 5 \\boxed{80235}", "5+0>05 4+9>13 3+8>12 2+7>10 1+6>08 \\boxed{80235}"),
    (999, 1, "9 9 10 \\boxed{1000}", "9+1>10 9+0>10 9+0>10 \\boxed{1000}"),
    (5, 7, "12 \\boxed{12}", "5+7>12 \\boxed{12}"),
])
def test_expert_styles_by_hand(a, b, terse, columns):
    assert toy.addition_terse(a, b) == terse and toy.addition_columns(a, b) == columns


@pytest.mark.parametrize("dataset, is_right", [("addition", terse_is_right), ("addition_columns", columns_is_right)])
def test_every_expert_solution_verifies_and_its_arithmetic_is_right(dataset, is_right):
    rows, _ = common.load_problems(dataset, split="train", synthetic_size=600)
    assert sorted({r["level"] for r in rows}) == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert is_right(r["question"], r["solution"]), r
        assert common.verify_answer(r["solution"], r["answer"]) == 1.0
        assert not toy.step_check(r["question"], r["solution"])  # not the model's own format
        assert len(toy.toy_tokenizer()(r["solution"])["input_ids"]) + 1 <= 64  # fits the lab's --max_new_tokens
    plain, _ = common.load_problems("addition", split="train", synthetic_size=600)
    assert [r["question"] for r in rows] == [r["question"] for r in plain]  # the same questions in every style


def test_correct_steps_counts_true_steps_by_position():
    assert toy.correct_steps("47+38", true_chain(47, 38)) == 2
    assert toy.correct_steps("47+38", "7805 4307 \\boxed{75}") == 1  # the carry is lost in step 2
    assert toy.correct_steps("47+38", "7804 4318 \\boxed{84}") == 1  # step 1 wrong, step 2 right
    assert toy.correct_steps("12345+67890", "\\boxed{80235}") == 0
    assert toy.correct_steps("47+38", "7 11 \\boxed{85}") == 0  # the terse expert has no such steps


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("question, answer, solve, explain", [
    ("12345+67890", "80235", "Q12345+67890|???????>", "Q12345+67890|0080235>"),
    ("5+7", "12", "Q5+7|???????>", "Q5+7|0000012>"),
    ("999999+999999", "1999998", "Q999999+999999|???????>", "Q999999+999999|1999998>"),
])
def test_toy_prompts_layout(question, answer, solve, explain):
    tok = toy.toy_tokenizer()
    assert common.question_prompt(tok, question) == solve
    assert common.explanation_prompt(tok, question, answer) == explain
    assert len(solve) == len(explain)  # the shared answer slot
    assert answer not in common.question_prompt(tok, question).split("|")[1]


def test_toy_tokenizer_is_character_level(tmp_path):
    tok = toy.toy_tokenizer()
    text = r"Q47+38|0000085>7805 4318 \boxed{85}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    tok.save_pretrained(tmp_path)
    again = engine.load_tokenizer(str(tmp_path))  # as the training scripts load it
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert again.decode(ids + [again.eos_token_id], skip_special_tokens=True) == text
    assert common.explanation_prompt(again, "47+38", "85") == "Q47+38|0000085>"


# ---------------------------------------------------------------- the toy model


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


def test_toy_model_build_is_deterministic_and_loads(tmp_path):
    kw = dict(steps=20, batch_size=32, verbose=False)
    a = toy.build_toy_model(str(tmp_path / "a"), seed=0, eval_size=8, **kw)
    b = toy.build_toy_model(str(tmp_path / "b"), seed=0, eval_size=0, **kw)
    c = toy.build_toy_model(str(tmp_path / "c"), seed=1, eval_size=0, **kw)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    with open(os.path.join(a, "toy_build.json")) as f:
        info = json.load(f)
    assert info["steps"] == 20 and all(0.0 <= info[k] <= 1.0 for k in ("easy_solve", "hard_solve", "hard_explain"))
    assert toy.build_toy_model(a, seed=0, **kw) == a  # cached: returns at once

    model = engine.load_model(a, torch.device("cpu"))
    tok = engine.load_tokenizer(a)
    # beside a qwen2 config.json, transformers would load Qwen's tokenizer class, which drops the spaces
    text = r"7805 4318 \boxed{85}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    out = engine.sample(model, tok, [common.question_prompt(tok, "12+34")], max_new_tokens=8, temperature=1.0)
    assert len(out["completion_ids"][0]) <= 8


def test_concurrent_builders_share_one_model(tmp_path):
    """Two processes asking for the same directory: one builds under the lock, the other waits and reuses."""
    path = str(tmp_path / "toy")
    code = ("import toy, sys; p = toy.build_toy_model(sys.argv[1], steps=3, batch_size=8, eval_size=0, "
            "verbose=False); print(p)")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, path], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == [path, path]
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


# ---------------------------------------------------------------- expo_grpo.py on the toy: --explanation_check, --sft_anchor


def test_explanation_check_steps_needs_a_step_checker():
    from expo_grpo import Args, validate_args

    with pytest.raises(SystemExit, match="dataset 'synthetic' has no step checker"):
        validate_args(Args(model="tiny", dataset="synthetic", explanation_check="steps"), world_size=1)
    with pytest.raises(SystemExit, match="need --sft_source explanation"):
        validate_args(Args(model="toy", dataset="addition", sft_source="none", sft_anchor=True), world_size=1)
    validate_args(Args(model="toy", dataset="addition", explanation_check="steps", sft_anchor=True), world_size=1)


def test_two_rank_toy_run_with_step_check_and_anchor(tmp_path):
    """A short model never explains right, so the explanations come from a file: the true chain of thought for
    even rows, and for odd rows one with a wrong first step that still copies the right answer (an answer check
    would keep it). Only the even rows may be trained on, under both prompts."""
    model = toy.build_toy_model(str(tmp_path / "toy"), steps=20, batch_size=32, eval_size=0, verbose=False)
    rows, _ = common.load_problems("addition_own", levels=[5, 6], seed=0)  # the model's own chains of thought
    path = tmp_path / "explanations.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            steps = r["solution"].split(" ")
            if i % 2:
                steps[0] = steps[0][:3] + str((int(steps[0][3]) + 1) % 10)
            f.write(json.dumps({"question": r["question"], "explanation": " ".join(steps)}) + "\n")
    out = tmp_path / "run"
    run_torchrun("expo_grpo.py", [
        "--model", model, "--dataset", "addition", "--levels", "5-6", "--explanations", str(path),
        "--explanation_check", "steps", "--sft_anchor", "--batch_size", "4", "--num_generations", "4",
        "--temperature", "1.0", "--beta", "0", "--lr", "2e-3", "--sft_coef", "1", "--max_new_tokens", "48",
        "--max_steps", "2", "--gradient_checkpointing", "false", "--save_every", "0", "--probe_every", "0",
        "--eval_every", "2", "--eval_levels", "5-6", "--eval_limit", "8", "--eval_num_samples", "1", "--eval_temperature", "0",
        "--output_dir", str(out)])
    with open(out / "metrics.jsonl") as f:
        metrics = [json.loads(line) for line in f]
    assert [m["step"] for m in metrics] == [1, 2]
    for step, m in enumerate(metrics, start=1):
        assert all(v == v and abs(v) != float("inf") for v in m.values() if isinstance(v, float)), m
        right = sum(rows.index(r) % 2 == 0 for r in common.global_batch(rows, step, 4, 0)) / 4
        assert 0 < right < 1 and m["expl_verified"] == m["sft_used"] == right
        assert m["sft_loss"] > 0 and m["grad_norm"] > 0
    assert {k for k in metrics[1] if k.startswith("eval/level")} == {"eval/level5/pass@1", "eval/level6/pass@1"}
    assert metrics[1]["eval/num_problems"] == 8


def test_a_rank_other_than_0_builds_a_whole_model(tmp_path):
    """Whichever rank takes the build lock writes the model: under torch.distributed transformers' save_pretrained
    writes only on rank 0, which once left a model directory with a tokenizer and no weights."""
    script = tmp_path / "build.py"
    script.write_text("import sys\nimport engine, toy\ninfo = engine.init_distributed()\n"
                      "if info.rank == 1:\n    toy.build_tiny_model(sys.argv[1])\nengine.close_distributed()\n")
    run_torchrun(str(script), [str(tmp_path / "tiny")], nproc=2, timeout=120)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "tiny"))


def test_two_rank_offline_expo_on_the_toy_reuses_cached_explanations(tmp_path):
    model = toy.build_toy_model(str(tmp_path / "toy"), steps=20, batch_size=32, eval_size=0, verbose=False)
    args = ["--model", model, "--dataset", "addition", "--levels", "5-6", "--batch_size", "4", "--num_generations", "4",
            "--temperature", "1.0", "--beta", "0", "--lr", "2e-3", "--max_new_tokens", "48", "--max_steps", "2",
            "--no_gradient_checkpointing", "--save_every", "0", "--probe_every", "0"]
    env = {"EXPO_CACHE": str(tmp_path / "cache")}
    first = run_torchrun("expo_grpo.py", args + ["--output_dir", str(tmp_path / "a")], env=env).stdout
    second = run_torchrun("expo_grpo.py", args + ["--output_dir", str(tmp_path / "b"), "--seed", "0"], env=env).stdout
    assert "offline explanations for 8 questions: 0 cached, 8 sampled now" in first
    assert "offline explanations for 8 questions: 8 cached, 0 sampled now" in second
    for run in ("a", "b"):
        with open(tmp_path / run / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert [r["step"] for r in rows] == [1, 2] and "expl_verified" in rows[0]
        assert all(v == v and abs(v) != float("inf") for r in rows for v in r.values() if isinstance(v, float))


def test_the_shipped_base_gives_its_recorded_rates_and_is_what_the_quick_lab_uses():
    """examples/toy_base is the quick lab's base, shipped so that the first command trains none: it is the build its
    toy_build.json names (seed 0, 600 steps, the defaults), and its files give the rates recorded at build time
    (greedy solves, and explanations drawn with fixed per-question seeds: the same numbers on any machine)."""
    from transformers import AutoModelForCausalLM

    with open(os.path.join(toy.SHIPPED_BASE, "toy_build.json")) as f:
        record = json.load(f)
    assert {k: record[k] for k in ("seed", "steps", "batch_size", "lr", "threads")} == {
        "seed": 0, "steps": 600, "batch_size": 128, "lr": 3e-3, "threads": 1}
    assert toy.build_toy_model() == toy.SHIPPED_BASE  # no build: the defaults are the shipped build
    model = AutoModelForCausalLM.from_pretrained(toy.SHIPPED_BASE).eval()
    rates = toy.toy_rates(model, engine.load_tokenizer(toy.SHIPPED_BASE), n=200)
    assert rates == {k: record[k] for k in ("easy_solve", "hard_solve", "hard_explain")}
    assert record["easy_solve"] >= 0.9 and record["hard_solve"] <= 0.05 and record["hard_explain"] >= 0.8
