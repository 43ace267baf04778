"""examples/toy_lab.py: the claims computed from fixed run folders with verdicts worked out by hand, and the lab
end to end on a tiny budget (the quick run and every part)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
import toy_lab  # noqa: E402


def write_run(d, name, rows, samples=None):
    os.makedirs(d / name, exist_ok=True)
    (d / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if samples is not None:
        (d / name / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def write_eval(d, name, accuracy_by_level):
    os.makedirs(d / "eval" / name, exist_ok=True)
    (d / "eval" / name / "eval.json").write_text(json.dumps(
        {"by_level": {lv: {"count": 100, "accuracy": a} for lv, a in accuracy_by_level.items()}}))


def fake_cell(out, b, seed, final, probe, dpo, levels, hard_solve=0.0):
    """final: arm -> final hard accuracy; probe: the probe figures; dpo: arm -> (loss first, loss last, logps chosen,
    logps rejected); levels: eval name -> accuracy by level."""
    d = out / f"b{b}"
    os.makedirs(d, exist_ok=True)
    (d / "base.json").write_text(json.dumps({"path": "x", "hard_solve": hard_solve}))
    for arm, acc in final.items():
        rows = [{"step": s, "eval/accuracy": 0.0} for s in (1, 2)] + [{"step": 3, "eval/accuracy": acc}]
        if arm in dpo:
            first, last, chosen, rejected = dpo[arm]
            rows = [{**r, "loss": first, "logps_chosen": chosen, "logps_rejected": rejected} for r in rows[:1]] + \
                   [{**r, "loss": last, "logps_chosen": 0.0, "logps_rejected": 0.0} for r in rows[1:]]
        write_run(d, f"{arm}_r{seed}", rows)
    for style, nll in probe["nll_expert"].items():
        write_run(d, f"probe_{style}_r{seed}", [{"step": 1, "nll_expert": nll, **probe["common"]}],
                  probe["samples"] if style == "terse" else None)
    for name, acc in levels.items():
        write_eval(d, name if name == "base" else f"{name}_r{seed}", acc)


LEVELS = [str(lv) for lv in range(1, 7)]


def test_claims_from_fixed_run_folders_match_verdicts_worked_out_by_hand(tmp_path):
    # cell b0_r0: everything as the paper says; cell b1_r0: the orderings reversed
    probe_good = {"nll_expert": {"terse": 4.0, "columns": 3.0, "own": 0.1},
                  "common": {"nll_explanation": 0.5, "answer_logp_after_explanation": -0.1, "answer_logp_after_cot": -9.0},
                  # explanation 2 correct steps vs CoT 1, then 0 vs 0 (tie), then 2 vs 2 (tie): win rate (1 + .5 + .5) / 3
                  "samples": [{"question": "47+38", "explanation": "7805 4318 \\boxed{85}", "completion": "7805 4307 \\boxed{75}"},
                              {"question": "47+38", "explanation": "x", "completion": "y"},
                              {"question": "47+38", "explanation": "7805 4318 \\boxed{85}", "completion": "7805 4318 \\boxed{85}"}]}
    probe_bad = {"nll_expert": {"terse": 0.2, "columns": 0.6, "own": 0.1},
                 "common": {"nll_explanation": 0.5, "answer_logp_after_explanation": -5.0, "answer_logp_after_cot": -1.0},
                 "samples": [{"question": "47+38", "explanation": "7805 4307 \\boxed{75}", "completion": "7805 4318 \\boxed{85}"}]}
    good_final = {"grpo": 0.0, "expo": 0.8, "expert_terse": 0.3, "expert_columns": 0.5, "own_format": 0.9,
                  "expo_coef0.5": 0.0, "grpo_all": 0.1, "expo_all": 0.7, "expert_all": 0.2,
                  "dpo_expl_offline": 0.4, "dpo_expl_online": 0.6, "dpo_expert_offline": 0.02, "dpo_expert_online": 0.1}
    bad_final = {**{k: 0.5 for k in good_final}, "grpo": 0.6, "expo": 0.1, "expo_coef0.5": 0.3,
                 "dpo_expl_offline": 0.2, "dpo_expert_offline": 0.4}
    good_levels = {"base": dict(zip(LEVELS, [1.0, 0.95, 0.9, 0.0, 0.0, 0.0])),
                   "grpo_all": dict(zip(LEVELS, [1.0, 0.95, 0.9, 0.0, 0.1, 0.0])),
                   "expo_all": dict(zip(LEVELS, [0.97, 0.95, 0.9, 0.2, 0.7, 0.6])),  # worst: -3 points at 1 digit
                   "expert_all": dict(zip(LEVELS, [0.9] * 6))}
    bad_levels = {**good_levels, "expo_all": dict(zip(LEVELS, [0.5, 0.95, 0.9, 0.2, 0.7, 0.6]))}  # -50 at 1 digit
    fake_cell(tmp_path, 0, 0, good_final, probe_good, {"dpo_expert_offline": (0.693, 0.01, -60.0, -20.0)}, good_levels)
    fake_cell(tmp_path, 1, 0, bad_final, probe_bad, {"dpo_expert_offline": (0.693, 0.5, -10.0, -20.0)}, bad_levels)
    cells = {c: toy_lab.cell_figures(str(tmp_path), b, 0) for c, b in (("b0_r0", 0), ("b1_r0", 1))}
    by_claim = {c["claim"]: c for c in toy_lab.claims(cells)}
    assert len(by_claim) == len(toy_lab.CLAIMS)  # every claim measured
    expected = {  # claim (start) -> (value in b0, value in b1, cells held)
        "A self-explanation is more likely under the policy than the expert's solution": (3.5, -0.3, 1),
        "... and than a complete expert": (2.5, 0.1, 2),
        "A self-explanation has more correct steps": (2 / 3 - 0.5, -0.5, 1),
        "A self-explanation makes a* more likely": (8.9, -4.0, 1),
        "ExP-GRPO beats GRPO + SFT on the expert's solution": (0.5, -0.4, 1),
        "ExP-GRPO beats GRPO + SFT on a complete": (0.3, -0.4, 1),
        "GRPO + expert SFT beats plain GRPO": (0.3, -0.1, 1),
        "ExP-GRPO beats plain GRPO": (0.8, -0.5, 1),
        "Trained on every level": (-3.0, -50.0, 1),
        "The largest gain over GRPO is at the hardest level": (60.0, 60.0, 2),  # +60 at 6 digits, at most 0 at 1-3
        "ExP-DPO with the self-explanation chosen beats the expert chosen, offline": (0.38, -0.2, 1),
        "... and online": (0.5, 0.0, 1),
        "Online ExP-DPO beats offline": (0.2, 0.3, 2),
        "With the expert chosen the DPO loss falls": (0.01, 0.5, 1),
        "SFT coefficient 0.04 beats 0.5": (0.8, -0.2, 1),
        "SFT coefficient 0.5 is worse than plain GRPO": (0.0, 0.3, 1),
    }
    for start, (v0, v1, held) in expected.items():
        (c,) = [c for name, c in by_claim.items() if name.startswith(start)]
        assert (c["toy_min"], c["toy_max"]) == pytest.approx((min(v0, v1), max(v0, v1))), start
        assert c["toy_median"] == pytest.approx((v0 + v1) / 2), start
        assert (c["cells_held"], c["cells"]) == (held, 2), start
        assert c["verdict"] == f"holds in {held} of 2 cells", start
    # a cell without a run has no figure for its claims: they count over fewer cells, or vanish
    only = toy_lab.claims({"b0_r0": {k: v for k, v in cells["b0_r0"].items() if not k.startswith("dpo_")}})
    assert not any("DPO" in c["claim"] for c in only) and all(c["cells"] == 1 for c in only)
    none_hold = toy_lab.claims({"b1_r0": cells["b1_r0"]})
    assert {c["verdict"] for c in none_hold if c["cells_held"] == 0} == {"does not hold"}


def test_the_quick_lab_runs_to_its_last_line_and_writes_claims(tmp_path):
    """`bash examples/toy_lab.sh` on a tiny budget (a base of 20 steps, 2 RL steps per arm): the central comparison
    and the claims of its one cell."""
    env = {**os.environ, "EXPO_CACHE": str(tmp_path / "cache"), "OUT": str(tmp_path / "lab"), "BUILD_STEPS": "20",
           "STEPS": "2", "EVAL_EVERY": "1", "EVAL_LIMIT": "6", "FINAL_LIMIT": "12"}
    proc = subprocess.run(["bash", "examples/toy_lab.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| cell | grpo | expo | expert_terse |" in proc.stdout
    assert "| digits |" not in proc.stdout  # tables by level are the full lab's
    claims = json.load(open(tmp_path / "lab" / "claims.json"))
    assert {c["claim"][:20] for c in claims} >= {"ExP-GRPO beats plain", "A self-explanation m"}
    assert all(set(c) == {"claim", "where", "paper", "measure", "toy_median", "toy_min", "toy_max", "cells_held",
                          "cells", "verdict"} for c in claims)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("total ")
    # the quick run's GRPO arms sample half the recipe's group (what the scripts ran with, from their run folders)
    assert {json.load(open(tmp_path / "lab" / "b0" / f"{a}_r0" / "run_config.json"))["args"]["num_generations"]
            for a in ("grpo", "expo", "expert_terse")} == {4}


def test_generations_knob_sets_g_of_the_grpo_arms_only(monkeypatch):
    """G is the recipe's 8 in every part but quick (4); GENERATIONS overrides both; DPO and the probes keep theirs.
    Read as the scripts read their flags (the last of a repeated flag wins)."""
    import argparse

    def g(mode, arm):
        parser = argparse.ArgumentParser()
        parser.add_argument("--num_generations", type=int)
        return parser.parse_known_args(toy_lab.run_command(arm, "base", 0, "out", toy_lab.knobs(mode))[1:])[0].num_generations

    assert [g("quick", a) for a in ("grpo", "expo", "expert_terse", "probe_terse")] == [4, 4, 4, 2]
    assert [g("grpo", "expo"), g("full", "expo_all"), g("full", "dpo_expl_online")] == [8, 8, 4]
    monkeypatch.setenv("GENERATIONS", "8")
    assert g("quick", "expo") == 8


@pytest.fixture(scope="module")
def lab_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lab_cache"))  # one 20-step base for every part


@pytest.mark.parametrize("part", ["grpo", "coef", "table3", "dpo", "probe"])
def test_each_part_runs_alone_on_a_tiny_budget(tmp_path, part, lab_cache):
    env = {**os.environ, "EXPO_CACHE": lab_cache, "OUT": str(tmp_path / "lab"), "BUILD_STEPS": "20",
           "BUILD_SEEDS": "0", "RL_SEEDS": "0", "STEPS": "1", "EVAL_EVERY": "1", "EVAL_LIMIT": "4", "FINAL_LIMIT": "6"}
    proc = subprocess.run([sys.executable, "examples/toy_lab.py", part], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {a for a in toy_lab.PARTS[part]}
    assert all(os.path.exists(tmp_path / "lab" / "b0" / f"{a}_r0" / "metrics.jsonl") for a in runs)
    assert os.path.exists(tmp_path / "lab" / "claims.json")


# ----------------------------------------------------------------------------------------------------
# calibrate: the criterion and the choice from fixed run folders (no training: the runs are there, finished)
# ----------------------------------------------------------------------------------------------------

BASE = dict(zip(LEVELS, [1.0, 0.94, 0.89, 0.0, 0.0, 0.0]))  # kept levels: 1, 2, 3
RISING, FALLING = [0.5] * 10 + [0.0] * 10 + [0.6] * 20, [0.5] * 20 + [0.45] * 20  # 40 steps: first 10, last 20
OUTCOMES = {  # on one base: (trained on 5-6, trained on 1-6, the 1-6 run's rewards)
    "pass": ({**BASE, "1": 0.98, "2": 0.89, "3": 0.84}, {**BASE, "4": 0.3}, RISING),  # 2 and 3: exactly 5 points down
    "a": ({**BASE, "2": 0.88}, BASE, RISING),  # the 5-6 run forgets 2 digits by 6 points
    "b": (BASE, {**BASE, "1": 0.5}, RISING),  # the 1-6 run forgets 1 digit
    "reward": (BASE, BASE, FALLING),  # the 1-6 run keeps the levels but its reward does not rise
}


def write_candidate(out, b, lr, beta, outcome):
    hard, all_, rewards = OUTCOMES[outcome]
    write_eval(out / f"b{b}", "base", BASE)
    d = out / "calibration" / f"b{b}" / f"lr{lr:g}_beta{beta:g}"
    for part, levels, rows in (("hard", hard, [0.0] * 40), ("all", all_, rewards)):
        write_run(d, part, [{"step": s + 1, "reward": r} for s, r in enumerate(rows)])
        os.makedirs(d / part / "eval", exist_ok=True)  # a run's table is in its folder
        (d / part / "eval" / "eval.json").write_text(json.dumps({"by_level": {lv: {"accuracy": a}
                                                                              for lv, a in levels.items()}}))


def test_calibration_criterion_read_from_run_folders(tmp_path):
    for b, outcome in enumerate(OUTCOMES):
        write_candidate(tmp_path, b, 1e-3, 0.04, outcome)
    f = {o: toy_lab.candidate_figures(str(tmp_path), b, 1e-3, 0.04) for b, o in enumerate(OUTCOMES)}
    assert f["pass"]["kept"] == ["1", "2", "3"] and f["pass"]["hard"] == [0.98, 0.89, 0.84]
    assert f["pass"]["all"] == [1.0, 0.94, 0.89] and f["pass"]["base"] == [1.0, 0.94, 0.89]
    assert (f["pass"]["reward_first10"], f["pass"]["reward_last20"]) == pytest.approx((0.5, 0.6))
    assert (f["reward"]["reward_first10"], f["reward"]["reward_last20"]) == pytest.approx((0.5, 0.45))
    assert {o: (x["a"], x["b"], x["pass"]) for o, x in f.items()} == {
        "pass": (True, True, True), "a": (False, True, False), "b": (True, False, False), "reward": (True, False, False)}
    assert toy_lab.candidate_figures(str(tmp_path), 0, 5e-4, 0.04) is None  # not run
    # a base solving no level at >= 80 %: nothing to keep, only the reward decides
    lone = toy_lab.criterion(dict.fromkeys(LEVELS, 0.5), dict.fromkeys(LEVELS, 0.0), dict.fromkeys(LEVELS, 0.0), FALLING)
    assert (lone["kept"], lone["a"], lone["b"]) == ([], True, False)


def calibrate_on(tmp_path, monkeypatch, grid, mode="calibrate"):
    """grid: (lr, beta) -> outcome on each base in turn (fewer than three: the scan must not reach the others).
    Runs the part on those folders, the base builds and the machine line stubbed; returns (exit code, calibration.json)."""
    for (lr, beta), outcomes in grid.items():
        for b, outcome in enumerate(outcomes):
            write_candidate(tmp_path, b, lr, beta, outcome)
    write_run(tmp_path / "calibration" / "b0", "dpo_expl_offline_lr8.33e-05",  # the report of the 5e-4 choice
              [{"step": s, "logps_chosen": -20.0 + s} for s in range(1, 41)])
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("STEPS", "40")
    monkeypatch.setattr(toy_lab, "build_base", lambda b, k: f"base{b}")
    monkeypatch.setattr(toy_lab, "machine", lambda: "a CPU")
    monkeypatch.setattr(toy_lab, "lab", lambda mode, k: pytest.fail("the lab ran without a calibrated recipe"))
    monkeypatch.setattr(toy_lab, "run_all", lambda jobs, parallel, start: jobs and pytest.fail(f"would run {jobs}"))
    try:
        toy_lab.main([mode])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, json.load(open(tmp_path / "calibration.json"))


def visited(result):
    return {(c["lr"], c["beta"]): len(c["bases"]) for c in result["candidates"]}


def test_calibration_largest_lr_fails_on_one_base(tmp_path, monkeypatch):
    # 1e-3: beta 0.04 fails (a) on base 2, beta 0 fails (b) on base 1; 5e-4 beta 0.04 passes on all three; 5e-4 beta 0
    # and 3e-4 would pass too, but the scan stops at the first pass
    code, result = calibrate_on(tmp_path, monkeypatch, {
        (1e-3, 0.04): ["pass", "pass", "a"], (1e-3, 0.0): ["pass", "b"], (5e-4, 0.04): ["pass"] * 3})
    assert code == 0
    assert result["choice"] == {"grpo_lr": 5e-4, "grpo_beta": 0.04, "dpo_lr": pytest.approx(5e-4 / 6), "dpo_beta": 0.1}
    assert visited(result) == {(1e-3, 0.04): 3, (1e-3, 0.0): 2, (5e-4, 0.04): 3}
    assert [c["pass"] for c in result["candidates"]] == [False, False, True] and result["closest"] is None
    assert result["dpo_logps_chosen_first_last"] == [-19.0, 20.0]
    md = (tmp_path / "calibration.md").read_text()
    assert "| 0.001 | 0.04 | 2 | 1,2,3 | 100/94/89 | 100/88/89 | 100/94/89 | 0.5000, 0.6000 | no | yes | no | no |" in md
    assert "Choice: GRPO lr 0.0005, beta 0.04; DPO lr 8.33e-05" in md and "-19.0 at its first step" in md


def test_calibration_beta_0_at_the_chosen_lr_when_0_04_fails(tmp_path, monkeypatch):
    # 1e-3 fails on base 0 at both betas; at 5e-4 beta 0.04's reward does not rise on base 1, beta 0 passes
    code, result = calibrate_on(tmp_path, monkeypatch, {
        (1e-3, 0.04): ["a"], (1e-3, 0.0): ["reward"], (5e-4, 0.04): ["pass", "reward"], (5e-4, 0.0): ["pass"] * 3})
    assert code == 0 and (result["choice"]["grpo_lr"], result["choice"]["grpo_beta"]) == (5e-4, 0.0)
    assert visited(result) == {(1e-3, 0.04): 1, (1e-3, 0.0): 1, (5e-4, 0.04): 2, (5e-4, 0.0): 3}


def test_calibration_no_candidate_passes_names_the_closest_and_stops_the_full_lab(tmp_path, monkeypatch):
    # every candidate fails on base 0 but two: 3e-4 beta 0 (then (a) only on base 1: 3 checks) and 2e-4 beta 0.04
    # (then (b) only on base 1: 3 checks); the tie goes to the larger lr
    grid = {(lr, beta): ["a"] for lr in toy_lab.CALIBRATION["lrs"] for beta in toy_lab.CALIBRATION["betas"]}
    grid.update({(3e-4, 0.0): ["pass", "b"], (2e-4, 0.04): ["pass", "a"], (1e-4, 0.0): ["reward"]})
    for mode in ("calibrate", "full"):
        code, result = calibrate_on(tmp_path, monkeypatch, grid, mode)
        assert code == 1 and result["choice"] is None, mode
        assert result["closest"] == {"lr": 3e-4, "beta": 0.0, "checks": 3}
        assert len(result["candidates"]) == 12 and not any(c["pass"] for c in result["candidates"])
        assert "dpo_logps_chosen_first_last" not in result
    assert "No candidate passes on every base; the closest: lr 0.0003, beta 0" in (tmp_path / "calibration.md").read_text()


def test_choose_is_a_function_of_the_figures():
    ok, bad = {"a": True, "b": True, "pass": True}, {"a": True, "b": False, "pass": False}
    grid = [{"lr": 1e-4, "beta": 0.04, "bases": {0: ok, 1: ok, 2: ok}},  # given out of scan order
            {"lr": 3e-4, "beta": 0.0, "bases": {0: ok, 1: ok, 2: ok}},
            {"lr": 3e-4, "beta": 0.04, "bases": {0: ok, 1: ok}}]  # not run on base 2: no pass
    assert toy_lab.choose(grid, [0, 1, 2])["choice"]["grpo_lr"] == 3e-4
    assert toy_lab.choose(grid, [0, 1, 2])["choice"]["grpo_beta"] == 0.0
    assert toy_lab.choose(grid, [0, 1])["choice"]["grpo_beta"] == 0.04
    assert toy_lab.choose([{**c, "bases": {0: bad}} for c in grid], [0, 1, 2]) == {
        "choice": None, "closest": {"lr": 3e-4, "beta": 0.04, "checks": 1}}
    assert toy_lab.choose([], [0]) == {"choice": None, "closest": None}


def test_the_recipe_lr_and_beta_reach_the_command_once():
    k = {**toy_lab.knobs("full"), "recipe": {"from": "x", "grpo_lr": 3e-4, "grpo_beta": 0.04, "dpo_lr": 5e-5}}
    for arm, lr, beta in (("grpo_all", "0.0003", "0.04"), ("dpo_expl_online", "5e-05", "0.1"), ("probe_own", "0", "0")):
        argv = toy_lab.run_command(arm, "base", 0, "out", k)
        assert (argv.count("--lr"), argv.count("--beta")) == (1, 1), arm
        assert (argv[argv.index("--lr") + 1], argv[argv.index("--beta") + 1]) == (lr, beta), arm


def test_claims_finds_the_quick_runs_or_says_where_it_looked(tmp_path):
    """`toy_lab.py claims` without OUT after the quick run: the full lab's folder holds nothing, the quick run's
    folder does; an OUT without runs is one line naming it, rc 1 (issue 26 item 7)."""
    quick = tmp_path / "runs" / "toy_lab_quick" / "b0"
    for arm, acc in (("grpo", 0.0), ("expo", 0.6), ("expert_terse", 0.1)):
        write_run(quick, f"{arm}_r0", [{"step": s, "eval/accuracy": a} for s, a in ((50, 0.0), (100, acc))])
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    claims = lambda cwd, **extra: subprocess.run(  # noqa: E731
        [sys.executable, os.path.join(ROOT, "examples", "toy_lab.py"), "claims"], cwd=cwd, env={**env, **extra},
        capture_output=True, text=True, timeout=120)
    proc = claims(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| ExP-GRPO beats plain GRPO |" in proc.stdout and "b0_r0" in proc.stdout
    written = json.load(open(tmp_path / "runs" / "toy_lab_quick" / "claims.json"))
    assert {c["claim"]: c["toy_median"] for c in written}["ExP-GRPO beats plain GRPO"] == pytest.approx(0.6)
    for out, where in ((tmp_path / "empty", [str(tmp_path / "empty")]),
                       (None, [os.path.join("runs", "toy_lab_full"), os.path.join("runs", "toy_lab_quick")])):
        os.makedirs(tmp_path / "empty" / "b0", exist_ok=True)
        proc = claims(tmp_path / "empty", **({"OUT": str(out)} if out else {}))
        assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stdout + proc.stderr
        assert all(w in proc.stderr for w in where), proc.stderr
        assert not os.path.exists(tmp_path / "empty" / "claims.json")


# ----------------------------------------------------------------------------------------------------
# placement (issue 27): where the same self-explanation goes; rows and ordering from fixed figures
# ----------------------------------------------------------------------------------------------------

PLACED = {  # cell -> final hard accuracy of each arm; b3_r0 has no questa run
    "b0_r0": {"grpo": 0.0, "expo": 0.8, "luffy": 0.6, "questa": 0.3, "star": 0.6},
    "b1_r0": {"grpo": 0.1, "expo": 0.6, "luffy": 0.4, "questa": 0.1, "star": 0.6},
    "b2_r0": {"grpo": 0.0, "expo": 0.7, "luffy": 0.7, "questa": 0.5, "star": 0.2},
    "b3_r0": {"grpo": 0.0, "expo": 0.9, "luffy": 0.9, "star": 0.0},
}


def test_placement_rows_and_ordering_from_fixed_figures():
    cells = {c: {f"{a}/final": v for a, v in arms.items()} for c, arms in PLACED.items()}
    rows = toy_lab.beyond(cells)
    assert [r["measure"] for r in rows] == [f"final hard accuracy ({a})" for a in ("grpo", "expo", "luffy", "questa",
                                                                                  "star")] + [rows[-1]["measure"]]
    # each row over the cells that hold it; the place by median over the 3 cells that hold all five (not b3_r0):
    # expo 0.7, luffy 0.6, star 0.6 (0.4 over its own 4 cells), questa 0.3, grpo 0.0
    by_arm = {r["measure"][21:-1]: r for r in rows[:-1]}
    expected = {"grpo": (0.0, 0.0, 0.1, 4, "5"), "expo": (0.75, 0.6, 0.9, 4, "1"), "luffy": (0.65, 0.4, 0.9, 4, "2="),
                "questa": (0.3, 0.1, 0.5, 3, "4"), "star": (0.4, 0.0, 0.6, 4, "2=")}
    for arm, (median, low, high, n, place) in expected.items():
        r = by_arm[arm]
        assert (r["toy_median"], r["toy_min"], r["toy_max"]) == pytest.approx((median, low, high)), arm
        assert (r["cells"], r["verdict"]) == (n, f"measured: place {place} of 5"), arm
        assert r["where"].startswith("beyond the paper") and r["cells_held"] is None
    assert rows[-1]["ordering"] == "expo 0.700 > luffy 0.600 = star 0.600 > questa 0.300 > grpo 0.000"
    assert (rows[-1]["cells"], rows[-1]["verdict"]) == (3, "ordering, measured (no claim made)")
    # the paper's arms alone (the quick run) give no such rows; no cell holding every placement, no order
    assert toy_lab.beyond({c: {k: v for k, v in f.items() if k[:4] in ("grpo", "expo")} for c, f in cells.items()}) == []
    split = toy_lab.beyond({"b0_r0": {"grpo/final": 0.0, "star/final": 0.5}, "b1_r0": {"expo/final": 0.5}})
    assert split[-1]["ordering"] == "no cell holds every placement" and split[-1]["cells"] == 0
    assert [r["verdict"] for r in split[:-1]] == ["measured"] * 3


def test_placement_rows_join_the_claims_table_under_their_heading(tmp_path, capsys):
    for cell, arms in PLACED.items():
        for arm, acc in arms.items():
            write_run(tmp_path / cell[:2], f"{arm}_r0", [{"step": 1, "eval/accuracy": 0.0}, {"step": 2, "eval/accuracy": acc}])
    toy_lab.report({**toy_lab.knobs("placement"), "out": str(tmp_path), "builds": [0, 1, 2, 3], "seeds": [0, 1]})
    md = (tmp_path / "claims.md").read_text().splitlines()
    heading = md.index("| **beyond the paper**: where the same self-explanation goes | | | | | |")
    assert md[heading - 1].startswith("| ExP-GRPO beats plain GRPO |") and len(md) == heading + 7
    assert md[-1].split(" | ")[4] == "expo 0.700 > luffy 0.600 = star 0.600 > questa 0.300 > grpo 0.000"
    assert " | 0.750 (0.600 .. 0.900) | measured: place 1 of 5 |" in md[heading + 2]
    written = json.load(open(tmp_path / "claims.json"))
    assert [c["where"][:16] for c in written].count("beyond the paper") == 6
    assert "(4 cells: b0_r0, b1_r0, b2_r0, b3_r0)" in capsys.readouterr().out  # the cells without runs are left out


def test_placement_arms_differ_from_expgrpo_only_in_the_place_flag():
    k = toy_lab.knobs("placement")
    expo = toy_lab.run_command("expo", "base", 0, "out", k)
    for arm, place in (("luffy", "group"), ("questa", "prompt"), ("star", "sft_only")):
        argv = toy_lab.run_command(arm, "base", 0, "out", k)
        i = argv.index("--positive_in")
        assert argv[i + 1] == place and argv[:i] + argv[i + 2:] == expo, arm
    assert toy_lab.PARTS["placement"] == ["grpo", "expo", "luffy", "questa", "star"]
    assert set(toy_lab.PARTS["placement"]) <= set(toy_lab.PARTS["full"]) & set(toy_lab.TABLES["hard"])
