"""Benchmark 5: step time of ExP-GRPO (`--sft_source explanation`) over plain GRPO (`--sft_source none`).

The same expo_grpo.py run both ways, one CPU process, tiny model, forced completion and explanation lengths.
ExP-GRPO's extra work per question: one more sample (the self-explanation), its verification, and one more
sequence (question + explanation) in the log-prob passes. A random-weight model never writes an explanation
that verifies, which would leave that last part out, so both arms run with every answer counted as verified
(see _harness.ALL_VERIFIED): the explanation arm then trains on every explanation, its costliest case.
Runs alternate; the first `--warmup` steps of each are dropped.

    python benchmarks/bench_overhead.py
"""

from __future__ import annotations

import argparse
import sys

from _harness import load_average, machine, median, run_expo, table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="runs of each arm, alternating")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64, help="completion and explanation length (forced)")
    a = p.parse_args()
    print(machine(), flush=True)

    common_args = ["--model", "tiny", "--dataset", "synthetic", "--levels", "1-2", "--batch_size", str(a.batch_size),
                   "--num_generations", str(a.G), "--micro_batch_size", "8", "--gen_batch_size",
                   str(a.batch_size * (a.G + 1)), "--max_new_tokens", str(a.max_new_tokens), "--min_new_tokens",
                   str(a.max_new_tokens), "--beta", "0.04", "--max_steps", str(a.warmup + a.steps)]
    load_before = load_average()
    rows = []
    for rep in range(a.reps):
        none = median(run_expo(common_args + ["--sft_source", "none"], a.warmup, all_verified=True))
        expl = median(run_expo(common_args + ["--sft_source", "explanation"], a.warmup, all_verified=True))
        rows.append([rep + 1, none, expl, expl / none])
        print(f"rep {rep + 1}: none {none:.3f} s, explanation {expl:.3f} s, ratio {expl / none:.3f}", file=sys.stderr)
    rows.append(["median", median([r[1] for r in rows]), median([r[2] for r in rows]), median([r[3] for r in rows])])
    print(f"Step time of expo_grpo.py --sft_source explanation over --sft_source none (tiny model, {a.batch_size} "
          f"questions x G {a.G} + {a.batch_size} explanations, {a.max_new_tokens} forced new tokens, beta 0.04, every "
          f"explanation verified and trained on; median of {a.steps} steps after {a.warmup} warm-up; load average "
          f"{load_before} -> {load_average()}). Target: < 1.3x.\n")
    print(table(["repetition", "none s/step", "explanation s/step", "explanation / none"], rows))


if __name__ == "__main__":
    main()
