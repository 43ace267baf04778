"""Run by test_engine.py under `torchrun --nproc_per_node 2`: FSDP2 step, sampling, checkpoint, export."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import common
import engine
import runs
import toy  # noqa: F401  (registers --model tiny)


def full_state(model):  # gathered on rank 0 only
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def max_diff(a, b):
    return max(((a[k].float() - b[k].float()).abs().max().item() for k in a), default=0.0)  # {} off rank 0


def main(out_dir):
    info = engine.init_distributed()
    engine.seed_everything(0, info.rank)
    tok = engine.load_tokenizer("tiny")
    model = engine.load_model("tiny", info.device)
    plain = copy.deepcopy(model)
    engine.shard_model(model, info.device)
    result = {}

    batch = engine.make_batch([[3, 4, 5, 6 + info.rank]], [[7, 8, 9]], tok.pad_token_id)
    with torch.no_grad():
        sharded = engine.token_logprobs(model, batch["input_ids"], batch["attention_mask"], chunk_tokens=2)
        reference = engine.token_logprobs(plain, batch["input_ids"], batch["attention_mask"])
    result["sharded_logprob_max_diff"] = (sharded - reference).abs().max().item()

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = engine.cosine_schedule(optimizer, total_steps=10, warmup_ratio=0.0)

    def step():
        logps = engine.token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        loss = -(logps * batch["completion_mask"]).sum() / batch["completion_mask"].sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return engine.sum_over_ranks({"loss": loss.item()})["loss"]

    before = step()
    with torch.no_grad():
        logps = engine.token_logprobs(model, batch["input_ids"], batch["attention_mask"])
        after = (-(logps * batch["completion_mask"]).sum() / batch["completion_mask"].sum()).item()
    result["loss_decreased"] = engine.sum_over_ranks({"after": after})["after"] < before

    # rank 1 decodes six times longer than rank 0: no per-token collective, so no rank waits for another
    length = 4 if info.rank == 0 else 24
    out = engine.sample(model, tok, [common.question_prompt(tok, "2+2?")], n=2, max_new_tokens=length,
                        min_new_tokens=length, temperature=1.0)
    result["sample_lengths"] = engine.gather_objects([len(c) for c in out["completion_ids"]])

    runs.save_checkpoint(out_dir, 1, model, optimizer, scheduler, extra={"data_position": 7})
    saved = full_state(model)
    step()
    result["changed_after_save"] = max_diff(saved, full_state(model))
    extra = runs.load_checkpoint(runs.latest_checkpoint(out_dir), model, optimizer, scheduler)
    assert extra == {"step": 1, "data_position": 7}, extra
    assert scheduler.last_epoch == 1
    result["restore_max_diff"] = max_diff(saved, full_state(model))

    engine.export_hf(model, tok, os.path.join(out_dir, "hf"))
    if info.is_main:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(os.path.join(out_dir, "hf"), dtype=torch.float32)
        result["export_max_diff"] = max_diff(saved, reloaded.state_dict())
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    engine.close_distributed()  # after main: its sharded models hold the process group
