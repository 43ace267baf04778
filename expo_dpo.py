"""ExP-DPO: DPO whose chosen response is the model's own verified self-explanation (arXiv 2507.02834, Table 2).

For each question q with gold answer a*:
  chosen   y+ = a self-explanation c~ ~ pi(.|q, a*) whose own \\boxed{} answer verifies against a*
              (`--chosen expert`: the dataset's reference solution instead, the paper's c_E baseline)
  rejected y- = a CoT the policy wrote for q alone, whose answer is WRONG (up to `--num_generations` tries)
and both are scored as answers to the question alone:

  L = -log sigmoid( beta [ (log pi(y+|q) - log ref(y+|q)) - (log pi(y-|q) - log ref(y-|q)) ] )

A question with no wrong CoT, or no verified explanation, gives no pair that round (it is counted).
`--regen_every 0` builds every pair once from the initial policy (offline); `--regen_every K` rebuilds the
pairs of the next K steps with the current policy (online). The reference is always the initial model.
**Decision**: a step takes the next `--batch_size` questions of the data order in both modes and trains on
their pairs (at most one each), the loss averaged over the pairs present; `pairs_in_step` logs how many.
So offline and online see the same questions at the same step, and differ only in when pairs are built.

One GPU:     python expo_dpo.py --output_dir runs/dpo
Four GPUs:   torchrun --nproc_per_node 4 expo_dpo.py     (the paper's setting, online, MATH train)
Offline:     torchrun --nproc_per_node 4 expo_dpo.py --regen_every 0
c_E arm:     torchrun --nproc_per_node 4 expo_dpo.py --chosen expert
Two nodes:   torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --master_addr $FIRST_NODE \\
                 --master_port 29500 expo_dpo.py --batch_size 64 [--hybrid_shard]     (README "Multi-node")
CPU, ExP-DPO that trains (the toy lab's base model, README "Set up and try it on a CPU"):
             torchrun --nproc_per_node 2 expo_dpo.py --model toy --dataset addition --levels 5-6 --batch_size 8 \\
                 --micro_batch_size 4 --num_generations 4 --max_new_tokens 48 --temperature 1.0 --lr 1e-4 \\
                 --max_steps 4 --regen_every 2 --no_gradient_checkpointing --save_every 0 --output_dir runs/dpo-demo
CPU smoke:   torchrun --nproc_per_node 2 expo_dpo.py --model tiny --dataset synthetic --chosen expert \\
                 --batch_size 4 --micro_batch_size 2 --num_generations 2 --max_new_tokens 16 --max_steps 4 \\
                 --rejected_truncated keep --output_dir runs/dpo-smoke
(the tiny model has random weights: its explanations never verify and its CoTs never end, so the smoke run needs
`--chosen expert --rejected_truncated keep`.)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

import toy  # noqa: F401  (registers --model tiny|toy and --dataset synthetic|addition)
from eval import evaluate_run
from common import explanation_prompt, global_batch, question_prompt, verify_answer
from engine import Timer, gather_objects, optimizer_step, print0, sample, sequence_logprobs, sum_over_ranks
from runs import check_solutions, check_trainer_flags, launch, parse_flags, start_run


@dataclass
class Args:
    # model and data
    model: str = field(default="Qwen/Qwen2.5-3B-Instruct", metadata={"help": "hub id, local directory, or a built-in model: tiny (random weights), toy (the toy lab's)"})
    dataset: str = field(default="DigitalLearningGmbH/MATH-lighteval", metadata={"help": "hub id, local .jsonl/.json/.parquet (question|problem and solution|answer columns), or synthetic|addition"})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "hub dataset configuration name"})
    split: str = field(default="train", metadata={"help": "training split"})
    levels: str = field(default="all", metadata={"help": "difficulty levels trained on: 5, 3-5, 1,3 or all"})
    limit: int = field(default=0, metadata={"help": "train on at most this many questions (0: all)"})
    # pairs
    chosen: Literal["explanation", "expert"] = field(default="explanation", metadata={"help": "chosen response: a verified self-explanation (ExP-DPO) or expert = the dataset's solution (the c_E baseline)"})
    num_generations: int = field(default=4, metadata={"help": "completions sampled per question to find a wrong one (the rejected response)"})
    num_explanations: int = field(default=1, metadata={"help": "self-explanations sampled per question to find a verified one"})
    rejected_truncated: Literal["skip", "keep"] = field(default="skip", metadata={"help": "a question whose wrong CoTs were all cut at max_new_tokens: skip it (counted), or keep a cut one as rejected (no EOS)"})
    regen_every: int = field(default=1, metadata={"help": "0: all pairs once from the initial policy (offline); K: the pairs of the next K steps rebuilt with the current policy (online)"})
    temperature: float = field(default=0.9, metadata={"help": "sampling temperature of completions and explanations"})
    max_new_tokens: int = field(default=1024, metadata={"help": "longest completion or explanation"})
    gen_batch_size: int = field(default=64, metadata={"help": "sequences generated at once on one rank"})
    # optimisation (appendix C.1)
    beta: float = field(default=0.1, metadata={"help": "DPO temperature beta (> 0)"})
    lr: float = field(default=5e-7, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of the steps of linear warm-up before the cosine decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: none)"})
    batch_size: int = field(default=16, metadata={"help": "questions per step, all ranks together"})
    micro_batch_size: int = field(default=2, metadata={"help": "pairs per forward/backward pass on one rank"})
    epochs: int = field(default=1, metadata={"help": "passes over the training questions"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: epochs x questions / batch_size); --resume may change it: the cosine schedule stretches to the new total"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward (less memory)"})
    bf16: Optional[bool] = field(default=None, metadata={"help": "compute in bf16 from fp32 master weights, gradients reduced in fp32 (default: on GPU, not on CPU)"})
    max_bad_steps: int = field(default=10, metadata={"help": "stop, with a checkpoint of the last good state, after this many skipped (non-finite) steps in a row"})
    hybrid_shard: bool = field(default=False, metadata={"help": "multi-node: shard within each node, replicate across nodes (HSDP)"})
    seed: int = field(default=0, metadata={"help": "seed of data order and sampling"})
    # logging, checkpoints, evaluation
    output_dir: str = field(default="runs/expo_dpo", metadata={"help": "run_config.json, metrics.jsonl, samples.jsonl, pairs-round*.jsonl, checkpoints, hf/ export (one run at a time)"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest complete checkpoint in output_dir; flags that change the run must be its own (README \"Resume\")"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "start over in an output_dir that holds another run: its checkpoints, hf/, metrics and samples are deleted first"})
    save_every: int = field(default=50, metadata={"help": "checkpoint and export to OUTPUT_DIR/hf every this many steps (and at the end)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    eval_every: int = field(default=0, metadata={"help": "evaluate every this many steps and at the end (0: never)"})
    eval_dataset: str = field(default="", metadata={"help": "evaluation data, as --dataset (default: the --eval_split split of --dataset)"})
    eval_split: str = field(default="test", metadata={"help": "evaluation split"})
    eval_limit: int = field(default=500, metadata={"help": "evaluate on at most this many questions (0: all)"})
    eval_levels: str = field(default="all", metadata={"help": "difficulty levels evaluated, as --levels"})
    eval_num_samples: int = field(default=4, metadata={"help": "samples per evaluation question (pass@k for k <= n)"})
    eval_temperature: float = field(default=0.7, metadata={"help": "evaluation sampling temperature (the paper: 0.7; 0: greedy)"})
    wandb_project: Optional[str] = field(default=None, metadata={"help": "also log to this wandb project"})


# ====================================================================================================
# ALGO LOGIC: pairs, sequence log-probs, the DPO loss. Change these for an ablation.
# ====================================================================================================


def build_pairs(items: list[tuple[int, dict]], tokenizer, sampler, chosen: str = "explanation",
                num_generations: int = 4, num_explanations: int = 1, rejected_truncated: str = "skip") -> tuple[list[dict], dict]:
    """(chosen, rejected) pairs for `items` = [(question id, row)], and counts of what happened.

    `sampler(prompts, n)` returns `sample()`'s dict (texts, completion_ids, eos), n completions per prompt,
    prompt-major. It is called exactly once for CoTs and (for `chosen == "explanation"`) once for
    explanations, whatever the data, even with an empty list: under FSDP sampling is a collective, so every
    rank must call it equally often. Each response keeps the token ids that were sampled, ending with EOS
    only if EOS was sampled. The rejected CoT is a wrong one that ended before one cut at max_new_tokens;
    a question whose wrong CoTs were all cut is skipped (`rejected_truncated="skip"`, counted as `truncated`)
    or uses the cut one (`"keep"`, trained without an EOS it never produced).
    Example: gold 7, CoTs [\\boxed{7}, \\boxed{9}] and explanation "... \\boxed{7}" -> chosen = the
    explanation, rejected = the \\boxed{9} CoT. CoTs [\\boxed{7}, \\boxed{7}] -> no pair (`all_correct`).
    """
    def responses(out, k, n):  # the k-th prompt's n responses: (text, ids, ended)
        return list(zip(out["texts"], out["completion_ids"], out["eos"]))[k * n : (k + 1) * n]

    cots = sampler([question_prompt(tokenizer, row["question"]) for _, row in items], num_generations)
    stats = {"questions": len(items), "cot_correct": 0.0, "all_correct": 0, "truncated": 0, "explained": 0,
             "explanations_verified": 0, "unverified": 0, "no_solution": 0, "built": 0}
    candidates = []  # (qid, row, wrong CoT): the questions that can still make a pair
    for k, (qid, row) in enumerate(items):
        group = responses(cots, k, num_generations)
        rewards = [verify_answer(text, row["answer"]) for text, _, _ in group]
        stats["cot_correct"] += sum(rewards)
        wrong = sorted((r for r, reward in zip(group, rewards) if reward == 0), key=lambda r: not r[2])  # ended first
        if not wrong:
            stats["all_correct"] += 1
        elif not wrong[0][2] and rejected_truncated == "skip":
            stats["truncated"] += 1
        else:
            candidates.append((qid, row, wrong[0]))
    if chosen == "explanation":
        # only questions with a wrong CoT need an explanation: the others cannot make a pair anyway
        out = sampler([explanation_prompt(tokenizer, row["question"], row["answer"]) for _, row, _ in candidates],
                      num_explanations)
        positives = []
        for k, (_, row, _) in enumerate(candidates):
            group = responses(out, k, num_explanations)
            verified = sorted((r for r in group if verify_answer(r[0], row["answer"]) == 1.0), key=lambda r: not r[2])
            stats["explained"] += len(group)
            stats["explanations_verified"] += len(verified)
            positives.append(verified[0] if verified else None)
            stats["unverified"] += not verified
    else:  # a dataset solution is a complete answer: its tokens and EOS
        positives = [(row["solution"], tokenizer(row["solution"], add_special_tokens=False)["input_ids"]
                      + [tokenizer.eos_token_id], True) if row.get("solution") else None for _, row, _ in candidates]
        stats["no_solution"] = sum(p is None for p in positives)
    pairs = [{"qid": qid, "question": row["question"], "answer": row["answer"], "level": row.get("level"),
              "chosen": pos[0], "chosen_ids": pos[1], "chosen_eos": pos[2],
              "rejected": neg[0], "rejected_ids": neg[1], "rejected_eos": neg[2]}
             for (qid, row, neg), pos in zip(candidates, positives) if pos is not None]
    stats["built"] = len(pairs)
    return pairs, stats


def sequence_logps(model, tokenizer, pairs: list[dict], device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """log pi(y|q) = sum over response tokens of log pi(y_t | q, y_<t), for chosen and rejected: (b,), (b,).

    Both responses go under the QUESTION prompt (never the explanation prompt) in one forward pass of 2b
    sequences. A response is the token ids that were sampled (`chosen_ids`, `rejected_ids`): EOS is scored
    only where it was sampled. Also returns the number of tokens processed.
    """
    prompts = tokenizer([question_prompt(tokenizer, p["question"]) for p in pairs], add_special_tokens=False)["input_ids"]
    responses = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    logps, _, tokens = sequence_logprobs(model, prompts + prompts, responses, tokenizer.pad_token_id, device)  # (2b,)
    return logps[: len(pairs)], logps[len(pairs) :], tokens


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """DPO loss (Rafailov et al. 2023) on sequence log-probs, each of shape (b,):

        r+ = beta (log pi(y+) - log ref(y+)),   r- = beta (log pi(y-) - log ref(y-))   (implicit rewards)
        L  = mean_i -log sigmoid(r+_i - r-_i)

    Example: beta 0.1, log pi - log ref = +2 for y+ and -3 for y-: margin 0.5, L = log(1 + e^-0.5) = 0.474.
    When pi == ref, L = log 2 = 0.693 for any pair. The loss can fall while log pi(y+) falls too, as long as
    log pi(y-) falls faster (the paper's "deceptively low loss", appendix C.3): so the metrics hold the
    policy log-probs of both sides, not only the loss and reward accuracy.
    """
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)  # (b,)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)  # (b,)
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()
    metrics = {
        "loss": loss.item(),
        "reward_accuracy": (margins > 0).float().mean().item(),
        "margin": margins.mean().item(),
        "rewards_chosen": chosen_rewards.mean().item(),
        "rewards_rejected": rejected_rewards.mean().item(),
        "logps_chosen": policy_chosen_logps.mean().item(),
        "logps_rejected": policy_rejected_logps.mean().item(),
        "ref_logps_chosen": ref_chosen_logps.mean().item(),
        "ref_logps_rejected": ref_rejected_logps.mean().item(),
    }
    return loss, metrics


# ====================================================================================================
# Splitting pairs over ranks, reference scoring, gradient accumulation
# ====================================================================================================


def rank_micro_batches(pairs: list, rank: int, world_size: int, micro_batch_size: int) -> list[tuple[list, bool]]:
    """This rank's share pairs[rank::world] in micro-batches, as (micro-batch, is_real).

    Every rank gets the same number of micro-batches, because each FSDP forward is a collective; a rank
    whose share runs out pads with a dummy (pairs[:1], False) that the caller weighs by 0.
    Example: 3 pairs, 2 ranks, micro 1 -> rank 0: [([p0], True), ([p2], True)], rank 1: [([p1], True), ([p0], False)].
    """
    share = pairs[rank::world_size]
    count = math.ceil(math.ceil(len(pairs) / world_size) / micro_batch_size)
    batches = [share[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(count)]
    return [(b, True) if b else (pairs[:1], False) for b in batches]


@torch.no_grad()
def score_reference(ref_model, tokenizer, pairs: list[dict], rank: int, world_size: int, micro_batch_size: int,
                    device) -> None:
    """Store ref log-probs in each pair (once per pair, at build time: they never change), on every rank."""
    local = []
    for mb, real in rank_micro_batches(pairs, rank, world_size, micro_batch_size):
        chosen, rejected, _ = sequence_logps(ref_model, tokenizer, mb, device)
        if real:
            local += [(p["qid"], c, r) for p, c, r in zip(mb, chosen.tolist(), rejected.tolist())]
    by_qid = {qid: (c, r) for part in gather_objects(local) for qid, c, r in part}
    for p in pairs:
        p["ref_chosen_logp"], p["ref_rejected_logp"] = by_qid[p["qid"]]


def dpo_backward(model, tokenizer, step_pairs: list[dict], beta: float, rank: int, world_size: int,
                 micro_batch_size: int, device) -> tuple[dict, float, int]:
    """Accumulate the gradient of the DPO loss averaged over ALL `step_pairs` (the global batch).

    A micro-batch of b pairs adds  mean_b(L) * b / N * world_size : summed over micro-batches it is
    sum_local(L) / N * world_size, and FSDP's gradient average over ranks divides by world_size again, so
    2 ranks with half the pairs each give exactly the gradient of 1 rank with all N pairs.
    Returns this rank's metric sums (weighted by pairs), its summed loss and its token count.
    """
    n_pairs = len(step_pairs)
    sums, loss_sum, tokens = {}, 0.0, 0
    model.train()  # whatever sampling or evaluation left: activation checkpointing recomputes only in training mode
    for mb, real in rank_micro_batches(step_pairs, rank, world_size, micro_batch_size):
        chosen, rejected, n_tokens = sequence_logps(model, tokenizer, mb, device)
        ref_chosen = torch.tensor([p["ref_chosen_logp"] for p in mb], device=device)
        ref_rejected = torch.tensor([p["ref_rejected_logp"] for p in mb], device=device)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        weight = len(mb) * world_size / n_pairs if real else 0.0
        (loss * weight).backward()
        if real:
            loss_sum += metrics["loss"] * len(mb)
            tokens += n_tokens
        for k, v in metrics.items():  # every key on every rank, even one with only dummies: all-reduced next
            sums[k] = sums.get(k, 0.0) + (v * len(mb) if real else 0.0)
    return sums, loss_sum, tokens


# ====================================================================================================
# The loop: pairs each round, one optimizer step each step
# ====================================================================================================


def main():
    args = parse_flags(Args, "expo_dpo.py")
    validate_args(args, int(os.environ.get("WORLD_SIZE", 1)))

    def check_data(used):  # before any model: --chosen expert on data without solutions would train nothing
        if args.chosen == "expert":
            check_solutions(used, "--chosen expert", "--chosen explanation", "give no pair")

    online = args.regen_every > 0
    # offline pairs all come from the initial policy, so its own no-grad pass before training is the reference:
    # no second copy of the model is needed
    run = start_run(args, "expo_dpo.py", default_levels="all", with_answer=args.chosen == "explanation",
                    reference=online, check_data=check_data)
    model, tokenizer, optimizer, scheduler = run.model, run.tokenizer, run.optimizer, run.scheduler
    ref_model = run.ref_model if online else model
    rank, world, device = run.info.rank, run.info.world_size, run.info.device
    rows, total_steps, every = run.rows, run.total_steps, args.regen_every
    qids = list(range(len(rows)))
    print0(f"ExP-DPO | chosen: {args.chosen} | "
           f"{f'online, pairs rebuilt every {every} steps' if online else 'offline, pairs built once'} | world size "
           f"{world} | per step: {args.batch_size} questions = at most {args.batch_size} pairs ({args.batch_size // world}"
           f" per rank, micro-batches of {args.micro_batch_size}), responses of at most {args.max_new_tokens} tokens | "
           f"beta {args.beta} | lr {args.lr} | {total_steps} steps")
    print0("reference: the initial model, " + ("a frozen copy" if online else "scored by the policy before step 1"))

    start_step = run.resume(
        # rewards_chosen < 0 while the loss falls: the chosen response got LESS likely, the rejected one just fell
        # faster (the "deceptively low loss", appendix C.3)
        show=("loss", "reward_accuracy", "margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
              "pairs_in_step", "train_tok_s"),
        state={"round": -1, "pairs_path": None, "pairs_until": 0, "rounds_built": 0, "empty_steps": 0})
    state, pairs = run.state, None
    if run.resume_from:
        # mid-round: train on the same pairs, unless they end here (a resume with a larger --max_steps)
        if state["pairs_path"] and (not online or start_step % every) and state["pairs_until"] > start_step:
            with open(state["pairs_path"]) as f:
                pairs = {p["qid"]: p for p in map(json.loads, f)}
        if not online and total_steps > state["pairs_until"]:
            raise SystemExit(f"expo_dpo.py: error: the offline pairs were built by the initial policy for "
                             f"{state['pairs_until']} steps, and it is gone: resume with --max_steps {state['pairs_until']}")
        print0(f"round {state['round']} at step {start_step}: "
               f"{'same pairs from ' + state['pairs_path'] if pairs is not None else 'new round next'}")

    decoding = {"decoded_slots": 0, "useful_tokens": 0}  # of the round's sampling, for pad_waste

    def sampler(prompts, n):
        out = sample(model, tokenizer, prompts, n=n, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, micro_batch_size=args.gen_batch_size, desc="pairs")
        for k in decoding:
            decoding[k] += out["stats"][k]
        return out

    for step in range(start_step + 1, total_steps + 1):
        metrics = {}
        # ---- 1. pairs: built once (offline) or for the next --regen_every steps with the current policy (online)
        if pairs is None or (online and (step - 1) % every == 0):
            state["round"] = (step - 1) // every if online else 0
            # the questions of the steps this round serves: the rest of its --regen_every steps (online; all of them
            # but after a resume with a larger --max_steps), or all the run has left (offline)
            last = min((state["round"] + 1) * every, total_steps) if online else total_steps
            round_qids = list(dict.fromkeys(q for s in range(step, last + 1)
                                            for q in global_batch(qids, s, args.batch_size, args.seed)))
            with Timer() as t_build:
                local_pairs, stats = build_pairs([(q, rows[q]) for q in round_qids[rank::world]], tokenizer, sampler,
                                                 args.chosen, args.num_generations, args.num_explanations,
                                                 args.rejected_truncated)
                stats = sum_over_ranks({**stats, **decoding})
                decoding.update(decoded_slots=0, useful_tokens=0)
                round_pairs = [p for part in gather_objects(local_pairs) for p in part]
                score_reference(ref_model, tokenizer, round_pairs, rank, world, args.micro_batch_size, device)
            pairs = {p["qid"]: p for p in round_pairs}
            state.update(rounds_built=state["rounds_built"] + 1, pairs_until=last,
                         pairs_path=os.path.join(args.output_dir, f"pairs-round{state['round']}.jsonl"))
            if rank == 0:
                with open(state["pairs_path"], "w") as f:
                    f.writelines(json.dumps(p) + "\n" for p in round_pairs)
            run.logger.log_samples(step, round_pairs[:4])
            metrics.update(round_metrics(stats, args.num_generations, t_build.seconds))
            print0(f"round {state['round']}: {stats['built']:.0f} pairs from {stats['questions']:.0f} questions "
                   f"-> {state['pairs_path']}")

        # ---- 2. one optimizer step on the pairs of this step's questions
        step_pairs = [pairs[q] for q in global_batch(qids, step, args.batch_size, args.seed) if q in pairs]
        metrics.update({"pairs_in_step": len(step_pairs), "rounds_built": state["rounds_built"],
                        "lr": scheduler.get_last_lr()[0]})
        with Timer() as t_train:
            if step_pairs:
                sums, loss_sum, tokens = dpo_backward(model, tokenizer, step_pairs, args.beta, rank, world,
                                                      args.micro_batch_size, device)
                sums = sum_over_ranks({**sums, "tokens": tokens})
                metrics["train_tok_s"] = sums.pop("tokens")
                metrics.update({k: v / len(step_pairs) for k, v in sums.items()})
                metrics.update(optimizer_step(model, optimizer, scheduler, math.isfinite(loss_sum),
                                              args.max_grad_norm, state))
            else:  # the schedule follows the step count, empty steps included
                state["empty_steps"] += 1
                print0(f"step {step}: no pair among this step's questions, step skipped")
                scheduler.step()
        if step_pairs:
            metrics["train_tok_s"] /= t_train.seconds
        metrics.update({"empty_steps": state["empty_steps"], "step_seconds": t_train.seconds})
        run.end_step(step, metrics, evaluate=lambda: evaluate_run(model, tokenizer, run.eval_rows, args))

    print0(f"done: {total_steps} steps, model exported to {os.path.join(args.output_dir, 'hf')}")


# ====================================================================================================
# PLUMBING only this trainer has: its metrics and its flag checks. Leave these alone for an ablation.
# ====================================================================================================


def round_metrics(stats: dict, num_generations: int, seconds: float) -> dict:
    """What a round of pair building saw, over all ranks: pairs built and why questions gave none."""
    metrics = {
        "pairs_built": stats["built"], "pairs_skipped": stats["questions"] - stats["built"],
        "pairs_skipped_all_correct": stats["all_correct"], "pairs_skipped_truncated": stats["truncated"],
        "pairs_skipped_unverified": stats["unverified"], "pairs_skipped_no_solution": stats["no_solution"],
        "cot_accuracy": stats["cot_correct"] / max(1, stats["questions"] * num_generations),
        "build_seconds": seconds, "pad_waste": 1 - stats["useful_tokens"] / max(stats["decoded_slots"], 1),
    }
    if stats["explained"]:
        metrics["expl_verified"] = stats["explanations_verified"] / stats["explained"]
    return metrics


def validate_args(args: Args, world_size: int) -> None:
    """Reject impossible settings before anything is loaded, with one clear line."""
    per_rank = args.batch_size // world_size
    check_trainer_flags(args, "expo_dpo.py", world_size, [
        (args.chosen not in ("explanation", "expert"), f"--chosen must be explanation or expert, got {args.chosen!r}"),
        (args.rejected_truncated not in ("skip", "keep"), "--rejected_truncated must be skip or keep"),
        (args.beta <= 0, f"--beta must be > 0 (beta 0 makes the loss a constant log 2), got {args.beta}"),
        (min(args.num_generations, args.num_explanations) < 1, "--num_generations and --num_explanations must be >= 1"),
        (args.regen_every < 0, "--regen_every must be >= 0"),
        (args.temperature <= 0, f"--temperature must be > 0 (a wrong CoT is found by sampling), got {args.temperature}"),
        (args.batch_size % world_size == 0 and args.micro_batch_size > 0 and per_rank % args.micro_batch_size,
         f"--batch_size {args.batch_size} / world size {world_size} = {per_rank} questions per "
         f"rank is not divisible by --micro_batch_size {args.micro_batch_size}"),
    ])
    if args.chosen == "expert" and args.num_explanations != 1:
        print0(f"warning: --num_explanations {args.num_explanations} does nothing with --chosen expert")


if __name__ == "__main__":
    launch(main, "expo_dpo.py")
