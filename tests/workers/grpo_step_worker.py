"""One call of expo_grpo.train_on_rollouts on fixed rollouts, for the test that 2 ranks == 1 rank.

    torchrun --nproc_per_node 2 tests/grpo_step_worker.py OUT.pt MICRO_BATCH_SIZE

The fixed batch is 4 questions x (G = 2 completions + 1 positive sample); rank r keeps questions
r::world_size. For each loss_agg, a fresh copy of the tiny model takes num_iterations = 2 SGD steps (the
second with ratio != 1, so clipping acts); rank 0 saves the full updated parameters and the metrics.
The test runs the same `train_all` in its own process on an unsharded model holding the whole batch.
"""

import sys

import torch


import engine
import toy  # noqa: F401  (registers --model tiny)
import expo_grpo


def fixed_rollouts(rank: int, world_size: int, vocab: int) -> dict:
    per_question = []
    for q in range(4):
        g = torch.Generator().manual_seed(q)
        prompt = torch.randint(3, vocab, (4 + q,), generator=g).tolist()
        completions = [torch.randint(3, vocab, (3 + 2 * k + q,), generator=g).tolist() for k in range(2)]
        positive = torch.randint(3, vocab, (5,), generator=g).tolist() if q != 3 else []  # question 3: none
        per_question.append({"prompt_ids": [prompt] * 3, "completion_ids": completions + [positive],
                             "advantages": [0.7 * (q + 1), -0.5 * (q + 1), 0.0], "in_pg": [True, True, False],
                             "in_sft": [False, False, q != 3]})
    mine = per_question[rank::world_size]
    return {k: [x for r in mine for x in r[k]] for k in per_question[0]}


def train_all(rollouts: dict, micro_batch_size: int, pad_id: int, device, sharded: bool) -> dict:
    results = {}
    for loss_agg in ("seq-mean", "token-mean", "dr-grpo"):
        args = expo_grpo.Args(model="tiny", num_generations=2, micro_batch_size=micro_batch_size, beta=0.04,
                              num_iterations=2, loss_agg=loss_agg, max_new_tokens=8, sft_coef=0.5, clip_eps=0.2,
                              max_grad_norm=1e6)
        model, ref_model = engine.load_model("tiny", device), engine.load_model("tiny", device)
        if sharded:
            model = engine.shard_model(model, device)
            ref_model = engine.shard_model(ref_model, device, trainable=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        metrics = expo_grpo.train_on_rollouts(model, ref_model, optimizer, scheduler, rollouts, args, pad_id)
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        results[loss_agg] = {"params": params, "metrics": metrics}
    return results


if __name__ == "__main__":
    out_path, micro_batch_size = sys.argv[1], int(sys.argv[2])
    info = engine.init_distributed()
    tokenizer = engine.load_tokenizer("tiny")
    rollouts = fixed_rollouts(info.rank, info.world_size, len(tokenizer))
    results = train_all(rollouts, micro_batch_size, tokenizer.pad_token_id, info.device, sharded=True)
    if info.rank == 0:
        torch.save(results, out_path)
    engine.close_distributed()
