"""Benchmark 1: step time of `expo_grpo.py --sft_source none` against trl's GRPOTrainer, one CPU process each.

Same tiny model (toy.build_tiny_model), same synthetic prompts under the same chat template, same G, batch,
micro-batch, beta 0.04, lr, clip, temperature, seq-mean loss, fp32, activation checkpointing on in both or off in
both (`--checkpointing`), and the same completion length in both (min_new_tokens = max_new_tokens). Runs alternate expo, trl, expo, trl...;
each run's first `--warmup` optimizer steps are dropped, the rest are timed, and the table gives the medians
and the ratio of the medians of the same repetitions.

    python benchmarks/bench_trl.py                       # about 5 minutes on 2 CPU cores
    python benchmarks/bench_trl.py --reps 5 --steps 8 --checkpointing off
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _harness import ENV, ROOT, load_average, median, run_expo, table


def trl_worker(a) -> None:
    """One GRPOTrainer run in this process; prints the seconds of each optimizer step after the warm-up."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import common
    import toy  # noqa: F401  (registers the tiny model and the synthetic data)

    torch.manual_seed(0)
    path = toy.build_tiny_model()
    tokenizer = common.load_tokenizer(path)
    rows, _ = common.load_problems("synthetic", levels=common.parse_levels(a.levels), seed=0)
    data = Dataset.from_list([{"prompt": common.question_prompt(tokenizer, r["question"]), "answer": r["answer"]}
                              for r in rows])

    def reward(completions, answer, **_):  # the reward expo uses
        return [common.verify_answer(c, gold) for c, gold in zip(completions, answer)]

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    times = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, bf16=False, fp16=False, seed=0, report_to="none", save_strategy="no",
            logging_steps=10**6, disable_tqdm=True, max_steps=a.warmup + a.steps,
            model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
            per_device_train_batch_size=a.micro_batch_size,
            gradient_accumulation_steps=a.batch_size * a.G // a.micro_batch_size,  # one generation per step
            num_generations=a.G, max_completion_length=a.max_new_tokens,
            generation_kwargs={"min_new_tokens": a.max_new_tokens}, temperature=0.9, top_p=1.0, top_k=0,
            beta=0.04, epsilon=0.2, loss_type="grpo", scale_rewards="group", num_iterations=1,
            learning_rate=3e-6, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", gradient_checkpointing=a.checkpointing == "on", log_completions=False, disable_dropout=True,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=path, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[times])
        start = time.perf_counter()
        trainer.train()
    ends = [start] + times.ends
    print("STEP_SECONDS", " ".join(f"{e - s:.4f}" for s, e in list(zip(ends, ends[1:]))[a.warmup:]))


def run_trl(a) -> list[float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--trl_worker", "--steps", str(a.steps), "--warmup",
           str(a.warmup), "--batch_size", str(a.batch_size), "--G", str(a.G), "--micro_batch_size",
           str(a.micro_batch_size), "--max_new_tokens", str(a.max_new_tokens), "--levels", a.levels,
           "--checkpointing", a.checkpointing]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("STEP_SECONDS")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"trl run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [float(x) for x in line[0].split()[1:]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="runs of each, alternating")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps at the start of each run")
    p.add_argument("--batch_size", type=int, default=4, help="questions per step")
    p.add_argument("--G", type=int, default=8, help="completions per question")
    p.add_argument("--micro_batch_size", type=int, default=8, help="sequences per forward/backward pass")
    p.add_argument("--max_new_tokens", type=int, default=64, help="completion length (forced)")
    p.add_argument("--levels", default="1-2", help="synthetic problem levels")
    p.add_argument("--checkpointing", choices=["on", "off"], default="on", help="activation checkpointing, both sides")
    p.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.trl_worker:
        return trl_worker(a)

    expo_args = ["--model", "tiny", "--dataset", "synthetic", "--levels", a.levels, "--sft_source", "none",
                 "--batch_size", str(a.batch_size), "--num_generations", str(a.G), "--micro_batch_size",
                 str(a.micro_batch_size), "--gen_batch_size", str(a.batch_size * a.G), "--max_new_tokens",
                 str(a.max_new_tokens), "--min_new_tokens", str(a.max_new_tokens), "--beta", "0.04",
                 "--temperature", "0.9", "--max_steps", str(a.warmup + a.steps),
                 "--gradient_checkpointing", "true" if a.checkpointing == "on" else "false"]
    load_before = load_average()
    rows = []
    for rep in range(a.reps):
        expo = median(run_expo(expo_args, a.warmup))
        trl = median(run_trl(a))
        rows.append([rep + 1, expo, trl, expo / trl])
        print(f"rep {rep + 1}: expo {expo:.3f} s, trl {trl:.3f} s, ratio {expo / trl:.3f}", file=sys.stderr)
    expo_m, trl_m = median([r[1] for r in rows]), median([r[2] for r in rows])
    rows.append(["median", expo_m, trl_m, median([r[3] for r in rows])])
    print(f"Step time, expo_grpo.py --sft_source none vs trl GRPOTrainer (tiny model, {a.batch_size} questions x G "
          f"{a.G}, {a.max_new_tokens} forced new tokens, beta 0.04, fp32, checkpointing {a.checkpointing} on both sides, 1 CPU thread; median of {a.steps} steps "
          f"after {a.warmup} warm-up; load average {load_before} -> {load_average()}). Target: ratio <= 0.8.\n")
    print(table(["repetition", "expo s/step", "trl s/step", "expo / trl"], rows))


if __name__ == "__main__":
    main()
