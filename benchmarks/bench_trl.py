"""Benchmark 1: step time of `expo_grpo.py --sft_source none` against trl's GRPOTrainer, one CPU process each.

Same model (the tiny model, or `--layers L --width W`: a random Qwen2 of that shape over the tiny model's
tokenizer, or any local `--model` directory), same data set (each side draws its own questions) under the same
chat template, same G, batch, micro-batch, beta 0.04, lr, clip, temperature, seq-mean loss, fp32, activation
checkpointing on in both or off in both (`--checkpointing`), and the same completion length in both
(min_new_tokens = max_new_tokens). Runs
alternate expo, trl, expo, trl...; each run's first `--warmup` optimizer steps are dropped, the rest are timed,
and the table gives each run's median step and the median of the per-repetition ratios. `--profile` splits each
side's step into phases (sampling, rewards, reference pass, policy forward, backward, optimizer, metrics) by
timing the functions that do them; each phase is the median over --reps runs.

    python benchmarks/bench_trl.py                       # about 2 minutes on 2 CPU cores
    python benchmarks/bench_trl.py --reps 5 --steps 8 --checkpointing off
    python benchmarks/bench_trl.py --layers 4 --width 128 --dataset openai/gsm8k --dataset_config main --levels all \\
        --G 4 --micro_batch_size 4
    python benchmarks/bench_trl.py --profile --reps 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from _harness import ENV, Phases, ROOT, load_average, machine, median, run_expo, table

PHASES = ["sampling", "rewards", "reference pass", "policy forward", "backward", "optimizer", "metrics, logging",
          "other", "step"]


def model_path(a) -> str:
    """The benchmark's model directory: `--model`, or a random Qwen2 of `--layers` x `--width` (built once)."""
    import toy

    if not a.layers:
        return toy.build_tiny_model() if a.model == "tiny" else a.model

    def write(tmp):
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM


        import engine

        tokenizer = engine.load_tokenizer(toy.build_tiny_model())
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=a.width, intermediate_size=2 * a.width,
                             num_hidden_layers=a.layers, num_attention_heads=a.width // 32, num_key_value_heads=2,
                             max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        toy.save_pretrained(model, tokenizer, tmp)

    return toy.built_once(os.path.join(toy.CACHE_DIR, f"bench-qwen2-{a.layers}x{a.width}"), write)


def expo_args(a, path: str) -> list[str]:
    return ["--model", path, "--dataset", a.dataset, "--levels", a.levels, "--sft_source", "none",
            "--batch_size", str(a.batch_size), "--num_generations", str(a.G), "--micro_batch_size",
            str(a.micro_batch_size), "--gen_batch_size", str(a.batch_size * a.G), "--max_new_tokens",
            str(a.max_new_tokens), "--min_new_tokens", str(a.max_new_tokens), "--beta", "0.04",
            "--temperature", "0.9", "--max_steps", str(a.warmup + a.steps),
            "--gradient_checkpointing", "true" if a.checkpointing == "on" else "false"] + (
        ["--dataset_config", a.dataset_config] if a.dataset_config else [])


def grad_label(no_grad: str, grad: str):
    import torch

    return lambda: grad if torch.is_grad_enabled() else no_grad


def expo_profile_worker(a) -> None:
    """One expo_grpo.py run in this process with its phases timed; prints them as JSON."""
    import json
    import tempfile

    import torch

    import expo_grpo
    import runs

    phases = Phases()
    phases.wrap(expo_grpo, "sample", "sampling")
    phases.wrap(expo_grpo, "score_answers", "rewards")
    phases.wrap(expo_grpo, "token_logprobs", grad_label("reference pass", "policy forward"))
    phases.wrap(torch.Tensor, "backward", "backward")
    phases.wrap(expo_grpo, "optimizer_step", "optimizer")
    phases.wrap(expo_grpo, "sum_over_ranks", "metrics, logging")
    phases.wrap(runs.Run, "end_step", "metrics, logging")
    end_step = runs.Run.end_step

    def end_and_mark(*args, **kwargs):
        end_step(*args, **kwargs)
        phases.mark()

    runs.Run.end_step = end_and_mark
    with tempfile.TemporaryDirectory() as out:
        # one step more than timed: the last step of a run saves a checkpoint (trl's runs save none)
        sys.argv = ["expo_grpo.py", *expo_args(a, model_path(a)), "--output_dir", out, "--save_every", "0",
                    "--probe_every", "0", "--log_samples", "0", "--max_steps", str(a.warmup + a.steps + 1)]
        expo_grpo.main()
    print("PHASES", json.dumps(phases.per_step(a.warmup, a.steps)))


def trl_worker(a) -> None:
    """One GRPOTrainer run in this process; prints the seconds of each optimizer step after the warm-up."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import common
    import engine
    import toy  # noqa: F401  (registers the tiny model and the synthetic data)

    torch.manual_seed(0)
    path = model_path(a)
    tokenizer = engine.load_tokenizer(path)
    rows, _ = common.load_problems(a.dataset, config=a.dataset_config or None, levels=common.parse_levels(a.levels),
                                   seed=0)
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
    phases = Phases()
    if a.profile:
        phases.wrap(GRPOTrainer, "_generate", "sampling")
        phases.wrap(GRPOTrainer, "_calculate_rewards", "rewards")
        phases.wrap(GRPOTrainer, "_get_per_token_logps_and_entropies", grad_label("reference pass", "policy forward"))
        phases.wrap(torch.Tensor, "backward", "backward")
        phases.wrap(torch.nn.utils, "clip_grad_norm_", "optimizer")
        phases.wrap(torch.optim.AdamW, "step", "optimizer")
        phases.wrap(GRPOTrainer, "log", "metrics, logging")
        times.on_step_end = lambda *args, **kw: phases.mark() or times.ends.append(time.perf_counter())
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
    if a.profile:
        import json

        print("PHASES", json.dumps(phases.per_step(a.warmup, a.steps)))
    ends = [start] + times.ends
    print("STEP_SECONDS", " ".join(f"{e - s:.4f}" for s, e in list(zip(ends, ends[1:]))[a.warmup:]))


def run_worker(a, role: str, key: str) -> str:
    """Run this script as `role` (trl_worker, expo_profile_worker) in a fresh process; return its `key` line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--" + role] + [
        x for k in ("steps", "warmup", "batch_size", "G", "micro_batch_size", "max_new_tokens", "levels",
                    "checkpointing", "model", "layers", "width", "dataset", "dataset_config")
        for x in ("--" + k, str(getattr(a, k)))] + (["--profile"] if a.profile else [])
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(key)]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{role} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return line[0][len(key):].strip()


def run_trl(a) -> list[float]:
    return [float(x) for x in run_worker(a, "trl_worker", "STEP_SECONDS").split()]


def profile(a) -> None:
    import json

    runs = {"expo": [], "trl": []}
    for _ in range(a.reps):  # alternating, as the timed runs
        runs["expo"].append(json.loads(run_worker(a, "expo_profile_worker", "PHASES")))
        runs["trl"].append(json.loads(run_worker(a, "trl_worker", "PHASES")))
    expo, trl = ({k: median([r.get(k, 0.0) for r in runs[side]]) for k in PHASES} for side in ("expo", "trl"))
    rows = [[k, expo[k], trl[k], expo[k] - trl[k]] for k in PHASES]
    print(f"Where a step's time goes, {describe(a)}: seconds per step, mean of {a.steps} steps after {a.warmup} "
          f"warm-up, median of {a.reps} runs each, alternating (load average {load_average()}).\n")
    print(table(["phase", "expo s", "trl s", "expo - trl"], rows))


def describe(a) -> str:
    model = f"random Qwen2 {a.layers} layers x {a.width}" if a.layers else f"model {a.model}"
    return (f"{model}, {a.dataset} {a.batch_size} questions x G {a.G}, micro-batch {a.micro_batch_size}, "
            f"{a.max_new_tokens} forced new tokens, beta 0.04, fp32, checkpointing {a.checkpointing} on both sides, "
            f"1 CPU thread")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="runs of each, alternating")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps at the start of each run")
    p.add_argument("--batch_size", type=int, default=4, help="questions per step")
    p.add_argument("--G", type=int, default=8, help="completions per question")
    p.add_argument("--micro_batch_size", type=int, default=8, help="sequences per forward/backward pass")
    p.add_argument("--max_new_tokens", type=int, default=64, help="completion length (forced)")
    p.add_argument("--levels", default="1-2", help="problem levels (`all` for data without levels)")
    p.add_argument("--checkpointing", choices=["on", "off"], default="on", help="activation checkpointing, both sides")
    p.add_argument("--model", default="tiny", help="`tiny` or a local model directory")
    p.add_argument("--layers", type=int, default=0, help="with --width: a random Qwen2 of this shape instead")
    p.add_argument("--width", type=int, default=128, help="hidden size of the --layers model")
    p.add_argument("--dataset", default="synthetic", help="`synthetic`, a local .jsonl file or a hub data set")
    p.add_argument("--dataset_config", default="", help="hub data set config (openai/gsm8k: main)")
    p.add_argument("--profile", action="store_true", help="split each side's step into phases (median of --reps)")
    p.add_argument("--trl_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--expo_profile_worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    print(machine(), flush=True)
    if a.trl_worker:
        return trl_worker(a)
    if a.expo_profile_worker:
        return expo_profile_worker(a)
    if a.profile:
        return profile(a)

    path = model_path(a)
    load_before = load_average()
    rows = []
    for rep in range(a.reps):
        expo = median(run_expo(expo_args(a, path), a.warmup))
        trl = median(run_trl(a))
        rows.append([rep + 1, expo, trl, expo / trl])
        print(f"rep {rep + 1}: expo {expo:.3f} s, trl {trl:.3f} s, ratio {expo / trl:.3f}", file=sys.stderr)
    expo_m, trl_m = median([r[1] for r in rows]), median([r[2] for r in rows])
    rows.append(["median", expo_m, trl_m, median([r[3] for r in rows])])
    print(f"Step time, expo_grpo.py --sft_source none vs trl GRPOTrainer ({describe(a)}; median of {a.steps} steps "
          f"after {a.warmup} warm-up; load average {load_before} -> {load_average()}). Target: ratio <= 0.8.\n")
    print(table(["repetition", "expo s/step", "trl s/step", "expo / trl"], rows))


if __name__ == "__main__":
    main()
