"""Torch under FSDP2: processes, loading, sharding and exporting models, the sampler, log-probs, the optimizer step.

Machinery a reader can trust and skip: the algorithms (expo_grpo.py, expo_dpo.py) call `sample` for their
rollouts, `token_logprobs` for the log-probs their losses need and `optimizer_step` once per update. Every
function here is tested against an independent computation in tests/test_engine.py and tests/test_sampling.py.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group torchrun describes in the environment, or make a one-process group.

    NCCL + one CUDA device per local rank when a GPU is present, gloo + CPU otherwise. A plain
    `python script.py` gets a world of one, so the training code has a single path. The timeout makes a
    rank whose peer died fail instead of waiting forever.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch.device("cuda", local_rank) if cuda else None,
        )
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_distributed() -> None:
    """Leave the process group, once the script's models and optimizer are gone (call it after `main` returns).

    A sharded model holds the process group (in each layer's FSDP state), so `destroy_process_group` alone leaves
    it alive until the model is collected, maybe at the interpreter's own shutdown, whose half-gone state then kills
    a finished rank (`terminate called without an active exception`, SIGABRT). Collecting first avoids that.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (before the process group exists too: torchrun has set RANK)."""
    if (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed every generator; each rank gets its own stream so ranks do not sample identical completions."""
    s = seed + 1000 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def rng_states() -> dict:
    """The state of every generator `seed_everything` seeds (and CUDA's), for a checkpoint."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_states(rng: dict) -> None:
    """Restore what `rng_states` returned."""
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def sum_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """The sum over ranks of a dict of floats (the keys must be the same on every rank).

    NaN is a legitimate value (e.g. a ratio with no denominator on this rank) and propagates.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (small Python objects only: rows, texts)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------------
# Models, tokenizers and FSDP2
# ----------------------------------------------------------------------------------------------------


CACHE_DIR = os.environ.get("EXPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "expo"))

# Models built in code rather than read from disk or a hub (toy.py registers `tiny` and `toy`): the loaders look
# names up here and name none of them.
BUILT_MODELS: dict = {}  # name -> build() -> local directory (built once, cached)


def register_model(name: str, build) -> None:
    BUILT_MODELS[name] = build


def resolve_model_path(name: str) -> str:
    """A built model's name -> its cached directory (built on first use); a hub id or directory as is."""
    return BUILT_MODELS[name]() if name in BUILT_MODELS else name


class LoadError(ValueError):
    """A model or tokenizer that cannot be loaded: one line naming it and why (the trainers print it and exit)."""


def _load_error(kind: str, name: str, e: Exception) -> LoadError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ValueError):  # the files were read: what they say is not supported
        return LoadError(f"cannot load the {kind} of {name!r}: {reason}")
    if name in BUILT_MODELS or os.path.isdir(name):
        hint = "a file missing, cut short or damaged? export or download it again"
    else:
        hint = "no network? a hub id needs it, or a local copy: `hf download ID` once, then the same id works offline"
    return LoadError(f"cannot load the {kind} of {name!r}: {reason} ({hint})")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one of them makes a tokenizer


def load_tokenizer(name: str):
    """Tokenizer with left padding (generation appends on the right) and a pad token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model_path(name)
    config = os.path.join(path, "tokenizer_config.json")
    own = os.path.exists(config) and json.load(open(config)).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    # without its files, AutoTokenizer makes an empty tokenizer of the model type's class, which fails much later
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise LoadError(f"cannot load the tokenizer of {name!r}: the folder has none of {', '.join(TOKENIZER_FILES)} "
                        "(copy the tokenizer files of the model it came from into it)")
    # AutoTokenizer picks the class from the model type (qwen2) and would swap the pre-tokenizer of a tokenizer
    # built in code (toy.py's) for Qwen's, which drops the toy's spaces: load those exactly as they were saved
    try:
        tokenizer = (PreTrainedTokenizerFast if own else AutoTokenizer).from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error("tokenizer", name, e) from None
    if tokenizer.chat_template is None:
        raise LoadError(f"the tokenizer of {name!r} has no chat template: every prompt here is a chat prompt "
                        "(an Instruct model's tokenizer has one)")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(device: torch.device) -> str:
    """flash_attention_2 when flash-attn is installed and we are on CUDA, else PyTorch's sdpa."""
    import importlib.util

    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def context_length(name: str) -> int | None:
    """How many positions the model takes (config.json's max_position_embeddings; None where it does not say)."""
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(resolve_model_path(name)), "max_position_embeddings", None)
    except (OSError, ValueError) as e:
        raise _load_error("model", name, e) from None


# token_logprobs computes log-probs from the final hidden states and the lm_head's weight alone (hidden @ W.T,
# chunk by chunk): a model whose logits are more than that would train on log-probs other than its own, silently.
# Sampling uses the model's own logits, so a model only sampled (eval.py's) is right as it is. attn_logit_softcapping
# acts inside attention, which runs as the model's own code: it is no such case.
_HEAD_ONLY = ("its training log-probs would silently differ from its own (a model with neither an lm_head bias nor "
              "logit soft-capping, as Qwen2.5, trains)")


def load_model(name: str, device: torch.device, gradient_checkpointing: bool = False, trainable: bool = True):
    """Causal LM from a hub id, a local directory or a built-in name, with fp32 master weights, in training mode.

    Weights stay fp32 here: FSDP's MixedPrecisionPolicy casts to bf16 for compute, while the optimizer updates
    fp32 copies (tiny updates at lr 3e-6 vanish in bf16). `model.checkpoint_dtype` remembers the dtype the
    checkpoint was saved in, so `export_hf` writes that back (bf16 for Qwen2.5-Instruct, not 2x the bytes).
    from_pretrained returns eval mode; a policy is put in training mode, else transformers' activation
    checkpointing never recomputes (it acts only when `self.training`) and all activations stay in memory.
    A model to train whose logits are more than hidden @ lm_head.weight (a bias, soft-capping) is a LoadError.
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()  # a "Loading weights" bar per model and rank would be mixed into the step log
    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error("model", name, e) from None
    if trainable and getattr(config, "final_logit_softcapping", None):
        raise LoadError(f"model {name!r} soft-caps its logits (final_logit_softcapping "
                        f"{config.final_logit_softcapping}), which token_logprobs does not: {_HEAD_ONLY}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attention_implementation(device))
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # RuntimeError: a cut-short .bin file
        raise _load_error("model", name, e) from None
    if trainable and getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise LoadError(f"model {name!r} has a bias in its lm_head, which token_logprobs leaves out: {_HEAD_ONLY}")
    saved_dtype = getattr(config, "dtype", None)
    model.checkpoint_dtype = saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.float32
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forward passes; sample() turns the KV cache on explicitly
    return model.train(trainable)


def device_mesh(device: torch.device, hybrid: bool = False):
    """1-D mesh over all ranks (FSDP), or 2-D (node, local rank) for hybrid sharding (HSDP).

    With `hybrid`, parameters are sharded within a node and replicated across nodes, so the per-layer
    all-gathers stay on the fast intra-node links and only the gradient all-reduce crosses nodes.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if hybrid and world > per_node:
        return init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))


def shard_model(model, device: torch.device, mesh=None, trainable: bool = True, bf16: bool | None = None):
    """FSDP2: `fully_shard` every decoder layer, then the root (embeddings, final norm, lm_head).

    With `bf16` (default: on GPU) the model computes in bf16 from fp32 master weights and reduces gradients
    in fp32 (MixedPrecisionPolicy); without it everything stays fp32 (the CPU default).
    A frozen model (the reference) is sharded the same way and just never gets an optimizer.
    `mesh` may be 2-D (replicate, shard) for hybrid sharding across nodes (see `device_mesh`).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda" if bf16 is None else bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    mesh = mesh if mesh is not None else device_mesh(device)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def fsdp_modules(model) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered_params(model):
    """Hold the full parameters on every rank for the duration of generation.

    Without this, FSDP would all-gather every layer for every decoded token (and a rank that finished
    early would have to keep joining those collectives). With the parameters gathered once, decoding
    runs with no communication at all, so ranks may generate different lengths.
    """
    mods = fsdp_modules(model)
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    # With every parameter whole, FSDP's forward hooks only cost Python time at every module of every decoded token:
    # they are taken off meanwhile (FSDP2 keeps their handles in its private state: torch is pinned, and
    # tests/test_sampling.py checks they come back)
    states = [m._get_fsdp_state() for m in mods]
    for st in states:
        st._pre_forward_hook_handle.remove()
        st._post_forward_hook_handle.remove()
    try:
        yield
    finally:
        for m, st in zip(mods, states):
            st._pre_forward_hook_handle = m.register_forward_pre_hook(st._pre_forward, prepend=True, with_kwargs=True)
            st._post_forward_hook_handle = m.register_forward_hook(st._post_forward, prepend=False)
        for m in mods:
            m.reshard()
            # the root keeps its parameters after forward (they are needed at once in backward)
            m.set_reshard_after_forward(m is not model, recurse=False)


def export_hf(model, tokenizer, path: str) -> None:
    """Write a Hugging Face directory (safetensors, config, generation_config, tokenizer) that `from_pretrained`
    loads, in the dtype the checkpoint came in (`load_model`'s `checkpoint_dtype`: a bf16 hub model in bf16, not as
    its fp32 master weights). The full state dict is gathered to rank 0's CPU: any model that fits in host memory.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        dtype = getattr(model, "checkpoint_dtype", torch.float32)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        # save_pretrained writes the class name into config.architectures; FSDP renamed the class
        base = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
        model.config.architectures = [base.__name__]
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)  # also the checkpoint's generation_config
        model.config.dtype = dtype  # save_pretrained wrote the dtype of the fp32 master weights
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


def progress(iterable, desc: str, total: int | None = None, every: float = 30.0):
    """tqdm over `iterable` (None: advanced by `.update(n)`) on rank 0: a bar on a terminal; in a log file or CI
    nothing for a phase shorter than `every` seconds, then at most one update every `every` seconds, so a long
    phase (offline explanations, DPO pairs, evaluation) never looks like a hang and a short one leaves no trace."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, leave=False, mininterval=0.1 if tty else every,
                delay=0 if tty else every, file=sys.stderr if tty else sys.stdout,
                disable=dist.is_initialized() and dist.get_rank() != 0)


def end_token_ids(model, tokenizer) -> list[int]:
    """Every end token the checkpoint declares: the tokenizer's eos_token_id, then the model's
    generation_config.eos_token_id (an int or a list). Qwen2.5-Instruct: [151645 <|im_end|>,
    151643 <|endoftext|>], the second also its pad token."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for v in (tokenizer.eos_token_id, getattr(gen_cfg, "eos_token_id", None)):
        for i in v if isinstance(v, (list, tuple)) else [v]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generators: list | None = None) -> torch.Tensor:
    """One token per row of `logits` (R, V): argmax at temperature 0, else a draw from softmax(logits / T),
    restricted to the nucleus when top_p < 1 (the smallest set of most likely tokens whose mass is >= top_p,
    renormalised). Nothing else: no top-k, no penalties, whatever a generation_config says.

    The draw is an exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) independent, which picks token i with
    probability exactly p_i / sum(p) (the smallest of independent exponentials E_i / p_i is the i-th with that
    probability), for every token of any vocabulary: no running sum whose float32 resolution hides the rare
    tokens (an inverse-CDF draw over 152k tokens never draws a token below ~1e-7 of the mass). `generators`
    (one torch.Generator per row) makes each row's draws its own random stream; else torch's global RNG.
    Logits that are NaN or +inf, or a row with no finite logit, raise ValueError: they would draw garbage."""
    logits = logits.float()
    bad = ~torch.isfinite(logits.amax(-1))  # (R,): amax is NaN if any entry is, +inf if any is, -inf if all are
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"the model gave non-finite logits (NaN, +inf or all -inf) for {int(bad.sum())} of "
                         f"{len(bad)} rows, first row {row}: the weights or the computation overflowed (try fp32)")
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p  # a token is kept while the mass before it is < top_p
        drop = mass_before >= top_p
        drop[..., 0] = False  # the most likely token always stays (top_p <= 0 is greedy sampling's limit)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p.masked_fill(drop, 0.0))
    if generators is None:
        race = torch.empty_like(probs).exponential_()  # (R, V)
    else:
        race = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in generators])
    return (probs / race).argmax(-1)  # a token of probability 0 scores 0 and never wins


def _cache_layers(cache) -> list:
    from transformers.cache_utils import DynamicLayer

    layers = cache.layers
    # sliding-window layers keep more state than keys and values
    if any(not isinstance(layer, DynamicLayer) or layer.is_sliding for layer in layers):
        raise NotImplementedError(f"sample() supports full-attention caches only, got {set(map(type, layers))}")
    return layers


def _left_pad_cache(cache, width: int) -> None:
    """Grow every layer's keys/values (B, H, L, D) to length `width` with zero columns on the left."""
    for layer in _cache_layers(cache):
        extra = width - layer.keys.shape[-2]
        if extra > 0:
            layer.keys = F.pad(layer.keys, (0, 0, extra, 0))
            layer.values = F.pad(layer.values, (0, 0, extra, 0))


class _Batch:
    """The rows being decoded: their KV cache (one DynamicCache, left-padded to a common length), attention
    mask (R, L), the position id of the next token (R,), the last sampled token (R,), tokens generated so far
    (R,), and the job and generated ids of each row."""

    def __init__(self, cache, mask, pos, last, jobs, gen):
        self.cache, self.mask, self.pos, self.last, self.jobs, self.gen = cache, mask, pos, last, jobs, gen
        self.ngen = torch.tensor([len(g) for g in gen], dtype=torch.long, device=mask.device)

    def __len__(self) -> int:
        return len(self.jobs)

    def keep(self, rows: list[int]) -> None:
        """Drop every row not in `rows` (ended ones), then the leading columns no kept row attends to."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        start = int(mask.any(0).long().argmax()) if rows else 0  # first column some row still uses
        self.mask = mask[:, start:]
        for layer in _cache_layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self.pos, self.last, self.ngen = self.pos[idx], self.last[idx], self.ngen[idx]
        self.jobs = [self.jobs[r] for r in rows]
        self.gen = [self.gen[r] for r in rows]

    def extend(self, other: _Batch) -> None:
        """Append the rows of `other`; both caches are left-padded to the longer of the two first."""
        if not len(self):
            self.__dict__.update(other.__dict__)
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        for b in (self, other):
            _left_pad_cache(b.cache, width)
            b.mask = F.pad(b.mask, (width - b.mask.shape[1], 0))
        for mine, theirs in zip(_cache_layers(self.cache), _cache_layers(other.cache)):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, other.mask])
        self.pos, self.last = torch.cat([self.pos, other.pos]), torch.cat([self.last, other.last])
        self.ngen = torch.cat([self.ngen, other.ngen])
        self.jobs, self.gen = self.jobs + other.jobs, self.gen + other.gen


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int | list[int] = 1, max_new_tokens: int = 512,
           temperature: float = 1.0, top_p: float = 1.0, micro_batch_size: int = 16, min_new_tokens: int = 0,
           stop_ids: list[int] | None = None, desc: str = "sampling", seeds: list[int] | None = None) -> dict:
    """n completions for each prompt (or n[i] for prompt i), decoded with the KV cache, at most
    `micro_batch_size` rows at a time. A row leaves the batch as soon as it ends and a pending prompt takes
    its slot (prefilled, then merged into the left-padded cache), so no token is decoded for an ended row and
    the batch stays full while work remains. The samples of one prompt prefilled together share one forward
    pass over it.

    Tokens are drawn by `next_tokens` (softmax(logits / T), top-p only when top_p < 1, argmax at T = 0) and by
    nothing else: the loop is written here, so no logits processor of transformers (nor the checkpoint's
    generation_config) can run. A completion ends at the first sampled id of `stop_ids` (default: every end
    token the checkpoint declares, `end_token_ids`), which is kept; none may be sampled before
    `min_new_tokens` tokens. Deterministic given torch's RNG state, or, with `seeds` (one per completion,
    prompt-major), each completion is drawn from its own random stream: the same seed gives the same completion
    whatever else is in the batch (the offline explanations use it). No collective while decoding (under FSDP
    the parameters are gathered once for the whole call), so ranks may get different numbers of prompts
    (zero included) and generate different lengths.

    Returns lists ordered prompt-major (the completions of prompt i are at i*n .. i*n+n-1):
      prompt_ids[j]      token ids of the prompt of completion j (no padding)
      completion_ids[j]  sampled ids, up to and including the first end token, nothing after it
      texts[j]           decoded completion without special tokens
      eos[j]             True if the completion ended by sampling an end token (False: cut at max_new_tokens)
      stats              decoded_slots (rows x decode steps computed), useful_tokens (sum of completion lengths),
                         pad_waste (1 - useful / decoded: slots spent on rows already ended), seconds, forwards,
                         prefill_tokens (distinct prompts, with padding), mean_rows (mean rows per forward),
                         tokens_per_s
    """
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    stop_ids = end_token_ids(model, tokenizer) if stop_ids is None else [int(i) for i in stop_ids]
    stop_t = torch.tensor(stop_ids, dtype=torch.long, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    # a rank with no prompts still joins the FSDP all-gather below, so an empty list must work
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    counts = n if isinstance(n, list) else [n] * len(prompts)
    jobs = [i for i, k in enumerate(counts) for _ in range(k)]
    if seeds is not None and len(seeds) != len(jobs):
        raise ValueError(f"sample: {len(seeds)} seeds for {len(jobs)} completions")
    generators = None if seeds is None else [torch.Generator(device=device).manual_seed(s) for s in seeds]
    # prompts of similar lengths share the batch: less left padding
    pending = sorted(range(len(jobs)), key=lambda j: len(prompt_ids[jobs[j]]))[::-1]  # pop() from the end
    completions: list = [None] * len(jobs)
    ended = [False] * len(jobs)
    stats = dict(decoded_slots=0, forwards=0, prefill_tokens=0)
    batch_size = max(1, micro_batch_size)
    # A refill costs one prefill forward, about one decode step (decoding is bound by reading the weights, on
    # GPU and on CPU alike): refilling slot by slot would add a forward per completion, waiting for a quarter of
    # the batch to be free costs a few idle slots instead. The last prompts are taken whenever any slot is free.
    refill_at = max(1, batch_size // 4)

    def forward(ids, mask, pos, cache):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        stats["forwards"] += 1
        return out.logits[:, -1, :]

    def advance(b: _Batch, logits: torch.Tensor) -> None:
        """Draw each row's next token from its logits (R, V), record it, and finish the rows that ended."""
        if min_new_tokens > 0 and len(stop_ids) and bool((b.ngen < min_new_tokens).any()):
            stop = stop_t[stop_t < logits.shape[-1]]
            logits = logits.index_put((torch.nonzero(b.ngen < min_new_tokens), stop[None, :]),
                                      torch.tensor(float("-inf"), device=device))
        tok = next_tokens(logits, temperature, top_p, generators and [generators[j] for j in b.jobs])
        stats["decoded_slots"] += tok.shape[0]
        b.last, b.ngen = tok, b.ngen + 1
        is_end = torch.isin(tok, stop_t).tolist()
        going_on = []
        for r, t in enumerate(tok.tolist()):
            b.gen[r].append(t)
            if is_end[r] or len(b.gen[r]) >= max_new_tokens:
                completions[b.jobs[r]], ended[b.jobs[r]] = b.gen[r], bool(is_end[r])
                bar.update()
            else:
                going_on.append(r)
        if len(going_on) < len(b):
            b.keep(going_on)

    def prefill(take: list[int]) -> _Batch:
        # each distinct prompt once (the n samples of a prompt share its forward pass), then its row of logits
        # and of the KV cache copied to each of its samples
        distinct = {i: r for r, i in enumerate(dict.fromkeys(jobs[j] for j in take))}  # prompt -> its row
        width = max(len(prompt_ids[i]) for i in distinct)
        ids = torch.full((len(distinct), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(distinct), width), dtype=torch.long)
        for r, i in enumerate(distinct):
            ids[r, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i], dtype=torch.long)
            mask[r, width - len(prompt_ids[i]):] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # rotary positions count from each row's first real token
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        logits = forward(ids, mask, pos, cache)
        stats["prefill_tokens"] += ids.numel()
        row = torch.tensor([distinct[jobs[j]] for j in take], dtype=torch.long, device=device)
        for layer in _cache_layers(cache):
            layer.keys, layer.values = layer.keys.index_select(0, row), layer.values.index_select(0, row)
        logits, ids, mask = logits.index_select(0, row), ids.index_select(0, row), mask.index_select(0, row)
        b = _Batch(cache, mask, mask.sum(-1), ids[:, -1], list(take), [[] for _ in take])
        advance(b, logits)
        return b

    was_training = model.training
    model.eval()
    bar = progress(None, desc, total=len(jobs))  # advanced once per finished completion
    ctx = gathered_params(model) if fsdp_modules(model) else contextlib.nullcontext()
    try:
        with ctx:
            if max_new_tokens <= 0:
                for j in pending:
                    completions[j] = []
                pending = []
            active = None  # the rows being decoded (a _Batch)
            while pending or (active is not None and len(active)):
                free = batch_size - (len(active) if active is not None else 0)
                if pending and free >= min(refill_at, len(pending)):
                    # slots are free: one prefill for all the pending prompts that fit, merged into the batch
                    take = [pending.pop() for _ in range(min(free, len(pending)))]
                    new = prefill(take)
                    if active is None:
                        active = new
                    elif len(new):
                        active.extend(new)
                if len(active):
                    mask = torch.cat([active.mask, active.mask.new_ones(len(active), 1)], dim=1)
                    logits = forward(active.last[:, None], mask, active.pos[:, None], active.cache)
                    active.mask, active.pos = mask, active.pos + 1
                    advance(active, logits)
    finally:
        bar.close()
        model.train(was_training)
    useful = sum(len(c) for c in completions)
    seconds = time.perf_counter() - t0
    stats.update(useful_tokens=useful, seconds=seconds,
                 pad_waste=1.0 - useful / stats["decoded_slots"] if stats["decoded_slots"] else 0.0,
                 mean_rows=stats["decoded_slots"] / stats["forwards"] if stats["forwards"] else 0.0,
                 tokens_per_s=useful / seconds if seconds > 0 else 0.0)
    return {
        "prompt_ids": [prompt_ids[i] for i in jobs],
        "completion_ids": completions,
        "texts": tokenizer.batch_decode(completions, skip_special_tokens=True) if completions else [],
        "eos": ended,
        "stats": stats,
    }


# ----------------------------------------------------------------------------------------------------
# Log-probs
# ----------------------------------------------------------------------------------------------------


def make_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device=None) -> dict:
    """Right-padded (prompt + completion) sequences for a training forward pass.

    Returns input_ids and attention_mask (B, T), and completion_mask (B, T-1), aligned with the output of
    `token_logprobs`: position t holds log p(input_ids[t+1]), so completion token k of a prompt of
    length P sits at position P-1+k.
    Example: prompt [5, 6], completion [7, 8] -> input_ids [5, 6, 7, 8], completion_mask [0, 1, 1].
    """
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for r, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[r, : len(p) + len(c)] = 1
        completion_mask[r, len(p) - 1 : len(p) - 1 + len(c)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(target) = logits[target] - logsumexp(logits), logits = hidden @ weight.T, chunk by chunk.

    Only the (N,) log-normalisers logz are saved. Backward recomputes each chunk's logits and uses
    d logp / d logits = onehot(target) - softmax(logits), built in place in that one block, so forward and
    backward each hold a single (chunk, V) fp32 block, and nothing but the matmuls is computed twice.
    hidden (N, H), weight (V, H), targets (N,) -> logp (N,), entropy (N,; empty unless asked, no gradient).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, with_entropy: bool):
        logps, logzs, ents = [], [], []
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s : s + chunk] @ weight.t()).float()  # (chunk, V)
            logz = torch.logsumexp(logits, dim=-1)
            logps.append(logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - logz)
            logzs.append(logz)
            if with_entropy:
                ents.append(logz - (torch.softmax(logits, dim=-1) * logits).sum(-1))
        ctx.save_for_backward(hidden, weight, targets, torch.cat(logzs))
        ctx.chunk = chunk
        entropy = torch.cat(ents) if with_entropy else hidden.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(entropy)
        return torch.cat(logps), entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, targets, logz = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, g = hidden[s : s + ctx.chunk], grad_logp[s : s + ctx.chunk, None]  # (chunk, H), (chunk, 1)
            grad_logits = (h @ weight.t()).float().sub_(logz[s : s + ctx.chunk, None]).exp_().mul_(-g)  # -g softmax
            grad_logits.scatter_add_(1, targets[s : s + ctx.chunk, None], g)  # + g at the target
            grad_logits = grad_logits.to(h.dtype)
            grad_hidden[s : s + ctx.chunk] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t().float(), h.float())
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


# token_logprobs asks the model for its hidden states (it needs the last). The first of them is the input of the
# first decoder layer, which FSDP2's own pre-forward hook returns as a view (RegisterPostBackwardFunction), so
# FSDP2 warns at every forward that its root "returned a view tensor ... can cause backward to fail or produce
# wrong gradients". The warning is about an in-place op on that view; nothing here modifies a hidden state.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor", category=UserWarning)


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk_tokens: int | None = None,
                   with_entropy: bool = False, positions: torch.Tensor | None = None):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every t: shape (B, T-1), fp32.

    The lm_head projection and log-softmax run over chunks of `chunk_tokens` positions, each chunk's logits
    recomputed in backward (`_ChunkedLogprobs`), so at most one (chunk, vocab) fp32 block is alive
    instead of (B, T, V). The default chunk makes that block 256 MiB whatever the vocabulary (441 positions
    of Qwen's 152k: 256 MiB instead of ~20 GB for 8 x 4096 tokens; a small vocabulary gets one chunk).
    Padding positions get a value but must be masked by the caller (see `make_batch`).
    `positions` (B, T-1), e.g. the completion mask: only where it is nonzero do the lm_head and log-softmax
    run (the prompt is often half the sequence); elsewhere the result is 0.
    With `with_entropy`, also returns the per-position entropy (no gradient), for logging.
    """
    # Right padding (make_batch's) needs no mask under causal attention: no real token sees a later pad, and the pads'
    # own values are masked by the caller. Without a mask, attention takes its causal fast path (no (B, 1, T, T) mask).
    right_padded = bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())
    out = model(input_ids=input_ids, attention_mask=None if right_padded else attention_mask,
                output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1][:, :-1]  # (B, T-1, H), after the final norm
    B, T1, H = hidden.shape
    hidden = hidden.reshape(-1, H)
    targets = input_ids[:, 1:].reshape(-1)
    if positions is not None:
        keep = positions.reshape(-1).nonzero().squeeze(-1)  # (N,)
        # with none asked for, one position is computed and zeroed: backward must still run through the
        # model, since under FSDP it is a collective that every rank joins
        empty = keep.numel() == 0
        keep = keep.new_zeros(1) if empty else keep
        hidden, targets = hidden[keep], targets[keep]
    weight = model.get_output_embeddings().weight
    chunk_tokens = chunk_tokens or max(1, 2**26 // weight.shape[0])
    logp, entropy = _ChunkedLogprobs.apply(hidden, weight, targets, chunk_tokens, with_entropy)  # (N,), (N,)
    if positions is not None:
        logp = logp.new_zeros(B * T1).index_copy(0, keep, logp * (0.0 if empty else 1.0))
    logp = logp.view(B, T1)
    if not torch.is_grad_enabled() and fsdp_modules(model):
        # FSDP keeps the root's parameters gathered after forward for the backward; with no backward
        # coming they would stay gathered (and an optimizer or checkpoint would see the wrong tensors)
        model.reshard()
    if with_entropy:
        if positions is not None:
            entropy = entropy.new_zeros(B * T1).index_copy(0, keep, entropy * (0.0 if empty else 1.0))
        return logp, entropy.view(B, T1)
    return logp


def sequence_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int, device,
                      micro_batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per sequence, sum_t log p(completion_t | prompt, completion_<t) and the completion's length: (N,), (N,); and
    the number of tokens passed through. In passes of `micro_batch_size` sequences (None: one pass), with a gradient
    where autograd is on."""
    size = micro_batch_size or max(len(prompt_ids), 1)
    sums, lengths, tokens = [], [], 0
    for s in range(0, len(prompt_ids), size):
        batch = make_batch(prompt_ids[s : s + size], completion_ids[s : s + size], pad_id, device)
        logps = token_logprobs(model, batch["input_ids"], batch["attention_mask"])  # (b, T-1)
        sums.append((logps * batch["completion_mask"]).sum(-1))
        lengths.append(batch["completion_mask"].sum(-1))
        tokens += int(batch["attention_mask"].sum())
    return torch.cat(sums), torch.cat(lengths), tokens


# ----------------------------------------------------------------------------------------------------
# The optimizer step and its schedule
# ----------------------------------------------------------------------------------------------------


def optimizer_step(model, optimizer, scheduler, loss_finite: bool, max_grad_norm: float, state: dict) -> dict:
    """After the backward passes of one update: clip the gradient to `max_grad_norm` (0: no clipping), then
    step, or skip the step on every rank together if the loss on any rank or the gradient norm is not finite
    (one NaN would poison the AdamW state for good). The schedule advances either way.
    Counts in `state`: `skipped_steps` (all of them) and `bad_in_a_row` (`Run.end_step` stops the run on too many).
    Returns {"grad_norm", "skipped"}; the same on every rank.
    """
    bad = sum_over_ranks({"bad": float(not loss_finite)})["bad"] > 0
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # DTensor (FSDP2)
    skipped = bad or not math.isfinite(grad_norm)
    if skipped:
        print0(f"non-finite loss or gradient (grad norm {grad_norm}): optimizer step skipped")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    state["skipped_steps"] = state.get("skipped_steps", 0) + skipped
    state["bad_in_a_row"] = state.get("bad_in_a_row", 0) + 1 if skipped else 0
    return {"grad_norm": grad_norm, "skipped": float(skipped)}


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0 (appendix C.1)."""
    warmup = int(round(warmup_ratio * total_steps))

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


class Timer:
    """`with Timer() as t: ...; t.seconds`"""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def machine_line() -> str:
    """The CPU model, its cores and the thread settings: a timing means nothing without them."""
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch threads {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
