"""eval.py: pass@k against brute force, evaluate() against hand-computed figures, the 2-rank command line,
its errors before loading, and the plot command."""

import itertools
import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT, run_torchrun

import common
import toy
import eval as ev


def test_pass_at_k_matches_brute_force_over_all_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                expected = sum(any(s) for s in subsets) / len(subsets)
                assert ev.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    # large n: the product form stays finite where the binomials would overflow a float
    assert ev.pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert math.isfinite(ev.pass_at_k(5000, 3, 7))
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


def test_default_ks():
    assert ev.default_ks(1) == [1]
    assert ev.default_ks(4) == [1, 2, 4]
    assert ev.default_ks(6) == [1, 2, 4, 6]
    assert ev.default_ks(16) == [1, 2, 4, 8, 16]


def test_evaluate_matches_hand_computed_pass_at_k(tiny, monkeypatch):
    """Problem p (level p+1) gets its first p of 4 samples marked correct: c = 0, 1, 2, 3, 4."""
    model, tokenizer = tiny
    rows = toy.synthetic_problems(5, seed=2)  # levels 1..5 in order
    calls = []

    def stub_check(completion, gold, *args, **kwargs):  # evaluate verifies problem-major, in sample order
        problem, index = divmod(len(calls), 4)
        calls.append(gold)
        assert gold == rows[problem]["answer"]
        return (1.0 if index < problem else 0.0), None

    monkeypatch.setattr(common, "check_answer", stub_check)
    summary, samples = ev.evaluate(model, tokenizer, rows, n=4, max_new_tokens=4, micro_batch_size=8)
    assert summary["num_problems"] == 5 and summary["n"] == 4 and len(samples) == 20
    assert summary["accuracy"] == pytest.approx(10 / 20)
    assert summary["pass@1"] == pytest.approx(0.5)
    # pass@2 per problem: 0, 1 - 3/6, 1 - 1/6, 1, 1
    assert summary["pass@2"] == pytest.approx((0 + 0.5 + 5 / 6 + 1 + 1) / 5)
    assert summary["pass@4"] == pytest.approx(4 / 5)
    assert list(summary["by_level"]) == ["1", "2", "3", "4", "5"]
    assert [summary["by_level"][str(L)]["pass@4"] for L in range(1, 6)] == [0, 1, 1, 1, 1]
    assert summary["by_level"]["2"]["pass@2"] == pytest.approx(0.5)
    assert summary["by_subject"]["Arithmetic"]["count"] == 5
    assert [(s["problem_index"], s["sample_index"]) for s in samples] == [(p, i) for p in range(5) for i in range(4)]
    assert sum(s["correct"] for s in samples) == 10
    assert ev.scalar_metrics(summary)["eval/level3/pass@2"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        ev.evaluate(model, tokenizer, rows, n=2, ks=[4])


def test_no_flag_is_taken_by_torchrun():
    """torchrun reads any flag that abbreviates one of its own, even after the script name."""
    from torch.distributed.run import get_args_parser

    def norm(flag):  # --max-restarts and --max_restarts are one flag
        return flag.lstrip("-").replace("-", "_")

    torchrun_flags = [norm(s) for a in get_args_parser()._actions for s in a.option_strings if s.startswith("--")]
    for name in ev.Args.__dataclass_fields__:
        assert not [t for t in torchrun_flags if t.startswith(name)], name


def test_torchrun_two_ranks_table_and_samples(tmp_path, tiny_path):
    limit, n = 9, 2  # 9 problems on 2 ranks: uneven shards of 5 and 4
    out = tmp_path / "eval"
    proc = run_torchrun("eval.py", ["--model", "tiny", "--dataset", "synthetic", "--limit", str(limit),
                                    "--num_samples", str(n), "--max_new_tokens", "16", "--output_dir", str(out)])
    assert "| Level | Count | pass@1 | pass@2 |" in proc.stdout and "| All | 9 |" in proc.stdout
    table = json.loads((out / "eval.json").read_text())
    rows, _ = common.load_problems("synthetic", split="test", limit=limit)
    assert set(table["by_level"]) == {str(r["level"]) for r in rows}
    assert sum(g["count"] for g in table["by_level"].values()) == table["num_problems"] == limit
    assert sum(g["count"] for g in table["by_subject"].values()) == limit
    assert table["n"] == n and table["ks"] == [1, 2] and table["accuracy"] == 0.0  # random weights
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == limit * n
    assert {(s["question"], s["sample_index"]) for s in samples} == {(r["question"], i) for r in rows for i in range(n)}
    assert {"gold", "completion", "extracted", "correct", "level", "subject"} <= set(samples[0])


@pytest.mark.parametrize("flags, message", [
    (["--num_samples", "2", "--ks", "1", "4"], "k <= n"),
    (["--model", "/nonexistent/run/hf"], "neither a local directory"),
    (["--dataset", "/nonexistent/test.jsonl"], "readable"),
])
def test_bad_flags_fail_with_one_line_before_loading(flags, message):
    proc = subprocess.run([sys.executable, "eval.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stdout + proc.stderr


# ---------------------------------------------------------------- the output folder is the user's data (issue 26)

QUICK = ["--model", "tiny", "--dataset", "synthetic", "--limit", "4", "--num_samples", "1", "--max_new_tokens", "4"]


def eval_cli(*flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval.py", *map(str, flags)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def refused(proc) -> str:
    """The one line of a command refused before any model loaded (eval.py prints `eval MODEL on ...` once loading)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.stdout, proc.stderr)
    assert lines[0].startswith("eval.py: error: ") and "eval tiny on" not in proc.stdout, (proc.stdout, proc.stderr)
    return lines[0]


def folder_state(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def test_a_training_runs_folder_is_refused_even_with_overwrite(tmp_path):
    """`--output_dir runs/demo` replaced the run's samples.jsonl (10 lines -> 4), rc 0: now refused, with the
    flag too (eval.py never deletes a run's checkpoints), and the line names a folder that works."""
    run = tmp_path / "demo"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "trainer_state.pt").write_bytes(b"state")
    (run / "run_config.json").write_text(json.dumps({"script": "expo_grpo.py"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(1, 3)))
    (run / "samples.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in range(10)))
    before = folder_state(run)
    for extra in ([], ["--overwrite_output_dir"]):
        line = refused(eval_cli(*QUICK, "--output_dir", run, *extra))
        assert "holds a training run" in line and f"--output_dir {run}/eval" in line, line
        assert "--overwrite_output_dir" in line, line  # says that the flag does not change this
        assert folder_state(run) == before


def test_a_second_evaluation_is_refused_unless_overwrite(tmp_path):
    """Rerunning with other --levels replaced eval_results/... without a word: refused, the first evaluation
    untouched; --overwrite_output_dir replaces eval.json and samples.jsonl and nothing else."""
    out = tmp_path / "eval"
    first = eval_cli(*QUICK, "--output_dir", out)
    assert first.returncode == 0, first.stderr
    (out / "notes.txt").write_text("mine")
    before = folder_state(out)
    line = refused(eval_cli(*QUICK, "--levels", "1-2", "--output_dir", out))
    assert "holds another evaluation" in line and "--overwrite_output_dir" in line, line
    assert folder_state(out) == before
    again = eval_cli(*QUICK, "--levels", "1-2", "--output_dir", out, "--overwrite_output_dir")
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "eval.json").read_text())["evaluated"]["levels"] == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "notes.txt", "samples.jsonl"]
    assert (out / "notes.txt").read_text() == "mine"


def test_eval_json_records_what_was_evaluated(tmp_path, tiny_path):
    """A trainer exports OUTPUT_DIR/hf at each checkpoint save: --model OUTPUT_DIR/hf records the run, its script
    and the step of its newest checkpoint; OUTPUT_DIR/eval is a folder of its own, so it is taken."""
    import shutil

    run = tmp_path / "run"
    for name in ("checkpoint-1", "checkpoint-3", "checkpoint-4.tmp"):  # a save in progress is no checkpoint
        (run / name).mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"script": "expo_dpo.py", "args": {}}))
    shutil.copytree(tiny_path, run / "hf")
    model = str(run / "hf") + "/"  # as given, a trailing slash included
    proc = eval_cli(*QUICK[2:], "--model", model, "--levels", "1-3", "--temperature", "0.5", "--seed", "7",
                    "--output_dir", run / "eval")
    assert proc.returncode == 0, proc.stderr
    table = json.loads((run / "eval" / "eval.json").read_text())
    assert table["evaluated"] == {
        "model": model, "model_path": str(run / "hf"),
        "run": {"output_dir": str(run), "script": "expo_dpo.py", "checkpoint": "checkpoint-3", "step": 3},
        "dataset": "synthetic", "dataset_config": None, "split": "test", "levels": [1, 2, 3], "limit": 4,
        "problems": table["num_problems"], "num_samples": 1, "temperature": 0.5, "top_p": 1.0,
        "max_new_tokens": 4, "seed": 7}
    assert table["num_problems"] <= 4 and table["args"]["model"] == model  # the keys that were there stay
    # a built-in model: its folder, and no run
    proc = eval_cli(*QUICK, "--output_dir", tmp_path / "tiny")
    assert proc.returncode == 0, proc.stderr
    evaluated = json.loads((tmp_path / "tiny" / "eval.json").read_text())["evaluated"]
    assert evaluated["model"] == "tiny" and evaluated["model_path"] == tiny_path and evaluated["run"] is None
    assert evaluated["levels"] == "all"


@pytest.mark.parametrize("levels", ["6-5", "x"])
def test_levels_that_mean_nothing_are_one_line(tmp_path, levels):
    """`--levels 6-5` kept every level (an empty list read as "all"), `--levels x` ended in "invalid literal for
    int()": one line naming what was given and the forms accepted (common.parse_levels says which)."""
    line = refused(eval_cli(*QUICK, "--levels", levels, "--output_dir", tmp_path / "eval"))
    assert levels in line and ("5-6" in line if levels == "6-5" else "3-5" in line), line
    assert not (tmp_path / "eval").exists()


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    for name, slope in [("grpo", 0.01), ("expo", 0.03)]:
        run = tmp_path / name
        run.mkdir()
        lines = []
        for step in range(1, 11):
            row = {"step": step, "reward": slope * step, "kl": 0.001 * step, "nll_explanation": 2 - 0.1 * step, "lr": 1e-6}
            if step % 5 == 0:
                row.update({"eval/accuracy": slope * step, "eval/pass@4": 2 * slope * step})
            lines.append(json.dumps(row) + "\n")
        (run / "metrics.jsonl").write_text("".join(lines))
    png = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "eval.py", "plot", str(tmp_path / "grpo"), str(tmp_path / "expo"),
                           "--out", str(png)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "eval/accuracy, eval/pass@4, reward, kl, nll_explanation" in proc.stdout  # `lr` is not a known curve
    runs = [str(tmp_path / "grpo"), str(tmp_path / "expo")]
    assert ev.plot(runs, str(tmp_path / "pass.png"), keys=[r"eval/pass@\d+"]) == ["eval/pass@4"]
    missing = subprocess.run([sys.executable, "eval.py", "plot", str(tmp_path / "nope"), "--out", str(png)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "metrics.jsonl" in missing.stderr and "Traceback" not in missing.stderr
