"""Evaluation: n samples per problem, unbiased pass@k, and the paper's Table 3 (pass@k by difficulty level).

    # 4 GPUs: the exported model of a training run on the MATH test set (the paper's Table 3)
    torchrun --nproc_per_node 4 eval.py --model OUTPUT_DIR/hf --dataset DigitalLearningGmbH/MATH-lighteval
    # one GPU, any hub model, level 5 only, 8 samples per problem
    python eval.py --model Qwen/Qwen2.5-3B-Instruct --dataset HuggingFaceH4/MATH-500 --levels 5 --num_samples 8
    # CPU demo: the tiny random model on synthetic problems (accuracy 0, but every code path runs)
    python eval.py --model tiny --dataset synthetic --limit 20 --num_samples 2 --max_new_tokens 32
    # training curves (eval accuracy, pass@k, reward, KL, explanation NLL) of several runs on one figure
    python eval.py plot runs/expo_grpo runs/grpo --out curves.png

Every rank samples its share of the problems (rows[rank::world]); the per-sample results are gathered, so
every rank returns the same table. The training scripts call `evaluate` every `--eval_every` steps.
A note on flag names: torchrun takes any flag that abbreviates one of its own (`--n` would become
`--nnodes`), so the sample count is `--num_samples` and no flag here is a prefix of a torchrun flag.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field

import torch.distributed as dist

import common
import engine
import runs
import toy  # noqa: F401  (registers --model tiny|toy and --dataset synthetic|addition)


@dataclass
class Args:
    model: str = field(default="tiny", metadata={"help": "exported checkpoint directory (OUTPUT_DIR/hf), hub id, or a built-in model: tiny, toy"})
    dataset: str = field(default="synthetic", metadata={"help": "hub id, local .jsonl/.json/.parquet (question|problem and solution|answer columns), or synthetic|addition"})
    split: str = field(default="test", metadata={"help": "evaluation split"})
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset configuration name"})
    levels: str = field(default="all", metadata={"help": "difficulty levels evaluated: 5, 3-5, 1,3 or all"})
    limit: int = field(default=0, metadata={"help": "evaluate on at most this many questions (0: all)"})
    num_samples: int = field(default=4, metadata={"help": "n: samples per problem (the paper uses 4)"})
    ks: list[int] = field(default_factory=list, metadata={"help": "k values for pass@k, each <= n (default: 1, powers of 2 up to n, and n)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (the paper: 0.7)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    max_new_tokens: int = field(default=1024, metadata={"help": "longest completion; longer ones are cut and usually wrong"})
    gen_batch_size: int = field(default=64, metadata={"help": "sequences generated at once on one rank"})
    output_dir: str | None = field(default=None, metadata={"help": "directory for eval.json and samples.jsonl (default: eval_results/MODEL-DATASET)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace the evaluation (eval.json, samples.jsonl) in an output_dir that holds one; a training run's folder is never written"})
    seed: int = field(default=0, metadata={"help": "sampling seed (each rank gets its own stream)"})


# ----------------------------------------------------------------------------------------------------
# pass@k and the table
# ----------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    The chance that k samples drawn without replacement from the n hold at least one correct one.
    Computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    Example: n=4, c=1, k=2 -> 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def default_ks(n: int) -> list[int]:
    """1, every power of 2 below n, and n: n=4 -> [1, 2, 4]; n=6 -> [1, 2, 4, 6]."""
    return sorted({1, n} | {2**i for i in range(1, n.bit_length()) if 2**i < n})


def group_stats(correct_counts: list[int], n: int, ks: list[int]) -> dict:
    """Count, mean accuracy and mean pass@k over problems, given each problem's number of correct samples."""
    m = len(correct_counts)
    stats = {"count": m, "accuracy": sum(correct_counts) / (m * n) if m else float("nan")}
    for k in ks:
        stats[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct_counts) / m if m else float("nan")
    return stats


def _natural(key: str):
    """Sort key that puts numbers in numeric order: level 2 before level 10, pass@2 before pass@16."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def summarize(samples: list[dict], n: int, ks: list[int]) -> dict:
    """The table from the gathered samples: overall figures, then `by_level` and `by_subject` groups.

    Keys of the groups are strings (as in the JSON file): levels "1".."5", "unknown" where a dataset
    has no level or subject (GSM8K).
    """
    problems: dict[int, dict] = {}
    for s in samples:
        p = problems.setdefault(s["problem_index"], {"level": s["level"], "subject": s["subject"], "correct": 0})
        p["correct"] += int(s["correct"])
    overall = group_stats([p["correct"] for p in problems.values()], n, ks)
    summary = {"num_problems": overall.pop("count"), "n": n, **overall,
               "mean_completion_tokens": sum(s["num_tokens"] for s in samples) / max(1, len(samples)),
               "truncated": sum(s["truncated"] for s in samples) / max(1, len(samples))}
    for by in ("level", "subject"):
        groups: dict[str, list[int]] = {}
        for p in problems.values():
            key = "unknown" if p[by] is None else str(p[by])
            groups.setdefault(key, []).append(p["correct"])
        summary[f"by_{by}"] = {key: group_stats(groups[key], n, ks) for key in sorted(groups, key=_natural)}
    return summary


def scalar_metrics(summary: dict, prefix: str = "eval/") -> dict[str, float]:
    """The figures a training run logs: overall accuracy and pass@k, and pass@k per level.

    Example: {"eval/accuracy": 0.4, "eval/pass@4": 0.6, "eval/level5/pass@4": 0.1, ...}
    """
    out = {f"{prefix}{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and k != "n"}
    for level, stats in summary["by_level"].items():
        if level != "unknown":  # a dataset without levels (GSM8K) has the overall figures only
            out.update({f"{prefix}level{level}/{k}": v for k, v in stats.items() if k.startswith("pass@")})
    return out


def markdown_table(groups: dict[str, dict], overall: dict, title: str, ks: list[int]) -> str:
    """| Level | Count | pass@1 | pass@2 | pass@4 | in percent, one row per group and an `All` row."""
    lines = [f"| {title} | Count | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---|---:|" + "---:|" * len(ks)]
    for name, stats in [*groups.items(), ("All", overall)]:
        cells = " | ".join(f"{100 * stats[f'pass@{k}']:.1f}" for k in ks)
        lines.append(f"| {name} | {stats['count']} | {cells} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Evaluation (called by the training scripts too)
# ----------------------------------------------------------------------------------------------------


def evaluate(model, tokenizer, rows: list[dict], n: int = 4, temperature: float = 0.7, max_new_tokens: int = 1024,
             micro_batch_size: int = 64, ks: list[int] | None = None, top_p: float = 1.0) -> tuple[dict, list[dict]]:
    """Sample n completions per problem under the question prompt, verify them, and tabulate pass@k.

    `rows` (common.load_problems rows) must be the same list on every rank; this rank takes
    rows[rank::world]. Every rank must call this (a sharded model gathers its parameters collectively),
    and every rank gets the same (summary, samples): samples holds each of the len(rows) * n samples
    once, ordered by problem then sample index.
    """
    ks = sorted(ks or default_ks(n))
    if ks[-1] > n:
        raise ValueError(f"pass@k needs k <= n: k={ks[-1]} > n={n}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(rank, len(rows), world))
    prompts = [common.question_prompt(tokenizer, rows[i]["question"]) for i in indices]
    out = engine.sample(model, tokenizer, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_p=top_p, micro_batch_size=micro_batch_size, desc="eval")
    # prompt-major: completion j belongs to problem j // n
    scores, verify_stats = common.score_answers(out["texts"], [rows[indices[j // n]]["answer"] for j in range(len(out["texts"]))])
    local = []
    for j, text in enumerate(out["texts"]):
        row = rows[indices[j // n]]
        local.append({
            "problem_index": indices[j // n], "sample_index": j % n, "question": row["question"],
            "gold": row["answer"], "level": row["level"], "subject": row["subject"], "completion": text,
            "extracted": common.extract_boxed(text), "correct": bool(scores[j]),
            "num_tokens": len(out["completion_ids"][j]), "truncated": not out["eos"][j],
        })
    samples = [s for part in engine.gather_objects(local) for s in part]
    samples.sort(key=lambda s: (s["problem_index"], s["sample_index"]))
    summary = summarize(samples, n, ks)
    seen = engine.sum_over_ranks({**verify_stats, "decoded_slots": out["stats"]["decoded_slots"],
                                   "useful_tokens": out["stats"]["useful_tokens"]})
    summary.update({k: seen[k] for k in verify_stats})  # what the verifier saw, on every rank
    summary["pad_waste"] = 1 - seen["useful_tokens"] / max(seen["decoded_slots"], 1)
    return summary, samples


def evaluate_run(model, tokenizer, rows: list[dict], args) -> dict:
    """What a trainer logs every --eval_every steps: accuracy and pass@k of its --eval_* flags, as eval/<key>."""
    summary, _ = evaluate(model, tokenizer, rows, n=args.eval_num_samples, temperature=args.eval_temperature,
                          max_new_tokens=args.max_new_tokens, micro_batch_size=args.gen_batch_size)
    return scalar_metrics(summary, prefix="eval/")


# ----------------------------------------------------------------------------------------------------
# Training curves: `eval.py plot RUN_DIR [RUN_DIR ...] --out FILE.png`
# ----------------------------------------------------------------------------------------------------

# metrics.jsonl keys (of expo_grpo.py and expo_dpo.py) worth a panel by default, in panel order: regular
# expressions, every match its own panel. Per-level curves on demand: --keys 'eval/level5/.*'
PLOT_KEYS = [r"eval/accuracy", r"eval/pass@\d+", r"reward", r"solved", r"kl", r"sft_loss",
             r"nll_(explanation|expert)|expl_nll", r"expl_verified", r"answer_logp_after_(explanation|cot)",
             r"loss", r"reward_accuracy", r"margin", r"logps_(chosen|rejected)", r"cot_accuracy"]


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: pass the OUTPUT_DIR of a training run")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_name(path: str, paths: list[str]) -> str:
    """A run's label: its path below the folder all `paths` share (runs/lab/b0/grpo_r0 -> b0/grpo_r0)."""
    common_dir = os.path.commonpath([os.path.abspath(p) for p in paths]) if len(paths) > 1 else None
    name = os.path.relpath(os.path.abspath(path), common_dir) if common_dir else os.path.basename(os.path.normpath(path))
    return name if name != "." else path


def compare_main(argv: list[str]) -> None:
    """`eval.py compare OUT_DIR ...`: pass@k by level of several evaluations on the same problems, side by side."""
    import argparse

    parser = argparse.ArgumentParser(prog="eval.py compare", description="Tables of several eval.py runs, side by side.")
    parser.add_argument("eval_dirs", nargs="+", help="--output_dir of eval.py runs (each holds eval.json)")
    dirs = parser.parse_args(argv).eval_dirs
    try:
        tables = {run_name(d, dirs): json.load(open(os.path.join(d, "eval.json"))) for d in dirs}
    except OSError as e:
        sys.exit(f"error: {e}")
    key = f"pass@{min(max(t['ks']) for t in tables.values())}"  # the largest k every table has
    levels = sorted({lv for t in tables.values() for lv in t["by_level"]}, key=_natural)
    print("| Level | Count | " + " | ".join(tables) + f" |  ({key}, %)\n|---|---:|" + "---:|" * len(tables))
    for lv in levels + ["All"]:
        cells = [t if lv == "All" else t["by_level"].get(lv, {}) for t in tables.values()]
        count = next((c.get("count", c.get("num_problems")) for c in cells if c), 0)
        print(f"| {lv} | {count} | " + " | ".join(f"{100 * c[key]:.1f}" if key in c else "-" for c in cells) + " |")


def plot(run_dirs: list[str], out: str, keys: list[str] | None = None) -> list[str]:
    """One panel per metric present in any run, one line per run, over the step; returns the keys drawn.

    `keys`: regular expressions matched against the metric names (default: PLOT_KEYS).
    """
    import matplotlib  # optional: `pip install matplotlib`; plot_main says so in one line when it is missing

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    runs = {run_name(d, run_dirs): read_metrics(d) for d in run_dirs}
    present = {k for rows in runs.values() for row in rows for k, v in row.items()
               if isinstance(v, (int, float)) and k != "step"}
    keys = list(dict.fromkeys(k for pattern in (keys or PLOT_KEYS) for k in sorted(present, key=_natural)
                              if re.fullmatch(pattern, k)))
    if not keys:
        raise ValueError(f"no known metric in {run_dirs}; present: {sorted(present)}")
    cols = min(3, len(keys))
    rows_ = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 3.5 * rows_), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in runs.items():
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o" if key.startswith("eval/") else None, markersize=3, label=name)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return keys


def plot_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="eval.py plot", description="Training curves of one or more runs as a PNG.")
    parser.add_argument("run_dirs", nargs="+", help="OUTPUT_DIRs of training runs (each holds metrics.jsonl)")
    parser.add_argument("--out", default="curves.png", help="PNG file to write")
    parser.add_argument("--keys", nargs="*", help="metrics to draw, as regular expressions (default: PLOT_KEYS)")
    a = parser.parse_args(argv)
    try:
        for d in a.run_dirs:  # a missing run is said first, matplotlib or not
            read_metrics(d)
        keys = plot(a.run_dirs, a.out, a.keys)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except ImportError:  # an exit status of 0 would tell a script a plot was drawn
        sys.exit("eval.py plot: error: matplotlib is not installed: pip install matplotlib (the curves are in each "
                 "run's metrics.jsonl)")
    print(f"wrote {a.out}: {', '.join(keys)}")


# ----------------------------------------------------------------------------------------------------
# Command line: check everything that can be checked before a model is loaded
# ----------------------------------------------------------------------------------------------------

EVAL_OUTPUTS = ("eval.json", "samples.jsonl")
# What a trainer (runs.RUN_OUTPUTS, run_config.json) or a model (config.json) leaves in a folder. samples.jsonl
# is a trainer's output and ours: next to none of these it is an evaluation's (one cut off before its eval.json).
RUN_MARKERS = tuple(p for p in runs.RUN_OUTPUTS if p != "samples.jsonl") + ("run_config.json", "run.lock", "config.json")


def check_eval_folder(out: str, overwrite: bool) -> list[str]:
    """The folder is the user's data, as for the trainers: refuse (ValueError) one that holds a training run or a
    model even with --overwrite_output_dir (its checkpoints are not eval.py's to delete, nor is an export, which
    the next one replaces whole), and another evaluation unless --overwrite_output_dir. Returns what gets replaced."""
    found = sorted({os.path.basename(p) for pattern in RUN_MARKERS for p in glob.glob(os.path.join(out, pattern))})
    if found:
        where = f", e.g. --output_dir {out.rstrip('/')}/eval" if found != ["config.json"] else ""
        raise ValueError(f"{out} holds a training run or a model ({', '.join(found[:5])}): eval.py never writes into "
                         f"one, --overwrite_output_dir neither; give another --output_dir{where}")
    ours = [f for f in EVAL_OUTPUTS if os.path.isfile(os.path.join(out, f))]
    if ours and not overwrite:
        raise ValueError(f"{out} holds another evaluation ({', '.join(ours)}): give another --output_dir, or replace "
                         "it with --overwrite_output_dir")
    return ours


def what_was_evaluated(args, levels: list[int] | None, problems: int) -> dict:
    """eval.json's record of the model and the data. A trainer exports OUTPUT_DIR/hf right after each checkpoint
    save, so for --model OUTPUT_DIR/hf the run's newest checkpoint (seen before loading) is the step evaluated."""
    path, run = engine.resolve_model_path(args.model), None
    path = os.path.abspath(path) if os.path.isdir(path) else None  # None: a hub id
    run_dir = os.path.dirname(path) if path and os.path.basename(path) == "hf" else ""
    if run_dir and os.path.isfile(os.path.join(run_dir, "run_config.json")):
        try:
            script = json.load(open(os.path.join(run_dir, "run_config.json"))).get("script")
        except (OSError, ValueError, AttributeError):  # damaged: the run and its step are still worth recording
            script = None
        ckpt = runs.latest_checkpoint(run_dir)
        run = {"output_dir": run_dir, "script": script, "checkpoint": ckpt and os.path.basename(ckpt),
               "step": ckpt and int(ckpt.rsplit("-", 1)[1])}
    return {"model": args.model, "model_path": path, "run": run, "dataset": args.dataset,
            "dataset_config": args.dataset_config, "split": args.split, "levels": levels or "all", "limit": args.limit,
            "problems": problems, **{k: getattr(args, k) for k in ("num_samples", "temperature", "top_p",
                                                                     "max_new_tokens", "seed")}}


def main() -> None:
    args = runs.parse_flags(Args, "eval.py")
    ks = sorted(set(args.ks)) or default_ks(args.num_samples)
    model_slug = re.sub(r"[^\w.-]+", "_", args.model.strip("/"))
    data_slug = re.sub(r"[^\w.-]+", "_", os.path.splitext(args.dataset)[0].strip("./"))
    args.output_dir = args.output_dir or os.path.join("eval_results", f"{model_slug}-{data_slug}")
    runs.reject_bad_args([
        (args.num_samples < 1, f"--num_samples must be >= 1, got {args.num_samples}"),
        (ks[0] < 1 or ks[-1] > args.num_samples,
         f"--ks {ks}: pass@k needs 1 <= k <= n for every k, and n is --num_samples {args.num_samples}"),
        (args.max_new_tokens < 1, f"--max_new_tokens must be >= 1, got {args.max_new_tokens}: every answer would be "
                                  "cut before its first token"),
        (args.gen_batch_size < 1 or args.limit < 0, "--gen_batch_size must be >= 1 and --limit >= 0"),
        (args.temperature < 0, "--temperature must be >= 0 (0: greedy)"),
        (not 0 < args.top_p <= 1, f"--top_p must be in (0, 1], got {args.top_p}"),
    ], "eval.py", args.model, [args.dataset], args.output_dir)
    try:
        levels = common.parse_levels(args.levels)  # a ValueError naming the forms accepted
        replaced = check_eval_folder(args.output_dir, args.overwrite_output_dir)
        tokenizer = engine.load_tokenizer(args.model)
        fits = common.prompt_fits(tokenizer, engine.context_length(args.model), args.max_new_tokens, with_answer=False)
        rows, data_stats = common.load_problems(args.dataset, split=args.split, config=args.dataset_config,
                                                levels=levels, limit=args.limit or None, seed=args.seed, fits=fits)
        if not rows:
            raise ValueError(f"no problems in {args.dataset!r} (split {args.split}, levels {args.levels}): {dict(data_stats)}")
        evaluated = what_was_evaluated(args, levels, len(rows))
    except Exception as e:  # a clear one-line message instead of a traceback from every rank
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"eval.py: error: {message}")

    info = engine.init_distributed()
    engine.seed_everything(args.seed, info.rank)
    engine.print0(f"eval {args.model} on {args.dataset}: {len(rows)} problems x {args.num_samples} samples, "
                  f"world size {info.world_size}, temperature {args.temperature}, pass@{ks}, data {dict(data_stats)}")
    if replaced:  # kept until the new files are written: a failed evaluation leaves the previous one whole
        engine.print0(f"--overwrite_output_dir: {' and '.join(replaced)} in {args.output_dir} will be replaced")
    try:
        model = engine.load_model(args.model, info.device, trainable=False)
    except engine.LoadError as e:
        sys.exit(f"eval.py: error: {e}")
    model = engine.shard_model(model, info.device, trainable=False)

    with engine.Timer() as timer:
        summary, samples = evaluate(model, tokenizer, rows, n=args.num_samples, temperature=args.temperature,
                                    max_new_tokens=args.max_new_tokens, micro_batch_size=args.gen_batch_size,
                                    ks=ks, top_p=args.top_p)
    total_tokens = sum(s["num_tokens"] for s in samples)
    engine.print0(f"{len(samples)} samples in {timer.seconds:.1f}s ({total_tokens / timer.seconds:.0f} tokens/s), "
                  f"accuracy {100 * summary['accuracy']:.1f}%, mean length {summary['mean_completion_tokens']:.0f} "
                  f"tokens, truncated {100 * summary['truncated']:.1f}%, verifier time-outs {summary['verify_timeouts']:.0f}, "
                  f"errors {summary['verify_errors']:.0f}, answers too long or complex {summary['verify_prefiltered']:.0f}")
    overall = {"count": summary["num_problems"], **summary}
    engine.print0("\n" + markdown_table(summary["by_level"], overall, "Level", ks))
    engine.print0("\n" + markdown_table(summary["by_subject"], overall, "Subject", ks) + "\n")

    if info.is_main:  # each file whole or not at all, eval.json last: it says the evaluation is complete
        os.makedirs(args.output_dir, exist_ok=True)
        runs.write_whole(os.path.join(args.output_dir, "samples.jsonl"), "".join(json.dumps(s) + "\n" for s in samples))
        runs.write_whole(os.path.join(args.output_dir, "eval.json"),
                         json.dumps({"args": asdict(args), "evaluated": evaluated, "ks": ks, **summary}, indent=2))
        print(f"wrote {args.output_dir}/eval.json and samples.jsonl", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("plot", "compare"):
        (plot_main if sys.argv[1] == "plot" else compare_main)(sys.argv[2:])
    else:
        runs.launch(main, "eval.py")
