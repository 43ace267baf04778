"""What ExP-GRPO and ExP-DPO share: distributed set-up, models and FSDP2, prompts, answers and rewards,
data, sampling, log-probs, checkpoints and logging.

The algorithm files (expo_grpo.py, expo_dpo.py) hold the algorithms; everything here is plumbing that a
reader can trust and skip. Each section is independent and tested in tests/.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import json
import math
import os
import random
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass

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


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------------------
# Models, tokenizers and FSDP2
# ----------------------------------------------------------------------------------------------------

CACHE_DIR = os.environ.get("EXPO_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "expo"))

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_model_path(name: str) -> str:
    """`tiny` / `toy` -> the cached tiny / toy model directory (built on first use); anything else as is."""
    if name == "tiny":
        return build_tiny_model()
    if name == "toy":
        return build_toy_model()
    return name


def small_qwen2(tokenizer, num_layers: int, num_kv_heads: int, max_positions: int):
    """A width-64 Qwen2 with random weights over `tokenizer`'s vocabulary, its EOS and pad wired into generation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def build_tiny_model(path: str | None = None, seed: int = 0) -> str:
    """Build (once) a small Qwen2-architecture causal LM with random weights and its own BPE tokenizer.

    Nothing is downloaded: the byte-level BPE tokenizer is trained on text generated here (synthetic
    problems, their solutions, both prompts), so the CPU demo and the tests run offline. The directory is
    written to a temporary name and renamed, so concurrent builders (several ranks) never see half a model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = path or os.path.join(CACHE_DIR, f"tiny-v1-seed{seed}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = []
    for row in synthetic_problems(2000, seed=seed):
        corpus += [row["question"], row["solution"], SYSTEM_PROMPT, EXPLAIN_SENTENCE.format(answer=row["answer"])]
    corpus.append(r"\frac{1}{2} \sqrt{3} \pi \dfrac{a}{b} x^2 + y^2 = z^2 (1, 2) [0, \infty)")
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = small_qwen2(tokenizer, num_layers=2, num_kv_heads=2, max_positions=2048)
    tmp = f"{path}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_model_name(name: str) -> None:
    """Fail fast, before anything is loaded, on a model that can be neither built, read nor downloaded."""
    if name in ("tiny", "toy"):
        return
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"model directory {name!r} has no config.json (expected an exported HF directory)")
        return
    if not _HUB_ID.match(name):  # a path that does not exist, or not of the form org/name
        raise ValueError(f"model {name!r} is neither a local directory, `tiny`, `toy`, nor a hub id like "
                         "Qwen/Qwen2.5-3B-Instruct")


def check_dataset_name(source: str) -> None:
    """Same for a dataset: `synthetic`, `addition`, an existing .jsonl/.json/.parquet file, or a hub id."""
    if source in ("synthetic", "addition") or os.path.isfile(source):
        return
    if source.endswith((".jsonl", ".json", ".parquet")) or os.path.exists(source) or not _HUB_ID.match(source):
        raise ValueError(f"dataset {source!r} is neither `synthetic`, `addition`, a readable .jsonl/.json/.parquet "
                         "file, nor a hub id")


def check_output_dir(path: str) -> None:
    """Fail fast on an output directory that could not be created or written to (nothing is created here)."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        why = "is not a directory" if not os.path.isdir(existing) else "is not writable"
        raise ValueError(f"output directory {path!r} cannot be written: {existing!r} {why}")


class LoadError(ValueError):
    """A model or tokenizer that cannot be loaded: one line naming it and why (the trainers print it and exit)."""


def _load_error(kind: str, name: str, e: Exception) -> LoadError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return LoadError(f"cannot load the {kind} of {name!r}: {reason} (no network? a hub id needs it, or a local "
                     "copy: `huggingface-cli download ID` once, then the same id works offline)")


def load_tokenizer(name: str):
    """Tokenizer with left padding (generation appends on the right) and a pad token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = resolve_model_path(name)
    config = os.path.join(path, "tokenizer_config.json")
    own = os.path.exists(config) and json.load(open(config)).get("tokenizer_class") in (
        "TokenizersBackend", "PreTrainedTokenizerFast")
    # AutoTokenizer picks the class from the model type (qwen2) and would swap the pre-tokenizer of the tiny
    # and toy tokenizers for Qwen's, which drops the toy's spaces: load those exactly as they were saved
    try:
        tokenizer = (PreTrainedTokenizerFast if own else AutoTokenizer).from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error("tokenizer", name, e) from None
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


def load_model(name: str, device: torch.device, gradient_checkpointing: bool = False, attn: str | None = None,
               trainable: bool = True):
    """Causal LM from a hub id, a local directory or `tiny`, with fp32 master weights, in training mode.

    Weights stay fp32 here: FSDP's MixedPrecisionPolicy casts to bf16 for compute, while the optimizer updates
    fp32 copies (tiny updates at lr 3e-6 vanish in bf16). `model.checkpoint_dtype` remembers the dtype the
    checkpoint was saved in, so `export_hf` writes that back (bf16 for Qwen2.5-Instruct, not 2x the bytes).
    from_pretrained returns eval mode; a policy is put in training mode, else transformers' activation
    checkpointing never recomputes (it acts only when `self.training`) and all activations stay in memory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        saved_dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=attn or attention_implementation(device))
    except (OSError, ValueError) as e:
        raise _load_error("model", name, e) from None
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
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            # the root keeps its parameters after forward (they are needed at once in backward)
            m.set_reshard_after_forward(m is not model, recurse=False)


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


VERIFY_STATS: Counter = Counter()  # calls, timeouts, errors, too_long, too_complex: logged by the training scripts

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


def verify_answer(completion: str, gold: str, timeout: float = 5.0, exact_shortcut: bool = True) -> float:
    """1.0 if the last `\\boxed{}` of `completion` equals `gold` by math-verify, else 0.0. Never raises.

    Identical strings (spaces aside) are accepted without calling math-verify (`exact_shortcut`). Returns
    within `timeout` seconds (plus the start of a verifier process after one was killed), in any thread.

    >>> verify_answer(r"... so the answer is \\boxed{\\dfrac{1}{2}}", "0.5")
    1.0
    """
    VERIFY_STATS["calls"] += 1
    try:
        pred = extract_boxed(completion)
        if pred is None or not gold:
            return 0.0
        if exact_shortcut:
            p, g = pred.replace(" ", ""), str(gold).replace(" ", "")
            if p == g:
                return 1.0
            if _INTEGER.fullmatch(p) and _INTEGER.fullmatch(g):  # most wrong answers: no subprocess round trip
                return float(int(p) == int(g))
        if len(pred) > _MAX_ANSWER_CHARS:
            VERIFY_STATS["too_long"] += 1
            return 0.0
        if too_complex(pred):
            VERIFY_STATS["too_complex"] += 1
            return 0.0
        score, err = _VERIFIER("\\boxed{" + str(gold) + "}", "\\boxed{" + pred + "}", timeout)
        if err == "timeout" or err == "TimeoutException":
            VERIFY_STATS["timeouts"] += 1
        elif err:
            VERIFY_STATS["errors"] += 1
        return float(score)
    except Exception:
        VERIFY_STATS["errors"] += 1
        return 0.0


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "June"]
_ITEMS = ["apples", "marbles", "books", "coins", "stickers", "pencils", "shells", "cards"]


def synthetic_problems(n: int, seed: int = 0, levels=None) -> list[dict]:
    """Arithmetic word problems of difficulty 1-5 with a worked solution ending in `\\boxed{}`.

    Level L chains L operations on numbers that grow with L, so a tiny model solves level 1 long before
    level 5: a stand-in for MATH's levels that needs no download.
    """
    rng = random.Random(seed)
    rows = []
    levels = list(levels or range(1, 6))
    for i in range(n):
        level = levels[i % len(levels)]
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        total = rng.randint(2, 5 * 10 ** (level // 2 + 1))
        q = [f"{name} has {total} {item}."]
        steps = [f"{name} starts with {total} {item}."]
        for _ in range(level):
            op = rng.choice(["gets", "gives away", "doubles"] if total > 1 else ["gets"])
            if op == "gets":
                k = rng.randint(1, 10 ** (level // 2 + 1))
                q.append(f"Then {name} gets {k} more.")
                steps.append(f"After getting {k} more: {total} + {k} = {total + k}.")
                total += k
            elif op == "gives away":
                k = rng.randint(1, total - 1)
                q.append(f"Then {name} gives away {k}.")
                steps.append(f"After giving away {k}: {total} - {k} = {total - k}.")
                total -= k
            else:
                q.append(f"Then the number of {item} doubles.")
                steps.append(f"After doubling: 2 * {total} = {2 * total}.")
                total *= 2
        q.append(f"How many {item} does {name} have now?")
        steps.append(f"The answer is \\boxed{{{total}}}.")
        rows.append({"question": " ".join(q), "answer": str(total), "solution": "\n".join(steps),
                     "level": level, "subject": "Arithmetic"})
    return rows


def _read_local(path: str, stats: Counter) -> list[dict]:
    if path.endswith(".jsonl"):
        rows = []
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise ValueError
                    rows.append(row)
                except ValueError:
                    stats["malformed_lines"] += 1
        return rows
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
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

    Returns None when the row has no question or no usable answer (empty, or unbalanced braces; the caller
    counts it).
    """
    question = row.get("problem", row.get("question"))
    solution = row.get("solution")
    answer = row.get("answer")
    if solution is None and isinstance(answer, str) and "####" in answer:  # GSM8K: rationale + '#### N'
        solution, answer = answer, gsm8k_answer(answer)
        solution = re.sub(r"<<[^>]*>>", "", solution.split("####")[0]).strip() + f"\nThe answer is \\boxed{{{answer}}}."
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


def load_problems(source: str, split: str = "train", config: str | None = None, levels=None,
                  limit: int | None = None, seed: int = 0, synthetic_size: int = 2000,
                  levels_flag: str | None = None) -> tuple[list[dict], Counter]:
    """Rows {question, answer, solution, level, subject} and a Counter of what was skipped and why.

    `source`: `synthetic`, `addition` (the toy task, see "Toy world"), a local .jsonl/.json/.parquet file,
    or a hub dataset id (with `split`, `config`). Rows are shuffled deterministically by `seed`, then filtered
    by `levels`, then cut to `limit`.
    Data with no level at all (GSM8K) is a ValueError naming `levels_flag` when `levels` keeps nothing, or, with
    `levels_flag` None (the caller's default levels, not the user's), is kept whole (counted as `no_levels`).
    """
    stats: Counter = Counter()
    if source == "synthetic":
        # the train and test splits are different draws, so evaluation is held out
        raw = synthetic_problems(synthetic_size, seed=1 if split == "train" else 2)
    elif source == "addition":  # the toy task: `synthetic_size` rows at the requested levels (digit counts)
        raw = addition_problems(synthetic_size, split, levels)
    elif os.path.isfile(source):
        raw = _read_local(source, stats)
    elif os.path.exists(source) or source.endswith((".jsonl", ".json", ".parquet")):
        raise FileNotFoundError(f"dataset file {source!r} not found")
    else:
        import datasets

        raw = list(datasets.load_dataset(source, config, split=split))
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
    rows = kept
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


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic permutation of range(n) for an epoch: resuming recomputes it, nothing is stored."""
    order = list(range(n))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return order


def global_batch(rows: list, step: int, batch_size: int, seed: int) -> list:
    """The rows of optimizer step `step` (0-based) for all ranks together; epochs wrap around.

    Each rank then takes `batch[rank::world_size]`, so the data position is a function of the step alone.
    """
    per_epoch = len(rows) // batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(rows)} rows cannot fill one batch of {batch_size}")
    epoch, i = divmod(step, per_epoch)
    order = epoch_order(len(rows), seed, epoch)
    return [rows[j] for j in order[i * batch_size : (i + 1) * batch_size]]


# ----------------------------------------------------------------------------------------------------
# Toy world: n-digit addition and a small character-level model that learns it on a CPU in minutes
# ----------------------------------------------------------------------------------------------------
# `--dataset addition --model toy` reproduces ExPO's effect without a GPU (../shared/TOYLAB.md): the toy
# base model solves 1-3 digit sums, solves no 5-6 digit ones, but explains those when given the answer.
# Everything here goes through the same prompts, sampler and reward (`verify_answer`) as MATH does.

TOY_ANSWER_WIDTH = 7  # a 6-digit sum has at most 7 digits
TOY_EASY_LEVELS, TOY_HARD_LEVELS = (1, 2, 3), (5, 6)
_TOY_CHARS = "0123456789+Q|?> \\boxed{}"
_TOY_SPECIALS = ["<pad>", "<eos>", "<unk>"]
_EXPLAIN_MARK = "\n\n" + EXPLAIN_SENTENCE.split("{answer}")[0]  # "\n\nThe correct final answer is "

# The toy tokenizer's chat template: it drops the system message and renders the user message compactly,
# `Q12345+67890|???????>` (question prompt) or `Q12345+67890|0080235>` (explanation prompt, the answer read
# back out of EXPLAIN_SENTENCE). Both share one fixed-width answer slot, so the chain of thought sits at the
# same positions under both prompts: in TOYLAB's prototype, without it even SFT on the true chain of
# thought never solved a hard problem.
TOY_CHAT_TEMPLATE = (
    "{%- for m in messages if m['role'] == 'user' -%}"
    "{%- set parts = m['content'].split(" + json.dumps(_EXPLAIN_MARK) + ") -%}"
    "Q{{ parts[0] }}|"
    "{%- if parts | length > 1 -%}{{ '%0" + str(TOY_ANSWER_WIDTH) + "d' | format(parts[1].split('.')[0] | int) }}"
    "{%- else -%}" + "?" * TOY_ANSWER_WIDTH + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}>{%- endif -%}"
)


def addition_solution(a: int, b: int) -> str:
    """The chain of thought: one 4-character step per digit, right to left (digit of a, digit of b, carry
    in, sum digit), then the answer boxed.

    >>> addition_solution(12345, 67890)
    '5005 4903 3812 2710 1618 \\\\boxed{80235}'
    """
    n = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(n), str(b).zfill(n)
    steps, carry = [], 0
    for i in range(n - 1, -1, -1):
        s = int(da[i]) + int(db[i]) + carry
        steps.append(f"{da[i]}{db[i]}{carry}{s % 10}")
        carry = s // 10
    return " ".join(steps) + f" \\boxed{{{a + b}}}"


def addition_problem(rng: random.Random, digits: int) -> dict:
    """One row of the `addition` dataset: two `digits`-digit numbers (no leading zero; 0-9 for one digit)."""
    lo = 10 ** (digits - 1) if digits > 1 else 0
    a, b = rng.randint(lo, 10**digits - 1), rng.randint(lo, 10**digits - 1)
    return {"question": f"{a}+{b}", "answer": str(a + b), "solution": addition_solution(a, b),
            "level": digits, "subject": "Addition"}


def addition_problems(n: int, split: str = "train", levels=None) -> list[dict]:
    """n rows cycling over `levels` (default 1-6 digits). Each (split, level) is its own random stream,
    so train and test are different draws and the level-5 rows of a smaller set are a prefix of a larger
    one's. (Only 100 one-digit problems exist, so easy train and test rows overlap; hard ones practically
    never do.)"""
    levels = list(levels or range(1, 7))
    if not all(1 <= lv <= 6 for lv in levels):
        raise ValueError(f"addition levels are digit counts 1-6, got {levels}")
    streams = {lv: random.Random(f"addition/{split}/{lv}") for lv in levels}
    return [addition_problem(streams[levels[i % len(levels)]], levels[i % len(levels)]) for i in range(n)]


def step_check(question: str, completion: str) -> bool:
    """True iff every step of an addition chain of thought is right, and the boxed answer is what the steps
    give. Answer-free: it reads the question only, never the gold answer, so an explanation that copies the
    given answer after wrong steps fails. Malformed text fails.

    >>> step_check("47+38", r"7805 4318 \\boxed{85}")
    True
    >>> step_check("47+38", r"7805 4307 \\boxed{85}")   # the second step drops the carry
    False
    """
    m = re.fullmatch(r"(\d+)\+(\d+)", question.strip())
    if not m:
        return False
    n = max(len(m.group(1)), len(m.group(2)))
    da, db = m.group(1).zfill(n), m.group(2).zfill(n)
    *steps, boxed = completion.strip().split(" ")
    if len(steps) != n:
        return False
    carry, digits = 0, ""
    for k, step in enumerate(steps):
        i = n - 1 - k  # digits are read right to left
        if not re.fullmatch(r"\d{4}", step) or step[:3] != f"{da[i]}{db[i]}{carry}":
            return False
        s = int(da[i]) + int(db[i]) + carry
        if int(step[3]) != s % 10:
            return False
        digits, carry = step[3] + digits, s // 10
    return boxed == f"\\boxed{{{int(str(carry) + digits)}}}"


# datasets with an answer-free checker of a chain of thought (`--explanation_check steps`)
STEP_CHECKERS = {"addition": step_check}


def toy_tokenizer():
    """Character-level tokenizer: one token per character of `_TOY_CHARS`, plus pad, eos and unk."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_TOY_SPECIALS + list(_TOY_CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                        bos_token=None, clean_up_tokenization_spaces=False, model_max_length=96)
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer


def build_toy_model(path: str | None = None, seed: int = 0, steps: int = 1000, batch_size: int = 128,
                    lr: float = 2e-3, eval_size: int = 200, threads: int = 1, verbose: bool = True) -> str:
    """Build (once) and cache the toy base model: a 3-layer Qwen2 over characters, trained on addition.

    Stage 1 of TOYLAB: each batch is 80% easy problems (1-3 digits), half under the question prompt and half
    under the explanation prompt, and 20% hard ones (5-6 digits) under the explanation prompt only; the
    loss is on the completion (true chain of thought + answer + EOS) only. So the model learns the
    procedure on easy problems and learns to explain hard ones given the answer, but never to solve them.
    It then prints its three rates on held-out test problems (see `toy_rates`).

    Deterministic: the same seed (and `threads`) gives identical weights; training always runs on CPU, on one
    thread by default: on a busy 2-core machine two threads were 5-10x slower than one.
    Ranks that call this together wait on a file lock while one builds; the directory appears by an
    atomic rename, so no one ever reads half a model.
    """
    import fcntl

    path = path or os.path.join(CACHE_DIR, f"toy-v1-seed{seed}-steps{steps}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path.rstrip("/") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if os.path.exists(os.path.join(path, "config.json")):  # another process built it meanwhile
            return path
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
                model, tokenizer, seconds = _train_toy_model(seed, steps, batch_size, lr, verbose)
                rates = toy_rates(model, tokenizer, eval_size) if eval_size else {}
        finally:
            torch.set_num_threads(prev_threads)
        if verbose:
            print(f"toy model: {steps} steps in {seconds:.0f}s; " + ", ".join(f"{k} {v:.3f}" for k, v in rates.items()))
        tmp = f"{path.rstrip('/')}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "toy_build.json"), "w") as f:
            json.dump({"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "threads": threads,
                       "train_seconds": round(seconds, 1), **rates}, f, indent=1)
        os.replace(tmp, path)
    return path


def _train_toy_model(seed: int, steps: int, batch_size: int, lr: float, verbose: bool):
    tokenizer = toy_tokenizer()
    torch.manual_seed(seed)
    model = small_qwen2(tokenizer, num_layers=3, num_kv_heads=4, max_positions=96)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = cosine_schedule(optimizer, steps, warmup_ratio=1 / 15)  # TOYLAB: 100 of 1500 steps
    vocab = tokenizer.get_vocab()
    encode = lambda text: [vocab[c] for c in text]  # noqa: E731 (character-level: no tokenizer call per row)
    rng = random.Random(f"toy-model/{seed}")
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        # hard rows first (explanation prompt only), then easy rows alternating the two prompts
        rows = [(addition_problem(rng, rng.choice(TOY_HARD_LEVELS if j < batch_size // 5 else TOY_EASY_LEVELS)),
                 j < batch_size // 5 or j % 2 == 0) for j in range(batch_size)]
        # two micro-batches, hard and easy, so the short easy sequences are not padded to the hard length
        chunks = [rows[: batch_size // 5], rows[batch_size // 5 :]]
        n_tokens = sum(len(r["solution"]) + 1 for r, _ in rows)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in chunks:
            prompt_ids = [encode(explanation_prompt(tokenizer, r["question"], r["answer"]) if explain
                                 else question_prompt(tokenizer, r["question"])) for r, explain in chunk]
            completion_ids = [encode(r["solution"]) + [tokenizer.eos_token_id] for r, _ in chunk]
            batch = make_batch(prompt_ids, completion_ids, tokenizer.pad_token_id)
            # right padding: causal attention never looks at the pads, so no attention mask is needed
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1]  # (B, T-1, V)
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1),
                                  reduction="none").view_as(batch["completion_mask"])
            loss = (nll * batch["completion_mask"]).sum() / n_tokens  # mean over the whole batch's tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"toy model step {step:>5} | loss {total:.4f} | {time.perf_counter() - start:.0f}s")
    return model.eval(), tokenizer, time.perf_counter() - start


def toy_rates(model, tokenizer, n: int = 200, micro_batch_size: int = 256) -> dict:
    """The three rates that make a good toy base model, on held-out test problems:
      easy_solve     greedy, question prompt, 1-3 digits: should be ~1
      hard_solve     greedy, question prompt, 5-6 digits: should be ~0 (GRPO then sees only zero rewards)
      hard_explain   T=1, explanation prompt, 5-6 digits: steps pass `step_check` and reach the answer (~1)
    """
    easy = addition_problems(n, "test", TOY_EASY_LEVELS)
    hard = addition_problems(n, "test", TOY_HARD_LEVELS)
    kw = dict(max_new_tokens=48, micro_batch_size=micro_batch_size)
    solve_easy = sample(model, tokenizer, [question_prompt(tokenizer, r["question"]) for r in easy], temperature=0, **kw)
    solve_hard = sample(model, tokenizer, [question_prompt(tokenizer, r["question"]) for r in hard], temperature=0, **kw)
    explain = sample(model, tokenizer, [explanation_prompt(tokenizer, r["question"], r["answer"]) for r in hard],
                     temperature=1.0, **kw)
    right = lambda rows, texts: [extract_boxed(t) == r["answer"] for r, t in zip(rows, texts)]  # noqa: E731
    return {
        "easy_solve": float(np.mean(right(easy, solve_easy["texts"]))),
        "hard_solve": float(np.mean(right(hard, solve_hard["texts"]))),
        "hard_explain": float(np.mean([ok and step_check(r["question"], t)
                                       for r, t, ok in zip(hard, explain["texts"], right(hard, explain["texts"]))])),
    }


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


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], n: int | list[int] = 1, max_new_tokens: int = 512,
           temperature: float = 1.0, top_p: float = 1.0, micro_batch_size: int = 16, min_new_tokens: int = 0,
           desc: str = "sampling") -> dict:
    """n completions for each prompt (or n[i] for prompt i), generated in left-padded micro-batches with the
    KV cache. Prompts of different kinds go in one call, so they share micro-batches (fewer decoding loops).

    Returns lists ordered prompt-major (the completions of prompt i are at i*n .. i*n+n-1):
      prompt_ids[j]      token ids of the prompt of completion j (no padding)
      completion_ids[j]  generated ids, up to and including EOS, no padding
      texts[j]           decoded completion without special tokens
      eos[j]             True if the completion ended with EOS (False: truncated at max_new_tokens)
    Under FSDP the parameters are gathered once for the whole call (`gathered_params`).
    """
    device = next(model.parameters()).device
    # a rank with no prompts still joins the FSDP all-gather below, so an empty list must work
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    counts = n if isinstance(n, list) else [n] * len(prompts)
    jobs = [i for i, k in enumerate(counts) for _ in range(k)]
    # similar lengths in a micro-batch waste less on padding
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
    ctx = gathered_params(model) if fsdp_modules(model) else contextlib.nullcontext()
    with ctx:
        chunks = [order[s : s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
        for chunk in progress(chunks, desc):
            batch = [prompt_ids[jobs[j]] for j in chunk]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, p in enumerate(batch):
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen_kwargs)
            for r, j in enumerate(chunk):
                completions[j] = out[r, width:].tolist()
    model.train(was_training)
    comp_ids, ended = [], []
    for c in completions:
        cut = c.index(eos_id) + 1 if eos_id in c else len(c)
        comp_ids.append(c[:cut])
        ended.append(eos_id in c)
    return {
        "prompt_ids": [prompt_ids[i] for i in jobs],
        "completion_ids": comp_ids,
        "texts": tokenizer.batch_decode(comp_ids, skip_special_tokens=True) if comp_ids else [],
        "eos": ended,
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
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                logits_to_keep=1, use_cache=False)
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
# Optimizer schedule, checkpoints and export
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


def _checkpoint_dirs(output_dir: str) -> list[str]:
    dirs = [d for d in glob.glob(os.path.join(output_dir, "checkpoint-*")) if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    return sorted(dirs, key=lambda d: int(d.rsplit("-", 1)[1]))


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint: incomplete ones live under a `.tmp` name and are ignored."""
    dirs = _checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(output_dir: str, step: int, model, optimizer, scheduler, extra: dict | None = None,
                    save_total_limit: int | None = None) -> str:
    """Save model, optimizer, scheduler, `extra` (step, data position...) and every rank's RNG.

    Written with torch.distributed.checkpoint (each rank writes its own shards) into
    `checkpoint-STEP.tmp`, then renamed by rank 0 once every rank is done: a crash mid-save leaves the
    previous checkpoint as the newest complete one.
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
        torch.save({"scheduler": scheduler.state_dict() if scheduler else None, "extra": extra or {}, "step": step},
                   os.path.join(tmp, "trainer_state.pt"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if save_total_limit:
            for old in _checkpoint_dirs(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore what `save_checkpoint` wrote; returns {"step": ..., **extra}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
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
