"""Toy lab: the paper's claims in miniature, on a CPU, with the project's own scripts (README "Toy lab").

The world (toy.py): n-digit addition with a digit-by-digit chain of thought, and a 3-layer character-level base
model that solves 1-3 digit sums, few or no 5-6 digit ones, but explains those when shown the answer. Every run
here is `expo_grpo.py`, `expo_dpo.py` or `eval.py` with flags; this file only chooses the flags, runs them two at
a time (one core each) and reads their metrics. One recipe per algorithm (GRPO_RECIPE, DPO_RECIPE), fixed before
any verdict was read; the arms differ only in the flags that define them.

    python examples/toy_lab.py            # quick: the shipped base, ExP-GRPO vs expert SFT vs GRPO, one cell at G 4
    python examples/toy_lab.py full       # every part on 3 base builds x 2 RL seeds, then the claims table
    python examples/toy_lab.py grpo|dpo|table3|coef|probe   # one part (on the cells of BUILD_SEEDS x RL_SEEDS)
    python examples/toy_lab.py claims     # the claims table of what OUT holds, no training

Knobs (environment): OUT, BUILD_SEEDS, RL_SEEDS, STEPS, BUILD_STEPS, EVAL_EVERY, EVAL_LIMIT, FINAL_LIMIT, JOBS,
GENERATIONS (the GRPO arms' G: 8, the recipe's, except in the quick run), and ARMS (run these arms instead of the
part's, e.g. ARMS="grpo expo").
Writes OUT/b{build}/{arm}_r{seed}/ (run folders), OUT/b{build}/eval_{trained}_r{seed}/ (tables by level),
OUT/claims.json and OUT/claims.md.
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

# ExP-GRPO and its baselines: 100 steps of 32 questions, G 8 (set by knobs' GENERATIONS: 4 in the quick run), T 1,
# lr 2e-3, beta 0, lambda 0.04; greedy held-out accuracy on EVAL_LIMIT 5-6 digit sums every EVAL_EVERY steps.
# 64 new tokens: the longest expert style (columns, 6 digits) is 58 tokens with its end token.
GRPO_RECIPE = ["--batch_size", "32", "--temperature", "1.0", "--lr", "2e-3", "--beta", "0",
               "--sft_coef", "0.04", "--max_new_tokens", "64", "--micro_batch_size", "128", "--gen_batch_size", "256",
               "--no_gradient_checkpointing", "--save_every", "0", "--probe_every", "0", "--log_samples", "1"]
# ExP-DPO: the same data, batch, sampling and optimizer; the paper's DPO beta 0.1; 4 CoTs per question to find a
# wrong one; online rebuilds the pairs every 10 steps.
DPO_RECIPE = ["--batch_size", "32", "--num_generations", "4", "--temperature", "1.0", "--lr", "2e-3", "--beta", "0.1",
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
            "jobs": int(os.environ.get("JOBS", 2 if full else 4)), "shipped": not full}


# ----------------------------------------------------------------------------------------------------
# Running: every run is a command line of the project's scripts
# ----------------------------------------------------------------------------------------------------

def run_command(arm: str, base: str, seed: int, out_dir: str, k: dict) -> list[str]:
    common_flags = ["--model", base, "--seed", str(seed), "--output_dir", out_dir]
    if arm in PROBES:
        return ["expo_grpo.py", *GRPO_RECIPE, *common_flags, "--dataset", PROBES[arm], "--split", "test",
                "--levels", HARD, "--batch_size", "128", "--num_generations", "2", "--max_steps", "1", "--lr", "0",
                "--probe_every", "1", "--probe_answer_logprob", "--log_samples", "128"]
    script, flags = ARMS[arm]
    recipe = GRPO_RECIPE + ["--num_generations", str(k["generations"])] if script == "expo_grpo.py" else DPO_RECIPE
    dataset = [] if "--dataset" in flags else ["--dataset", "addition"]
    return [script, *recipe, *common_flags, *dataset, "--max_steps", str(k["steps"]), "--eval_every",
            str(k["eval_every"]), "--eval_levels", HARD, "--eval_limit", str(k["eval_limit"]), "--eval_num_samples", "1",
            "--eval_temperature", "0", *flags]


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
    print(f"toy lab {mode}: {len(arms)} runs x {len(k['builds'])} base builds x {len(k['seeds'])} RL seeds -> {k['out']} "
          f"| {machine()}, {k['jobs']} at a time", flush=True)
    bases = {b: build_base(b, k) for b in k["builds"]}
    jobs = []
    for b, base in bases.items():
        for seed in k["seeds"]:
            for arm in arms:
                out_dir = os.path.join(k["out"], f"b{b}", f"{arm}_r{seed}")
                steps = 1 if arm in PROBES else k["steps"]
                if finished(out_dir, steps):
                    continue
                shutil.rmtree(out_dir, ignore_errors=True)  # the lab's own folder: an unfinished run starts over
                jobs.append((run_command(arm, base, seed, out_dir, k), out_dir + ".log", f"b{b}/{arm}_r{seed}"))
    # the offline explanations are sampled once per base, by the first run that needs them: start those first
    jobs.sort(key=lambda j: "--sft_source" not in j[0] or "explanation" not in j[0])
    run_all(jobs, k["jobs"], start)
    evals = []  # by-level tables: the base and the arms of TABLES, on the same held-out sums (not in the quick run)
    for b, base in (bases.items() if mode != "quick" else []):
        models = [("base", base)] + [(f"{a}_r{s}", os.path.join(k["out"], f"b{b}", f"{a}_r{s}", "hf"))
                                     for s in k["seeds"] for a in sum(TABLES.values(), [])
                                     if a in arms and finished(os.path.join(k["out"], f"b{b}", f"{a}_r{s}"), k["steps"])]
        for name, model in models:
            out_dir = os.path.join(k["out"], f"b{b}", "eval", name)
            if not os.path.exists(os.path.join(out_dir, "eval.json")):
                shutil.rmtree(out_dir, ignore_errors=True)
                evals.append((["eval.py", "--model", model, "--dataset", "addition", "--levels", ALL, "--limit",
                               str(k["final_limit"]), "--num_samples", "1", "--temperature", "0", "--max_new_tokens",
                               "64", "--gen_batch_size", "256", "--output_dir", out_dir], out_dir + ".log",
                              f"b{b}/eval/{name}"))
    run_all(evals, k["jobs"], start)
    report(k)
    print(f"total {time.time() - start:.0f}s | {machine()}, {k['jobs']} at a time")


def machine() -> str:
    """Every timing this lab prints is of this machine: its CPU and cores, and how the runs share them."""
    from common import machine_line

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
            path = os.path.join(d, "eval", run, "eval.json")
            if os.path.exists(path):
                by_level = json.load(open(path))["by_level"]
                f[f"{table}/{name}/levels"] = {str(lv): s["accuracy"] for lv, s in by_level.items()}
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


def main(argv: list[str]) -> None:
    mode = argv[0] if argv else "quick"
    if mode not in PARTS and mode != "claims":
        raise SystemExit(f"toy_lab: unknown part {mode!r}; choose from {', '.join([*PARTS, 'claims'])}")
    k = knobs(mode)
    if mode == "claims":
        report(k)
    else:
        lab(mode, k)


if __name__ == "__main__":
    main(sys.argv[1:])
