"""ExP-GRPO: GRPO with self-explanations as positive samples (ExPO, arXiv 2507.02834).

GRPO learns only from contrasts between its own samples: on a hard question where all G samples are
wrong, every advantage is 0 and nothing is learned. ExPO gives such questions a positive sample the model
can write itself: shown the question q *and* the gold answer a*, the model explains how to reach a*
(a self-explanation c~ ~ pi(.|q, a*)). If c~ ends at a*, it is trained on as an answer to q alone:

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta KL_it ]
        + lambda * log pi(c~, a* | q)          (per token, averaged over the batch's explanations)

Three arms from one flag: --sft_source explanation (ExP-GRPO), expert (GRPO SFT-GT-CoT: the dataset's
solution replaces c~), none (plain GRPO). The explanations are written once by the initial policy
(--explanations offline, the paper's, cached and shared by every arm and seed) or each step (online).
Watch reward, not loss: with --num_iterations 1 the ratio is 1, so the policy loss is ~0 while its
gradient is not. Every figure of every step is in OUTPUT_DIR/metrics.jsonl, a few samples in samples.jsonl.

Commands
  4 GPUs, the paper's run (Qwen2.5-3B-Instruct, MATH level 5, appendix C.1; Figures 3-4):
      torchrun --nproc_per_node 4 expo_grpo.py
  the two baselines:
      torchrun --nproc_per_node 4 expo_grpo.py --sft_source expert --output_dir runs/grpo_sft_gt_cot
      torchrun --nproc_per_node 4 expo_grpo.py --sft_source none --output_dir runs/grpo
  Table 3 (train on every level): torchrun --nproc_per_node 4 expo_grpo.py --levels all
  1 GPU:
      torchrun --nproc_per_node 1 expo_grpo.py --batch_size 8 --micro_batch_size 4
  2 nodes of 8 GPUs: README "Multi-node" (--hybrid_shard: HSDP)
  CPU toy lab, the paper's claims on n-digit addition (README "Toy lab"): bash examples/toy_lab.sh
  CPU demo (random-weight tiny model, synthetic arithmetic, 15-30 s on 2 cores):
      torchrun --nproc_per_node 2 expo_grpo.py --model tiny --dataset synthetic --levels 1-2 --batch_size 4 \
          --num_generations 4 --max_new_tokens 32 --max_steps 4 --save_every 2 --output_dir runs/demo
  Continue a run: the same command with --resume (README "Resume" says what may change); start over in the same
  folder: --overwrite_output_dir.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, Optional

import torch

import toy  # noqa: F401  (registers --model tiny|toy and --dataset synthetic|addition)
from eval import evaluate_run
from common import (STEP_CHECKERS, explanation_prompt, global_batch, question_prompt, score_answers, text_lines,
                    verify_answer)
from engine import (CACHE_DIR, Timer, gather_objects, make_batch, optimizer_step, print0, resolve_model_path, sample,
                    sequence_logprobs, sum_over_ranks, token_logprobs)
from runs import check_solutions, check_trainer_flags, launch, parse_flags, start_run


@dataclass
class Args:
    # model and data
    model: str = field(default="Qwen/Qwen2.5-3B-Instruct", metadata={"help": "hub id, local directory, or a built-in model: tiny (random weights), toy (the toy lab's)"})
    dataset: str = field(default="DigitalLearningGmbH/MATH-lighteval", metadata={"help": "hub id, local .jsonl/.json/.parquet (question|problem and solution|answer columns), or synthetic|addition"})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "hub dataset configuration name"})
    split: str = field(default="train", metadata={"help": "training split"})
    levels: str = field(default="", metadata={"help": "difficulty levels trained on: 5, 3-5, 1,3 or all (default: 5, the paper's Figures 3-4; all for data without levels)"})
    limit: int = field(default=0, metadata={"help": "train on at most this many questions (0: all)"})
    # ExPO: the positive sample of each question
    sft_source: Literal["explanation", "expert", "none"] = field(default="explanation", metadata={"help": "positive sample: explanation (ExP-GRPO), expert = the dataset's solution (GRPO SFT-GT-CoT), none (plain GRPO)"})
    sft_coef: float = field(default=0.04, metadata={"help": "lambda, weight of the positive sample's mean token log-likelihood (arXiv v3, Table 5)"})
    sft_on: Literal["all", "unsolved"] = field(default="all", metadata={"help": "questions that get the SFT term: all, or only those whose G samples all failed"})
    explanations: str = field(default="offline", metadata={"help": "offline: once by the initial policy, cached for every run of the same model and data; online: each step; or a JSONL of {question, explanation}"})
    explanation_check: Literal["answer", "steps"] = field(default="answer", metadata={"help": "keep an explanation if its answer verifies, or (steps) only if every step also passes the dataset's step checker (addition has one)"})
    sft_anchor: bool = field(default=False, metadata={"help": "also train each kept explanation under the explanation prompt, so that RL does not erode the ability to explain"})
    positive_in: Literal["sft", "group", "prompt", "sft_only"] = field(default="sft", metadata={"help": "where the self-explanation goes: sft (ExPO's SFT term), group (LUFFY: one member of an all-fail group), prompt (QuestA: a hint), sft_only (STaR)"})
    # GRPO
    num_generations: int = field(default=8, metadata={"help": "G: completions sampled per question"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature of completions and explanations"})
    max_new_tokens: int = field(default=1024, metadata={"help": "longest completion or explanation"})
    min_new_tokens: int = field(default=0, metadata={"help": "no end token before this many tokens (benchmarks force lengths with it)"})
    beta: float = field(default=0.04, metadata={"help": "weight of the k3 KL to the initial model; 0 loads no reference model"})
    clip_eps: float = field(default=0.2, metadata={"help": "ratio clip: rho in [1 - clip_eps, 1 + clip_eps_high]"})
    clip_eps_high: Optional[float] = field(default=None, metadata={"help": "upper clip (DAPO's clip-higher); default clip_eps"})
    num_iterations: int = field(default=1, metadata={"help": "optimizer steps per rollout batch; with 1 the ratio is 1, clipping never acts, the loss is ~0 (its gradient is not)"})
    loss_agg: Literal["seq-mean", "token-mean", "dr-grpo"] = field(default="seq-mean", metadata={"help": "seq-mean (GRPO), token-mean (DAPO) or dr-grpo (a constant divisor); always over the global batch"})
    scale_rewards: Literal["group", "none"] = field(default="group", metadata={"help": "divide advantages by the group's reward std (group) or not (none, Dr. GRPO)"})
    mask_truncated: bool = field(default=False, metadata={"help": "leave completions cut at max_new_tokens out of the policy loss"})
    # optimisation
    batch_size: int = field(default=16, metadata={"help": "questions per step, all ranks together"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward pass on one rank"})
    gen_batch_size: int = field(default=64, metadata={"help": "sequences generated at once on one rank"})
    lr: float = field(default=3e-6, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of the steps of linear warm-up before the cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: none)"})
    epochs: int = field(default=3, metadata={"help": "passes over the training questions"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: epochs x questions / batch_size); --resume may change it: the cosine schedule stretches to the new total"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward (less memory)"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "compute in bf16 from fp32 master weights, gradients reduced in fp32 (default: on GPU, not on CPU)"})
    max_bad_steps: int = field(default=10, metadata={"help": "stop, with a checkpoint of the last good state, after this many skipped (non-finite) steps in a row"})
    hybrid_shard: bool = field(default=False, metadata={"help": "multi-node: shard within each node, replicate across nodes (HSDP)"})
    seed: int = field(default=0, metadata={"help": "seed of data order and sampling"})
    # logging, checkpoints, evaluation
    output_dir: str = field(default="runs/expo_grpo", metadata={"help": "run_config.json, metrics.jsonl, samples.jsonl, checkpoints, hf/ export (one run at a time)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest complete checkpoint in output_dir; flags that change the run must be its own (README \"Resume\")"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in an output_dir that holds another run: its checkpoints, hf/, metrics and samples are deleted first"})
    save_every: int = field(default=50, metadata={"help": "checkpoint and export to OUTPUT_DIR/hf every this many steps (and at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    probe_every: int = field(default=1, metadata={"help": "measure NLL of explanations and expert solutions under the policy every this many steps (0: never)"})
    probe_answer_logprob: bool = field(default=False, metadata={"help": "also measure log p(a* | q, c) after the explanation vs after the model's own CoT (Lemma 2)"})
    log_samples: int = field(default=2, metadata={"help": "questions per step whose completion and explanation go to samples.jsonl"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every this many steps and at the end (0: never)"})
    eval_dataset: str = field(default="", metadata={"help": "evaluation data, as --dataset (default: the --eval_split split of --dataset)"})
    eval_split: str = field(default="test", metadata={"help": "evaluation split"})
    eval_limit: int = field(default=500, metadata={"help": "evaluate on at most this many questions (0: all)"})
    eval_levels: str = field(default="all", metadata={"help": "difficulty levels evaluated, as --levels"})
    eval_num_samples: int = field(default=4, metadata={"help": "samples per evaluation question (pass@k for k <= n)"})
    eval_temperature: float = field(default=0.7, metadata={"help": "evaluation sampling temperature (the paper: 0.7; 0: greedy)"})
    wandb_project: Optional[str] = field(default=None, metadata={"help": "also log to this wandb project"})

    def __post_init__(self):
        if self.clip_eps_high is None:
            self.clip_eps_high = self.clip_eps


# What a --resume may change beyond the flags every trainer may (runs.RESUMABLE): what is measured and logged
RESUMABLE = frozenset({"log_samples", "probe_every", "probe_answer_logprob"})


# ====================================================================================================
# ALGO LOGIC: the loss and its positive samples. Change these for an ablation.
# ====================================================================================================


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4):
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std with Bessel's correction; (N,) -> (N,).

    Example, one group of 4: rewards [1, 0, 0, 0] -> mean 0.25, std 0.5 -> [1.4997, -0.4999, -0.4999, -0.4999].
    A group with equal rewards gets zeros (no signal, never NaN). scale_by_std=False gives r - mean (Dr. GRPO).
    """
    groups = rewards.view(-1, group_size).float()  # (N/G, G)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 = exp(ref - logp) - (ref - logp) - 1.

    Always >= 0 (e^x >= 1 + x), 0 where the policies agree, and unbiased for samples drawn from pi.
    """
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float):
    """PPO's min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), and where the clipped branch is the min.

    Example with eps 0.2: A = 1, rho = 1.5 -> min(1.5, 1.2) = 1.2: constant, no gradient (moved far enough);
    A = -1, rho = 0.5 -> min(-0.5, -0.8) = -0.8: also clipped. A = 1, rho = 0.5 -> 0.5: gradient flows.
    """
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    return torch.min(unclipped, clipped), clipped < unclipped


def grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, clip_eps, clip_eps_high, beta, loss_agg,
              num_seqs=None, num_tokens=None, max_len=None, off_policy=None):
    """Minus the GRPO objective, and its metrics.

    Per token:  l_it = min(rho_it A_i, clip(rho_it, 1-eps, 1+eps_high) A_i) - beta k3_it,
                rho_it = exp(logp_it - old_logp_it)
    Aggregated with N_seq sequences and N_tok tokens (pass those of the global batch, see train_on_rollouts):
      seq-mean    loss = -1/N_seq    sum_i 1/|o_i| sum_t l_it    (the paper's formula)
      token-mean  loss = -1/N_tok    sum_i sum_t l_it            (DAPO: every token weighs the same)
      dr-grpo     loss = -1/(N_seq L) sum_i sum_t l_it           (Dr. GRPO: L = max_len, a constant)
    Defaults: N_seq = sequences with a token in the mask, N_tok = mask.sum(), L = T.
    logps, old_logps, ref_logps, completion_mask: (B, T); advantages: (B,); ref_logps None when beta = 0.
    With old_logps = logps.detach() the ratio is 1: the value is ~0 but the gradient is -A grad(logp).
    Metrics kl and clip_frac are sums divided by N_tok, so they add up over micro-batches and ranks.
    """
    mask = completion_mask
    n_tok = max(float(mask.sum()) if num_tokens is None else float(num_tokens), 1.0)
    n_seq = max(float((mask.sum(1) > 0).sum()) if num_seqs is None else float(num_seqs), 1.0)
    ratio = torch.exp((logps - old_logps) * mask)  # (B, T); padding gets ratio 1, whatever its log-probs
    surrogate, clipped = clipped_surrogate(ratio, advantages[:, None], clip_eps, clip_eps_high)
    if off_policy is not None:  # (B,) bool: rows the policy did not sample get LUFFY's shaped term instead
        surrogate = torch.where(off_policy[:, None], shaped_surrogate(logps, advantages[:, None]), surrogate)
        clipped = clipped & ~off_policy[:, None]
    kl = k3_kl(logps, ref_logps) * mask if ref_logps is not None else torch.zeros_like(logps)  # (B, T)
    per_token = (surrogate - beta * kl) * mask
    if loss_agg == "seq-mean":
        loss = -(per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seq
    elif loss_agg == "token-mean":
        loss = -per_token.sum() / n_tok
    elif loss_agg == "dr-grpo":
        loss = -per_token.sum() / (n_seq * (max_len or mask.shape[1]))
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    metrics = {"policy_loss": loss.item(), "kl": (kl.sum() / n_tok).item(),
               "clip_frac": ((clipped.float() * mask).sum() / n_tok).item()}
    return loss, metrics


def shaped_surrogate(logps: torch.Tensor, advantages: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """LUFFY's term for a token the policy did not sample (arXiv 2504.14945): A f(p), f(p) = p / (p + gamma),
    p = pi(token) = exp(logp), unclipped, no behaviour probability (taken as 1). Its gradient A gamma p / (p + gamma)^2
    grad logp keeps a push on unlikely tokens that the ratio p / 1 would all but erase.

    Example: A = 0.875, p = 0.1 -> 0.875 * 0.5 = 0.4375; d/dlogp = 0.875 * 0.1 * 0.1 / 0.04 = 0.21875.
    """
    p = logps.exp()
    return advantages * p / (p + gamma)


def place_in_groups(rollouts: dict, positives: list, group_size: int) -> None:
    """--positive_in group (LUFFY, arXiv 2504.14945), in place: a group's positive sample (the caller gives one only
    to groups whose G samples all failed) replaces its last member, scored under the question prompt with reward 1,
    and the group's advantages become r - mean(r), no std: 1 - 1/G for it, -1/G for the others (a push-down on the
    failed samples that ExPO's SFT term does not give). It is marked off-policy: `shaped_surrogate`, unclipped.

    Example, G 4, one all-fail group: advantages [-0.25, -0.25, -0.25, 0.75], the last member the positive sample.
    """
    rollouts["off_policy"] = [False] * len(rollouts["completion_ids"])
    for i, ids in enumerate(positives):
        if ids is not None:
            last = (i + 1) * group_size - 1
            rollouts["completion_ids"][last], rollouts["in_pg"][last], rollouts["off_policy"][last] = ids, True, True
            for j in range(i * group_size, last + 1):
                rollouts["advantages"][j] = float(j == last) - 1.0 / group_size


def explanation_prefix(text: str, fraction: float) -> str:
    """The first steps of an explanation, for the prompt placement (QuestA, arXiv 2507.13266): a step is a line,
    or, in a one-line explanation, a word; floor(fraction x steps) of them, so that a fraction <= 1/2 never gives
    the last step (which holds the answer: a hint with the answer makes every sample right, and the group moot).

    >>> explanation_prefix("0909 1506 3508 0202 1304 1405 \\boxed{542869}", 0.5)
    '0909 1506 3508 '
    """
    sep = "\n" if "\n" in text.strip() else " "
    steps = text.strip().split(sep)
    keep = int(fraction * len(steps))
    return sep.join(steps[:keep]) + sep if keep else ""


def hinted_groups(model, tokenizer, batch, out, rewards, positives, explanations, fraction: float, args: Args):
    """--positive_in prompt (QuestA): each question with a positive sample has its G samples drawn again from the
    question prompt followed by the first steps of its self-explanation (`explanation_prefix`: `fraction` of
    them); plain GRPO then trains on that prompt, with no correction back to the question. The other questions
    keep their samples. Every rank samples, with hinted questions or none (an FSDP collective).
    Returns `out` with those groups replaced (their prompt ids hold the hint), their rewards, the advantages, and
    what the verifier saw of the redrawn samples (`score_answers`' counts).
    """
    G = args.num_generations
    hinted = [i for i, ids in enumerate(positives) if ids is not None]
    prompts = [question_prompt(tokenizer, batch[i]["question"]) + explanation_prefix(explanations[i]["explanation"],
                                                                                      fraction) for i in hinted]
    redo = sample(model, tokenizer, prompts, n=G, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  micro_batch_size=args.gen_batch_size, min_new_tokens=args.min_new_tokens)
    scores, verified = score_answers(redo["texts"], [batch[i]["answer"] for i in hinted for _ in range(G)])
    out, rewards = {k: list(v) for k, v in out.items()}, rewards.clone()
    for k, i in enumerate(hinted):
        for key in ("prompt_ids", "completion_ids", "texts", "eos"):
            out[key][i * G : (i + 1) * G] = redo[key][k * G : (k + 1) * G]
        rewards[i * G : (i + 1) * G] = torch.tensor(scores[k * G : (k + 1) * G])
    return out, rewards, group_advantages(rewards, G, scale_by_std=args.scale_rewards == "group"), verified


def positive_sample(row: dict, solved: bool, explanation: dict | None, args: Args, encode, eos_id: int):
    """The token ids a question's SFT term trains on, or None: its verified self-explanation (c~, a*) (ExP-GRPO) or
    the data set's solution plus EOS (--sft_source expert); with --sft_on unsolved, only if its G samples all failed."""
    if args.sft_on == "unsolved" and solved:
        return None
    if args.sft_source == "expert" and row.get("solution"):
        return list(encode(row["solution"])) + [eos_id]
    if args.sft_source == "explanation" and explanation and explanation["verified"]:
        return explanation["completion_ids"]
    return None


def sft_loss(logps: torch.Tensor, mask: torch.Tensor, num_tokens=None) -> torch.Tensor:
    """The term lambda weighs: mean token NLL of the positive samples, -1/N sum_t log pi(c~_t | q, c~_<t).

    N = num_tokens (the positive tokens of the global batch) or mask.sum(); logps, mask: (B, T).
    An empty mask gives 0 with zero gradient.
    """
    n = max(float(mask.sum()) if num_tokens is None else float(num_tokens), 1.0)
    return -(logps * mask).sum() / n


def check_explanation(text: str, row: dict, args: Args) -> float:
    """1.0 if an explanation may be trained on: its last \\boxed{} verifies against a*, and with
    --explanation_check steps every step passes the dataset's answer-free step checker too (so an
    explanation that copies a* after wrong steps is dropped)."""
    ok = verify_answer(text, row["answer"])
    if ok and args.explanation_check == "steps":
        ok = float(STEP_CHECKERS[args.dataset](row["question"], text))
    return ok


def explanation_records(rows: list[dict], out: dict) -> list[dict]:
    """`sample`'s output for the explanation prompts of `rows` -> one record per row: the text, the token ids
    as sampled (ending with EOS only if EOS was sampled) and `verified` (None: checked where it is used)."""
    return [{"question": r["question"], "answer": r["answer"], "explanation": text, "completion_ids": ids,
             "verified": None} for r, text, ids in zip(rows, out["texts"], out["completion_ids"])]


# ====================================================================================================
# One optimisation step on given rollouts (global-batch normalisation, micro-batches, FSDP)
# ====================================================================================================


def make_micro_batches(rollouts: dict, micro_batch_size: int, pad_id: int, device) -> list[dict]:
    """Tensors of each micro-batch, built once and reused by the old, reference and training passes.

    Sorted by length, so a micro-batch pads to similar lengths. Each holds input_ids, attention_mask (b, T),
    completion_mask (b, T-1; the only positions whose log-probs are computed), pg_mask and sft_mask (b, T-1;
    the tokens in the policy loss and in the SFT term), advantages (b,).
    """
    n = len(rollouts["completion_ids"])
    order = sorted(range(n), key=lambda j: len(rollouts["prompt_ids"][j]) + len(rollouts["completion_ids"][j]))
    batches = []
    for s in range(0, n, micro_batch_size):
        idx = order[s : s + micro_batch_size]
        mb = make_batch([rollouts["prompt_ids"][j] for j in idx], [rollouts["completion_ids"][j] for j in idx],
                        pad_id, device)
        mask = mb["completion_mask"]  # (b, T-1)
        in_pg = torch.tensor([float(rollouts["in_pg"][j]) for j in idx], device=device)  # (b,)
        in_sft = torch.tensor([float(rollouts["in_sft"][j]) for j in idx], device=device)  # (b,)
        mb["pg_mask"], mb["sft_mask"] = mask * in_pg[:, None], mask * in_sft[:, None]
        mb["advantages"] = torch.tensor([rollouts["advantages"][j] for j in idx], dtype=torch.float32, device=device)
        mb["off_policy"] = (torch.tensor([rollouts["off_policy"][j] for j in idx], dtype=torch.bool, device=device)
                            if "off_policy" in rollouts else None)
        batches.append(mb)
    return batches


def train_on_rollouts(model, ref_model, optimizer, scheduler, rollouts: dict, args: Args, pad_id: int,
                      state: dict | None = None) -> dict:
    """`args.num_iterations` optimizer steps of loss = grpo_loss + sft_coef * sft_loss on this rank's rollouts.

    rollouts: parallel lists over this rank's sequences, all under the question prompt:
      prompt_ids, completion_ids   token ids
      advantages                   A_i of a sampled completion (0 for a positive sample)
      in_pg, in_sft                the sequence's tokens count in the policy loss / in the SFT term
      off_policy (optional)        the sequence was not sampled by the policy (--positive_in group): shaped term
    Every rank must hold the same number of sequences: each forward pass is an FSDP collective.
    Returns metrics of the global batch (the same on every rank), averaged over iterations.
    """
    device = next(model.parameters()).device
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    state = {} if state is None else state
    model.train()  # whatever sampling or evaluation left: activation checkpointing recomputes only in training mode
    # Normalisers of the global batch (all ranks, all sequences), so the gradient does not depend on the split.
    lens, in_pg, in_sft = [len(c) for c in rollouts["completion_ids"]], rollouts["in_pg"], rollouts["in_sft"]
    norm = sum_over_ranks({"seqs": sum(float(pg and n > 0) for n, pg in zip(lens, in_pg)),
                            "tokens": sum(float(n * pg) for n, pg in zip(lens, in_pg)),
                            "sft_tokens": sum(float(n * sft) for n, sft in zip(lens, in_sft))})
    # A sequence outside the SFT term adds exactly 0 to the loss and its gradient when it is outside the policy loss
    # too (sft_only), or when its advantage is 0 and beta is 0 (rho * 0): skip its passes, as most of them on hard
    # questions. Every rank keeps as many sequences as the rank with the most useful ones (the rest padded with
    # skippable ones), so all run the same FSDP collectives.
    useful = [bool(sft or pg and (advantage != 0 or args.beta > 0))
              for sft, pg, advantage in zip(in_sft, in_pg, rollouts["advantages"])]
    kept = sorted(range(len(lens)), key=lambda j: not useful[j])[: max(max(gather_objects(sum(useful))), 1)]
    micro_batches = make_micro_batches({k: [v[j] for j in kept] for k, v in rollouts.items()}, args.micro_batch_size,
                                       pad_id, device)
    with torch.no_grad():
        for mb in micro_batches:
            # pi_old sampled the completions: with one iteration it is the current policy, so no pass is needed
            mb["old_logps"] = (token_logprobs(model, mb["input_ids"], mb["attention_mask"],
                                              positions=mb["completion_mask"])
                               if args.num_iterations > 1 else None)  # (b, T-1)
            mb["ref_logps"] = (token_logprobs(ref_model, mb["input_ids"], mb["attention_mask"],
                                              positions=mb["completion_mask"])
                               if args.beta > 0 else None)  # (b, T-1)
    history = []
    for _ in range(args.num_iterations):
        sums = dict.fromkeys(["policy_loss", "sft_loss", "kl", "clip_frac", "entropy", "entropy_tokens",
                              "train_tokens"], 0.0)
        for mb in micro_batches:
            logps, entropy = token_logprobs(model, mb["input_ids"], mb["attention_mask"], with_entropy=True,
                                            positions=mb["completion_mask"])  # (b, T-1)
            old_logps = mb["old_logps"] if mb["old_logps"] is not None else logps.detach()
            pg, pg_metrics = grpo_loss(logps, old_logps, mb["ref_logps"], mb["advantages"], mb["pg_mask"],
                                       args.clip_eps, args.clip_eps_high, args.beta, args.loss_agg,
                                       num_seqs=norm["seqs"], num_tokens=norm["tokens"], max_len=args.max_new_tokens,
                                       off_policy=mb["off_policy"])
            nll = sft_loss(logps, mb["sft_mask"], num_tokens=norm["sft_tokens"])
            loss = pg + args.sft_coef * nll
            # FSDP averages gradients over ranks, but the loss is already divided by global counts: undo the mean
            (loss * world_size).backward()
            for k, v in pg_metrics.items():
                sums[k] += v
            sums["sft_loss"] += nll.item()
            sums["entropy"] += float((entropy * mb["pg_mask"]).sum())
            sums["entropy_tokens"] += float(mb["pg_mask"].sum())
            sums["train_tokens"] += float(mb["attention_mask"].sum())
        finite = math.isfinite(sums["policy_loss"] + sums["sft_loss"])
        sums = sum_over_ranks(sums)
        sums["entropy"] /= max(sums.pop("entropy_tokens"), 1.0)  # over the completion tokens passed through
        sums.update(optimizer_step(model, optimizer, scheduler, finite, args.max_grad_norm, state))
        history.append(sums)
    out = {k: sum(h[k] for h in history) / len(history) for k in history[0]}
    out["skipped"] = sum(h["skipped"] for h in history)
    out["train_tokens"] = sum(h["train_tokens"] for h in history)
    return out


# ====================================================================================================
# The paper's two properties of a positive sample, measured live on the current policy
# ====================================================================================================


@torch.no_grad()
def probe_positive_signal(model, encode, question_ids, rows, explanations, cot_texts, args: Args, eos_id: int,
                          pad_id: int) -> dict:
    """In-distribution (Figure 2): mean token NLL of the self-explanations and of the expert solutions, both
    under the question prompt; lower = more likely under the policy.
    Positive signal (Lemma 2, with --probe_answer_logprob): log p(a* | q, c) with c the explanation vs c the
    model's own first CoT, each cut before its last \\boxed{ and followed by `\\boxed{a*}` (tokenised apart).
    Every rank scores one sequence per question and kind (empty when missing), so forward passes line up.
    """
    nq = len(rows)
    groups = {}  # kind -> (prompt ids, completion ids), nq of each
    if explanations is not None:
        groups["explanation"] = (question_ids, [e["completion_ids"] if e else [] for e in explanations])
    groups["expert"] = (question_ids, [list(encode(r["solution"])) + [eos_id] if r.get("solution") else []
                                       for r in rows])
    if args.probe_answer_logprob:
        def before_answer(q_ids, text):
            cut = text.rfind("\\boxed{")
            return q_ids + list(encode((text[:cut] if cut >= 0 else text + " ") + "\\boxed{"))

        for kind, texts in (("answer_expl", [e["explanation"] if e else "" for e in explanations]),
                            ("answer_cot", cot_texts)):
            groups[kind] = ([before_answer(q, t) for q, t in zip(question_ids, texts)],
                            [list(encode(r["answer"] + "}")) if t else [] for r, t in zip(rows, texts)])
    sums, lens, _ = sequence_logprobs(model, [p for ps, _ in groups.values() for p in ps],
                                      [c for _, cs in groups.values() for c in cs], pad_id,
                                      next(model.parameters()).device, args.micro_batch_size)  # (N,), (N,)
    local = {}
    for k, kind in enumerate(groups):
        part = slice(k * nq, (k + 1) * nq)
        local[f"{kind}_logp"] = float(sums[part].sum())
        local[f"{kind}_tokens"] = float(lens[part].sum())
        local[f"{kind}_seqs"] = float((lens[part] > 0).sum())
    total = sum_over_ranks(local)
    out = {}
    for kind in ("explanation", "expert"):
        if kind in groups and total[f"{kind}_tokens"] > 0:
            out[f"nll_{kind}"] = -total[f"{kind}_logp"] / total[f"{kind}_tokens"]
    for kind, name in (("answer_expl", "answer_logp_after_explanation"), ("answer_cot", "answer_logp_after_cot")):
        if kind in groups and total[f"{kind}_seqs"] > 0:
            out[name] = total[f"{kind}_logp"] / total[f"{kind}_seqs"]
    return out


# ====================================================================================================
# The loop: one numbered step per iteration
# ====================================================================================================


def main():
    args = parse_flags(Args, "expo_grpo.py")
    validate_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    run = start_run(args, "expo_grpo.py", resumable=RESUMABLE, default_levels="5",
                    with_answer=args.sft_source == "explanation", reference=args.beta > 0,
                    updates_per_step=args.num_iterations, check_data=lambda used: check_positive_samples(args, used))
    model, tokenizer, optimizer, scheduler = run.model, run.tokenizer, run.optimizer, run.scheduler
    rank, world_size = run.info.rank, run.info.world_size
    G = args.num_generations
    nq = args.batch_size // world_size  # questions per rank
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    encode = lru_cache(maxsize=None)(lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"]))
    print0(banner(args, run))

    # offline explanations: by the initial policy (before a resumed run loads its checkpoint), for the run's questions
    explanation_bank = fixed_explanations(model, tokenizer, run.used, args)  # None: online, or none at all
    online = args.sft_source == "explanation" and explanation_bank is None
    start_step = run.resume(show=("reward", "solved", "zero_spread", "expl_verified", "sft_used", "sft_loss", "kl",
                                  "grad_norm", "lr", "sample_tok_s", "train_tok_s"))

    cut_said = False
    for step in range(start_step + 1, run.total_steps + 1):
        step_start = time.perf_counter()
        batch = global_batch(run.rows, step, args.batch_size, args.seed)[rank::world_size]

        with Timer() as t_sample:
            # ---- 1. prompts: the question for G completions; online, the explanation prompt too (one rollout)
            prompts = [question_prompt(tokenizer, r["question"]) for r in batch]
            prompts += [explanation_prompt(tokenizer, r["question"], r["answer"]) for r in batch] if online else []
            # ---- 2. sample
            out = sample(model, tokenizer, prompts, n=[G] * nq + [1] * (len(prompts) - nq),
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         micro_batch_size=args.gen_batch_size, min_new_tokens=args.min_new_tokens)
            decoding = out.pop("stats")  # decoded token slots and useful tokens (pad_waste)
            explanation_out = {k: v[nq * G :] for k, v in out.items()}
            out = {k: v[: nq * G] for k, v in out.items()}
            # ---- 3. reward and advantages
            scores, verify_stats = score_answers(out["texts"], [batch[j // G]["answer"] for j in range(nq * G)])
            rewards = torch.tensor(scores)  # (nq*G,)
            advantages = group_advantages(rewards, G, scale_by_std=args.scale_rewards == "group")  # (nq*G,)
            solved = rewards.view(nq, G).amax(dim=1) > 0  # (nq,)
            question_ids = [out["prompt_ids"][i * G] for i in range(nq)]
            # ---- 4. a self-explanation per question, c~ ~ pi(. | q, a*), kept only if it reaches a*
            explanations = None
            if args.sft_source == "explanation":
                explanations = (explanation_records(batch, explanation_out) if online
                                else [find_explanation(explanation_bank, r) for r in batch])
                for e, row in zip(explanations, batch):
                    if e is not None and e["verified"] is None:
                        e["verified"] = check_explanation(e["explanation"], row, args)

        # ---- 5. the positive sample of each question, trained as an answer to the QUESTION prompt
        positives = [positive_sample(row, bool(solved[i]), explanations and explanations[i], args, encode, eos_id)
                     for i, row in enumerate(batch)]
        if args.positive_in == "prompt":  # QuestA: those questions' G samples are drawn again from a hinted prompt
            with Timer() as t_hint:
                out, rewards, advantages, verified = hinted_groups(
                    model, tokenizer, batch, out, rewards, positives, explanations,
                    0.5 if 2 * step <= run.total_steps else 0.25, args)
            verify_stats = {k: v + verified[k] for k, v in verify_stats.items()}
            t_sample.seconds += t_hint.seconds
        rollouts = {"prompt_ids": list(out["prompt_ids"]), "completion_ids": list(out["completion_ids"]),
                    "advantages": advantages.tolist(), "in_sft": [False] * nq * G,
                    "in_pg": [args.positive_in != "sft_only" and (ended or not args.mask_truncated)
                              for ended in out["eos"]]}
        if args.positive_in == "group":  # LUFFY: the positive sample joins its group, if all G samples failed
            positives = [None if solved[i] else ids for i, ids in enumerate(positives)]
            place_in_groups(rollouts, positives, G)
        # the SFT term: each positive sample once per prompt it is trained under, a sequence for every question
        # (empty when it has none) so that every rank runs the same number of micro-batches: the question prompt,
        # and with --sft_anchor also the explanation prompt it was sampled from
        sft_term = args.sft_source != "none" and args.positive_in in ("sft", "sft_only")
        positive_prompts = [question_ids] if sft_term else []
        if args.sft_anchor:
            positive_prompts.append([list(encode(explanation_prompt(tokenizer, r["question"], r["answer"])))
                                     for r in batch])
        for prompt_ids in positive_prompts:
            rollouts["prompt_ids"] += prompt_ids
            rollouts["completion_ids"] += [ids or [] for ids in positives]
            rollouts["advantages"] += [0.0] * nq
            rollouts["in_pg"] += [False] * nq
            rollouts["in_sft"] += [ids is not None for ids in positives]

        # ---- 6. the paper's two properties, on the policy that sampled this batch
        probe = {}
        if args.probe_every and step % args.probe_every == 0:
            probe = probe_positive_signal(model, encode, question_ids, batch, explanations,
                                          [out["texts"][i * G] for i in range(nq)], args, eos_id, pad_id)

        # ---- 7. optimise loss = grpo_loss + sft_coef * sft_loss, num_iterations updates
        lr = scheduler.get_last_lr()[0]
        with Timer() as t_train:
            train = train_on_rollouts(model, run.ref_model, optimizer, scheduler, rollouts, args, pad_id, run.state)

        metrics = step_metrics(out, rewards, solved, explanations, positives, train, decoding, verify_stats, online,
                               t_sample.seconds, t_train.seconds, world_size)
        metrics.update(lr=lr, step_seconds=time.perf_counter() - step_start, **probe)
        if metrics["truncated"] > 0.5 and not cut_said:  # said once: a run that cuts most answers learns from halves
            cut_said = print0(f"warning: {100 * metrics['truncated']:.0f}% of step {step}'s completions were cut at "
                              f"--max_new_tokens {args.max_new_tokens} before an end token") or True
        run.logger.log_samples(step, sample_records(batch, out, rewards, explanations, G, args.log_samples))
        run.end_step(step, metrics, evaluate=lambda: evaluate_run(model, tokenizer, run.eval_rows, args))

    print0(f"done: {run.total_steps} steps, {run.state['skipped_steps']} optimizer updates skipped (non-finite), "
           f"model in {os.path.join(args.output_dir, 'hf')}")


# ====================================================================================================
# PLUMBING only this trainer has: its banner and metrics, its flag checks, the explanation cache.
# ====================================================================================================


def banner(args: Args, run) -> str:
    """What the run will do, before it does it."""
    source = (f"{args.explanations}, which explains {run.checked} of the run's {len(run.used)} questions"
              if run.checked is not None else args.explanations)
    positive = {"explanation": f"self-explanations ({source}, check: {args.explanation_check})",
                "expert": "the dataset's solutions", "none": "none"}[args.sft_source]
    world_size = run.info.world_size
    return (f"ExP-GRPO | world size {world_size} | per step: {args.batch_size} questions ({args.batch_size // world_size}"
            f" per rank) x G {args.num_generations} = {args.batch_size * args.num_generations} completions of at most "
            f"{args.max_new_tokens} tokens | positive samples: {positive}, lambda {args.sft_coef} | "
            f"{args.num_iterations} update(s) per batch, micro-batches of {args.micro_batch_size} | beta {args.beta}"
            f"{' (no reference model)' if args.beta == 0 else ''} | loss {args.loss_agg} | {run.total_steps} steps "
            f"({run.steps_per_epoch} per epoch)")


def step_metrics(out, rewards, solved, explanations, positives, train, decoding, verify_stats, online: bool,
                 sample_seconds: float, train_seconds: float, world_size: int) -> dict:
    """The step's figures over the global batch (the same on every rank): what was sampled and rewarded, which
    positive samples were used, the losses, and the speed of sampling and training."""
    nq, G = len(solved), len(rewards) // len(solved)
    completion_tokens = sum(len(c) for c in out["completion_ids"])
    explanation_tokens = sum(len(e["completion_ids"]) for e in explanations if e) if explanations else 0
    total = sum_over_ranks({
        "reward": float(rewards.sum()), "completions": float(nq * G), "questions": float(nq),
        "zero_spread": float((rewards.view(nq, G).std(dim=1) == 0).sum()), "solved": float(solved.sum()),
        "truncated": float(sum(not ended for ended in out["eos"])), "completion_tokens": float(completion_tokens),
        "expl_sampled": float(sum(e is not None for e in explanations or [])),
        "expl_verified": float(sum(bool(e and e["verified"]) for e in explanations or [])),
        "explanation_tokens": float(explanation_tokens),
        "sft_used": float(sum(ids is not None for ids in positives)),
        "positive_tokens": float(sum(len(ids) for ids in positives if ids is not None)),
        "gen_tokens": float(completion_tokens + (explanation_tokens if online else 0)),
        "sample_seconds": sample_seconds, "train_seconds": train_seconds, **verify_stats,
        "decoded_slots": float(decoding["decoded_slots"]), "useful_tokens": float(decoding["useful_tokens"]),
    })
    metrics = {
        "reward": total["reward"] / total["completions"],
        "zero_spread": total["zero_spread"] / total["questions"],  # groups with equal rewards: no GRPO signal
        "solved": total["solved"] / total["questions"],  # questions with at least one correct sample
        "sft_used": total["sft_used"] / total["questions"],  # questions with a positive sample in the SFT term
        **{k: train[k] for k in ("policy_loss", "sft_loss", "kl", "clip_frac", "entropy", "grad_norm")},
        "completion_len": total["completion_tokens"] / total["completions"],
        "truncated": total["truncated"] / total["completions"],
        "pad_waste": 1 - total["useful_tokens"] / max(total["decoded_slots"], 1),  # decoded slots of ended rows
        "sample_tok_s": total["gen_tokens"] / (total["sample_seconds"] / world_size),
        "train_tok_s": train["train_tokens"] / (total["train_seconds"] / world_size),
        **{k: total[k] for k in verify_stats},
    }
    if total["expl_sampled"]:
        metrics["expl_verified"] = total["expl_verified"] / total["expl_sampled"]
        metrics["explanation_len"] = total["explanation_tokens"] / total["expl_sampled"]
    if total["sft_used"]:
        metrics["positive_len"] = total["positive_tokens"] / total["sft_used"]
    return metrics


def validate_args(args: Args, world_size: int) -> None:
    """Reject impossible settings before anything is loaded, with one clear line."""
    check_trainer_flags(args, "expo_grpo.py", world_size, [
        (args.num_generations < 2, "--num_generations must be >= 2: a group of one has no advantage"),
        (args.beta < 0, "--beta must be >= 0"),
        (args.clip_eps <= 0 or args.clip_eps_high <= 0, "--clip_eps and --clip_eps_high must be > 0"),
        (args.sft_coef < 0, "--sft_coef must be >= 0"),
        (args.num_iterations < 1, "--num_iterations must be >= 1"),
        (args.temperature <= 0, "--temperature must be > 0: GRPO needs different samples in a group"),
        (not 0 <= args.min_new_tokens <= args.max_new_tokens, "--min_new_tokens must be in [0, max_new_tokens]"),
        (args.probe_every < 0, "--probe_every must be >= 0"),
        (args.explanations not in ("online", "offline") and not os.path.isfile(args.explanations),
         f"--explanations must be online, offline or an existing JSONL file; {args.explanations!r} is none"),
        (args.probe_answer_logprob and args.sft_source != "explanation",
         "--probe_answer_logprob needs --sft_source explanation"),
        ((args.explanation_check != "answer" or args.sft_anchor) and args.sft_source != "explanation",
         "--explanation_check steps and --sft_anchor need --sft_source explanation"),
        (args.positive_in != "sft" and args.sft_source != "explanation",
         f"--positive_in {args.positive_in} places the self-explanation: it needs --sft_source explanation"),
        (args.sft_anchor and args.positive_in in ("group", "prompt"),
         f"--sft_anchor adds to the SFT term, which --positive_in {args.positive_in} does not have"),
        (args.explanation_check == "steps" and args.dataset not in STEP_CHECKERS,
         f"--explanation_check steps: dataset {args.dataset!r} has no step checker (these have: "
         f"{', '.join(STEP_CHECKERS)})"),
    ])
    arm, ignored = f"--sft_source {args.sft_source}", {"none": ("sft_coef", "sft_on", "explanations"),
                                                        "expert": ("explanations",)}.get(args.sft_source, ())
    if args.sft_source == "explanation" and args.positive_in in ("group", "prompt"):
        arm, ignored = f"--positive_in {args.positive_in}", ("sft_coef",)
    given = [f"--{k} {getattr(args, k)}" for k in ignored if getattr(args, k) != Args.__dataclass_fields__[k].default]
    if given:
        print0(f"warning: {', '.join(given)} {'does' if len(given) == 1 else 'do'} nothing with {arm}")


def fixed_explanations(model, tokenizer, used: list[dict], args: Args) -> dict | None:
    """The explanations of `used`, the run's questions, written before training: by the initial policy (offline,
    cached) or read from a file; None when they are sampled each step (online) or the arm has none."""
    if args.sft_source != "explanation" or args.explanations == "online":
        return None
    if args.explanations == "offline":
        explanations, how = offline_explanations(model, tokenizer, used, args)
    else:
        explanations, how = read_explanations(args.explanations, tokenizer), f"from {args.explanations}"
    print0(f"offline explanations for {len(used)} questions: {how}")
    return explanations


def sample_records(batch, out, rewards, explanations, group_size: int, count: int) -> list[dict]:
    """What samples.jsonl keeps of a step: the first `count` questions' first completion, and their explanation."""
    return [{"question": row["question"], "answer": row["answer"], "completion": out["texts"][i * group_size],
             "reward": float(rewards[i * group_size]),
             **({"explanation": explanations[i] and explanations[i]["explanation"],
                 "explanation_verified": explanations[i] and explanations[i]["verified"]} if explanations else {})}
            for i, row in enumerate(batch[:count])]


def check_positive_samples(args: Args, used: list[dict]) -> int | None:
    """Before any model: the positive samples the arm trains on exist for the questions it uses (`used`); returns
    how many of them an --explanations file explains."""
    if args.sft_source == "expert":
        check_solutions(used, "--sft_source expert", "--sft_source explanation", "get no SFT term")
    if args.sft_source == "explanation" and args.explanations not in ("online", "offline"):
        return check_explanations_file(args.explanations, used)
    return None


def check_explanations_file(path: str, rows: list[dict]) -> int:
    """How many of `rows` (the questions the run uses) an `--explanations` JSONL file explains, read before any
    model is loaded. A record that is not a JSON object with string `question` and `explanation` (and, if any,
    `completion_ids` a list of token ids) is a ValueError naming the file and line; so is a file that explains
    none of the run's questions, which would silently make the run plain GRPO."""
    explained = set()
    for number, line in text_lines(path):
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path} line {number}: not JSON ({e})") from None
        if (not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("question", "explanation"))
                or not isinstance(record.get("completion_ids", []), list)):
            raise ValueError(f"{path} line {number}: a record must be a JSON object with string `question` and "
                             "`explanation` fields (and `completion_ids` a list of token ids, if given)")
        explained.add(record["question"])
    covered = sum(r["question"] in explained for r in rows)
    if not covered:
        raise ValueError(f"{path} explains none of the run's {len(rows)} questions (its `question` fields must be the "
                         f"data set's questions, exactly: the first of the run's is {rows[0]['question'][:60]!r})")
    return covered


def explanation_cache_path(args: Args, tokenizer) -> str:
    """CACHE_DIR/explanations/KEY.jsonl, KEY a hash of what decides an explanation besides its question and gold
    answer: the model (its name and the files of its directory), the explanation prompt, the sampling settings.
    Records are kept per (question, answer), so every arm and seed of the same model finds the explanations of
    the questions it uses, and a question whose gold answer changed (a data file mended) gets a new one."""
    path = resolve_model_path(args.model)
    files = sorted((f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f)))
                   for f in os.listdir(path)) if os.path.isdir(path) else []
    key = json.dumps({"model": args.model, "files": files, "prompt": explanation_prompt(tokenizer, "Q?", "A!"),
                      "sampling": [args.temperature, args.max_new_tokens, args.min_new_tokens]})
    return os.path.join(CACHE_DIR, "explanations", hashlib.sha256(key.encode()).hexdigest()[:16] + ".jsonl")


def read_explanations(path: str, tokenizer) -> dict[tuple, dict]:
    """(question, answer) -> record {question, answer, explanation, completion_ids, verified (None: check at use)}.
    A record without an answer (a file from elsewhere may have none) is keyed (question, None).

    A record written here keeps the ids that were sampled (EOS only if it was sampled); a record with text
    only (an explanation set from elsewhere: a complete answer) is tokenised once, plus EOS.
    """
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    texts = [r for r in records if "completion_ids" not in r]
    ids = iter(tokenizer([r["explanation"] for r in texts], add_special_tokens=False)["input_ids"] if texts else [])
    explanations = {}
    for r in records:
        ids_r = r["completion_ids"] if "completion_ids" in r else next(ids) + [tokenizer.eos_token_id]
        explanations.setdefault((r["question"], r.get("answer")),
                                {**r, "completion_ids": ids_r, "verified": r.get("verified")})
    return explanations


def find_explanation(explanations: dict, row: dict) -> dict | None:
    """The explanation of `row`'s question written for its gold answer, or one written for no stated answer."""
    return explanations.get((row["question"], row["answer"])) or explanations.get((row["question"], None))


def offline_explanations(model, tokenizer, rows: list[dict], args: Args) -> tuple[dict, str]:
    """The explanation of each row by the initial policy, from the cache or sampled now (and added to it).

    One run at a time fills a cache file (a file lock held by rank 0), so arms started together sample each
    explanation once. **Decision**: the paper's "initial policy, once" is one explanation per question, a fixed
    data set (the paper published its own): each is drawn from a random stream seeded by its question alone,
    not by --seed, so it does not depend on which runs filled the cache before, on the batch it was sampled
    in, on the number of ranks or on where the model lies; every arm and seed trains on the same explanation.
    The run's own random state is left alone. Returns {question: record} and a line saying what happened.
    """
    from filelock import FileLock

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    path = explanation_cache_path(args, tokenizer)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = FileLock(path + ".lock") if rank == 0 else None
    if lock:
        lock.acquire()
    gather_objects(None)  # the other ranks wait for the lock too
    cached = read_explanations(path, tokenizer) if os.path.exists(path) else {}
    missing = list({key: r for r in rows if (key := (r["question"], r["answer"])) not in cached}.values())
    mine = missing[rank::world]
    seeds = [int.from_bytes(hashlib.sha256(r["question"].encode()).digest()[:8], "little") for r in mine]
    out = sample(model, tokenizer, [explanation_prompt(tokenizer, r["question"], r["answer"]) for r in mine],
                 n=1, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seeds=seeds,
                 micro_batch_size=args.gen_batch_size, min_new_tokens=args.min_new_tokens, desc="explanations")
    new = [rec for part in gather_objects(explanation_records(mine, out)) for rec in part]
    if rank == 0:
        with open(path, "a") as f:
            f.writelines(json.dumps({k: v for k, v in rec.items() if k != "verified"}) + "\n" for rec in new)
        lock.release()
    cached.update({(rec["question"], rec["answer"]): rec for rec in new})
    return cached, f"{len(rows) - len(missing)} cached, {len(missing)} sampled now -> {path}"


if __name__ == "__main__":
    launch(main, "expo_grpo.py")
