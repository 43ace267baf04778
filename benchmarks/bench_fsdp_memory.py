"""Benchmark 4: per-rank peak memory of an ExP-GRPO training step under FSDP2, 2 ranks against 1 rank.

A random Qwen2 of ~100M parameters (hidden 768, 12 layers, vocab 32k), so parameters, gradients and AdamW's two
moments (16 bytes a parameter in fp32) dominate. Each rank builds the model, shards it (`engine.shard_model`),
frees what it no longer holds, then runs `--steps` calls of `expo_grpo.train_on_rollouts` (forward, backward,
AdamW step; beta 0, so no reference model; gradient checkpointing on) on its own 4 sequences of 32 + 96 tokens.
Reported: the peak RSS during the steps minus the RSS the process had before the model existed, with glibc
told to mmap blocks over 64 KiB (MALLOC_MMAP_THRESHOLD_), so that RSS follows the live tensors.

    python benchmarks/bench_fsdp_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _harness import ENV, ROOT, median, peak_rss_mb, reset_peak_rss, rss_mb, table, torchrun


def worker(a) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM


    import engine
    import expo_grpo

    torch.set_num_threads(1)
    info = engine.init_distributed()
    start = rss_mb()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True,
                         attn_implementation="sdpa", use_cache=False)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = engine.shard_model(model, info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = engine.cosine_schedule(optimizer, a.steps, 0.0)
    args = expo_grpo.Args(model="bench", beta=0.0, micro_batch_size=4, max_new_tokens=96, sft_source="none")
    g = torch.Generator().manual_seed(info.rank)
    rollouts = {"prompt_ids": torch.randint(3, 32000, (4, 32), generator=g).tolist(),
                "completion_ids": torch.randint(3, 32000, (4, 96), generator=g).tolist(),
                "advantages": [1.0, -1.0, 0.5, -0.5], "in_pg": [True] * 4, "in_sft": [False] * 4}
    base = reset_peak_rss()
    for _ in range(a.steps):
        expo_grpo.train_on_rollouts(model, None, optimizer, scheduler, rollouts, args, pad_id=0)
    result = {"peak_above_start": peak_rss_mb() - start, "before_steps": base - start, "params": n_params}
    results = engine.gather_objects(result)
    if info.is_main:
        print("RESULT", json.dumps({k: max(r[k] for r in results) for k in result}))


def launch(a, nproc: int) -> dict:
    cmd = [*torchrun(nproc), os.path.abspath(__file__), "--worker", "--steps", str(a.steps)]
    # glibc keeps freed heap memory resident and per-thread arenas (gloo's threads) reuse it poorly, so RSS
    # would measure the allocator's cache; with large blocks mmap-ed, freeing one gives it back at once
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{nproc} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[0].split(" ", 1)[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=2, help="runs of each world size, alternating")
    p.add_argument("--steps", type=int, default=2, help="training steps per run (AdamW state exists from the first)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        from engine import close_distributed

        worker(a)
        return close_distributed()  # after the worker: its sharded model holds the process group

    runs = {1: [], 2: []}
    for rep in range(a.reps):
        for nproc in (1, 2):
            runs[nproc].append(launch(a, nproc))
            print(f"rep {rep + 1}, {nproc} rank(s): {runs[nproc][-1]}", file=sys.stderr)
    n_params = runs[1][0]["params"]
    peak = {n: median([r["peak_above_start"] for r in runs[n]]) for n in runs}
    rows = [[f"{n}", f"{median([r['before_steps'] for r in runs[n]]):.0f}", f"{peak[n]:.0f}",
             f"{peak[n] / peak[1]:.2f}"] for n in (1, 2)]
    print(f"Per-rank peak memory of `train_on_rollouts` (forward, backward, AdamW), random Qwen2 of "
          f"{n_params / 1e6:.0f}M parameters (fp32 parameters + gradients + AdamW = {16 * n_params / 2**20:.0f} MiB "
          f"unsharded), 4 sequences x 128 tokens per rank, gradient checkpointing, FSDP2 on gloo; MiB above the RSS "
          f"before the model was built, highest rank, median of {a.reps} runs. Target: 2 ranks <= 0.65x 1 rank.\n")
    print(table(["ranks", "after sharding + optimizer, MiB", "peak during steps, MiB", "vs 1 rank"], rows))


if __name__ == "__main__":
    main()
