"""Memory plan: the bytes per GPU of each part of an expo_grpo.py / expo_dpo.py step, from config.json alone.

    python benchmarks/memory_plan.py --model Qwen/Qwen2.5-3B-Instruct --gpus 4 --gpu_gib 80
    python benchmarks/memory_plan.py --model DIR --gpus 4 --gpu_gib 40 --micro_batch_size 4 --gen_batch_size 32
    python benchmarks/memory_plan.py --model DIR --script dpo --gpus 8 --gpu_gib 80
    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/memory_plan.py \\
        --model DIR --device cpu --measure ...     (CPU: predicted against measured, see tests/test_memory_plan.py)

Only config.json is read: from a local directory, or the hub's config.json alone (no weights). Layout as the
trainers run it: fp32 master parameters, gradients and AdamW moments sharded by FSDP2 over --gpus, compute in
bf16 (MixedPrecisionPolicy) on GPU and in fp32 on CPU (--device cpu). A step goes through four phases; the peak
is the largest:
  sampling   parameters gathered in full for generate (engine.gathered_params), KV cache, decoding
  ref pass   no-grad log-probs of the reference model (GRPO beta > 0, online DPO)
  training   forward + backward of one micro-batch: root + 2 layers gathered, saved activations, log-prob blocks
  optimizer  AdamW step
Notation: P parameters, L layers, H hidden, I intermediate, V vocabulary, kv = kv_heads x head_dim, n GPUs,
w bytes of a compute element (2 on GPU, 4 on CPU), b sequences of T tokens in a micro-batch, N positions whose
log-prob is computed (GRPO: completion tokens only; DPO: all). Not counted: the CUDA context, NCCL buffers and the
caching allocator's fragmentation, which the fit check keeps free (--reserve_gib, --fragmentation).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common.py, for --measure

GiB = 2**30


@dataclass
class Shape:
    L: int
    H: int
    I: int
    V: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """q, k, v projections with bias, o without, gate/up/down, two RMSNorm weights."""
        q = self.heads * self.head_dim
        return self.H * (q + 2 * self.kv) + q + 2 * self.kv + q * self.H + 3 * self.H * self.I + 2 * self.H

    @property
    def root_params(self) -> int:
        """What `shard_model` leaves to the root: embeddings, final norm, lm_head unless tied."""
        return self.V * self.H * (1 if self.tied else 2) + self.H

    @property
    def params(self) -> int:
        return self.L * self.layer_params + self.root_params


def read_config(model: str) -> Shape:
    """config.json of a local directory, or of a hub id (that one file only, from the cache when offline).
    A model it cannot read is a ValueError of one line that says what to do; `main` prints it."""
    path = os.path.join(model, "config.json")
    if os.path.isdir(model) and not os.path.isfile(path):
        raise ValueError(f"{model!r} has no config.json (expected a model folder, as OUTPUT_DIR/hf)")
    if not os.path.isdir(model):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(model, "config.json")
        except HFValidationError:  # a path that does not exist, and no hub id either
            raise ValueError(f"model {model!r} is neither a local folder nor a hub id like Qwen/Qwen2.5-3B-Instruct") from None
        except LocalEntryNotFoundError:  # offline, or no network, and not in the cache (HF_HOME)
            why = "HF_HUB_OFFLINE is set" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") \
                else "the hub cannot be reached"
            raise ValueError(f"cannot read config.json of {model!r}: {why} and it is not in the cache: pass a local "
                             f"folder that holds it (--model DIR), or download it once with network (`hf download "
                             f"{model} config.json`), then the same id works offline") from None
        except OSError as e:  # the hub answered: no such repository, no access, no config.json in it
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot read config.json of {model!r} from the hub: {reason}") from None
    try:
        with open(path) as f:
            c = json.load(f)
        heads = c["num_attention_heads"]
        return Shape(L=c["num_hidden_layers"], H=c["hidden_size"], I=c["intermediate_size"], V=c["vocab_size"],
                     heads=heads, kv_heads=c.get("num_key_value_heads", heads),
                     head_dim=c.get("head_dim") or c["hidden_size"] // heads, tied=c.get("tie_word_embeddings", False))
    except (ValueError, KeyError, TypeError) as e:  # damaged, or not a decoder's config (a multimodal one nests it)
        raise ValueError(f"config.json of {model!r} is not a decoder model's config this plan knows "
                         f"({type(e).__name__}: {e})") from None


@dataclass
class Setting:
    n: int  # GPUs (ranks) that shard the model
    w: int  # bytes of a compute element
    b: int  # sequences in a training micro-batch
    T: int  # tokens per training sequence
    N: int  # log-prob positions of a micro-batch
    entropy: bool  # the policy pass also computes the entropy (GRPO)
    gen_b: int  # sequences in a generation micro-batch
    prompt: int
    new: int
    checkpointing: bool
    ref: bool


# ---- one function per part; bytes per GPU ---------------------------------------------------------


def sharded_state(s: Shape, a: Setting) -> dict:
    """fp32 master parameters 4P/n, gradients 4P/n, AdamW exp_avg + exp_avg_sq 8P/n: 16P/n in all."""
    return {"params": 4 * s.params // a.n, "grads": 4 * s.params // a.n, "adam": 8 * s.params // a.n}


def reference_params(s: Shape, a: Setting) -> int:
    """The frozen reference is loaded like the policy (fp32) and sharded the same way: 4P/n, or 0."""
    return 4 * s.params // a.n if a.ref else 0


def gathered_sampling(s: Shape, a: Setting) -> int:
    """`gathered_params` unshards every layer at once for generate: the whole model in compute dtype, w P."""
    return a.w * s.params


def gathered_training(s: Shape, a: Setting) -> int:
    """The root stays gathered through forward and backward, plus the layer computed and the one prefetched:
    w (root + 2 layer)."""
    return a.w * (s.root_params + 2 * s.layer_params)


def kv_cache(s: Shape, a: Setting, tokens: int | None = None) -> int:
    """L x 2 (k, v) x kv_heads x head_dim x (prompt + new tokens) x gen_b x w."""
    return s.L * 2 * s.kv * (tokens or a.prompt + a.new) * a.gen_b * a.w


def decoding_work(s: Shape, a: Setting) -> int:
    """The larger of prefill and the last decoding step, beyond the gathered parameters.
    prefill: cache of the prompt + one layer's transients, gen_b prompt w (2H residual + max(q,k,v + repeated k,v +
             attention out + its contiguous copy: 5H + 2kv, MLP gate/silu/up: 3I)); an upper bound, since
             `engine.sample` prefills each distinct prompt once for its n samples;
    last step: full cache + one layer's k, v copied by DynamicCache's torch.cat + 4 fp32 (gen_b, V) logits copies."""
    prefill = kv_cache(s, a, a.prompt) + a.gen_b * a.prompt * a.w * (2 * s.H + max(5 * s.H + 2 * s.kv, 3 * s.I))
    last = kv_cache(s, a) + 2 * s.kv * (a.prompt + a.new) * a.gen_b * a.w + 4 * a.gen_b * s.V * 4
    return max(prefill, last)


def layer_activations(s: Shape, a: Setting) -> int:
    """Bytes one Qwen2 decoder layer saves for backward, per token (sdpa or flash attention: no T x T scores):
      2 RMSNorms x (4H fp32 upcast of the input + 2wH normalised and weighted outputs)
      + w (q: H, k and v: 2kv, not repeated to every head: training batches are right-padded, so they run
           without a mask and sdpa takes its grouped-query path; attention output H, o_proj's contiguous input H)
      + w 4I (MLP: gate, silu(gate), up, their product)
      + w H layer input, kept by output_hidden_states (when w = 4 it is the first norm's fp32 input already).
    Qwen2.5-3B in bf16: 24H + 4kv + 8I = 138,240 bytes per token per layer."""
    per_token = 2 * (4 * s.H + 2 * a.w * s.H) + a.w * (s.heads * s.head_dim + 2 * s.kv + 2 * s.H + 4 * s.I)
    return per_token + (a.w * s.H if a.w != 4 else 0)


def activations(s: Shape, a: Setting, checkpointing: bool) -> int:
    """Held at the end of the forward of one training micro-batch of b x T tokens: without checkpointing, L layers'
    activations; with it, one hidden state per layer boundary, L w H per token (backward recomputes one layer at a
    time: see layer_backward); plus the final norm (4H + 3wH per token) and the log-prob input (N positions x wH)."""
    layers = s.L * a.w * s.H if checkpointing else s.L * layer_activations(s, a)
    return a.b * a.T * (layers + 4 * s.H + 3 * a.w * s.H) + a.N * a.w * s.H


def logprob_chunk(s: Shape) -> int:
    """Positions per chunk in engine.token_logprobs: max(1, 2**26 // V), so a (chunk, V) fp32 block is 256 MiB."""
    return max(1, 2**26 // s.V)


def logprob_forward(s: Shape, a: Setting) -> int:
    """One chunk alive at a time, (chunk, V) fp32 blocks: the logits + logsumexp's temporary, or with the entropy
    the logits + softmax + softmax x logits: 2 or 3 blocks (the compute-dtype logits are gone by then)."""
    return min(logprob_chunk(s), a.N) * s.V * 4 * (3 if a.entropy else 2)


def logprob_backward(s: Shape, a: Setting) -> int:
    """The lm_head gradient, an fp32 (V, H) accumulator (+ its cast to w), the hidden states' gradient (N w H) and
    one chunk's gradient: 4 bytes an element in fp32; in bf16 the fp32 block + its cast (or transpose) copy, 4 + w."""
    block = min(logprob_chunk(s), a.N) * s.V * (4 + (a.w if a.w != 4 else 0))
    return 4 * s.V * s.H + (a.w * s.V * s.H if a.w != 4 else 0) + a.N * a.w * s.H + block


def layer_backward(s: Shape, a: Setting) -> int:
    """Backward through one layer: gradients of its (b T, I) and (b T, H) tensors, w (2I + 2H) per token, its
    unsharded parameter gradients (w) and their fp32 copy for the reduce-scatter on GPU; the layer's
    activations again when they are recomputed (checkpointing)."""
    grads = a.b * a.T * a.w * (2 * s.I + 2 * s.H) + s.layer_params * (a.w + (4 if a.w != 4 else 0))
    recompute = a.b * a.T * layer_activations(s, a) if a.checkpointing else 0
    return grads + recompute + a.w * s.V * s.H  # + the root's gradient, held until the end of backward


def no_grad_pass(s: Shape, a: Setting) -> int:
    """A log-prob pass without gradient (reference, or old policy): gathered root + 2 layers, the L + 1 hidden
    states output_hidden_states keeps (w H per token each), one layer's transients as in prefill, the log-prob
    forward blocks."""
    b, T = a.b, a.T
    work = b * T * a.w * (2 * s.H + max(5 * s.H + 2 * s.kv, 3 * s.I))
    hidden_states = (s.L + 1) * b * T * a.w * s.H
    return gathered_training(s, a) + hidden_states + work + logprob_forward(s, replace(a, entropy=False))


def optimizer_work(s: Shape, a: Setting) -> int:
    """AdamW's temporary sqrt(exp_avg_sq), for all parameters at once (the trainers' foreach path): 4P/n."""
    return 4 * s.params // a.n


def plan(s: Shape, a: Setting) -> dict:
    """Every part and the peak of each phase, in bytes per GPU."""
    st = sharded_state(s, a)
    ref = reference_params(s, a)
    resident = st["params"] + st["adam"] + ref  # between steps (gradients are set to None after the step)
    act = activations(s, a, a.checkpointing)
    training = max(act + logprob_forward(s, a), act + logprob_backward(s, a), act + layer_backward(s, a))
    phases = {
        "sampling": resident + gathered_sampling(s, a) + decoding_work(s, a),
        "ref pass": resident + no_grad_pass(s, a) if a.ref else 0,
        "training": resident + st["grads"] + gathered_training(s, a) + training,
        "optimizer": resident + st["grads"] + optimizer_work(s, a),
    }
    parts = {
        "fp32 parameters (sharded)": st["params"], "fp32 gradients (sharded)": st["grads"],
        "AdamW state, 2 x fp32 (sharded)": st["adam"], "reference model, fp32 (sharded)": ref,
        "gathered parameters, sampling": gathered_sampling(s, a),
        "gathered parameters, training (root + 2 layers)": gathered_training(s, a),
        f"KV cache, {a.gen_b} x {a.prompt + a.new} tokens": kv_cache(s, a),
        "decoding working set (incl. KV cache)": decoding_work(s, a),
        f"activations, {a.b} x {a.T} tokens, checkpointing (+1 layer)":
            activations(s, a, True) + a.b * a.T * layer_activations(s, a),
        f"activations, {a.b} x {a.T} tokens, no checkpointing": activations(s, a, False),
        f"log-prob blocks, chunk {logprob_chunk(s)} (forward)": logprob_forward(s, a),
        "log-prob backward (lm_head grad + block)": logprob_backward(s, a),
        "AdamW step temporaries": optimizer_work(s, a),
    }
    return {"parts": parts, "phases": phases, "resident": resident}


def setting(args, s: Shape, **override) -> Setting:
    """The trainer's flags as sizes. GRPO trains b = micro_batch_size sequences, log-probs on completion tokens;
    DPO trains b = 2 x micro_batch_size (chosen + rejected), log-probs on every position. A GRPO rank holds
    batch_size / gpus questions x (G completions + 1 explanation) sequences: no micro-batch is larger."""
    grpo = args.script == "grpo"
    mb = override.get("micro_batch_size", args.micro_batch_size)
    gb = override.get("gen_batch_size", args.gen_batch_size)
    if grpo and not override:
        per_rank = -(-args.batch_size // args.gpus) * (args.num_generations + 1)
        mb, gb = min(mb, per_rank), min(gb, per_rank)
    b, T = (mb if grpo else 2 * mb), args.prompt_tokens + args.max_new_tokens
    return Setting(n=args.gpus, w=2 if args.bf16 else 4, b=b, T=T,
                   N=b * args.max_new_tokens if grpo else b * (T - 1), entropy=grpo, gen_b=gb,
                   prompt=args.prompt_tokens, new=args.max_new_tokens, checkpointing=args.gradient_checkpointing,
                   ref=args.beta > 0 if grpo else args.regen_every > 0)


def largest(args, s: Shape, key: str, phases: tuple, usable: float, cap: int = 2**14) -> int:
    """The largest value of `key` (micro_batch_size, gen_batch_size) whose `phases` peak fits in `usable` bytes
    (0: not even 1); doubling, then bisection (the peak grows with either)."""
    def fits(v: int) -> bool:
        return max(plan(s, setting(args, s, **{key: v}))["phases"][p] for p in phases) <= usable

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    t = lambda v: v.lower() in ("1", "true", "yes")  # noqa: E731
    p.add_argument("--model", required=True, help="hub id or local directory with config.json")
    p.add_argument("--script", choices=["grpo", "dpo"], default="grpo")
    p.add_argument("--gpus", type=int, default=4, help="ranks that shard the model (FSDP2)")
    p.add_argument("--gpu_gib", type=float, default=80.0, help="memory of one GPU, GiB")
    p.add_argument("--micro_batch_size", type=int, help="default: the trainer's (GRPO 8 sequences, DPO 2 pairs)")
    p.add_argument("--gen_batch_size", type=int, help="default: the trainer's (GRPO 64, DPO 32)")
    p.add_argument("--max_new_tokens", type=int, default=1024)
    p.add_argument("--prompt_tokens", type=int, default=300, help="longest prompt of a micro-batch (MATH: ~300)")
    p.add_argument("--beta", type=float, default=0.04, help="GRPO: > 0 loads the reference model")
    p.add_argument("--regen_every", type=int, default=1, help="DPO: > 0 (online) loads the reference model")
    p.add_argument("--gradient_checkpointing", type=t, default=True)
    p.add_argument("--batch_size", type=int, default=16, help="GRPO: questions per step, all ranks together")
    p.add_argument("--num_generations", type=int, default=8, help="GRPO: G")
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: as a CPU run (fp32 unless --bf16)")
    p.add_argument("--bf16", type=t, default=None, help="bf16 compute (default: on GPU, not on CPU), as the trainers")
    p.add_argument("--reserve_gib", type=float, default=1.5, help="kept free for the CUDA context and NCCL")
    p.add_argument("--fragmentation", type=float, default=0.10, help="share of the GPU kept free for fragmentation")
    p.add_argument("--measure", action="store_true", help="CPU, under torchrun: run the step, compare (measure())")
    args = p.parse_args(argv)
    args.bf16 = args.device == "gpu" if args.bf16 is None else args.bf16
    grpo = args.script == "grpo"
    args.micro_batch_size = args.micro_batch_size or (8 if grpo else 2)
    args.gen_batch_size = args.gen_batch_size or (64 if grpo else 32)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    grpo = args.script == "grpo"
    try:
        s = read_config(args.model)
    except ValueError as e:  # one line, not a traceback from huggingface_hub
        sys.exit(f"memory_plan.py: error: {e}")
    if args.measure:
        from engine import close_distributed

        measure(args, s)
        return close_distributed()  # after measure: its sharded model holds the process group
    a = setting(args, s)
    out = plan(s, a)
    print(f"{args.model}: {s.params / 1e9:.3f}B parameters ({s.L} layers, hidden {s.H}, intermediate {s.I}, "
          f"vocab {s.V}, {s.heads} heads / {s.kv_heads} kv){' tied' if s.tied else ''} | {args.script}, "
          f"{args.gpus} x {args.gpu_gib:g} GiB, {'bf16' if a.w == 2 else 'fp32'} compute | micro-batch {a.b} x {a.T} "
          f"tokens, generation {a.gen_b} x {a.prompt + a.new} | checkpointing {a.checkpointing} | ref {a.ref}")
    print("\npart (per GPU)")
    for k, v in out["parts"].items():
        print(f"  {k:<58} {gib(v)}")
    print("\npeak by phase (per GPU)")
    for k, v in out["phases"].items():
        print(f"  {k:<58} {gib(v)}" if v else f"  {k:<58}      -")
    phase = max(out["phases"], key=out["phases"].get)
    peak = out["phases"][phase]
    usable = args.gpu_gib * GiB * (1 - args.fragmentation) - args.reserve_gib * GiB
    print(f"\npredicted peak {gib(peak).strip()}, set by {phase}; usable {gib(usable).strip()} of "
          f"{args.gpu_gib:g} GiB ({args.reserve_gib:g} GiB CUDA context + NCCL, {args.fragmentation:.0%} kept "
          f"for fragmentation): {'FITS' if peak <= usable else 'DOES NOT FIT'}")
    mb = largest(args, s, "micro_batch_size", ("ref pass", "training", "optimizer"), usable)
    gb = largest(args, s, "gen_batch_size", ("sampling",), usable)
    cap = (f"; a GRPO micro-batch is never larger than a rank's {-(-args.batch_size // args.gpus)} questions x "
           f"(G {args.num_generations} + 1) sequences" if grpo else "")
    print(f"largest --micro_batch_size that fits: {mb} | largest --gen_batch_size: {gb} (other flags as given{cap})")


# ---- CPU validation: run the step and measure ------------------------------------------------------


def _rss(field: str) -> int:
    """VmRSS / VmHWM (peak) of this process, bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def measure(args, s: Shape) -> None:
    """Peak RSS growth of a sampling and a training step of what expo_grpo does, on CPU, against the plan.

    Each rank loads and shards the model (and the reference when beta > 0), makes AdamW and runs one warm-up step
    at the same shapes, so that AdamW's state exists, as in every step after the first, and every kernel is
    loaded. Then, per phase: reset the peak RSS (/proc/self/clear_refs), run it, take VmHWM - VmRSS before; the
    largest over ranks. Compared with the plan's peak of that phase minus what is resident before it (parameters,
    AdamW state, reference). Run with MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors leave RSS.
    Sampling: every FSDP module unsharded and kept so (as engine.gathered_params), one generate of gen_batch_size
    prompts (one a token shorter: left padding) and exactly max_new_tokens new tokens. Training: as
    train_on_rollouts, on two micro-batches of micro_batch_size sequences (one a token shorter: right padding).
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from engine import device_mesh, init_distributed, load_model, make_batch, shard_model, token_logprobs

    torch.set_num_threads(1)
    info = init_distributed()
    a = setting(args, s)
    mesh = device_mesh(info.device)
    model = shard_model(load_model(args.model, info.device, args.gradient_checkpointing), info.device, mesh,
                        bf16=args.bf16)
    ref = shard_model(load_model(args.model, info.device), info.device, mesh, trainable=False,
                      bf16=args.bf16) if a.ref else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)  # as the trainers
    g = torch.Generator().manual_seed(info.rank)

    def train(b: int, prompt: int, new: int, micro_batches: int = 2) -> None:
        """As train_on_rollouts: no-grad reference passes, then forward + backward per micro-batch (the second with
        the first one's gradients held), then the AdamW step."""
        batches = []
        for _ in range(micro_batches):
            ids = torch.randint(1, s.V, (b, prompt + new), generator=g).tolist()
            batches.append(make_batch([r[:prompt] for r in ids],
                                      [r[prompt : prompt + new - (i == 0)] for i, r in enumerate(ids)], 0))
        if ref is not None:
            with torch.no_grad():
                for mb in batches:
                    token_logprobs(ref, mb["input_ids"], mb["attention_mask"], positions=mb["completion_mask"])
        for mb in batches:
            logps, _ = token_logprobs(model, mb["input_ids"], mb["attention_mask"], with_entropy=True,
                                      positions=mb["completion_mask"])  # (b, T-1)
            (logps * mb["completion_mask"]).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def generate(b: int, prompt: int, new: int) -> None:
        ids = torch.randint(1, s.V, (b, prompt), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in mods:  # as engine.gathered_params: gathered once, kept through every decoding step
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                           top_k=0, eos_token_id=s.V - 1, pad_token_id=0, use_cache=True)
        model.train()
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)

    # warm-up at the measured shapes: AdamW state made, kernels (and oneDNN's bf16 ones) loaded
    generate(a.gen_b, args.prompt_tokens, args.max_new_tokens)
    train(a.b, args.prompt_tokens, args.max_new_tokens, 1)
    resident = _rss("VmRSS")
    measured = {}
    for phase, step, b in (("sampling", generate, a.gen_b), ("training", train, a.b)):
        dist.barrier()
        open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
        before = _rss("VmRSS")
        step(b, args.prompt_tokens, args.max_new_tokens)
        measured[phase] = _rss("VmHWM") - before
    peaks = torch.tensor([measured["sampling"], measured["training"]], dtype=torch.float64)
    dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    phases = plan(s, a)["phases"]
    predicted = {"sampling": phases["sampling"],
                 "training": max(phases["ref pass"], phases["training"], phases["optimizer"])}
    if info.is_main:
        print(f"resident after load + warm-up: {resident / 2**20:.0f} MiB (process, libraries included)")
        for phase, m in zip(("sampling", "training"), peaks.tolist()):
            pred = predicted[phase] - plan(s, a)["resident"]
            print("MEASURE " + json.dumps({"phase": phase, "predicted": pred, "measured": m, "ratio": pred / m}))


if __name__ == "__main__":
    main()
