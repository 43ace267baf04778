"""A run's bookkeeping: flags and input checks, the run's data, the run folder, checkpoints, the end of a step, logs.

`start_run` does the set-up both trainers share, in the order that fails fastest; `Run.resume` then loads the newest
checkpoint. A trainer tells this file what only it knows (the flags a resume may change, what a step evaluates);
nothing here names an algorithm's flag.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

from common import BUILT_DATASETS, global_batch, load_problems, parse_levels, prompt_fits
from engine import (BUILT_MODELS, DistInfo, LoadError, close_distributed, context_length, cosine_schedule,
                    device_mesh, export_hf, gather_objects, init_distributed, load_model, load_tokenizer, print0,
                    resolve_model_path, rng_states, seed_everything, set_rng_states, shard_model)


# ----------------------------------------------------------------------------------------------------
# Flags and input checks
# ----------------------------------------------------------------------------------------------------


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
    """A script's `Args` from the command line, or exit 2 with one line `SCRIPT: error: ...` (not HfArgumentParser's
    traceback or argparse's whole usage), also for a float flag given nan or inf. `--bf16` alone means true."""
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


def fail(line: str):
    """Stop with one line, printed by rank 0 only; the other ranks exit quietly (also before any process group
    exists, as torchrun's RANK says which rank this is)."""
    raise SystemExit(line if int(os.environ.get("RANK", 0)) == 0 else 1)


def reject_bad_args(problems: list[tuple[bool, str]], script: str, model: str, datasets: list, output_dir: str) -> None:
    """Before anything loads: exit with one line `SCRIPT: error: ...` on the first of `problems` [(bad, message)], or
    on a model, data set (empty entries: none given) or output directory that cannot work."""
    for bad, message in problems:
        if bad:
            fail(f"{script}: error: {message}")
    try:
        check_model_name(model)
        for dataset in filter(None, datasets):
            check_dataset_name(dataset)
        check_output_dir(output_dir)
    except ValueError as e:
        fail(f"{script}: error: {e}")


def check_trainer_flags(args, script: str, world_size: int, problems: list[tuple[bool, str]]) -> None:
    """`reject_bad_args` on a trainer's own `problems`, then on those of the flags every trainer has."""
    reject_bad_args(problems + [
        (args.batch_size < 1 or args.batch_size % world_size,
         f"--batch_size {args.batch_size} must be a positive multiple of the world size {world_size}"),
        (min(args.micro_batch_size, args.gen_batch_size, args.max_new_tokens) < 1,
         "--micro_batch_size, --gen_batch_size and --max_new_tokens must be >= 1"),
        (args.lr < 0 or args.weight_decay < 0, "--lr and --weight_decay must be >= 0"),
        (not 0 <= args.warmup_ratio < 1, "--warmup_ratio must be in [0, 1)"),
        (args.max_grad_norm < 0, "--max_grad_norm must be >= 0"),
        (args.max_steps < 0 or (args.max_steps == 0 and args.epochs < 1), "give --epochs >= 1 or --max_steps > 0"),
        (min(args.save_every, args.eval_every, args.eval_limit, args.limit) < 0,
         "--save_every, --eval_every, --eval_limit and --limit must be >= 0"),
        (min(args.save_total_limit, args.eval_num_samples, args.max_bad_steps) < 1,
         "--save_total_limit, --eval_num_samples and --max_bad_steps must be >= 1"),
        (args.eval_temperature < 0, "--eval_temperature must be >= 0"),
        (args.resume and latest_checkpoint(args.output_dir) is None, f"--resume: no checkpoint in {args.output_dir}"),
    ], script, args.model, [args.dataset, args.eval_every and args.eval_dataset], args.output_dir)


def check_solutions(used: list[dict], arm: str, instead: str, without: str) -> None:
    """An `arm` that trains on the data set's solutions finds some in the questions the run uses (none: a ValueError,
    the arm would silently be another; some missing: a warning with the count)."""
    bare = sum(not r.get("solution") for r in used)
    if bare == len(used):
        raise ValueError(f"{arm}: none of the run's {len(used)} questions has a solution (a worked answer in a "
                         f"`solution` column) to train on: use {instead} or other data")
    if bare:
        print0(f"warning: {bare} of the run's {len(used)} questions have no solution: they {without}")


def load_run_data(args, tokenizer, default_levels: str = "all", with_answer: bool = True
                  ) -> tuple[list[dict], list[dict], dict]:
    """A trainer's training and evaluation rows, before any model; a ValueError (or OSError) of one line.

    An empty `--levels` means `default_levels` where the data has levels at all (GSM8K has none: all of it). A question
    whose prompt (the explanation prompt `with_answer`) and --max_new_tokens overflow the context is skipped, counted.
    """
    if args.eval_every and not args.eval_dataset and os.path.isfile(args.dataset):
        raise ValueError(f"--eval_every: the local file {args.dataset} has no test split, so the evaluation would be on "
                         "the training questions: give held-out questions with --eval_dataset FILE")
    context = context_length(args.model)
    rows, stats = load_problems(args.dataset, args.split, args.dataset_config, parse_levels(args.levels or default_levels),
                                args.limit or None, args.seed, levels_flag=f"--levels {args.levels}" if args.levels else None,
                                fits=prompt_fits(tokenizer, context, args.max_new_tokens, with_answer))
    if len(rows) < args.batch_size:
        raise ValueError(f"{len(rows)} training questions ({dict(stats)}) cannot fill --batch_size {args.batch_size}")
    eval_rows = load_problems(args.eval_dataset or args.dataset, args.eval_split, seed=args.seed,
                              config=None if args.eval_dataset else args.dataset_config, limit=args.eval_limit or None,
                              levels=parse_levels(args.eval_levels, "--eval_levels"),
                              fits=prompt_fits(tokenizer, context, args.max_new_tokens, False))[0] if args.eval_every else []
    return rows, eval_rows, dict(stats)


# ----------------------------------------------------------------------------------------------------
# The set-up both trainers share, the end of each step, and the way a run stops
# ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What `start_run` set up: the trainer's flags, its data, the sharded models and the optimizer, then (after
    `resume`) the step to start from, the counts saved with each checkpoint (`state`) and the logger."""

    args: object
    script: str
    info: DistInfo
    tokenizer: object
    rows: list  # the training questions, in the data set's shuffled order
    eval_rows: list  # the questions of the periodic evaluation (empty without --eval_every)
    total_steps: int
    steps_per_epoch: int
    used: list  # the questions the run's steps take (all rows once it runs an epoch or more)
    checked: object  # what the trainer's `check_data` returned
    resume_from: str | None
    model: object = None
    ref_model: object = None
    optimizer: object = None
    scheduler: object = None
    state: dict | None = None
    logger: object = None
    step: int = 0  # the last step whose row is logged

    def resume(self, show: tuple, state: dict | None = None) -> int:
        """Load the newest complete checkpoint when resuming, open the metrics log, and return the step the run
        goes on from (0: a fresh start). `state`: the trainer's own counts, saved with every checkpoint."""
        self.state = {"skipped_steps": 0, "bad_in_a_row": 0, **(state or {})}
        if self.resume_from:
            self.state.update(load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler))
            self.step = self.state.pop("step")
            print0(f"resumed from step {self.step}")
        args = self.args
        self.logger = MetricsLogger(args.output_dir, config=asdict(args), wandb_project=args.wandb_project,
                                    resume_step=self.step if args.resume else None, show=show)
        return self.step

    def end_step(self, step: int, metrics: dict, evaluate=None) -> None:
        """After step `step`: evaluate (`evaluate() -> metrics`, every --eval_every steps and at the last), log its row,
        save checkpoint-`step` with `self.state` and export hf/ (every --save_every steps, at the last, when stopping),
        stop after --max_bad_steps skipped updates in a row. In this order a killed run redoes the step from the last
        checkpoint (no row missing or twice), whose random state includes evaluation's: a resume samples the same."""
        args, state = self.args, self.state
        last = step == self.total_steps
        if evaluate is not None and args.eval_every and (step % args.eval_every == 0 or last):
            metrics.update(evaluate())
        metrics["skipped_steps"] = state.get("skipped_steps", 0)
        self.logger.log(step, metrics)
        self.step = step
        stop = state.get("bad_in_a_row", 0) >= args.max_bad_steps
        if (args.save_every and step % args.save_every == 0) or last or stop:
            save_checkpoint(args.output_dir, step, self.model, self.optimizer, self.scheduler, extra=state,
                            save_total_limit=args.save_total_limit)
            export_hf(self.model, self.tokenizer, os.path.join(args.output_dir, "hf"))
        if stop:  # the skipped steps left the parameters alone: the checkpoint holds the last good state
            print0(f"stopping: {state['bad_in_a_row']} steps in a row with a non-finite loss or gradient "
                   f"(--max_bad_steps {args.max_bad_steps}); the last good parameters are in checkpoint-{step} and hf/")
            sys.exit(1)


_RUN: Run | None = None  # this process's run, for the line an interrupt prints


def start_run(args, script: str, *, resumable: frozenset = frozenset(), default_levels: str = "all",
              with_answer: bool = True, reference: bool = False, updates_per_step: int = 1,
              check_data=None) -> Run:
    """The set-up both trainers share, in the order that fails fastest; every failure is one line, `SCRIPT: error:`.
    1. Before any process group or model: the tokenizer, the rows, the steps, the questions they take (`used`) and
       the trainer's `check_data(used)` (its answer: `Run.checked`).
    2. The process group, the output folder (`claim_output_dir`; a resume may change RESUMABLE and `resumable`), seeds.
    3. The policy (and a frozen `reference`) sharded with FSDP2, AdamW, the cosine schedule over `updates_per_step`
       updates a step. `Run.resume` loads the checkpoint after the trainer used the initial policy (offline
       explanations). Of `args`, this reads the flags every trainer has (model, data, batch, optimizer, output, eval).
    """
    global _RUN
    try:
        tokenizer = load_tokenizer(args.model)
        rows, eval_rows, data_stats = load_run_data(args, tokenizer, default_levels, with_answer)
        steps_per_epoch = len(rows) // args.batch_size
        total_steps = args.max_steps or args.epochs * steps_per_epoch
        used = rows if total_steps >= steps_per_epoch else [
            r for s in range(1, total_steps + 1) for r in global_batch(rows, s, args.batch_size, args.seed)]
        checked = check_data(used) if check_data else None
    except (ValueError, OSError) as e:
        fail(f"{script}: error: {e}")
    info = init_distributed()
    resume_from = claim_output_dir(args, script, rows, RESUMABLE | resumable)  # this run's, or the run it resumes
    seed_everything(args.seed, info.rank)
    print0(f"data: {len(rows)} questions from {args.dataset} ({data_stats}) | world size {info.world_size} | "
           f"{total_steps} steps ({steps_per_epoch} per epoch)")
    run = _RUN = Run(args, script, info, tokenizer, rows, eval_rows, total_steps, steps_per_epoch, used, checked,
                     resume_from)
    try:
        policy = load_model(args.model, info.device, args.gradient_checkpointing)
        ref_model = load_model(args.model, info.device, trainable=False) if reference else None
    except LoadError as e:
        fail(f"{script}: error: {e}")
    mesh = device_mesh(info.device, hybrid=args.hybrid_shard)
    run.model = shard_model(policy, info.device, mesh, bf16=args.bf16)
    if ref_model is not None:
        run.ref_model = shard_model(ref_model, info.device, mesh, trainable=False, bf16=args.bf16)
    # foreach: one kernel per operation over all tensors, as AdamW picks by itself on GPU; on CPU its default goes
    # tensor by tensor (slower for sharded parameters, the same result)
    run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=args.lr, weight_decay=args.weight_decay, foreach=True)
    run.scheduler = cosine_schedule(run.optimizer, total_steps * updates_per_step, args.warmup_ratio)
    return run


def launch(main, script: str) -> None:
    """Run a script's `main` and leave the process group once its frame (its sharded models) is gone. Ctrl-C is one
    line (`interrupt_line`), and every rank exits 130 at once from the signal handler: no rank waits in a collective
    for a peer that is gone, no half-written checkpoint is finished."""
    def on_ctrl_c(signum, frame):
        if int(os.environ.get("RANK", 0)) == 0:
            print(interrupt_line(script), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        main()
    except BaseException:
        # a peer that stopped on Ctrl-C first can break this rank's collective (gloo: "Connection reset") before
        # this rank's own handler ran: give the handler its turn, so that this rank exits quietly too
        time.sleep(0.5)
        raise
    close_distributed()


def interrupt_line(script: str) -> str:
    """`launch`'s line on Ctrl-C: where the run stopped, its newest complete checkpoint, how to continue."""
    if _RUN is None or _RUN.logger is None:
        return f"{script}: interrupted before step 1; nothing to resume"
    out = _RUN.args.output_dir
    checkpoint = newest_complete_checkpoint(out)[0]
    if checkpoint is None:
        return f"{script}: interrupted during step {_RUN.step + 1}; no complete checkpoint in {out} yet, so start again"
    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite_output_dir")]
    nodes = int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    launcher = (f"torchrun --nproc_per_node {os.environ['LOCAL_WORLD_SIZE']}" + (f" --nnodes {nodes}" if nodes > 1 else "")
                if "LOCAL_WORLD_SIZE" in os.environ else "python")
    return (f"{script}: interrupted during step {_RUN.step + 1}; newest complete checkpoint: {checkpoint}; continue "
            f"with: {launcher} {script} {' '.join(argv)} --resume")


# ----------------------------------------------------------------------------------------------------
# The run folder: one run at a time, its configuration, and what a resume may change
# ----------------------------------------------------------------------------------------------------


# What a run leaves in its --output_dir (run_config.json aside: a start that got no further may be started
# again): a fresh start refuses a folder that holds any of them, --overwrite_output_dir deletes them (only them)
RUN_OUTPUTS = ("checkpoint-*", "hf", "hf.tmp", "metrics.jsonl", "samples.jsonl", "pairs-round*.jsonl", "wandb")

# The flags every trainer has that a --resume may change (a trainer adds its own); every other must be the saved one.
# They change what is evaluated, logged and kept, memory and layout (the updates keep their distribution, not their
# samples), and the length: `load_checkpoint` stretches the cosine schedule to a new total.
RESUMABLE = frozenset({
    "output_dir", "resume", "overwrite_output_dir", "max_steps", "epochs", "save_every", "save_total_limit",
    "max_bad_steps", "wandb_project", "eval_every", "eval_dataset", "eval_split", "eval_limit", "eval_levels",
    "eval_num_samples", "eval_temperature", "micro_batch_size", "gen_batch_size", "gradient_checkpointing",
    "hybrid_shard"})
DATA_FLAGS = ("dataset", "dataset_config", "split", "levels", "limit", "seed")  # they decide the training questions

_run_lock = None  # rank 0's lock on its output folder, held until the process exits


def _fingerprint(path: str, block: int = 1 << 20) -> str:
    """Size and hash of the first, middle and last MiB: milliseconds for 6 GB, and unlike a safetensors header,
    different for two models of the same shape."""
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


def resume_differences(saved: dict, config: dict, resumable: frozenset = RESUMABLE, defaults: dict | None = None
                       ) -> list[str]:
    """What a resume with `config` would change of the `saved` run that it may not (not in `resumable`), e.g.
    ["--batch_size 2 -> 4", "--model base (its model.safetensors changed)"]. A flag the saved run lacks is its default."""
    old, new = {**(defaults or {}), **saved["args"]}, config["args"]

    def show(v):
        return repr(v) if v in ("", None) else str(v)

    out = [f"--{k} {show(old.get(k))} -> {show(v)}" for k, v in new.items()
           if k not in resumable and old.get(k) != v]
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


def claim_output_dir(args, script: str, rows: list[dict], resumable: frozenset = RESUMABLE) -> str | None:
    """Make args.output_dir this run's, before any model is loaded; returns the checkpoint to resume from (None:
    a fresh start). Rank 0 decides and the others follow, so every rank stops together, with one line (rank 0's):
    1. OUTPUT_DIR/run.lock is locked for the whole run: a second run on the folder stops at once;
    2. a fresh start refuses a folder with another run's outputs (RUN_OUTPUTS) unless --overwrite_output_dir,
       which deletes them; --resume refuses what `resume_differences` finds, then takes the newest complete
       checkpoint, with one line for each newer one it skips;
    3. run_config.json says what the run is (`run_config`); a resume adds what it changed, when.
    """
    verdict = (None, None)  # (error line, checkpoint to resume from)
    if dist.get_rank() == 0:
        try:
            verdict = (None, _take_folder(args, rows, script, resumable))
        except ValueError as e:
            verdict = (f"{script}: error: {e}", None)
    error, resume_from = gather_objects(verdict)[0]
    if error:
        fail(error)
    return resume_from


def _take_folder(args, rows: list[dict], script: str, resumable: frozenset) -> str | None:
    """`claim_output_dir` on rank 0; a refusal is a ValueError of one line."""
    from filelock import FileLock, Timeout

    global _run_lock
    out = args.output_dir
    if args.resume and args.overwrite_output_dir:
        raise ValueError("--resume continues the run in --output_dir and --overwrite_output_dir deletes it: give one")
    lock_path = os.path.join(out, "run.lock")
    try:
        os.makedirs(out, exist_ok=True)
        lock = FileLock(lock_path)
        lock.acquire(timeout=0)
        with open(lock_path, "w") as f:  # who holds it, for the refusal of a second run
            f.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%H:%M:%S')}")
        _run_lock = lock
    except Timeout:
        with open(lock_path) as f:
            holder = f.read().strip()
        raise ValueError(f"another run is using {out} ({holder}): one run at a time per --output_dir") from None
    except OSError as e:
        if not os.path.isdir(out):
            raise ValueError(f"output directory {out!r} cannot be written: {e.strerror}") from None
        # a filesystem without locks (some NFS mounts): run, and say what is not guarded
        print0(f"warning: cannot lock {lock_path} ({e.strerror}): a second run on this folder would not be stopped")

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
            raise ValueError(f"--resume: {out} has no readable run_config.json (missing or damaged), so what it would "
                             "continue cannot be checked: start over with --overwrite_output_dir") from None
        if saved.get("script") != script:
            raise ValueError(f"--resume: {out} holds an {saved.get('script')} run: resume it with {saved.get('script')}")
        differ = resume_differences(saved, config, resumable, {f.name: f.default for f in fields(args)})
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
    write_whole(config_path, json.dumps(config, indent=1))
    return resume_from


def write_whole(path: str, text: str) -> None:
    """Write a file whole or not at all: a crash while writing leaves the previous one."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------


def _checkpoint_dirs(output_dir: str) -> list[str]:
    dirs = [d for d in glob.glob(os.path.join(output_dir, "checkpoint-*")) if re.fullmatch(r"checkpoint-\d+", os.path.basename(d))]
    return sorted(dirs, key=lambda d: int(d.rsplit("-", 1)[1]))


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint directory, complete or not (a save in progress, `.tmp`, is not one)."""
    dirs = _checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint in `path` cannot be resumed from (e.g. "__1_0.distcp is missing"), or None: its manifest.json
    (written last) names each file at its size, trainer_state.pt reads, and every shard `.metadata` names is listed.
    Sizes, not checksums: a 3B run's optimizer state is tens of GB to read at every resume."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        with open(os.path.join(path, "manifest.json")) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no manifest.json: its save did not finish"
    for name, size in files.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != size:
            return f"{name} has {os.path.getsize(file)} bytes, not {size}"
    # a damaged pickle raises whatever its bytes lead to: any exception means unreadable
    try:
        torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    except Exception as e:
        return f"trainer_state.pt cannot be read ({type(e).__name__})"
    try:
        shards = {s.relative_path for s in FileSystemReader(path).read_metadata().storage_data.values()}
    except Exception as e:
        return f".metadata cannot be read ({type(e).__name__})"
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
    """Save model, optimizer, scheduler, `extra` and every rank's RNG with torch.distributed.checkpoint (each rank
    its shards) into `checkpoint-STEP.tmp`; then rank 0 lists each file's size in manifest.json and renames it, so a
    crash mid-save leaves the previous checkpoint the newest complete one. `save_total_limit` keeps that many, newest
    first; ones past `step` (damaged ones a resume skipped) go, so they never outrank this run's."""
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
    torch.save(rng_states(), os.path.join(tmp, f"rng-rank{rank}.pt"))
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict() if scheduler else None, "extra": extra or {}, "step": step},
                   os.path.join(tmp, "trainer_state.pt"))
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
    """Restore what `save_checkpoint` wrote; returns {"step": ..., **extra}. The schedule is this run's, at the saved
    step: a resume with a larger --max_steps stretches the cosine to the new total instead of training on at lr 0."""
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
        set_rng_states(torch.load(rng_file, weights_only=False))
    return {"step": trainer["step"], **trainer["extra"]}


# ----------------------------------------------------------------------------------------------------
# Logging
# ----------------------------------------------------------------------------------------------------


class MetricsLogger:
    """One line per step on rank 0, every metric in `OUTPUT_DIR/metrics.jsonl`, wandb when asked for. On resume,
    rows past the resumed step are dropped first, so the file never holds a step twice."""

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
            if os.path.exists(p):  # a fresh start empties it, a resume keeps the rows up to its step
                with open(p) as f:
                    keep = [ln for ln in f if resume_step is not None and ln.strip()
                            and json.loads(ln).get("step", 0) <= resume_step]
                write_whole(p, "".join(keep))
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
        shown = [f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                 for k in self.show or metrics if k in metrics]
        print0(f"step {step:>5} | " + " | ".join(shown))
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_samples(self, step: int, rows: list[dict]) -> None:
        if not self.is_main:
            return
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps({"step": step, **r}) + "\n" for r in rows)

