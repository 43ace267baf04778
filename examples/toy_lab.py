"""Toy lab: the paper's claims in miniature, on a CPU, with the project's own scripts (README "Toy lab").

The world (toy.py): n-digit addition with a digit-by-digit chain of thought, and a 3-layer character-level base
model that solves 1-3 digit sums, few or no 5-6 digit ones, but explains those when shown the answer. Every run
here is `expo_grpo.py`, `expo_dpo.py` or `eval.py` with flags; this file only chooses the flags, runs them two at
a time (one core each) and reads their metrics. One recipe per algorithm (GRPO_RECIPE, DPO_RECIPE; their lr and beta
chosen by `calibrate` on plain GRPO), fixed before any verdict was read; the arms differ only in the flags that define
them.

    python examples/toy_lab.py            # quick: the shipped base, ExP-GRPO vs expert SFT vs GRPO, one cell at G 4
    python examples/toy_lab.py calibrate  # choose the recipes' lr and beta on plain GRPO (OUT/calibration.json)
    python examples/toy_lab.py full       # calibrate, then every part on 3 base builds x 2 RL seeds, the claims table
    python examples/toy_lab.py grpo|dpo|table3|coef|probe   # one part (on the cells of BUILD_SEEDS x RL_SEEDS)
    python examples/toy_lab.py claims     # the claims table of what OUT holds, no training

Knobs (environment): OUT, BUILD_SEEDS, RL_SEEDS, STEPS, BUILD_STEPS, EVAL_EVERY, EVAL_LIMIT, FINAL_LIMIT, JOBS,
GENERATIONS (the GRPO arms' G: 8, the recipe's, except in the quick run), and ARMS (run these arms instead of the
part's, e.g. ARMS="grpo expo").
Writes OUT/b{build}/{arm}_r{seed}/ (run folders), OUT/b{build}/eval/ (tables by level), OUT/claims.json and
OUT/claims.md; calibrate writes OUT/calibration/ (its runs), OUT/calibration.json and OUT/calibration.md.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# ----------------------------------------------------------------------------------------------------
# The recipes and the arms
# ----------------------------------------------------------------------------------------------------

# The recipes' learning rates and GRPO's KL beta, and the calibration they came from: `calibrate` chooses them on the
# plain GRPO baseline (issue 25), and `full` runs with its own calibration's choice. These predate any calibration.
RECIPE_LR = {"from": "none (the recipe before issue 25)", "grpo_lr": 2e-3, "grpo_beta": 0.0, "dpo_lr": 2e-3}
# ExP-GRPO and its baselines: 100 steps of 32 questions, G 8 (set by knobs' GENERATIONS: 4 in the quick run), T 1,
# lr and beta of RECIPE_LR, lambda 0.04; greedy held-out accuracy on EVAL_LIMIT 5-6 digit sums every EVAL_EVERY steps.
# 64 new tokens: the longest expert style (columns, 6 digits) is 58 tokens with its end token.
GRPO_RECIPE = ["--batch_size", "32", "--temperature", "1.0",
               "--sft_coef", "0.04", "--max_new_tokens", "64", "--micro_batch_size", "128", "--gen_batch_size", "256",
               "--no_gradient_checkpointing", "--save_every", "0", "--probe_every", "0", "--log_samples", "1"]
# ExP-DPO: the same data, batch, sampling and optimizer (lr: RECIPE_LR's); the paper's DPO beta 0.1; 4 CoTs per
# question to find a wrong one; online rebuilds the pairs every 10 steps.
DPO_RECIPE = ["--batch_size", "32", "--num_generations", "4", "--temperature", "1.0", "--beta", "0.1",
              "--max_new_tokens", "64", "--micro_batch_size", "32", "--gen_batch_size", "256",
              "--no_gradient_checkpointing", "--save_every", "0"]
HARD, ALL = "5-6", "1-6"

# name -> (script, flags): what makes the arm what it is, on top of its recipe
ARMS = {
    # Figure 3's setting: train on hard sums only
    "grpo": ("expo_grpo.py", ["--sft_source", "none", "--levels", HARD]),
    "expo": ("expo_grpo.py", ["--sft_source", "explanation", "--levels", HARD]),  # the paper's: offline, answer check
    "expert_terse": ("expo_grpo.py", ["--sft_source", "expert", "--dataset", "addition", "--levels", HARD]),
    "expert_columns": ("expo_grpo.py", ["--sft_source", "expert", "--dataset", "addition_columns", "--levels", HARD]),
    "own_format": ("expo_grpo.py", ["--sft_source", "expert", "--dataset", "addition_own", "--levels", HARD]),
    # arXiv v3 Table 5
    "expo_coef0.5": ("expo_grpo.py", ["--sft_source", "explanation", "--sft_coef", "0.5", "--levels", HARD]),
    # Table 3's setting: train on every level
    "grpo_all": ("expo_grpo.py", ["--sft_source", "none", "--levels", ALL]),
    "expo_all": ("expo_grpo.py", ["--sft_source", "explanation", "--levels", ALL]),
    "expert_all": ("expo_grpo.py", ["--sft_source", "expert", "--dataset", "addition", "--levels", ALL]),
    # Table 2: chosen = self-explanation or the (terse) expert, offline or online
    "dpo_expl_offline": ("expo_dpo.py", ["--chosen", "explanation", "--regen_every", "0", "--levels", HARD]),
    "dpo_expl_online": ("expo_dpo.py", ["--chosen", "explanation", "--regen_every", "10", "--levels", HARD]),
    "dpo_expert_offline": ("expo_dpo.py", ["--chosen", "expert", "--regen_every", "0", "--levels", HARD]),
    "dpo_expert_online": ("expo_dpo.py", ["--chosen", "expert", "--regen_every", "10", "--levels", HARD]),
}
# Figure 2 and Lemma 2, measured on the base: one step at lr 0 probes 128 test questions; one run per expert style
PROBES = {f"probe_{style}": dataset for style, dataset in
          (("terse", "addition"), ("columns", "addition_columns"), ("own", "addition_own"))}
PARTS = {
    "grpo": ["grpo", "expo", "expert_terse", "expert_columns", "own_format"],
    "coef": ["grpo", "expo", "expo_coef0.5"],
    "table3": ["grpo_all", "expo_all", "expert_all"],
    "dpo": ["dpo_expl_offline", "dpo_expl_online", "dpo_expert_offline", "dpo_expert_online"],
    "probe": list(PROBES),
    "quick": ["grpo", "expo", "expert_terse", "probe_terse"],
}
PARTS["full"] = list(dict.fromkeys(a for p in ("probe", "grpo", "coef", "table3", "dpo") for a in PARTS[p]))
# by-level tables (eval.py on FINAL_LIMIT held-out sums of 1-6 digits): the base against these arms
TABLES = {"hard": ["grpo", "expo", "expert_terse"], "all": ["grpo_all", "expo_all", "expert_all"]}


def env_list(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split()]


def knobs(mode: str) -> dict:
    full = mode != "quick"
    return {"out": os.environ.get("OUT", os.path.join("runs", "toy_lab_quick" if mode == "quick" else "toy_lab_full")),
            "builds": env_list("BUILD_SEEDS", "0 1 2" if full else "0"), "seeds": env_list("RL_SEEDS", "0 1" if full else "0"),
            "steps": int(os.environ.get("STEPS", 100)),
            # quick: half the recipe's rollouts (G 4), to fit a few minutes on a slow 2-core CPU; GENERATIONS=8 gives
            # exactly the full lab's cell of base 0, RL seed 0
            "generations": int(os.environ.get("GENERATIONS", 8 if full else 4)),
            "build_steps": int(os.environ.get("BUILD_STEPS", 600)),
            "eval_every": int(os.environ.get("EVAL_EVERY", 25 if full else 50)),
            "eval_limit": int(os.environ.get("EVAL_LIMIT", 200)), "final_limit": int(os.environ.get("FINAL_LIMIT", 600)),
            # quick: its four runs at once (one thread each): two cores finish them sooner than two at a time
            "jobs": int(os.environ.get("JOBS", 2 if full else 4)), "shipped": not full, "recipe": RECIPE_LR}


# ----------------------------------------------------------------------------------------------------
# Running: every run is a command line of the project's scripts
# ----------------------------------------------------------------------------------------------------

def run_command(arm: str, base: str, seed: int, out_dir: str, k: dict) -> list[str]:
    common_flags = ["--model", base, "--seed", str(seed), "--output_dir", out_dir]
    if arm in PROBES:
        return ["expo_grpo.py", *GRPO_RECIPE, *common_flags, "--dataset", PROBES[arm], "--split", "test",
                "--levels", HARD, "--batch_size", "128", "--num_generations", "2", "--max_steps", "1", "--lr", "0",
                "--beta", "0", "--probe_every", "1", "--probe_answer_logprob", "--log_samples", "128"]
    script, flags = ARMS[arm]
    r = k["recipe"]
    recipe = (GRPO_RECIPE + ["--lr", f"{r['grpo_lr']:g}", "--beta", f"{r['grpo_beta']:g}", "--num_generations",
                             str(k["generations"])] if script == "expo_grpo.py" else DPO_RECIPE + ["--lr", f"{r['dpo_lr']:g}"])
    dataset = [] if "--dataset" in flags else ["--dataset", "addition"]
    return [script, *recipe, *common_flags, *dataset, "--max_steps", str(k["steps"]), "--eval_every",
            str(k["eval_every"]), "--eval_levels", HARD, "--eval_limit", str(k["eval_limit"]), "--eval_num_samples", "1",
            "--eval_temperature", "0", *flags]


def train_job(argv: list[str], out_dir: str, steps: int) -> list:
    """[job], or [] when out_dir holds a finished run; an unfinished one (the lab's own folder) starts over."""
    if finished(out_dir, steps):
        return []
    shutil.rmtree(out_dir, ignore_errors=True)
    return [(argv, out_dir + ".log", out_dir)]


def eval_job(model: str, out_dir: str, k: dict) -> list:
    """eval.py by level on FINAL_LIMIT held-out sums of 1-6 digits, greedy: [job], or [] when out_dir has its table."""
    if os.path.exists(os.path.join(out_dir, "eval.json")):
        return []
    shutil.rmtree(out_dir, ignore_errors=True)
    return [(["eval.py", "--model", model, "--dataset", "addition", "--levels", ALL, "--limit", str(k["final_limit"]),
              "--num_samples", "1", "--temperature", "0", "--max_new_tokens", "64", "--gen_batch_size", "256",
              "--output_dir", out_dir], out_dir + ".log", out_dir)]


def levels(out_dir: str) -> dict[str, float]:
    """Accuracy by level (\"1\"..\"6\") of eval.py's table in out_dir."""
    return {str(lv): s["accuracy"] for lv, s in json.load(open(os.path.join(out_dir, "eval.json")))["by_level"].items()}


def finished(out_dir: str, steps: int) -> bool:
    """A run counts when its metrics reach its last step (a lab run interrupted half-way is run again)."""
    rows = read_rows(out_dir)
    return bool(rows) and rows[-1].get("step") == steps


def read_rows(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def run_all(jobs: list[tuple[list[str], str, str]], parallel: int, start: float) -> None:
    """jobs: (argv, log file, label). At most `parallel` at a time, one thread each; stops at the first failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            argv, log, label = pending.pop(0)
            os.makedirs(os.path.dirname(log), exist_ok=True)
            running.append((subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=open(log, "w"),
                                             stderr=subprocess.STDOUT), log, label))
        time.sleep(0.5)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            proc, log, label = job
            if proc.returncode:
                for other in running:
                    other[0].kill()
                raise SystemExit(f"toy_lab: {label} failed (exit {proc.returncode}), see {log}")
            print(f"{label} done at {time.time() - start:.0f}s", flush=True)


def build_base(build_seed: int, k: dict) -> str:
    import toy

    path = toy.build_toy_model(seed=build_seed, steps=k["build_steps"], shipped=k["shipped"], verbose=False)
    rates = json.load(open(os.path.join(path, "toy_build.json")))
    os.makedirs(os.path.join(k["out"], f"b{build_seed}"), exist_ok=True)
    with open(os.path.join(k["out"], f"b{build_seed}", "base.json"), "w") as fh:  # what the claims compare with
        json.dump({"path": path, **rates}, fh, indent=1)
    print(f"base build {build_seed}: {path} (easy solve {rates['easy_solve']:.3f}, hard solve {rates['hard_solve']:.3f},"
          f" hard explain {rates['hard_explain']:.3f})", flush=True)
    return path


def lab(mode: str, k: dict) -> None:
    start = time.time()
    arms = os.environ.get("ARMS", "").split() or PARTS[mode]
    unknown = [a for a in arms if a not in ARMS and a not in PROBES]
    if unknown:
        raise SystemExit(f"toy_lab: unknown arm(s) {' '.join(unknown)}; the arms: {' '.join([*ARMS, *PROBES])}")
    r = k["recipe"]
    print(f"toy lab {mode}: {len(arms)} runs x {len(k['builds'])} base builds x {len(k['seeds'])} RL seeds -> {k['out']} "
          f"| GRPO lr {r['grpo_lr']:g} beta {r['grpo_beta']:g}, DPO lr {r['dpo_lr']:g} (calibration: {r['from']}) "
          f"| {machine()}, {k['jobs']} at a time", flush=True)
    bases = {b: build_base(b, k) for b in k["builds"]}
    jobs = []
    for b, base in bases.items():
        for seed in k["seeds"]:
            for arm in arms:
                out_dir = os.path.join(k["out"], f"b{b}", f"{arm}_r{seed}")
                jobs += train_job(run_command(arm, base, seed, out_dir, k), out_dir, 1 if arm in PROBES else k["steps"])
    # the offline explanations are sampled once per base, by the first run that needs them: start those first
    jobs.sort(key=lambda j: "--sft_source" not in j[0] or "explanation" not in j[0])
    run_all(jobs, k["jobs"], start)
    evals = []  # by-level tables: the base and the arms of TABLES, on the same held-out sums (not in the quick run)
    for b, base in (bases.items() if mode != "quick" else []):
        models = [("base", base)] + [(f"{a}_r{s}", os.path.join(k["out"], f"b{b}", f"{a}_r{s}", "hf"))
                                     for s in k["seeds"] for a in sum(TABLES.values(), [])
                                     if a in arms and finished(os.path.join(k["out"], f"b{b}", f"{a}_r{s}"), k["steps"])]
        for name, model in models:
            evals += eval_job(model, os.path.join(k["out"], f"b{b}", "eval", name), k)
    run_all(evals, k["jobs"], start)
    report(k)
    print(f"total {time.time() - start:.0f}s | {machine()}, {k['jobs']} at a time")


def machine() -> str:
    """Every timing this lab prints is of this machine: its CPU and cores, and how the runs share them."""
    from runs import machine_line

    return f"{machine_line().split(', torch threads')[0]}, one thread per run"


# ----------------------------------------------------------------------------------------------------
# Reading the runs: one dict of figures per cell (base build, RL seed)
# ----------------------------------------------------------------------------------------------------

def cell_figures(out: str, b: int, seed: int) -> dict:
    """The figures the claims read, from the run folders of one cell; a figure is missing where its run is."""
    import toy

    d = os.path.join(out, f"b{b}")
    f: dict = {}
    for arm in ARMS:
        rows = read_rows(os.path.join(d, f"{arm}_r{seed}"))
        evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
        if evals:
            f[f"{arm}/final"] = evals[-1]
        trained = [r for r in rows if "loss" in r and "logps_chosen" in r]  # DPO steps that had pairs
        if arm.startswith("dpo_") and trained:
            f[f"{arm}/loss_first"], f[f"{arm}/loss_last"] = trained[0]["loss"], trained[-1]["loss"]
            f[f"{arm}/logps_chosen_first"] = trained[0]["logps_chosen"]
            f[f"{arm}/logps_rejected_first"] = trained[0]["logps_rejected"]
    for probe in PROBES:
        rows = read_rows(os.path.join(d, f"{probe}_r{seed}"))
        if rows:
            f[f"{probe}/nll_expert"] = rows[0]["nll_expert"]
            for key in ("nll_explanation", "answer_logp_after_explanation", "answer_logp_after_cot"):
                f[key] = rows[0][key]
    samples = os.path.join(d, f"probe_terse_r{seed}", "samples.jsonl")
    if os.path.exists(samples):  # correct steps: the explanation against the model's own CoT, question by question
        wins = [(toy.correct_steps(s["question"], s["explanation"] or ""), toy.correct_steps(s["question"], s["completion"]))
                for s in map(json.loads, open(samples))]
        f["step_win_rate"] = sum(1.0 if e > c else 0.5 if e == c else 0.0 for e, c in wins) / len(wins)
    for table, trained in TABLES.items():
        for name, run in [("base", "base")] + [(a, f"{a}_r{seed}") for a in trained]:
            if os.path.exists(os.path.join(d, "eval", run, "eval.json")):
                f[f"{table}/{name}/levels"] = levels(os.path.join(d, "eval", run))
    if os.path.exists(os.path.join(d, "base.json")):
        f["base/hard_solve"] = json.load(open(os.path.join(d, "base.json")))["hard_solve"]
    return f


# ----------------------------------------------------------------------------------------------------
# The claims: where the paper makes each, its own figures, the toy's measure and when it holds in a cell
# ----------------------------------------------------------------------------------------------------

def _diff(f, a, b):
    return f[a] - f[b] if a in f and b in f else None


def _table3(f):
    """min over levels 1-6 of (ExP-GRPO - base), in points, and whether ExP-GRPO beats GRPO at 5 and 6 digits."""
    keys = ("all/expo_all/levels", "all/base/levels", "all/grpo_all/levels")
    if not all(k in f for k in keys):
        return None
    expo, base, grpo = (f[k] for k in keys)
    if not {"5", "6"} <= set(expo) & set(grpo):  # a small evaluation may miss a level
        return None
    worst = min(100 * (expo[lv] - base[lv]) for lv in set(expo) & set(base))
    return worst, worst >= -5 and all(expo[lv] > grpo[lv] for lv in ("5", "6"))


def _hardest_gain(f):
    """ExP-GRPO's gain over GRPO at 6 digits minus its largest gain at 1-3 digits (points), trained on all levels."""
    if "all/expo_all/levels" not in f or "all/grpo_all/levels" not in f:
        return None
    expo, grpo = f["all/expo_all/levels"], f["all/grpo_all/levels"]
    gain = {lv: 100 * (expo[lv] - grpo[lv]) for lv in set(expo) & set(grpo)}
    easy = [gain[lv] for lv in ("1", "2", "3") if lv in gain]
    return gain["6"] - max(easy) if "6" in gain and easy else None


def _deceptive(f):
    """Expert chosen, offline: the expert starts far below the rejected CoT in log-prob, the DPO loss ends below
    half of log 2, and held-out hard accuracy ends within 0.05 of the base's."""
    keys = ("dpo_expert_offline/loss_last", "dpo_expert_offline/logps_chosen_first",
            "dpo_expert_offline/logps_rejected_first", "dpo_expert_offline/final", "base/hard_solve")
    if not all(k in f for k in keys):
        return None
    loss, chosen, rejected, acc, base = (f[k] for k in keys)
    return loss, loss < 0.3466 and chosen < rejected and acc - base <= 0.05


def _positive(value):
    return None if value is None else (value, value > 0)


CLAIMS = [  # (claim, where, the paper's figures, the toy's measure, cell -> (value, holds) or None)
    ("A self-explanation is more likely under the policy than the expert's solution (terse style)",
     "Property 1, Figure 2 left", "plotted, no table: self-explanation NLL far below the expert CoT's",
     "NLL/token: expert (terse) - self-explanation",
     lambda f: _positive(_diff(f, "probe_terse/nll_expert", "nll_explanation"))),
    ("... and than a complete expert derivation in a foreign layout",
     "Property 1, Figure 2 left", "(as above)", "NLL/token: expert (columns) - self-explanation",
     lambda f: _positive(_diff(f, "probe_columns/nll_expert", "nll_explanation"))),
    ("A self-explanation has more correct steps than the model's own CoT",
     "Figure 2 right", "win rate judged by GPT-4o, plotted", "win rate in correct steps (ties 1/2) - 0.5",
     lambda f: _positive(f["step_win_rate"] - 0.5 if "step_win_rate" in f else None)),
    ("A self-explanation makes a* more likely than the model's own CoT",
     "Property 2, Lemma 2", "stated as a lemma", "log p(a*|q,c~) - log p(a*|q,c)",
     lambda f: _positive(_diff(f, "answer_logp_after_explanation", "answer_logp_after_cot"))),
    ("ExP-GRPO beats GRPO + SFT on the expert's solution (terse), hard-only training",
     "Figure 3", "MATH level 5 curves; Table 3 level 5: 23 vs 12 % pass@4", "final hard accuracy: ExP-GRPO - expert",
     lambda f: _positive(_diff(f, "expo/final", "expert_terse/final"))),
    ("ExP-GRPO beats GRPO + SFT on a complete foreign expert derivation",
     "Figure 3 (the toy's second expert)", "-", "final hard accuracy: ExP-GRPO - expert (columns)",
     lambda f: _positive(_diff(f, "expo/final", "expert_columns/final"))),
    ("GRPO + expert SFT beats plain GRPO", "Figure 3", "Table 3 level 5: 12 vs 2 % pass@4",
     "final hard accuracy: expert (terse) - GRPO", lambda f: _positive(_diff(f, "expert_terse/final", "grpo/final"))),
    ("ExP-GRPO beats plain GRPO", "Figure 3", "Table 3 level 5: 23 vs 2 % pass@4", "final hard accuracy: ExP-GRPO - GRPO",
     lambda f: _positive(_diff(f, "expo/final", "grpo/final"))),
    ("Trained on every level, ExP-GRPO stays within 5 points of the base on each level and beats GRPO at 5-6 digits",
     "Table 3", "ExP-GRPO 96/91/86/76/23, GRPO 91/84/77/39/2 % (levels 1-5)",
     "min over levels of ExP-GRPO - base (points)", _table3),
    ("The largest gain over GRPO is at the hardest level", "Table 3", "gains 5/7/9/37/21 points on levels 1-5",
     "gain at 6 digits - largest gain at 1-3 digits (points)", lambda f: _positive(_hardest_gain(f))),
    ("ExP-DPO with the self-explanation chosen beats the expert chosen, offline", "Table 2, Figures 4-5",
     "MATH 54.3 offline (c_E lower)", "final hard accuracy: chosen self-explanation - expert, offline",
     lambda f: _positive(_diff(f, "dpo_expl_offline/final", "dpo_expert_offline/final"))),
    ("... and online", "Table 2, Figures 4-5", "MATH 60.4 online (c_E lower)",
     "final hard accuracy: chosen self-explanation - expert, online",
     lambda f: _positive(_diff(f, "dpo_expl_online/final", "dpo_expert_online/final"))),
    ("Online ExP-DPO beats offline", "Table 2, Figures 4-5", "MATH 54.3 -> 60.4, GSM8K 80.1 -> 85.4 pass@4",
     "final hard accuracy: online - offline (self-explanation chosen)",
     lambda f: _positive(_diff(f, "dpo_expl_online/final", "dpo_expl_offline/final"))),
    ("With the expert chosen the DPO loss falls while accuracy barely moves (deceptively low loss)",
     "Appendix C.3", "loss falls quickly, expert log-prob far below the rejected CoT's", "final DPO loss (expert, offline)",
     _deceptive),
    ("SFT coefficient 0.04 beats 0.5", "arXiv v3 Table 5", "0.04 best on MATH", "final hard accuracy: 0.04 - 0.5",
     lambda f: _positive(_diff(f, "expo/final", "expo_coef0.5/final"))),
    ("SFT coefficient 0.5 is worse than plain GRPO", "arXiv v3 Table 5", "0.5 below GRPO on MATH",
     "final hard accuracy: GRPO - ExP-GRPO at 0.5", lambda f: _positive(_diff(f, "grpo/final", "expo_coef0.5/final"))),
]


def claims(cells: dict[str, dict]) -> list[dict]:
    """One record per claim with a measurement in some cell: the toy's median, min and max over those cells, and
    in how many it holds. `cells`: cell name -> cell_figures."""
    out = []
    for claim, where, paper, measure, judge in CLAIMS:
        results = [r for r in (judge(f) for f in cells.values()) if r is not None]
        if not results:
            continue
        values = [v for v, _ in results]
        held = sum(bool(h) for _, h in results)
        out.append({"claim": claim, "where": where, "paper": paper, "measure": measure,
                    "toy_median": statistics.median(values), "toy_min": min(values), "toy_max": max(values),
                    "cells_held": held, "cells": len(results),
                    "verdict": f"holds in {held} of {len(results)} cells" if held else "does not hold"})
    return out


def report(k: dict) -> list[dict]:
    cells = {f"b{b}_r{s}": cell_figures(k["out"], b, s) for b in k["builds"] for s in k["seeds"]}
    print("\nFinal held-out 5-6 digit accuracy (greedy) of each run, by cell:")
    arms = [a for a in ARMS if any(f"{a}/final" in f for f in cells.values())]
    print("| cell | " + " | ".join(arms) + " |\n|---|" + "---|" * len(arms))
    for name, f in cells.items():
        print(f"| {name} | " + " | ".join(f"{f[a + '/final']:.3f}" if f"{a}/final" in f else "-" for a in arms) + " |")
    for table, trained in TABLES.items():
        for name, f in cells.items():
            if f"{table}/base/levels" in f and any(f"{table}/{a}/levels" in f for a in trained):
                cols = ["base"] + [a for a in trained if f"{table}/{a}/levels" in f]
                print(f"\n{name}: greedy accuracy (%) by digits on {k['final_limit']} held-out sums, trained on "
                      f"{'5-6' if table == 'hard' else '1-6'} digits")
                print("| digits | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols))
                for lv in f[f"{table}/base/levels"]:
                    print(f"| {lv} | " + " | ".join(f"{100 * f[f'{table}/{c}/levels'][lv]:.1f}" for c in cols) + " |")
    result = claims(cells)
    os.makedirs(k["out"], exist_ok=True)
    with open(os.path.join(k["out"], "claims.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    lines = ["| claim | where | paper | toy measure | toy median (min .. max) | verdict |", "|---|---|---|---|---|---|"]
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731 (a | inside a markdown cell ends it)
    lines += [f"| {c['claim']} | {c['where']} | {c['paper']} | {cell(c['measure'])} | {c['toy_median']:+.3f} "
              f"({c['toy_min']:+.3f} .. {c['toy_max']:+.3f}) | {c['verdict']} |" for c in result]
    with open(os.path.join(k["out"], "claims.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"\nThe paper's claims in the toy ({len(cells)} cells: base builds {k['builds']} x RL seeds {k['seeds']}):")
    print("\n".join(lines))
    print(f"\n-> {os.path.join(k['out'], 'claims.json')}")
    return result


# ----------------------------------------------------------------------------------------------------
# The calibration (issue 25): the recipes' lr and beta, by a criterion fixed before any claim was read, on plain GRPO
# ----------------------------------------------------------------------------------------------------

# scan order: lr from the largest down, the paper's beta 0.04 before 0; on the development bases (build 3 stays
# unseen), RL seed 0. A base's "kept" levels, those it solves at >= KEEP, must stay within SLACK of it.
CALIBRATION = {"lrs": [1e-3, 5e-4, 3e-4, 2e-4, 1e-4, 5e-5], "betas": [0.04, 0.0], "builds": [0, 1, 2]}
KEEP, SLACK = 0.8, 0.05
CRITERION = ("(a) plain GRPO on 5-6 digits keeps every level the base solves at >= 80 % within 5 points; (b) so does "
             "plain GRPO on 1-6 digits, and its mean reward over its last 20 steps is >= that over its first 10")


def criterion(base: dict, hard: dict, all_: dict, rewards: list[float]) -> dict:
    """CRITERION on one base (it may stall, it must not forget; it learns what it can sample). base, hard, all_: accuracy
    by level of the base, the 5-6 run and the 1-6 run; rewards: the 1-6 run's training reward, step by step."""
    kept = [lv for lv in base if base[lv] >= KEEP]
    keeps = lambda run: all(run[lv] >= base[lv] - SLACK - 1e-9 for lv in kept)  # noqa: E731 (1e-9: float rounding)
    first, last = statistics.mean(rewards[:10]), statistics.mean(rewards[-20:])
    a, b = keeps(hard), keeps(all_) and last >= first
    return {"kept": kept, **{name: [run[lv] for lv in kept] for name, run in (("base", base), ("hard", hard), ("all", all_))},
            "reward_first10": first, "reward_last20": last, "a": a, "b": b, "pass": a and b}


def candidate_figures(out: str, b: int, lr: float, beta: float) -> dict | None:
    """criterion's figures from the run folders (the base's table is the lab's); None until every table is there."""
    d = os.path.join(out, "calibration", f"b{b}", f"lr{lr:g}_beta{beta:g}")
    tables = [os.path.join(out, f"b{b}", "eval", "base"), os.path.join(d, "hard", "eval"), os.path.join(d, "all", "eval")]
    if not all(os.path.exists(os.path.join(t, "eval.json")) for t in tables):
        return None
    return criterion(*map(levels, tables), [r["reward"] for r in read_rows(os.path.join(d, "all"))])


def choose(candidates: list[dict], builds: list[int]) -> dict:
    """candidates: {"lr", "beta", "bases": {build: criterion's figures}} (none for a base it did not reach). The choice:
    the first in scan order passing on every base (the largest lr; at it beta 0.04 if it passes, else 0), DPO at GRPO's
    lr / 6 (the paper's 5e-7 against 3e-6). None passing: the closest, with the most (a) and (b) passed over its bases
    (ties to the larger lr)."""
    order = sorted(candidates, key=lambda c: (-c["lr"], -c["beta"]))
    passed = [c for c in order if all(b in c["bases"] and c["bases"][b]["pass"] for b in builds)]
    if passed:
        lr, beta = passed[0]["lr"], passed[0]["beta"]
        return {"choice": {"grpo_lr": lr, "grpo_beta": beta, "dpo_lr": lr / 6,
                           "dpo_beta": float(DPO_RECIPE[DPO_RECIPE.index("--beta") + 1])}, "closest": None}
    checks = lambda c: sum(f["a"] + f["b"] for f in c["bases"].values())  # noqa: E731
    best = max(order, key=checks, default=None)  # max keeps the first of equals: the larger lr
    return {"choice": None, "closest": best and {"lr": best["lr"], "beta": best["beta"], "checks": checks(best)}}


def calibrate(k: dict) -> dict | None:
    """The scan, resumable (finished runs and tables are kept); writes OUT/calibration.json and .md. Returns the
    recipes' lr and beta, or None when no candidate passes."""
    start, out, builds = time.time(), k["out"], CALIBRATION["builds"]
    print(f"toy lab calibrate: plain GRPO, lr {CALIBRATION['lrs']} x beta {CALIBRATION['betas']}, base builds {builds}, "
          f"RL seed 0, {k['steps']} steps, G {k['generations']} -> {out} | {machine()}, {k['jobs']} at a time", flush=True)
    bases, candidates = {}, []
    for lr, beta in [(lr, beta) for lr in CALIBRATION["lrs"] for beta in CALIBRATION["betas"]]:
        candidates.append({"lr": lr, "beta": beta, "bases": {}})
        ck = {**k, "recipe": {**k["recipe"], "grpo_lr": lr, "grpo_beta": beta}, "eval_every": 0}  # eval.py judges
        for b in builds:  # on to the next base only once it passes on this one
            bases[b] = bases.get(b) or build_base(b, k)
            d = os.path.join(out, "calibration", f"b{b}", f"lr{lr:g}_beta{beta:g}")
            runs = {os.path.join(d, "hard"): "grpo", os.path.join(d, "all"): "grpo_all"}
            run_all([j for run, arm in runs.items() for j in train_job(run_command(arm, bases[b], 0, run, ck), run,
                                                                       k["steps"])], k["jobs"], start)
            run_all(eval_job(bases[b], os.path.join(out, f"b{b}", "eval", "base"), k) +
                    [j for run in runs for j in eval_job(os.path.join(run, "hf"), os.path.join(run, "eval"), k)],
                    k["jobs"], start)
            f = candidates[-1]["bases"][b] = candidate_figures(out, b, lr, beta)
            print(f"{d}: {'passes' if f['pass'] else 'fails'} ((a) {f['a']}, (b) {f['b']}) at {time.time() - start:.0f}s",
                  flush=True)
            if not f["pass"]:
                break
        if (decision := choose(candidates, builds))["choice"]:
            break
    result = {"criterion": CRITERION, "builds": builds, "steps": k["steps"], "generations": k["generations"],
              "final_limit": k["final_limit"], **decision,
              "candidates": [{**c, "pass": bool(choose([c], builds)["choice"])} for c in candidates]}
    if choice := decision["choice"]:  # reported, not chosen by: offline ExP-DPO at that lr on the first base, and the
        # chosen response's log-prob at its first step with pairs against its last (likelihood displacement)
        run = os.path.join(out, "calibration", f"b{builds[0]}", f"dpo_expl_offline_lr{choice['dpo_lr']:.3g}")
        run_all(train_job(run_command("dpo_expl_offline", bases[builds[0]], 0, run, {
            **k, "recipe": {**k["recipe"], "dpo_lr": choice["dpo_lr"]}}), run, k["steps"]), k["jobs"], start)
        chosen = [r["logps_chosen"] for r in read_rows(run) if "logps_chosen" in r]
        result["dpo_logps_chosen_first_last"] = [chosen[0], chosen[-1]] if chosen else None
    table = calibration_table(result)
    for name, text in (("calibration.json", json.dumps(result, indent=1)), ("calibration.md", table)):
        with open(os.path.join(out, name), "w") as fh:
            fh.write(text + "\n")
    print(f"\n{table}\n\n-> {os.path.join(out, 'calibration.json')}\ntotal {time.time() - start:.0f}s | {machine()}, "
          f"{k['jobs']} at a time", flush=True)
    return choice and {"from": os.path.join(out, "calibration.json"), **choice}


def calibration_table(r: dict) -> str:
    pct = lambda accs: "/".join(f"{100 * a:.0f}" for a in accs) or "-"  # noqa: E731
    yes = lambda x: "yes" if x else "no"  # noqa: E731
    lines = [(f"Plain GRPO, {r['steps']} steps, G {r['generations']}, RL seed 0; greedy accuracy (%) on {r['final_limit']} "
              f"held-out sums, at the levels kept. {r['criterion']}."), "",
             ("| GRPO lr | beta | base | levels kept | base | trained on 5-6 | trained on 1-6 | reward: first 10, last 20 "
              "| (a) | (b) | passes on this base | on all |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['lr']:g} | {c['beta']:g} | {b} | {','.join(f['kept']) or '-'} | {pct(f['base'])} | {pct(f['hard'])} | "
              f"{pct(f['all'])} | {f['reward_first10']:.4f}, {f['reward_last20']:.4f} | {yes(f['a'])} | {yes(f['b'])} | "
              f"{yes(f['pass'])} | {yes(c['pass'])} |" for c in r["candidates"] for b, f in c["bases"].items()]
    ch, cl, dpo = r["choice"], r["closest"], r.get("dpo_logps_chosen_first_last")
    lines.append(f"\nChoice: GRPO lr {ch['grpo_lr']:g}, beta {ch['grpo_beta']:g}; DPO lr {ch['dpo_lr']:.3g} (GRPO's / 6), "
                 f"beta {ch['dpo_beta']:g}." if ch else f"\nNo candidate passes on every base; the closest: lr {cl['lr']:g}, "
                 f"beta {cl['beta']:g} ({cl['checks']} of the (a) and (b) checks passed). The lab stops here.")
    if dpo:
        lines.append(f"Offline ExP-DPO at that lr on base {r['builds'][0]} (reported, not chosen by): the chosen log-prob "
                     f"{dpo[0]:.1f} at its first step with pairs, {dpo[1]:.1f} at its last.")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    mode = argv[0] if argv else "quick"
    if mode not in PARTS and mode not in ("claims", "calibrate"):
        raise SystemExit(f"toy_lab: unknown part {mode!r}; choose from {', '.join([*PARTS, 'calibrate', 'claims'])}")
    k = knobs(mode)
    if mode in ("calibrate", "full"):  # the full lab runs on its own calibration's choice, and not without one
        k["recipe"] = calibrate(k)
        if k["recipe"] is None:
            sys.exit(1)
    if mode == "claims":
        report(k)
    elif mode != "calibrate":
        lab(mode, k)


if __name__ == "__main__":
    main(sys.argv[1:])
