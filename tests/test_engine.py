"""engine.py: log-probs against a naive log-softmax, batches, the lr schedule, sample() on one process, and a 2-rank
FSDP2 run (step, sampling, checkpoint, export) in tests/workers/common_worker.py.

sample() itself is checked against independent computations in tests/test_sampling.py.
"""

import json

import pytest
import torch

import common
import engine
from conftest import run_torchrun

# ---------------------------------------------------------------- log-probs


def test_token_logprobs_matches_naive_log_softmax(tiny):
    model, tok = tiny
    b = engine.make_batch([[3, 4, 5, 6], [7, 8]], [[9, 10, 11], [12]], tok.pad_token_id)
    assert b["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]]
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    naive = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    valid = b["attention_mask"][:, 1:].bool()
    for chunk in (1, 5, 1024):
        with torch.no_grad():
            fast, ent = engine.token_logprobs(model, b["input_ids"], b["attention_mask"], chunk_tokens=chunk,
                                              with_entropy=True)
        torch.testing.assert_close(fast[valid], naive[valid], atol=1e-5, rtol=1e-5)
    p = torch.softmax(logits[:, :-1], -1)
    torch.testing.assert_close(ent[valid], -(p * p.log()).sum(-1)[valid], atol=1e-4, rtol=1e-4)


def test_token_logprobs_gradient_matches_naive(tiny):
    model, _ = tiny
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    model.zero_grad()
    engine.token_logprobs(model, ids, mask, chunk_tokens=2).sum().backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).sum().backward()
    for a, p in zip(fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_token_logprobs_padding_on_either_side_matches_each_row_alone(tiny):
    """Right padding runs without an attention mask (causal attention already hides the later pads), left
    padding with one: both give each row's own log-probs and the gradient of the rows computed one at a time,
    unpadded."""
    model, tok = tiny
    rows = [[3, 4, 5, 6, 9, 10, 11], [7, 8, 12], [5, 9, 13, 14, 6]]
    pad, width = tok.pad_token_id, max(map(len, rows))
    alone, grads_alone = [], None
    model.zero_grad()
    for r in rows:
        logp = engine.token_logprobs(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
        logp.sum().backward()
        alone.append(logp.detach()[0])
    grads_alone = [p.grad.clone() for p in model.parameters()]
    for side in ("right", "left"):
        ids = torch.tensor([r + [pad] * (width - len(r)) if side == "right" else [pad] * (width - len(r)) + r
                            for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) if side == "right" else
                             [0] * (width - len(r)) + [1] * len(r) for r in rows])
        model.zero_grad()
        logp = engine.token_logprobs(model, ids, mask)
        real = mask[:, 1:].bool() & mask[:, :-1].bool()  # positions whose token and context are both real
        (logp * real).sum().backward()
        for i, r in enumerate(rows):
            torch.testing.assert_close(logp.detach()[i][real[i]], alone[i], atol=1e-5, rtol=1e-5)
        for a, p in zip(grads_alone, model.parameters()):
            torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)
    model.zero_grad()


def test_token_logprobs_positions_computes_only_those(tiny):
    """`positions` (the completion mask) gives the same values and gradients there, 0 elsewhere."""
    model, tok = tiny
    b = engine.make_batch([[3, 4, 5, 6], [7, 8]], [[9, 10, 11], [12]], tok.pad_token_id)
    mask = b["completion_mask"]
    grads = []
    for positions in (None, mask, torch.zeros_like(mask)):
        model.zero_grad()
        logp, ent = engine.token_logprobs(model, b["input_ids"], b["attention_mask"], chunk_tokens=2,
                                          with_entropy=True, positions=positions)
        (logp * mask).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if positions is None:
            full, full_ent = logp.detach(), ent
        elif positions is mask:
            torch.testing.assert_close(logp.detach(), full * mask)
            torch.testing.assert_close(ent, full_ent * mask)
        else:  # nothing asked for: all zeros, and backward still runs (FSDP needs it on every rank)
            assert not logp.detach().any()
    for a, c in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)
    model.zero_grad()


# ---------------------------------------------------------------- schedule


def test_cosine_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = engine.cosine_schedule(opt, total_steps=10, warmup_ratio=0.2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])  # 2 warm-up steps, then the cosine starts at the top
    assert lrs[6] == pytest.approx(0.5 * (1 + __import__("math").cos(__import__("math").pi * 4 / 8)))


# ---------------------------------------------------------------- sampling


def test_sample_shapes_and_eos(tiny):
    model, tok = tiny
    prompts = [common.question_prompt(tok, "1+1?"), common.question_prompt(tok, "A longer question: 2+2?")]
    out = engine.sample(model, tok, prompts, n=3, max_new_tokens=6, temperature=1.0, micro_batch_size=4)
    assert len(out["completion_ids"]) == 6
    assert out["prompt_ids"][0] == tok(prompts[0], add_special_tokens=False)["input_ids"]
    assert out["prompt_ids"][3] == tok(prompts[1], add_special_tokens=False)["input_ids"]
    for ids, eos in zip(out["completion_ids"], out["eos"]):
        assert 1 <= len(ids) <= 6 and eos == (ids[-1] == tok.eos_token_id)
        assert tok.pad_token_id not in ids[:-1] or not eos


# ---------------------------------------------------------------- 2 ranks: FSDP step, sampling, checkpoint, export


def test_two_rank_fsdp_step_sampling_checkpoint_export(tmp_path):
    proc = run_torchrun("tests/workers/common_worker.py", [str(tmp_path)], nproc=2)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sample_lengths"] == [[4, 4], [24, 24]], proc.stdout
    assert result["loss_decreased"]
    assert result["restore_max_diff"] == 0.0
    assert result["changed_after_save"] > 0
    assert result["export_max_diff"] == 0.0
    assert result["sharded_logprob_max_diff"] < 1e-5
