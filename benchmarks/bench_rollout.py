"""Benchmark 2: rollout throughput of `engine.sample` under FSDP on CPU (gloo).

Ways to generate the same number of tokens per process, from a random-weight Qwen2 (hidden 384, 6 layers)
big enough that matrix products, not Python, dominate a decoding step:
  unsharded     one process, the plain model
  unsharded x2  two such processes at once: the same contention for cores and memory bandwidth as 2 ranks
                (on a 2-core machine this, not FSDP, is most of what separates 1 process from 2)
  sharded       2 ranks, FSDP2-sharded model, `sample` (parameters gathered once per rollout)
  naive         2 ranks, FSDP2-sharded model, `generate` straight on it with synced_gpus=True: every layer is
                all-gathered for every decoded token
Each rank generates as many tokens as the unsharded process, so "per rank" compares like with like. The modes
alternate; each run times `--reps_inner` calls after one warm-up call and reports its median.

    python benchmarks/bench_rollout.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _harness import ENV, ROOT, load_average, machine, median, table, torchrun

MODES = ("unsharded", "unsharded x2", "sharded", "naive")


def build_model(a):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM


    import engine
    import toy  # noqa: F401  (registers the tiny model and the synthetic data)

    tokenizer = engine.load_tokenizer("tiny")
    torch.manual_seed(0)  # the same weights on every rank
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=a.hidden, intermediate_size=a.hidden * 3,
                         num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    model.config.use_cache = False  # as load_model leaves it
    return model, tokenizer


def worker(a) -> None:
    import torch

    import common
    import engine
    import toy  # noqa: F401  (registers the tiny model and the synthetic data)

    torch.set_num_threads(1)
    model, tokenizer = build_model(a)
    rows, _ = common.load_problems("synthetic", levels=[1, 2], seed=0)
    prompts = [common.question_prompt(tokenizer, r["question"]) for r in rows[: a.prompts]]
    if a.mode in ("sharded", "naive"):
        info = engine.init_distributed()
        model = engine.shard_model(model, info.device)

    def run(n_new):
        if a.mode != "naive":
            engine.sample(model, tokenizer, prompts, n=1, max_new_tokens=n_new, min_new_tokens=n_new,
                          temperature=0.9, micro_batch_size=len(prompts))
            return
        batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        model.eval()
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True, temperature=0.9,
                           top_p=1.0, top_k=0, use_cache=True, synced_gpus=True,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    run(4)  # warm-up
    rates = []
    for _ in range(a.reps_inner):
        start = time.perf_counter()
        run(a.new_tokens)
        rates.append(len(prompts) * a.new_tokens / (time.perf_counter() - start))
    rate = statistics.median(rates)
    if a.mode in ("sharded", "naive"):
        rate = engine.gather_objects(rate)
        if common.dist.get_rank() == 0:
            print("RESULT", json.dumps({"per_rank": statistics.mean(rate)}))
    else:
        print("RESULT", json.dumps({"per_rank": rate}))


def launch(a, mode: str) -> float:
    own = [os.path.abspath(__file__), "--worker", "--mode", mode.split()[0], "--hidden", str(a.hidden),
           "--layers", str(a.layers), "--prompts", str(a.prompts), "--new_tokens", str(a.new_tokens),
           "--reps_inner", str(a.reps_inner)]
    cmds = {"unsharded": [[sys.executable, *own]], "unsharded x2": [[sys.executable, *own]] * 2}.get(
        mode, [[*torchrun(2), *own]])
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    rates = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        line = [ln for ln in out.splitlines() if ln.startswith("RESULT")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"{mode} failed:\n{out[-3000:]}\n{err[-3000:]}")
        rates.append(json.loads(line[0].split(" ", 1)[1])["per_rank"])
    return statistics.mean(rates)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="runs of each mode, alternating")
    p.add_argument("--reps_inner", type=int, default=3, help="timed sample calls per run")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--prompts", type=int, default=16, help="sequences generated per process (one micro-batch)")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per sequence (forced)")
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    print(machine(), flush=True)
    if a.worker:
        from engine import close_distributed

        worker(a)
        return close_distributed()  # after the worker: its sharded model holds the process group

    load_before = load_average()
    rates = {m: [] for m in MODES}
    for rep in range(a.reps):
        for mode in MODES:
            rates[mode].append(launch(a, mode))
        print(f"rep {rep + 1}: " + ", ".join(f"{m} {rates[m][-1]:.0f} tok/s" for m in MODES), file=sys.stderr)
    base, base2 = median(rates["unsharded"]), median(rates["unsharded x2"])
    rows = [[m, "1" if m == "unsharded" else "2", *[f"{r:.0f}" for r in rates[m]], f"{median(rates[m]):.0f}",
             f"{median(rates[m]) / base:.2f}", f"{median(rates[m]) / base2:.2f}"] for m in MODES]
    print(f"Rollout throughput of engine.sample, random Qwen2 hidden {a.hidden} x {a.layers} layers, {a.prompts} "
          f"sequences x {a.new_tokens} forced new tokens per process, 1 thread per process, fp32 CPU, gloo "
          f"(load average {load_before} -> {load_average()}). Target: sharded >= 0.9x unsharded per rank.\n")
    print(table(["mode", "processes", *[f"run {i + 1} tok/s per rank" for i in range(a.reps)], "median",
                 "vs unsharded", "vs unsharded x2"], rows))


if __name__ == "__main__":
    main()
