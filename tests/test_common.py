"""common.py: answers, prompts, data, log-probs, and a 2-rank FSDP run (step, sampling, checkpoint, export)."""

import json
import os

import pytest
import torch

import common
import engine
import toy
from conftest import SHARED_DATA, run_torchrun

# ---------------------------------------------------------------- answers


@pytest.mark.parametrize("text, expected", [
    (r"The answer is \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"nested \boxed{\left\{ x \mid x^{2} > 1 \right\}} end", r"\left\{ x \mid x^{2} > 1 \right\}"),
    (r"so \boxed 5$ done", "5"),
    (r"\fbox{42}", "42"),
    (r"no box here", None),
    (r"", None),
    (r"\boxed{}", ""),
    (r"\boxed{3} and \boxed{unbalanced", "3"),
    (r"\boxed{\dfrac{3}{4}}", r"\dfrac{3}{4}"),
])
def test_extract_boxed(text, expected):
    assert common.extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
    ("... \n#### 1,234", "1234"),
    ("#### -5", "-5"),
    ("no marker", None),
])
def test_gsm8k_answer(text, expected):
    assert common.gsm8k_answer(text) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    (r"so \boxed{\dfrac{1}{2}}", "0.5", 1.0),
    (r"so \boxed{\frac12}", r"\frac{1}{2}", 1.0),
    (r"the interval is \boxed{[0, 1)} .", "[0,1)", 1.0),
    (r"\boxed{(0,1)}", "[0,1)", 0.0),
    (r"I think it is 7, \boxed{7}", "7", 1.0),
    (r"\boxed{7} no wait \boxed{8}", "7", 0.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (r"answer: 7", "7", 0.0),  # no box, no reward
    (r"\boxed{}", "7", 0.0),
    (r"\boxed{\{1, 2\}}", r"\{2, 1\}", 1.0),
])
def test_verify_answer(completion, gold, expected):
    assert common.verify_answer(completion, gold) == expected


def test_verify_answer_never_raises_on_junk():
    nested = "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}"
    for junk in [None, "", "\\boxed{", nested, "\\boxed{" + "9" * 100000 + "}", "\\boxed{10^{10^{10^{10^{10}}}}}"]:
        assert common.verify_answer(junk, "1") == 0.0


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not present")
@pytest.mark.parametrize("name", ["math/test.jsonl", "math500/test.jsonl"])
def test_gold_answers_verify_on_real_data(name):
    """The gold taken from each reference solution verifies, through math-verify, against that solution."""
    rows = [common.normalize_row(r) for r in _rows(os.path.join(SHARED_DATA, name))]
    assert all(r is not None for r in rows)
    ok = sum(common.verify_answer(r["solution"], r["answer"], exact_shortcut=False) for r in rows)
    assert ok / len(rows) >= 0.995, f"{ok}/{len(rows)}"


# ---------------------------------------------------------------- data


def test_normalize_row_formats():
    math_row = {"problem": "p", "solution": r"so \boxed{\frac{1}{2}}", "level": "Level 5", "type": "Algebra"}
    assert common.normalize_row(math_row) == {"question": "p", "answer": r"\frac{1}{2}",
                                              "solution": math_row["solution"], "level": 5, "subject": "Algebra"}
    m500 = {"problem": "p", "solution": r"\boxed{3}", "answer": "3", "subject": "Geometry", "level": 2}
    assert common.normalize_row(m500)["answer"] == "3" and common.normalize_row(m500)["level"] == 2
    gsm = {"question": "q", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}
    row = common.normalize_row(gsm)
    assert row["answer"] == "4" and row["level"] is None
    assert "<<" not in row["solution"] and common.extract_boxed(row["solution"]) == "4"
    assert common.normalize_row({"problem": "p", "solution": "no box"}) is None


def test_load_problems_local_file(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"problem": f"q{i}", "solution": rf"\boxed{{{i}}}", "level": f"Level {i % 5 + 1}"}) for i in range(20)]
    lines += ["{not json", json.dumps({"problem": "q", "solution": "no answer"})]
    path.write_text("\n".join(lines))
    rows, stats = common.load_problems(str(path), levels=[1, 2])
    assert stats["malformed_lines"] == 1 and stats["no_answer"] == 1 and stats["kept"] == 8
    assert sorted(int(r["answer"]) for r in rows) == [i for i in range(20) if i % 5 < 2]
    again, _ = common.load_problems(str(path), levels=[1, 2])
    assert [r["question"] for r in again] == [r["question"] for r in rows]  # deterministic order
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": 1}))
    with pytest.raises(ValueError, match="found columns: \\['label', 'text'\\]"):
        common.load_problems(str(bad))


def test_synthetic_problems_are_solvable_and_levelled():
    rows = toy.synthetic_problems(50, seed=3)
    assert {r["level"] for r in rows} == {1, 2, 3, 4, 5}
    for r in rows:
        assert common.extract_boxed(r["solution"]) == r["answer"]
        assert r["solution"].count("\n") == r["level"] + 1  # start, one line per operation, answer


def test_global_batch_covers_each_row_once_per_epoch():
    rows = list(range(12))
    epoch0 = [x for s in range(1, 4) for x in common.global_batch(rows, s, 4, seed=0)]  # steps count from 1
    epoch1 = [x for s in range(4, 7) for x in common.global_batch(rows, s, 4, seed=0)]
    assert sorted(epoch0) == rows and sorted(epoch1) == rows and epoch0 != epoch1


def test_parse_levels():
    assert common.parse_levels("5") == [5]
    assert common.parse_levels("3-5") == [3, 4, 5]
    assert common.parse_levels("1,4-5") == [1, 4, 5]
    assert common.parse_levels("all") is None


# ---------------------------------------------------------------- prompts


def test_prompts_differ_only_by_the_answer(tiny):
    _, tok = tiny
    q, a = "What is 17 times 23?", "391"
    qp, ep = common.question_prompt(tok, q), common.explanation_prompt(tok, q, a)
    assert a not in qp and a in ep and q in qp and q in ep
    assert ep.replace("\n\n" + common.EXPLAIN_SENTENCE.format(answer=a), "") == qp
    assert qp.endswith("<|im_start|>assistant\n")


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
