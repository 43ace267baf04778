"""Rollout throughput: the new `sample()` (rows leave the batch as they end, pending prompts refill their slots)
against the old one (one padded `model.generate` per micro-batch, copied below as the peer).

Workload: a random Qwen2 whose lm_head biases EOS so that, with min_new_tokens = max_new_tokens / 10, sampled
completion lengths spread from ~10% to 100% of max_new_tokens (a share hit the cap). Both paths sample at
T = 1 with the same seed; the figure compared is useful tokens/s (sum of completion lengths / wall time),
median over alternating repetitions (old, new, old, new, ...). A greedy run on a second head (lengths varied
by the model itself, no floor) checks that both paths give token-identical completions.

    OMP_NUM_THREADS=1 python benchmarks/bench_sampler.py --reps 5      # the figures in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
from torch import nn

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # the repository root

from _harness import machine  # noqa: E402
from engine import fsdp_modules, gathered_params, progress  # noqa: E402
from engine import sample as new_sample  # noqa: E402


# --- the peer: engine.sample() as it was before this change (verbatim but for the stats it now reports) ---
@torch.no_grad()
def old_sample(model, tokenizer, prompts, n=1, max_new_tokens=512, temperature=1.0, top_p=1.0,
               micro_batch_size=16, min_new_tokens=0, desc="sampling"):
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    counts = n if isinstance(n, list) else [n] * len(prompts)
    jobs = [i for i, k in enumerate(counts) for _ in range(k)]
    order = sorted(range(len(jobs)), key=lambda j: len(prompt_ids[jobs[j]]))
    completions: list = [None] * len(jobs)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    gen_kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, eos_token_id=eos_id,
                      pad_token_id=pad_id, use_cache=True, synced_gpus=False)
    if temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        gen_kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    decoded = forwards = 0
    ctx = gathered_params(model) if fsdp_modules(model) else contextlib.nullcontext()
    with ctx:
        chunks = [order[s: s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
        for chunk in progress(chunks, desc):
            batch = [prompt_ids[jobs[j]] for j in chunk]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
            decoded += out.shape[0] * (out.shape[1] - width)  # every row decodes until the longest has ended
            forwards += out.shape[1] - width  # a prefill, then one forward per further token
            for r, j in enumerate(chunk):
                completions[j] = out[r, width:].tolist()
    model.train(was_training)
    comp_ids, ended = [], []
    for c in completions:
        cut = c.index(eos_id) + 1 if eos_id in c else len(c)
        comp_ids.append(c[:cut])
        ended.append(eos_id in c)
    useful = sum(len(c) for c in comp_ids)
    return {"prompt_ids": [prompt_ids[i] for i in jobs], "completion_ids": comp_ids, "eos": ended,
            "texts": tokenizer.batch_decode(comp_ids, skip_special_tokens=True) if comp_ids else [],
            "stats": {"decoded_slots": decoded, "useful_tokens": useful, "pad_waste": 1 - useful / max(decoded, 1),
                      "forwards": forwards,
                      "seconds": time.perf_counter() - t0}}


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token=None)


def random_qwen2(vocab: int, layers: int, width: int, eos_bias: float, head_std: float, seed: int = 0):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                      num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 128),
                      max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=1, pad_token_id=0,
                      bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.lm_head = nn.Linear(width, vocab, bias=True)
    nn.init.normal_(model.lm_head.weight, std=head_std)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[1] = eos_bias
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, bos_token_id=None)
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--micro_batch_size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--eos_bias", type=float, default=3.0, help="sets the EOS hazard per step after the floor")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(machine(), flush=True)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)

    tok = word_tokenizer(args.vocab)
    model = random_qwen2(args.vocab, args.layers, args.width, args.eos_bias, head_std=0.02, seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(8, 40, (args.prompts,), generator=g).tolist()
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(2, args.vocab, (k,), generator=g)) for k in lengths]
    kw = dict(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0,
              micro_batch_size=args.micro_batch_size, min_new_tokens=args.max_new_tokens // 10)
    paths = {"old: generate per micro-batch": old_sample, "new: leave + refill": new_sample}
    runs = {name: [] for name in paths}
    new_sample(model, tok, prompts[:2], **{**kw, "n": 1})  # warm-up (first-call costs) for both
    old_sample(model, tok, prompts[:2], **{**kw, "n": 1})
    for rep in range(args.reps):
        for name, fn in paths.items():
            torch.manual_seed(1000 + rep)
            out = fn(model, tok, prompts, **kw)
            runs[name].append(out)

    # greedy identity: a head whose logits vary enough that the argmax sometimes is EOS (lengths vary, no floor)
    greedy = random_qwen2(args.vocab, args.layers, args.width, eos_bias=0.0, head_std=0.2, seed=args.seed + 1)
    greedy.lm_head.bias.data[1] = greedy_bias(greedy, tok, prompts, args.max_new_tokens)
    gkw = dict(kw, temperature=0.0, min_new_tokens=0, n=1)
    a, b = old_sample(greedy, tok, prompts, **gkw), new_sample(greedy, tok, prompts, **gkw)
    same = a["completion_ids"] == b["completion_ids"] and a["eos"] == b["eos"]
    glens = sorted(len(c) for c in a["completion_ids"])

    M = args.max_new_tokens
    print(f"# bench_rollout: Qwen2 {args.layers} layers x {args.width}, vocab {args.vocab}, random weights; "
          f"{args.prompts} prompts (8-39 tokens) x n {args.n}, max_new_tokens {M}, min_new_tokens {M // 10}, "
          f"micro_batch_size {args.micro_batch_size}, T 1.0, fp32 CPU, OMP_NUM_THREADS={threads}, "
          f"torch {torch.__version__}; median of {args.reps} alternating repetitions")
    print(f"{'path':32s} {'useful tok':>10s} {'decoded':>8s} {'pad_waste':>9s} {'forwards':>8s} {'seconds':>8s} {'useful tok/s':>12s}"
          f" {'x old':>6s}  lengths/max_new (min p10 p50 p90 max, % cut)")
    base = None
    for name, outs in runs.items():
        secs = statistics.median(o["stats"]["seconds"] for o in outs)
        rate = statistics.median(o["stats"]["useful_tokens"] / o["stats"]["seconds"] for o in outs)
        base = base or rate
        useful = statistics.median(o["stats"]["useful_tokens"] for o in outs)
        decoded = statistics.median(o["stats"]["decoded_slots"] for o in outs)
        waste = statistics.median(o["stats"]["pad_waste"] for o in outs)
        fwd = statistics.median(o["stats"]["forwards"] for o in outs)
        lens = sorted(len(c) for o in outs for c in o["completion_ids"])
        q = [lens[min(len(lens) - 1, int(f * len(lens)))] / M for f in (0, 0.1, 0.5, 0.9, 1.0)]
        cut = sum(1 for o in outs for e in o["eos"] if not e) / len(lens)
        print(f"{name:32s} {useful:10.0f} {decoded:8.0f} {waste:9.1%} {fwd:8.0f} {secs:8.2f} {rate:12.0f} {rate / base:6.2f}  "
              + " ".join(f"{x:.2f}" for x in q) + f", {cut:.0%}")
    print(f"greedy ({len(prompts)} prompts, lengths {glens[0]}..{glens[-1]} of {M}): token-identical "
          f"old vs new: {'yes' if same else 'NO'}")
    if not same:
        sys.exit(1)


def greedy_bias(model, tok, prompts, max_new: int) -> float:
    """An EOS bias at which greedy lengths spread (first argmax-EOS varies by context): the median over the
    prompts' first-step margins between the best other token and EOS."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    margins = []
    with torch.no_grad():
        for x in ids:
            logits = model(input_ids=torch.tensor([x])).logits[0].float()  # every position, as later contexts
            other = logits.clone()
            other[:, 1] = float("-inf")
            margins += (other.max(-1).values - logits[:, 1]).tolist()
    margins.sort()
    return margins[int(0.03 * len(margins))]  # EOS wins at about 3% of contexts: lengths ~1 .. max_new


if __name__ == "__main__":
    main()
