"""Worker of test_sampling.py: sample() on an FSDP2-sharded model, uneven work per rank, greedy against generate;
then FSDP's forward hooks (taken off while decoding) are back and a training pass after sampling gives the
unsharded copy's gradient.

argv: OUT_DIR; writes OUT_DIR/rank{r}.json.
"""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for test_sampling
import engine
from test_sampling import EOS, prompts_of, reference_greedy, tiny_qwen2, word_tokenizer  # noqa: E402

info = engine.init_distributed(timeout_minutes=1)
tok = word_tokenizer()
model = tiny_qwen2()  # same seed on both ranks
plain = copy.deepcopy(model)
engine.shard_model(model, info.device, trainable=True)
model.train()
calls = [(prompts_of([3, 8, 5, 2, 6]), prompts_of([4, 7, 2], seed=9)),  # rank 0
         ([], prompts_of([6], seed=4))]  # rank 1: nothing, then one
hooks = lambda: [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in engine.fsdp_modules(model)]  # noqa: E731
hooks_before = hooks()
match, counts = True, []
for prompts in calls[info.rank]:
    out = engine.sample(model, tok, prompts, max_new_tokens=40, temperature=0.0, micro_batch_size=2)
    ref = [reference_greedy(plain, tok, p, 40, [EOS]) for p in prompts]
    match &= out["completion_ids"] == ref and model.training
    counts.append(len(out["completion_ids"]))
ids = torch.tensor([[3, 4, 5, 6, 7, 8]])  # the same on both ranks: FSDP's mean of gradients is this one
for m in (model, plain):
    m.train()
    m(input_ids=ids).logits.float().pow(2).mean().backward()
grads_match = all(n == n2 and torch.allclose(p.grad.full_tensor(), q.grad, rtol=1e-4, atol=1e-6)
                  for (n, p), (n2, q) in zip(model.named_parameters(), plain.named_parameters()))
with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
    json.dump({"match": bool(match), "counts": counts, "hooks_back": hooks() == hooks_before,
               "hooks": hooks_before[0], "grads_match": grads_match}, f)
torch.distributed.barrier()
model = plain = None  # the sharded model holds the process group: it goes first, before the interpreter does
engine.close_distributed()
