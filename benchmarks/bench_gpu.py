"""GPU figures at the paper's settings: a few ExP-GRPO steps of a Qwen2.5-3B-Instruct-shaped model, rollout
tokens/s, training tokens/s, model FLOPs utilisation, and each phase's peak memory against memory_plan.py.

Random weights in Qwen2.5-3B-Instruct's shape (hidden 2048, 36 layers, MLP 11008, 16 heads, 2 KV heads,
vocabulary 151,936, tied embeddings: 3.09B parameters; nothing is downloaded), fp32 master weights sharded by
`engine.shard_model` (bf16 compute on GPU), flash-attention 2 if installed, else sdpa; the reference model with
beta 0.04; activation checkpointing. A step is what expo_grpo.py does per rank: `engine.sample` of
batch_size / ranks prompts x G (prompts of --prompt_tokens random tokens, completions forced to --max_new_tokens),
then `expo_grpo.train_on_rollouts` on them in micro-batches. One warm-up step, then --steps timed ones.
  rollout tok/s   completion tokens per second of sampling, per rank
  train tok/s     prompt + completion tokens per second of the reference pass + forward + backward + AdamW
  MFU             6 N FLOPs per trained token + 2 N per reference token (N parameters; the recomputation of
                  checkpointing and attention FLOPs left out), over the GPU's dense bf16 peak
  memory          torch.cuda.max_memory_allocated in each phase against memory_plan.py's phase peak for the
                  same flags (the plan's extra sequence per question for the explanation is left out here)

    torchrun --nproc_per_node 4 benchmarks/bench_gpu.py                      # the paper's: 4 GPUs, 16 questions
    torchrun --nproc_per_node 1 benchmarks/bench_gpu.py --batch_size 4       # one GPU, 4 questions x G 8
    python benchmarks/bench_gpu.py --shape small --device cpu --batch_size 2 --num_generations 2 \\
        --prompt_tokens 16 --max_new_tokens 8                                 # the code path on CPU, in seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

from _harness import table

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
SHAPES = {  # Qwen2.5 configs (config.json of the hub checkpoints), and a small one for the CPU code path
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936),
    "small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=151936),
}


def predicted_phases(a, config, world: int, bf16: bool) -> dict[str, float]:
    """memory_plan.py's peak of each phase, bytes per GPU, for this run's flags."""
    import memory_plan as mp

    s = mp.Shape(L=config.num_hidden_layers, H=config.hidden_size, I=config.intermediate_size,
                 V=config.vocab_size, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                 head_dim=config.hidden_size // config.num_attention_heads, tied=True)
    args = mp.parse_args(["--model", "bench", "--gpus", str(world), "--micro_batch_size", str(a.micro_batch_size),
                          "--gen_batch_size", str(a.gen_batch_size), "--max_new_tokens", str(a.max_new_tokens),
                          "--prompt_tokens", str(a.prompt_tokens), "--batch_size", str(a.batch_size),
                          "--num_generations", str(a.num_generations), "--device", "gpu" if bf16 else "cpu",
                          "--bf16", str(bf16)])
    return mp.plan(s, mp.setting(args, s))["phases"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="3b")
    p.add_argument("--batch_size", type=int, default=16, help="questions per step, all ranks together")
    p.add_argument("--num_generations", type=int, default=8, help="G")
    p.add_argument("--prompt_tokens", type=int, default=300, help="tokens per prompt (MATH: up to ~300)")
    p.add_argument("--max_new_tokens", type=int, default=1024, help="completion length (forced)")
    p.add_argument("--micro_batch_size", type=int, default=8, help="sequences per forward/backward pass")
    p.add_argument("--gen_batch_size", type=int, default=64, help="sequences decoded together")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="peak dense bf16 TFLOP/s (default: by GPU name)")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM


    import engine
    import expo_grpo
    import toy  # noqa: F401  (registers the tiny model)

    info = engine.init_distributed()
    if a.batch_size % info.world_size:
        raise SystemExit(f"--batch_size {a.batch_size} does not divide over {info.world_size} ranks")
    device = info.device if a.device == "cuda" else torch.device("cpu")
    cuda = device.type == "cuda"
    a.attn = engine.attention_implementation(device)
    tokenizer = engine.load_tokenizer("tiny")  # pad/eos ids and decoding only; prompts are random ids
    config = Qwen2Config(**SHAPES[a.shape], max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, attn_implementation=a.attn, use_cache=False)

    def build():
        torch.manual_seed(0)
        with torch.device(device):
            return Qwen2ForCausalLM(config)

    model = build()
    n_params = sum(x.numel() for x in model.parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = engine.shard_model(model, device)
    ref_model = engine.shard_model(build(), device, trainable=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)  # as the trainers
    scheduler = engine.cosine_schedule(optimizer, 100, 0.0)
    args = expo_grpo.Args(model="bench", beta=0.04, micro_batch_size=a.micro_batch_size,
                          max_new_tokens=a.max_new_tokens, sft_source="none")
    questions, G = a.batch_size // info.world_size, a.num_generations
    g = torch.Generator().manual_seed(info.rank)
    vocab = min(config.vocab_size, len(tokenizer))  # ids the tokenizer can decode

    def peak(fn):
        """fn's result, its seconds and the peak bytes allocated while it ran (0 on CPU)."""
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else 0

    def step():
        prompts = [tokenizer.decode(torch.randint(3, vocab, (a.prompt_tokens,), generator=g).tolist())
                   for _ in range(questions)]
        out, t_roll, m_roll = peak(lambda: engine.sample(
            model, tokenizer, prompts, n=G, max_new_tokens=a.max_new_tokens, min_new_tokens=a.max_new_tokens,
            temperature=1.0, micro_batch_size=a.gen_batch_size))
        rollouts = {"prompt_ids": out["prompt_ids"], "completion_ids": out["completion_ids"],
                    "advantages": torch.randn(questions * G, generator=g).tolist(),
                    "in_pg": [True] * questions * G, "in_sft": [False] * questions * G}
        _, t_train, m_train = peak(lambda: expo_grpo.train_on_rollouts(model, ref_model, optimizer, scheduler,
                                                                       rollouts, args, tokenizer.pad_token_id))
        new = sum(len(c) for c in out["completion_ids"])
        trained = new + sum(len(q) for q in out["prompt_ids"])
        return dict(roll_tok_s=new / t_roll, train_tok_s=trained / t_train, step_s=t_roll + t_train,
                    mfu_flops=(6 + 2) * n_params * trained / t_train, mem_roll=m_roll, mem_train=m_train)

    step()  # warm-up: kernels, allocator, AdamW state
    runs = [step() for _ in range(a.steps)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    mem = {k: max(r[k] for r in runs) for k in ("mem_roll", "mem_train")}
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_tflops = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    engine.print0(f"{info.world_size} rank(s), {a.shape} shape ({n_params:,} parameters, {a.attn}); per rank "
                  f"and step: {questions} prompts x G {G}, {a.prompt_tokens} + {a.max_new_tokens} tokens, "
                  f"micro-batch {a.micro_batch_size}, beta 0.04, checkpointing; median of {a.steps} steps after "
                  f"1 warm-up.\n")
    engine.print0(table(["device", "rollout tok/s", "train tok/s", "step s", "MFU"],
                        [[name, f"{med['roll_tok_s']:.0f}", f"{med['train_tok_s']:.0f}", f"{med['step_s']:.1f}",
                          f"{100 * med['mfu_flops'] / (peak_tflops * 1e12):.1f}%"]]))
    plan = predicted_phases(a, config, info.world_size, bf16=cuda)
    predicted = {"mem_roll": plan["sampling"], "mem_train": max(plan["ref pass"], plan["training"], plan["optimizer"])}
    rows = [[phase, f"{predicted[m] / 2**30:.2f}", f"{mem[m] / 2**30:.2f}" if cuda else "-",
             f"{mem[m] / predicted[m]:.2f}" if cuda else "-"]
            for phase, m in (("sampling", "mem_roll"), ("reference pass + training + optimizer", "mem_train"))]
    engine.print0("\nPeak memory per GPU, GiB (rank 0; the second row against the largest of the plan's reference, "
                  "training and optimizer phases):\n")
    engine.print0(table(["phase", "predicted", "measured", "measured / predicted"], rows))


if __name__ == "__main__":
    main()
    from engine import close_distributed

    close_distributed()  # after main: its sharded models hold the process group
