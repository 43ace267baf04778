"""Worker of test_sampling.py: sample() on an FSDP2-sharded model, uneven work per rank, greedy against generate.

argv: OUT_DIR; writes OUT_DIR/rank{r}.json.
"""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for test_sampling
import common  # noqa: E402
from test_sampling import EOS, prompts_of, reference_greedy, tiny_qwen2, word_tokenizer  # noqa: E402

info = common.init_distributed(timeout_minutes=1)
tok = word_tokenizer()
model = tiny_qwen2()  # same seed on both ranks
plain = copy.deepcopy(model)
common.shard_model(model, info.device, trainable=True)
model.train()
calls = [(prompts_of([3, 8, 5, 2, 6]), prompts_of([4, 7, 2], seed=9)),  # rank 0
         ([], prompts_of([6], seed=4))]  # rank 1: nothing, then one
match, counts = True, []
for prompts in calls[info.rank]:
    out = common.sample(model, tok, prompts, max_new_tokens=40, temperature=0.0, micro_batch_size=2)
    ref = [reference_greedy(plain, tok, p, 40, [EOS]) for p in prompts]
    match &= out["completion_ids"] == ref and model.training
    counts.append(len(out["completion_ids"]))
with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
    json.dump({"match": bool(match), "counts": counts}, f)
torch.distributed.barrier()
common.cleanup_distributed()
