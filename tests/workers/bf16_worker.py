"""Worker of test_real_path.py: one ExP-GRPO step and one ExP-DPO scoring pass under FSDP2, in fp32 and in bf16.

argv: HUB_PATH OUT_DIR; writes OUT_DIR/fp32.json and OUT_DIR/bf16.json (rank 0).
"""

import json
import os
import sys

import torch


import engine
import expo_dpo
import expo_grpo

hub_path, out_dir = sys.argv[1], sys.argv[2]
info = engine.init_distributed()
tokenizer = engine.load_tokenizer(hub_path)
g = torch.Generator().manual_seed(0)
ids = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
G = 4  # this rank's rollouts: one question, G completions, one positive sample (same on every run)
prompt = ids(12)
rollouts = {"prompt_ids": [prompt] * (G + 1), "completion_ids": [ids(20 + 5 * i) for i in range(G + 1)],
            "advantages": [1.5, -0.5, -0.5, -0.5, 0.0], "in_pg": [True] * G + [False], "in_sft": [False] * G + [True]}
pair = {"qid": info.rank, "question": "What is 2+3?", "chosen_ids": ids(40), "rejected_ids": ids(30)}
args = expo_grpo.Args(model=hub_path, beta=0.04, micro_batch_size=5, num_generations=G)
for name, bf16 in (("fp32", False), ("bf16", True)):
    torch.manual_seed(0)
    model = engine.shard_model(engine.load_model(hub_path, info.device, gradient_checkpointing=True), info.device,
                               bf16=bf16)
    ref = engine.shard_model(engine.load_model(hub_path, info.device, trainable=False), info.device, trainable=False,
                             bf16=bf16)
    seen = {}
    def record(module, inputs, output):
        seen.setdefault("dtype", str((output[0] if isinstance(output, tuple) else output).dtype))

    hook = model.model.layers[0].register_forward_hook(record)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    grpo = expo_grpo.train_on_rollouts(model, ref, optimizer, scheduler, rollouts, args, tokenizer.pad_token_id)
    hook.remove()
    with torch.no_grad():
        chosen, rejected, _ = expo_dpo.sequence_logps(model, tokenizer, [pair], info.device)
    res = engine.sum_over_ranks({"grpo_sft_loss": grpo["sft_loss"], "grpo_grad_norm": grpo["grad_norm"],
                                  "dpo_logps_chosen": chosen.item(), "dpo_logps_rejected": rejected.item()})
    res["param_dtype"] = str(next(model.parameters()).dtype)
    res["compute_dtype"] = seen["dtype"]
    if info.rank == 0:
        with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
            json.dump(res, f)
del model, ref  # they hold the process group: it goes with them, before the interpreter does
engine.close_distributed()
