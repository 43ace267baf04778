"""GPU figures: rollout tokens/s, training tokens/s and model FLOPs utilisation, Qwen2.5-1.5B-shaped model.

Random weights (nothing is downloaded) in the Qwen2.5-1.5B shape (hidden 1536, 28 layers, MLP 8960, 12 heads,
2 KV heads, vocabulary 151,936, tied embeddings: 1.54B parameters), fp32 master weights sharded with
`common.shard_model` (bf16 compute on GPU), flash-attention 2 if installed, else sdpa. Prompts are random token
ids; completions are forced to `--new_tokens` so every run generates the same amount.
  rollout   tokens/s of `common.sample` (KV cache, parameters gathered once)
  training  tokens/s of `expo_grpo.train_on_rollouts` (reference pass with beta 0.04, then forward + backward
            + AdamW, gradient checkpointing), over prompt + completion tokens
  MFU       model FLOPs / time / peak bf16 FLOPs, with 6 N FLOPs per trained token and 2 N per reference token
            (N = parameters; attention FLOPs left out, so this slightly understates it)

    torchrun --nproc_per_node 1 benchmarks/bench_gpu.py               # one GPU
    python benchmarks/bench_gpu.py --small --device cpu                 # the code path on CPU, tiny shape
"""

from __future__ import annotations

import argparse
import statistics
import time

from _harness import table

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64, help="sequences per rollout call (one micro-batch)")
    p.add_argument("--prompt_tokens", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=512, help="forced completion length")
    p.add_argument("--train_seqs", type=int, default=32, help="sequences per training step")
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--reps", type=int, default=3, help="timed calls after one warm-up")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="peak bf16 TFLOP/s (default: by GPU name)")
    p.add_argument("--small", action="store_true", help="a tiny shape, to try the code path")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import common
    import toy  # noqa: F401  (registers the tiny model and the synthetic data)
    import expo_grpo

    info = common.init_distributed()
    device = info.device if a.device == "cuda" else torch.device("cpu")
    shape = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936)
    if a.small:
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=151936)
    attn = common.attention_implementation(device)
    tokenizer = common.load_tokenizer("tiny")  # only for pad/eos ids and decoding; prompts are random ids
    config = Qwen2Config(**shape, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, attn_implementation=attn, use_cache=False)

    def build():
        torch.manual_seed(0)
        with torch.device(device):
            return Qwen2ForCausalLM(config)

    model = build()
    n_params = sum(x.numel() for x in model.parameters())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = common.shard_model(model, device)
    ref_model = common.shard_model(build(), device, trainable=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scheduler = common.cosine_schedule(optimizer, 100, 0.0)
    g = torch.Generator().manual_seed(info.rank)
    vocab = min(config.vocab_size, len(tokenizer))  # ids the tokenizer can decode
    prompt_text = [tokenizer.decode(torch.randint(3, vocab, (a.prompt_tokens,), generator=g).tolist())
                   for _ in range(a.prompts)]

    def timed(fn):
        fn()  # warm-up
        out = []
        for _ in range(a.reps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(tokens / (time.perf_counter() - start))
        return statistics.median(out)

    def rollout():
        out = common.sample(model, tokenizer, prompt_text, n=1, max_new_tokens=a.new_tokens,
                            min_new_tokens=a.new_tokens, temperature=0.9, micro_batch_size=a.prompts)
        return sum(len(c) for c in out["completion_ids"])

    args = expo_grpo.Args(model="bench", beta=0.04, micro_batch_size=a.micro_batch_size,
                          max_new_tokens=a.new_tokens, sft_source="none")
    rollouts = {"prompt_ids": torch.randint(3, vocab, (a.train_seqs, a.prompt_tokens), generator=g).tolist(),
                "completion_ids": torch.randint(3, vocab, (a.train_seqs, a.new_tokens), generator=g).tolist(),
                "advantages": torch.randn(a.train_seqs, generator=g).tolist(), "in_pg": [True] * a.train_seqs,
                "in_sft": [False] * a.train_seqs}

    def train():
        expo_grpo.train_on_rollouts(model, ref_model, optimizer, scheduler, rollouts, args, tokenizer.pad_token_id)
        return a.train_seqs * (a.prompt_tokens + a.new_tokens)

    rollout_tok_s = timed(rollout)
    train_tok_s = timed(train)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))
    mfu = train_tok_s * (6 + 2) * n_params / (peak * 1e12)
    rows = [[name, f"{n_params / 1e9:.2f}B", attn, f"{rollout_tok_s:.0f}", f"{train_tok_s:.0f}", f"{100 * mfu:.1f}%"]]
    common.print0(f"{info.world_size} rank(s); rollout {a.prompts} x ({a.prompt_tokens} prompt + {a.new_tokens} new) "
                  f"tokens; training {a.train_seqs} sequences in micro-batches of {a.micro_batch_size}; per rank, "
                  f"median of {a.reps}.\n")
    common.print0(table(["device", "parameters", "attention", "rollout tok/s", "training tok/s", "MFU"], rows))
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
