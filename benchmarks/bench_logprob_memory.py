"""Benchmark 3: peak memory of `engine.token_logprobs` against a naive full log-softmax.

A random Qwen2 with Qwen's 151,936-token vocabulary and a small body (hidden 64, 1 layer), so the (batch x length
x vocab) logits dominate. Each measurement runs in a fresh process: peak RSS during the pass (VmHWM, reset just
before it) minus the RSS just before it, with model and inputs already built; for forward+backward the loss is
sum(logp * w) with a fixed random w. The parent checks that both ways give the same log-probs and gradients.

    naive:  logits = model(ids).logits (B, T, V) fp32; log_softmax(logits).gather(targets)
    ours:   token_logprobs(model, ids, mask): lm_head + log-softmax over chunks of 1024 positions,
            each chunk recomputed in backward

    python benchmarks/bench_logprob_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _harness import ENV, ROOT, peak_rss_mb, reset_peak_rss, table


def worker(a) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM


    import engine

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=a.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    ids = torch.randint(0, a.vocab, (a.batch, a.length))
    mask = torch.ones_like(ids)
    w = torch.randn(a.batch, a.length - 1)
    grad = a.pass_ == "forward+backward"
    before = reset_peak_rss()
    with torch.set_grad_enabled(grad):
        if a.method == "naive":
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            del logits
        else:
            logp = engine.token_logprobs(model, ids, mask)  # (B, T-1)
        if grad:
            (logp * w).sum().backward()
    peak = peak_rss_mb()
    torch.save({"logp": logp.detach(), "grad": model.model.embed_tokens.weight.grad if grad else None}, a.out)
    print("RESULT", json.dumps({"peak_mb": peak - before}))


def measure(a, method: str, pass_: str, out: str) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--pass_", pass_, "--out", out,
           "--batch", str(a.batch), "--length", str(a.length), "--vocab", str(a.vocab)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1200)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{method} {pass_} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[0].split(" ", 1)[1])["peak_mb"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--method", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    p.add_argument("--pass_", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pass_ in ("forward", "forward+backward"):
            files = {m: os.path.join(tmp, f"{m}-{pass_}.pt") for m in ("naive", "chunked")}
            peaks = {m: measure(a, m, pass_, files[m]) for m in ("naive", "chunked")}
            res = {m: torch.load(f) for m, f in files.items()}
            logp_diff = (res["naive"]["logp"] - res["chunked"]["logp"]).abs().max().item()
            torch.testing.assert_close(res["chunked"]["logp"], res["naive"]["logp"], rtol=1e-4, atol=1e-4)
            grad_diff = "-"
            if res["naive"]["grad"] is not None:
                g_naive, g_ours = res["naive"]["grad"], res["chunked"]["grad"]
                torch.testing.assert_close(g_ours, g_naive, rtol=1e-3, atol=1e-5)
                grad_diff = f"{((g_ours - g_naive).norm() / g_naive.norm()).item():.1e}"
            rows.append([pass_, f"{peaks['naive']:.0f}", f"{peaks['chunked']:.0f}",
                         f"{peaks['chunked'] / peaks['naive']:.3f}", f"{logp_diff:.1e}", grad_diff])
    logits_mb = a.batch * a.length * a.vocab * 4 / 2**20
    print(f"Peak memory of the log-prob pass above the RSS before it (fresh process each; random Qwen2, hidden 64, "
          f"1 layer, vocab {a.vocab}, batch {a.batch} x length {a.length}: one fp32 (B, T, V) tensor is "
          f"{logits_mb:.0f} MiB). Target: <= 0.25x naive, equal values.\n")
    print(table(["pass", "naive MiB", "token_logprobs MiB", "ratio", "max |logp diff|", "grad rel. diff"], rows))


if __name__ == "__main__":
    main()
