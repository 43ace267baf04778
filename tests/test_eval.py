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
