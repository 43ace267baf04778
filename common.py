"""What ExP-GRPO and ExP-DPO share: distributed set-up, models and FSDP2, prompts, answers and rewards,
data, sampling, log-probs, checkpoints and logging.

The algorithm files (expo_grpo.py, expo_dpo.py) hold the algorithms; everything here is plumbing that a
reader can trust and skip. Each section is independent and tested in tests/.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import glob
import hashlib
import json
import math
import os
import random
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Distributed set-up
# ----------------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
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
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        cuda = torch.cuda.is_available()
        local_rank = int(os.environ["LOCAL_RANK"])
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch.device("cuda", local_rank) if cuda else None,
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed every generator; each rank gets its own stream so ranks do not sample identical completions."""
    s = seed + 1000 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def all_reduce_dict(metrics: dict[str, float], op: str = "mean", device=None) -> dict[str, float]:
    """Mean or sum of a dict of floats over ranks (the keys must be the same on every rank).

    NaN is a legitimate value (e.g. a ratio with no denominator on this rank) and propagates.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: float(v) for k, v in metrics.items()}
    keys = sorted(metrics)
    device = device or (torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu"))
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    elif op != "sum":
        raise ValueError(f"op must be mean or sum, got {op}")
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

# Models and data sets built in code rather than read from disk or a hub (toy.py registers `tiny`, `toy`,
# `synthetic` and `addition`): the plumbing looks names up here and names none of them itself.
BUILT_MODELS: dict = {}  # name -> build() -> local directory (built once, cached)
BUILT_DATASETS: dict = {}  # name -> rows(n, split, levels) -> [{question, answer, solution, level, subject}]
STEP_CHECKERS: dict = {}  # dataset name -> check(question, completion) -> bool, an answer-free check of each step


def register_model(name: str, build) -> None:
    BUILT_MODELS[name] = build


def register_dataset(name: str, rows, step_checker=None) -> None:
    BUILT_DATASETS[name] = rows
    if step_checker is not None:
        STEP_CHECKERS[name] = step_checker


def resolve_model_path(name: str) -> str:
    """A built model's name -> its cached directory (built on first use); a hub id or directory as is."""
    return BUILT_MODELS[name]() if name in BUILT_MODELS else name


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_name(name: str) -> None:
    """Fail fast, before anything is loaded, on a model that can be neither built, read nor downloaded."""
    if name in BUILT_MODELS:
        return
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"model directory {name!r} has no config.json (expected an exported HF directory)")
        return
    if not _HUB_ID.match(name):  # a path that does not exist, or not of the form org/name
        raise ValueError(f"model {name!r} is neither a local directory, a built-in model ({', '.join(BUILT_MODELS)}), "
                         "nor a hub id like Qwen/Qwen2.5-3B-Instruct")


def check_dataset_name(source: str) -> None:
    """Same for a dataset: a built-in one, an existing .jsonl/.json/.parquet file, or a hub id."""
    if source in BUILT_DATASETS or os.path.isfile(source):
        return
    if source.endswith((".jsonl", ".json", ".parquet")) or os.path.exists(source) or not _HUB_ID.match(source):
        raise ValueError(f"dataset {source!r} is neither a built-in one ({', '.join(BUILT_DATASETS)}), a readable "
                         ".jsonl/.json/.parquet file, nor a hub id")


def check_output_dir(path: str) -> None:
    """Fail fast on an output directory that could not be created or written to: a file is created and removed
    in it, or in the nearest folder above it that exists (os.access says yes to root everywhere, /proc too)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"output directory {path!r} cannot be written: {existing!r} is not a directory")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ValueError(f"output directory {path!r} cannot be written: no file can be created in {existing!r} "
                         f"({e.strerror})") from None


def parse_flags(cls, script: str):
    """A script's `Args` dataclass from the command line, or exit 2 with one line `SCRIPT: error: ...`.

    HfArgumentParser raises a ValueError (a traceback) on an unknown flag, and argparse prints its whole usage
    before an error: both become one line, as does a float flag given nan or inf (`--lr nan` would train on
    NaN). A flag of type Optional[bool] (None: decided at run time, as --bf16) gets the bare form a plain bool
    flag has: `--bf16` is `--bf16 true`.
    """
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    parser = HfArgumentParser(cls, prog=script)
    parser.error = lambda message: parser.exit(2, f"{script}: error: {message} (see --help)\n")
    for action in parser._actions:
        if action.type is string_to_bool and action.nargs is None:
            action.nargs, action.const = "?", True
    args, unknown = parser.parse_args_into_dataclasses(return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name} {value} is not a finite number")
    return args


def reject_bad_args(problems: list[tuple[bool, str]], args, script: str) -> None:
    """A script's flag check, before anything is loaded: exit with one line `SCRIPT: error: ...` on the first
    of `problems` [(bad, message)], or on a model, data set or output directory that cannot work."""
    for bad, message in problems:
        if bad:
            raise SystemExit(f"{script}: error: {message}")
    try:
        check_model_name(args.model)
        check_dataset_name(args.dataset)
        if getattr(args, "eval_every", 0) and args.eval_dataset:  # a trainer's periodic evaluation (eval.py has none)
            check_dataset_name(args.eval_dataset)
        check_output_dir(args.output_dir)
    except ValueError as e:
        raise SystemExit(f"{script}: error: {e}")


class LoadError(ValueError):
    """A model or tokenizer that cannot be loaded: one line naming it and why (the trainers print it and exit)."""


def _load_error(kind: str, name: str, e: Exception) -> LoadError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, ValueError):  # the files were read: what they say is not supported
        return LoadError(f"cannot load the {kind} of {name!r}: {reason}")
    if name in BUILT_MODELS or os.path.isdir(name):
        hint = "a file missing, cut short or damaged? export or download it again"
    else:
        hint = "no network? a hub id needs it, or a local copy: `huggingface-cli download ID` once, then the same id works offline"
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


def load_model(name: str, device: torch.device, gradient_checkpointing: bool = False, attn: str | None = None,
               trainable: bool = True):
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
            path, dtype=torch.float32, attn_implementation=attn or attention_implementation(device))
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
    # With every parameter whole, FSDP's forward hooks have nothing left to do but cost Python time at every
    # module of every decoded token (15% of decoding a 4-layer model on CPU): they are taken off meanwhile
    # (FSDP2 keeps their handles in its state; torch is pinned, tests/test_sampling.py checks they come back)
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


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

def _not_utf8(path: str, line: int, raw: bytes, e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8")


def text_lines(path: str):
    """(line number, line) of each non-blank line of a UTF-8 text file, counted from 1. A byte that is not UTF-8
    is a ValueError naming the file and the line (Python's own error names neither)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, number, raw, e) from None
            if line.strip():
                yield number, line


def _read_local(path: str, stats: Counter) -> list[dict]:
    if path.endswith(".jsonl"):
        rows = []
        for _, line in text_lines(path):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError
                rows.append(row)
            except ValueError:
                stats["malformed_lines"] += 1
        return rows
    if path.endswith(".json"):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _not_utf8(path, raw[: e.start].count(b"\n") + 1, raw, e) from None
        data = data if isinstance(data, list) else data.get("data", data.get("rows", []))
        stats["malformed_lines"] += sum(not isinstance(r, dict) for r in data)
        return [r for r in data if isinstance(r, dict)]
    if path.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    raise ValueError(f"unsupported file type {path!r}: use .jsonl, .json or .parquet")


def _parse_level(v) -> int | None:
    if v is None:
        return None
    m = re.search(r"\d+", str(v))
    return int(m.group(0)) if m else None


def normalize_row(row: dict) -> dict | None:
    """Map a MATH / MATH500 / GSM8K style row to {question, answer, solution, level, subject}.

    Returns None when the row has no question or no usable answer (empty: nothing after `####` or in the last
    `\\boxed{}`; or unbalanced braces; the caller counts it). An answer column that holds a worked solution
    (with a `\\boxed{}`) gives the content of its last box, never the whole text.
    """
    question = row.get("problem", row.get("question"))
    solution = row.get("solution")
    answer = row.get("answer")
    if solution is None and isinstance(answer, str) and "####" in answer:  # GSM8K: rationale + '#### N'
        solution, answer = answer, gsm8k_answer(answer)
        if answer is None:  # `#### ` and nothing after it: no gold answer (and not the text "None")
            return None
        solution = re.sub(r"<<[^>]*>>", "", solution.split("####")[0]).strip() + f"\nThe answer is \\boxed{{{answer}}}."
    elif isinstance(answer, str) and _BOX_RE.search(answer):
        solution, answer = solution or answer, extract_boxed(answer)
    if answer is None or str(answer).strip() == "":
        answer = extract_boxed(solution)
    if not isinstance(question, str) or not question.strip() or answer is None or not str(answer).strip():
        return None
    if str(answer).count("{") != str(answer).count("}"):  # cut or garbled: no completion could match it
        return None
    return {
        "question": question.strip(),
        "answer": str(answer).strip(),
        "solution": solution if isinstance(solution, str) else None,
        "level": _parse_level(row.get("level")),
        "subject": row.get("type", row.get("subject")),
    }


def check_columns(columns, source: str) -> None:
    """Fail before any model is loaded if the data has no question column or no answer column."""
    columns = set(columns)
    if not columns & {"problem", "question"} or not columns & {"solution", "answer"}:
        raise ValueError(
            f"dataset {source!r} needs a question column (problem|question) and an answer column "
            f"(solution|answer); found columns: {sorted(columns)}"
        )


def prompt_fits(tokenizer, context: int | None, max_new_tokens: int, with_answer: bool):
    """`load_problems`' `fits` for a model of `context` positions: rows -> whether each row's prompt and
    `max_new_tokens` more fit (None where the model does not say its context). The prompt is the explanation
    prompt (question and answer, the longest a trainer writes) `with_answer`, else the question prompt.
    A longer question would reach the model (a 6 MB line once asked for 36 TB): skipped, counted as `too_long`.
    """
    if context is None:
        return None
    room = context - max_new_tokens
    if room < 1:
        raise ValueError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context "
                         f"of {context} positions")
    # no token covers more characters than its own text has: a prompt longer than this is too long untokenized
    most_chars = room * max(map(len, tokenizer.get_vocab()))

    def fits(rows: list[dict]) -> list[bool]:
        prompts = [explanation_prompt(tokenizer, r["question"], r["answer"]) if with_answer
                   else question_prompt(tokenizer, r["question"]) for r in rows]
        short = [p for p in prompts if len(p) <= most_chars]
        lengths = iter([len(ids) for ids in tokenizer(short, add_special_tokens=False)["input_ids"]] if short else [])
        return [len(p) <= most_chars and next(lengths) <= room for p in prompts]

    return fits


def load_problems(source: str, split: str = "train", config: str | None = None, levels=None,
                  limit: int | None = None, seed: int = 0, synthetic_size: int = 2000,
                  levels_flag: str | None = None, fits=None) -> tuple[list[dict], Counter]:
    """Rows {question, answer, solution, level, subject} and a Counter of what was skipped and why.

    `source`: a built-in data set (`register_dataset`: `synthetic_size` rows), a local .jsonl/.json/.parquet file,
    or a hub dataset id (with `split`, `config`). Rows are shuffled deterministically by `seed`, then filtered
    by `levels` and by `fits` (rows -> [bool], `prompt_fits`: a row too long for the model, counted as `too_long`),
    then cut to `limit`.
    Data with no level at all (GSM8K) is a ValueError naming `levels_flag` when `levels` keeps nothing, or, with
    `levels_flag` None (the caller's default levels, not the user's), is kept whole (counted as `no_levels`).
    """
    stats: Counter = Counter()
    if source in BUILT_DATASETS:
        raw = BUILT_DATASETS[source](synthetic_size, split, levels)
    elif os.path.isfile(source):
        raw = _read_local(source, stats)
    elif os.path.exists(source) or source.endswith((".jsonl", ".json", ".parquet")):
        raise FileNotFoundError(f"dataset file {source!r} not found")
    else:
        import datasets

        try:
            raw = list(datasets.load_dataset(source, config, split=split))
        except ConnectionError as e:
            raise ValueError(f"cannot load the dataset {source!r}: {e} (no network? a hub data set needs it the first "
                             "time, or give a local .jsonl file)") from None
    if raw:
        check_columns(set().union(*(r.keys() for r in raw[:100])), source)
    rows = [normalize_row(r) for r in raw]
    if levels and not any(row and row["level"] is not None for row in rows):
        if levels_flag is not None:
            raise ValueError(f"dataset {source!r} has no difficulty levels (no `level` column), so {levels_flag} "
                             f"keeps none of its {len(rows)} rows: drop that flag or pass it as `all`")
        levels, stats["no_levels"] = None, len(rows)
    kept = []
    for r, row in zip(raw, rows):
        if row is None:
            question = r.get("problem", r.get("question"))
            stats["no_question" if not isinstance(question, str) or not question.strip() else "no_answer"] += 1
        elif levels and row["level"] not in levels:
            stats["other_level"] += 1
        else:
            kept.append(row)
    rows = [row for row, ok in zip(kept, fits(kept) if fits and kept else [True] * len(kept)) if ok]
    if len(rows) < len(kept):
        stats["too_long"] = len(kept) - len(rows)
    random.Random(seed).shuffle(rows)
    if limit:
        rows = rows[:limit]
    stats["kept"] = len(rows)
    return rows, stats


def parse_levels(text: str | None) -> list[int] | None:
    """'5' -> [5]; '3-5' -> [3, 4, 5]; '1,3' -> [1, 3]; '' or 'all' -> None."""
    if not text or text == "all":
        return None
    out = []
    for part in str(text).split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def load_run_data(args, tokenizer, default_levels: str = "all", with_answer: bool = True
                  ) -> tuple[list[dict], list[dict], dict]:
    """A trainer's training and evaluation rows from its flags, before any model: a bad file fails in seconds.

    An empty `--levels` means `default_levels` where the data has levels at all (GSM8K has none: all of it).
    A question whose prompt (the explanation prompt `with_answer`; evaluation: the question prompt) and
    --max_new_tokens do not fit in the model's context is skipped and counted (`prompt_fits`).
    Raises ValueError (or OSError) with one line.
    """
    context = context_length(args.model)
    rows, stats = load_problems(args.dataset, args.split, args.dataset_config, parse_levels(args.levels or default_levels),
                                args.limit or None, args.seed, levels_flag=f"--levels {args.levels}" if args.levels else None,
                                fits=prompt_fits(tokenizer, context, args.max_new_tokens, with_answer))
    if len(rows) < args.batch_size:
        raise ValueError(f"{len(rows)} training questions ({dict(stats)}) cannot fill --batch_size {args.batch_size}")
    eval_rows = load_problems(args.eval_dataset or args.dataset, args.eval_split, seed=args.seed,
                              config=None if args.eval_dataset else args.dataset_config, limit=args.eval_limit or None,
                              levels=parse_levels(args.eval_levels),
                              fits=prompt_fits(tokenizer, context, args.max_new_tokens, False))[0] if args.eval_every else []
    return rows, eval_rows, dict(stats)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic permutation of range(n) for an epoch: resuming recomputes it, nothing is stored."""
    order = list(range(n))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return order


def global_batch(rows: list, step: int, batch_size: int, seed: int) -> list:
    """The rows of optimizer step `step` (counted from 1) for all ranks together; epochs wrap around.

    Each rank then takes `batch[rank::world_size]`, so the data position is a function of the step alone.
    """
    per_epoch = len(rows) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} rows cannot fill one batch of {batch_size}")
    epoch, i = divmod(step - 1, per_epoch)
    order = epoch_order(len(rows), seed, epoch)
    return [rows[j] for j in order[i * batch_size : (i + 1) * batch_size]]


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
EXPLAIN_SENTENCE = (
    "The correct final answer is {answer}. Explain step by step how to solve the problem and reach this "
    "answer. Write it as a normal solution, without mentioning that the answer was given, and end with "
    "\\boxed{{{answer}}}."
)


def _chat_prompt(tokenizer, user: str) -> str:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def question_prompt(tokenizer, question: str) -> str:
    """The prompt every response is sampled, scored and trained under: the question alone."""
    return _chat_prompt(tokenizer, question)


def explanation_prompt(tokenizer, question: str, answer: str) -> str:
    """The question followed by the answer sentence: the only difference from `question_prompt`."""
    return _chat_prompt(tokenizer, question + "\n\n" + EXPLAIN_SENTENCE.format(answer=answer))


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


def progress(iterable, desc: str, total: int | None = None, every: float = 30.0):
    """Yield from `iterable` and report how far it is, on rank 0 only: tqdm when stderr is a terminal, else
    (a log file, CI) one line `desc: done/total, rate/s, eta` at most every `every` seconds, so a long phase
    (offline explanations, DPO pairs, evaluation) never looks like a hang."""
    if dist.is_initialized() and dist.get_rank() != 0:
        yield from iterable
        return
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, total=total, leave=False)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(iterable, start=1):
        yield item
        now = time.perf_counter()
        if now - last >= every:
            last, rate = now, done / (now - start)
            eta = f", eta {(total - done) / rate:.0f}s" if total else ""
            print(f"{desc}: {done}/{total if total else '?'}, {rate:.2f}/s{eta}", flush=True)


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
    finished = [0]  # completions finished since the progress bar was last moved
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

    def choose(logits, ngen, rows_jobs):
        if min_new_tokens > 0 and len(stop_ids) and bool((ngen < min_new_tokens).any()):
            stop = stop_t[stop_t < logits.shape[-1]]
            logits = logits.index_put((torch.nonzero(ngen < min_new_tokens), stop[None, :]),
                                      torch.tensor(float("-inf"), device=device))
        tok = next_tokens(logits, temperature, top_p, generators and [generators[j] for j in rows_jobs])
        stats["decoded_slots"] += tok.shape[0]
        return tok

    def settle(b: _Batch, tok: torch.Tensor) -> list[int]:
        """Record the sampled tokens; finish the rows that ended; return the rows that go on."""
        is_end = torch.isin(tok, stop_t).tolist()
        keep = []
        for r, t in enumerate(tok.tolist()):
            b.gen[r].append(t)
            if is_end[r] or len(b.gen[r]) >= max_new_tokens:
                completions[b.jobs[r]], ended[b.jobs[r]] = b.gen[r], bool(is_end[r])
                finished[0] += 1
            else:
                keep.append(r)
        return keep

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
        tok = choose(logits, b.ngen, b.jobs)
        b.last, b.ngen = tok, b.ngen + 1
        keep = settle(b, tok)
        if len(keep) < len(b):
            b.keep(keep)
        return b

    was_training = model.training
    model.eval()
    ticks = iter(progress(range(len(jobs)), desc, total=len(jobs)))  # advanced once per finished completion
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
                    tok = choose(logits, active.ngen, active.jobs)
                    active.last, active.ngen = tok, active.ngen + 1
                    keep = settle(active, tok)
                    if len(keep) < len(active):
                        active.keep(keep)
                for _ in range(finished[0]):
                    next(ticks, None)
                finished[0] = 0
        for _ in ticks:  # the rows that ended in a prefill; closes a tqdm bar
            pass
    finally:
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
# Answers and rewards
# ----------------------------------------------------------------------------------------------------

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed(text: str | None) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`), braces balanced; else None.

    >>> extract_boxed(r"so \\boxed{\\frac{1}{2}} and \\boxed{3}")
    '3'
    >>> extract_boxed(r"\\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    if not text:
        return None
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    # one pass pairs every `{` with its `}`: a text of thousands of unclosed boxes stays linear, not quadratic
    closing, open_ = {}, []
    for b in re.finditer(r"[{}]", text):
        if b.group() == "{":
            open_.append(b.start())
        elif open_:
            closing[open_.pop()] = b.start()
    for m in reversed(boxes):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if i in closing:
                return text[i + 1 : closing[i]].strip()
            continue  # unbalanced: try an earlier box
        if m.group(0).startswith("\\boxed") and m.end() > m.start() + len("\\boxed"):
            tail = re.match(r"[^\s$]+", text[i:])  # `\boxed 5`: up to the next space or `$`
            if tail:
                return tail.group(0)
    return None


def gsm8k_answer(text: str | None) -> str | None:
    """GSM8K's final answer: the text after `####`, without thousands separators. '#### 1,234' -> '1234'."""
    if not text or "####" not in text:
        return None
    ans = text.split("####")[-1].strip().replace(",", "")
    return ans or None



_MAX_ANSWER_CHARS = 512  # longer "answers" are junk; parsing them is where sympy can take minutes
_INTEGER = re.compile(r"-?\d{1,30}")
# sympy evaluates what it parses: 10^{10^{10}}, (10^9)! or 9^{99999999} run for minutes (or fill the
# memory) and a batch of them would cost a full time limit each. No gold answer of MATH or GSM8K has these
# shapes, so such an answer counts only if it equals the gold string (checked before). `x!` is a power
# tower of a kind too: it is allowed on a literal of at most 5 digits.
_TOO_COMPLEX = re.compile(
    r"\^\s*\{[^{}]*\^"                        # a power in an exponent: 10^{10^{10}}, e^{e^{x}}
    r"|\^\s*[\w.]+\s*\^"                      # 10^10^10
    r"|\^\s*\{?\s*[-+]?\d{5,}"                # an exponent of 5+ digits: 2^{99999999}
    r"|(?:[)}!]|\d{6,})\s*!"                  # a factorial of an expression, of a factorial, of 6+ digits
    r"|\\(?:binom|sum|prod|int|lim)\b.*(?:\^|\d{4})"  # big operators with large bounds
)
_MAX_NESTING = 12  # braces or parentheses deeper than this: generated junk (MATH answers stay below 5)


def too_complex(answer: str) -> bool:
    """True for an answer whose verification could outlast any time limit (see _TOO_COMPLEX).

    >>> too_complex("10^{10^{10^{10}}}"), too_complex("(10^{10})!"), too_complex("2^{2007}"), too_complex("5!")
    (True, True, False, False)
    """
    if _TOO_COMPLEX.search(answer):
        return True
    depth = deepest = 0
    for ch in re.findall(r"[{}()\[\]]", answer):
        depth = depth + 1 if ch in "{([" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest > _MAX_NESTING


_WORKER_SRC = r"""
import json, sys, time
from math_verify import parse, verify
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    gold, pred, t = json.loads(line)
    start = time.monotonic()
    try:
        ok = verify(parse(gold, parsing_timeout=t, raise_on_error=True),
                    parse(pred, parsing_timeout=t, raise_on_error=True), timeout_seconds=t)
        # verify answers False when its own time limit stopped it: the clock tells that apart
        out = [1.0 if ok else 0.0, "TimeoutException" if not ok and time.monotonic() - start >= t else None]
    except BaseException as e:
        out = [0.0, type(e).__name__]
    sys.stdout.write(json.dumps(out) + "\n"); sys.stdout.flush()
"""


class _Verifier:
    """math-verify in a child process, so a hard time limit holds whatever thread calls it.

    math-verify's own timeout uses signal.alarm, which only works in a main thread; here it runs in the
    child's main thread (a soft limit of a third of the time for each of its three parts: parsing the
    gold, the answer, comparing), and the parent kills the child if it has not answered when the time is
    up (the hard limit). A replacement child is started at once, so it imports sympy while the caller
    goes on; only its start-up (about a second, not counted in the limit) is waited for on the next call.
    """

    def __init__(self, source: str = _WORKER_SRC):
        self.source, self.proc = source, None
        self.lock = threading.Lock()

    def _start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.source], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.ready = False

    def _read(self, seconds: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        return self.proc.stdout.readline() if ready else None

    def __call__(self, gold: str, pred: str, timeout: float) -> tuple[float, str | None]:
        with self.lock:
            try:
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                if not self.ready:
                    self.ready = self._read(120) == "ready\n"
                    if not self.ready:
                        raise OSError("the verifier process did not start")
                self.proc.stdin.write(json.dumps([gold, pred, max(1, int(timeout / 3))]) + "\n")
                self.proc.stdin.flush()
                line = self._read(timeout)
                if line:
                    return tuple(json.loads(line))
            except (OSError, ValueError):
                pass
            self.proc.kill()
            self.proc.wait()
            self._start()
            return 0.0, "timeout"


_VERIFIER = _Verifier()


def check_answer(completion: str, gold: str, timeout: float = 5.0, exact_shortcut: bool = True) -> tuple[float, str | None]:
    """(1.0 if the last `\\boxed{}` of `completion` equals `gold` by math-verify else 0.0, what went wrong).

    What went wrong: None, or `too_long` / `too_complex` (an answer sympy could spend minutes on: 0 unless it
    is the very string of the gold), `timeout`, `error`. Never raises. Identical strings (spaces aside) are
    accepted without calling math-verify (`exact_shortcut`). Returns within `timeout` seconds (plus the
    start of a verifier process after one was killed), in any thread.

    >>> check_answer(r"... so the answer is \\boxed{\\dfrac{1}{2}}", "0.5")
    (1.0, None)
    """
    try:
        pred = extract_boxed(completion)
        if pred is None or not gold:
            return 0.0, None
        if exact_shortcut:
            p, g = pred.replace(" ", ""), str(gold).replace(" ", "")
            if p == g:
                return 1.0, None
            if _INTEGER.fullmatch(p) and _INTEGER.fullmatch(g):  # most wrong answers: no subprocess round trip
                return float(int(p) == int(g)), None
        if len(pred) > _MAX_ANSWER_CHARS:
            return 0.0, "too_long"
        if too_complex(pred):
            return 0.0, "too_complex"
        score, err = _VERIFIER("\\boxed{" + str(gold) + "}", "\\boxed{" + pred + "}", timeout)
        return float(score), None if not err else "timeout" if err in ("timeout", "TimeoutException") else "error"
    except Exception:
        return 0.0, "error"


def verify_answer(completion: str, gold: str, timeout: float = 5.0, exact_shortcut: bool = True) -> float:
    """`check_answer`'s score alone."""
    return check_answer(completion, gold, timeout, exact_shortcut)[0]


def score_answers(completions: list[str], golds: list[str]) -> tuple[list[float], dict[str, float]]:
    """The reward of each completion (1 if its last \\boxed{} verifies against its gold answer, else 0; no
    format reward), and what the verifier saw: counts of `verify_timeouts`, `verify_errors` and
    `verify_prefiltered` (answers too long or too complex for sympy), for the log."""
    checked = [check_answer(c, g) for c, g in zip(completions, golds)]
    seen = Counter(what for _, what in checked)
    return [score for score, _ in checked], {"verify_timeouts": float(seen["timeout"]),
                                             "verify_errors": float(seen["error"]),
                                             "verify_prefiltered": float(seen["too_long"] + seen["too_complex"])}


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
    # Right padding (make_batch's) needs no mask under causal attention: no real token sees a later pad, and the
    # pads' own values are masked by the caller. Without a mask, attention takes its causal fast path: the same
    # values at real positions, 11% faster forward + backward on CPU (flash kernels on GPU, no (B, 1, T, T) mask).
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


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1; over everything (dim=None) or along `dim`. An empty mask gives 0."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# The step protocol: both trainers end every update and every step the same way
# ----------------------------------------------------------------------------------------------------


def optimizer_step(model, optimizer, scheduler, loss_finite: bool, max_grad_norm: float, state: dict) -> dict:
    """After the backward passes of one update: clip the gradient to `max_grad_norm` (0: no clipping), then
    step, or skip the step on every rank together if the loss on any rank or the gradient norm is not finite
    (one NaN would poison the AdamW state for good). The schedule advances either way.
    Counts in `state`: `skipped_steps` (all of them) and `bad_in_a_row` (`end_of_step` stops the run on too many).
    Returns {"grad_norm", "skipped"}; the same on every rank.
    """
    bad = all_reduce_dict({"bad": float(not loss_finite)}, op="sum")["bad"] > 0
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


def end_of_step(step: int, total_steps: int, metrics: dict, args, model, tokenizer, optimizer, scheduler, logger,
                state: dict, evaluate=None) -> None:
    """Steps count from 1. At the end of step `step`: evaluate (`evaluate() -> metrics`, every `args.eval_every`
    steps and at the last), log row `step`, save checkpoint-`step` and export OUTPUT_DIR/hf (every
    `args.save_every` steps, at the last, and when stopping), then stop the run after `args.max_bad_steps`
    skipped updates in a row.
    In this order, a run killed in between redoes the step from the previous checkpoint (no missing or
    duplicated row), and the saved random state already includes what evaluation drew, so a resumed run
    samples what an uninterrupted one does. `state` (counts and the trainer's own) is saved with the checkpoint.
    """
    last = step == total_steps
    if evaluate is not None and args.eval_every and (step % args.eval_every == 0 or last):
        metrics.update(evaluate())
    metrics["skipped_steps"] = state.get("skipped_steps", 0)
    logger.log(step, metrics)
    stop = state.get("bad_in_a_row", 0) >= args.max_bad_steps
    if (args.save_every and step % args.save_every == 0) or last or stop:
        save_checkpoint(args.output_dir, step, model, optimizer, scheduler, extra=state,
                        save_total_limit=args.save_total_limit)
        export_hf(model, tokenizer, os.path.join(args.output_dir, "hf"))
    if stop:  # the skipped steps left the parameters alone: the checkpoint holds the last good state
        print0(f"stopping: {state['bad_in_a_row']} steps in a row with a non-finite loss or gradient (--max_bad_steps "
               f"{args.max_bad_steps}); the last good parameters are in checkpoint-{step} and hf/")
        cleanup_distributed()
        sys.exit(1)


# ----------------------------------------------------------------------------------------------------
# Checkpoints and export
# ----------------------------------------------------------------------------------------------------


def cosine_schedule(optimizer, total_steps: int, warmup_ratio: float):
    """Linear warm-up over `warmup_ratio` of the steps, then cosine decay to 0 (appendix C.1)."""
    warmup = int(round(warmup_ratio * total_steps))

    def lr_lambda(step):
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


CHECKPOINT_FORMAT = 2  # 2: steps counted from 1 in both trainers, sampled responses kept as token ids


def _checkpoint_dirs(output_dir: str) -> list[str]:
    dirs = [d for d in glob.glob(os.path.join(output_dir, "checkpoint-*")) if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    return sorted(dirs, key=lambda d: int(d.rsplit("-", 1)[1]))


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint directory (a save in progress lives under a `.tmp` name and is ignored); whether it
    is complete is `checkpoint_problem`'s question, and `newest_complete_checkpoint` asks it."""
    dirs = _checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint in `path` cannot be resumed from, or None when it is complete: its manifest.json
    (written last, once every rank's files were done) is there, each file it names is there at the size it
    names, trainer_state.pt reads, and every shard file that torch.distributed.checkpoint's `.metadata` names is
    in the manifest. Sizes, not checksums: a 3B run's optimizer state is tens of GB to read at every resume.
    Example: a shard deleted -> "__1_0.distcp is missing"; trainer_state.pt cut -> "trainer_state.pt has 700
    bytes, not 1553".
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        with open(os.path.join(path, "manifest.json")) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no manifest.json: its save did not finish (or an earlier version of expo wrote it)"
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, not {size}"
    # a damaged pickle raises whatever its bytes lead to: any exception means unreadable
    try:
        trainer = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    except Exception as e:
        return f"trainer_state.pt cannot be read ({type(e).__name__})"
    try:
        shards = {s.relative_path for s in FileSystemReader(path).read_metadata().storage_data.values()}
    except Exception as e:
        return f".metadata cannot be read ({type(e).__name__})"
    if trainer.get("format") != CHECKPOINT_FORMAT:
        return "written by an earlier version of expo (other step numbering and sample format)"
    if shards - set(files):
        return f"{sorted(shards - set(files))[0]}, named by .metadata, is not in its manifest"
    return None


def newest_complete_checkpoint(output_dir: str) -> tuple[str | None, list[str]]:
    """The newest checkpoint `checkpoint_problem` finds nothing wrong with (None if none), and a line for each
    newer one it skipped: ["checkpoint-6: __0_0.distcp is missing"]."""
    skipped = []
    for path in reversed(_checkpoint_dirs(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{os.path.basename(path)}: {problem}")
    return None, skipped


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, extra: dict | None = None,
                    save_total_limit: int | None = None) -> str:
    """Save model, optimizer, scheduler, `extra` (step, data position...) and every rank's RNG.

    Written with torch.distributed.checkpoint (each rank writes its own shards) into
    `checkpoint-STEP.tmp`, then, once every rank is done, rank 0 lists each file and its size in manifest.json
    (`checkpoint_problem` checks them) and renames it: a crash mid-save leaves the previous checkpoint as the
    newest complete one. `save_total_limit` keeps that many of this run's checkpoints, newest first; ones past
    `step` are from before a resume (the damaged ones it skipped) and go, so they never outrank this run's.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tmp, f"rng-rank{rank}.pt"))
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict() if scheduler else None, "extra": extra or {}, "step": step,
                    "format": CHECKPOINT_FORMAT}, os.path.join(tmp, "trainer_state.pt"))
    dist.barrier()
    if rank == 0:
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump({"step": step, "files": files}, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if save_total_limit:
            dirs = _checkpoint_dirs(output_dir)
            kept = [d for d in dirs if int(d.rsplit("-", 1)[1]) <= step][-save_total_limit:]
            for old in set(dirs) - set(kept):
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote (a checkpoint `checkpoint_problem` passed); returns {"step": ..., **extra}.

    The schedule is the current run's: the learning rate of the next step is its value at the saved step, not
    the saved one, so a resume with a larger --max_steps stretches the cosine to the new total instead of
    training on at the end of the old one (lr 0).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])  # its step count; its lr_lambda stays this run's
        scheduler.last_epoch -= 1
        scheduler.step()  # sets the optimizer's lr (restored with the saved one) to this run's schedule at that step
    rng_file = os.path.join(path, f"rng-rank{dist.get_rank()}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks than saved: seeds stay as set
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {"step": trainer["step"], **trainer["extra"]}


def export_hf(model, tokenizer, path: str) -> None:
    """Write a Hugging Face directory (safetensors + config + generation_config + tokenizer) that
    `from_pretrained` loads, in the dtype the checkpoint came in (`load_model`'s `checkpoint_dtype`): a bf16
    hub model is exported in bf16, not as its fp32 master weights.

    The full state dict is gathered to rank 0's CPU, so this works for a sharded model of any size that
    fits in host memory.
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
# The run folder: one run at a time, its configuration, and what a resume may change
# ----------------------------------------------------------------------------------------------------

# What a run leaves in its --output_dir (run_config.json aside: a start that got no further may be started
# again): a fresh start refuses a folder that holds any of them, --overwrite_output_dir deletes them (only them)
RUN_OUTPUTS = ("checkpoint-*", "hf", "hf.tmp", "metrics.jsonl", "samples.jsonl", "pairs-round*.jsonl", "wandb")

# The flags a --resume may give other values than the run's; every other flag must be the saved one. They
# change what is evaluated, logged and kept, memory and layout (the updates keep their distribution, though a
# resumed run's samples then differ from an uninterrupted run's), and the length: `load_checkpoint` stretches
# the cosine schedule to a new total.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "max_steps", "epochs", "save_every", "save_total_limit",
    "max_bad_steps", "log_samples", "probe_every", "probe_answer_logprob", "wandb_project", "eval_every",
    "eval_dataset", "eval_split", "eval_limit", "eval_levels", "eval_num_samples", "eval_temperature",
    "micro_batch_size", "gen_batch_size", "gradient_checkpointing", "hybrid_shard"})
DATA_FLAGS = ("dataset", "dataset_config", "split", "levels", "limit", "seed")  # they decide the training questions

_run_lock = None  # rank 0's lock on its output folder, held until the process exits


def _fingerprint(path: str, block: int = 1 << 20) -> str:
    """A file's size and a hash of its first, middle and last MiB: milliseconds for a 6 GB weights file, and
    two models of the same shape differ in all three (their safetensors headers would not)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
            f.seek(offset)
            digest.update(f.read(block))
    return f"{size}:{digest.hexdigest()[:16]}"


def model_identity(name: str) -> dict:
    """What --model names: a directory (a built-in model's too) by its absolute path and its files' fingerprints,
    so that another model of the same shape in its place is told apart; a hub id by its name."""
    path = resolve_model_path(name)
    if not os.path.isdir(path):
        return {"hub_id": name}
    files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    return {"path": os.path.abspath(path), "files": {f: _fingerprint(os.path.join(path, f)) for f in files}}


def run_config(args, script: str, rows: list[dict]) -> dict:
    """What OUTPUT_DIR/run_config.json says a run is: its flags, script and world size, the model its --model
    names, and its training questions (their number and a hash of them in their order)."""
    questions = json.dumps(rows, sort_keys=True, default=str).encode()
    return {"script": script, "args": json.loads(json.dumps(asdict(args))), "world_size": dist.get_world_size(),
            "model": model_identity(args.model),
            "data": {"questions": len(rows), "sha256": hashlib.sha256(questions).hexdigest()[:16]},
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def resume_differences(saved: dict, config: dict) -> list[str]:
    """What a resume with `config` would change of the `saved` run that it may not (RESUME_MAY_CHANGE), one
    item each: ["--batch_size 2 -> 4", "--model base (its model.safetensors changed)"]."""
    old, new = saved["args"], config["args"]

    def show(v):
        return repr(v) if v in ("", None) else str(v)

    out = [f"--{k} {show(old.get(k))} -> {show(v)}" for k, v in new.items()
           if k not in RESUME_MAY_CHANGE and old.get(k) != v]
    was, now = saved["model"], config["model"]
    if old.get("model") == new["model"] and was != now:  # the same name, another model
        if was.get("path") != now.get("path"):
            what = f"it is {now.get('path', 'a hub id')} now, {was.get('path', 'a hub id')} then"
        else:
            what = "its " + ", ".join(sorted(f for f in set(was["files"]) | set(now["files"])
                                             if was["files"].get(f) != now["files"].get(f))) + " changed"
        out.append(f"--model {new['model']} ({what})")
    if all(old.get(k) == new[k] for k in DATA_FLAGS) and saved["data"] != config["data"]:
        out.append(f"--dataset {new['dataset']} (its questions changed: {saved['data']['questions']} then, "
                   f"{config['data']['questions']} now)")
    return out


def claim_output_dir(args, script: str, rows: list[dict]) -> str | None:
    """Make args.output_dir this run's, before any model is loaded; returns the checkpoint to resume from (None:
    a fresh start). Rank 0 decides and the others follow, so every rank stops together, with one line (rank 0's):
    1. OUTPUT_DIR/run.lock is locked for the whole run: a second run on the folder stops at once;
    2. a fresh start refuses a folder with another run's outputs (RUN_OUTPUTS) unless --overwrite_output_dir,
       which deletes them; --resume refuses what `resume_differences` finds, then takes the newest complete
       checkpoint, with one line for each newer one it skips;
    3. run_config.json says what the run is (`run_config`); a resume adds what it changed, when.
    """
    rank = dist.get_rank()
    verdict = (None, None)  # (error line, checkpoint to resume from)
    if rank == 0:
        try:
            verdict = (None, _claim(args, rows, script))
        except ValueError as e:
            verdict = (f"{script}: error: {e}", None)
    error, resume_from = gather_objects(verdict)[0]
    if error:
        cleanup_distributed()
        raise SystemExit(error if rank == 0 else 1)
    return resume_from


def _claim(args, rows: list[dict], script: str) -> str | None:
    """`claim_output_dir` on rank 0; a refusal is a ValueError of one line."""
    global _run_lock
    out = args.output_dir
    if args.resume and args.overwrite_output_dir:
        raise ValueError("--resume continues the run in --output_dir and --overwrite_output_dir deletes it: give one")
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, "run.lock"), "a+")
    except OSError as e:
        raise ValueError(f"output directory {out!r} cannot be written: {e.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}")
        lock.flush()
        _run_lock = lock
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        raise ValueError(f"another run is using {out} ({holder}): one run at a time per --output_dir") from None
    except OSError as e:  # a filesystem without locks (some NFS mounts): run, and say what is not guarded
        print0(f"warning: cannot lock {out}/run.lock ({e.strerror}): a second run on this folder would not be stopped")

    found = sorted({os.path.basename(p) for pattern in RUN_OUTPUTS for p in glob.glob(os.path.join(out, pattern))})
    listed = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    if found and not args.resume:
        if not args.overwrite_output_dir:
            raise ValueError(f"{out} holds another run ({listed}): continue it with --resume, or start over with "
                             "--overwrite_output_dir (deletes those)")
        for name in found:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print0(f"--overwrite_output_dir: deleted the previous run's {listed} in {out}")

    config, resume_from = run_config(args, script, rows), None
    config_path = os.path.join(out, "run_config.json")
    if args.resume:
        try:
            with open(config_path) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            raise ValueError(f"--resume: {out} has no readable run_config.json (an earlier version of expo wrote this "
                             "run), so what it would continue cannot be checked: start over with --overwrite_output_dir"
                             ) from None
        differ = resume_differences(saved, config)
        if differ:
            raise ValueError(f"--resume: the run in {out} has other settings (its -> given): {'; '.join(differ)}. "
                             "Resume with its values, or start over with --overwrite_output_dir")
        resume_from, skipped = newest_complete_checkpoint(out)
        if resume_from is None:
            raise ValueError(f"--resume: no complete checkpoint in {out} ({'; '.join(skipped)})")
        for line in skipped:
            print0(f"--resume: skipped {line}")
        changed = {k: [saved["args"].get(k), v] for k, v in config["args"].items()
                   if k != "resume" and saved["args"].get(k) != v}
        config = {**saved, "resumes": saved.get("resumes", []) + [{
            "from": os.path.basename(resume_from), "at": config["started"], "world_size": config["world_size"],
            "changed": changed}]}
    with open(config_path + ".tmp", "w") as f:
        json.dump(config, f, indent=1)
    os.replace(config_path + ".tmp", config_path)
    return resume_from


# ----------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------


class MetricsLogger:
    """One line per step on rank 0, every metric in `OUTPUT_DIR/metrics.jsonl`, wandb when asked for.

    On resume, rows past the resumed step are dropped first, so the file never holds a step twice.
    """

    def __init__(self, output_dir: str, config: dict | None = None, wandb_project: str | None = None,
                 resume_step: int | None = None, show: tuple = ()):
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.samples_path = os.path.join(output_dir, "samples.jsonl")
        self.show = show
        self.wandb = None
        if not self.is_main:
            return
        os.makedirs(output_dir, exist_ok=True)
        for p in (self.path, self.samples_path):
            if os.path.exists(p):
                keep = []
                if resume_step is not None:
                    with open(p) as f:
                        keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
                with open(p, "w") as f:
                    f.writelines(keep)
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config, dir=output_dir)
            except ImportError:
                print0("wandb is not installed: logging to metrics.jsonl only")

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, np.floating)) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        keys = self.show or list(metrics)
        print0(f"step {step:>5} | " + " | ".join(f"{k} {_fmt(metrics[k])}" for k in keys if k in metrics))
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if not self.is_main:
            return
        with open(self.samples_path, "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **r}) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def machine_line() -> str:
    """The CPU model, its cores and the thread settings: a timing means nothing without them (the same toy build
    took 0.22 s a step on one 2-core machine and 0.59 s on another)."""
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch threads {torch.get_num_threads()}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


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
