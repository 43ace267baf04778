"""ExP-DPO (expo_dpo.py): the loss against its closed form, pair building with a stubbed sampler, the
split of pairs over ranks, flag validation, gradient equivalence of 1 and 2 ranks, and 2-process torchrun
runs (offline with resume, online with --regen_every 1) on the tiny model."""

import json
import math
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch

import common
import engine
import toy
import expo_dpo
from conftest import read_jsonl, run_torchrun

# ----------------------------------------------------------------------------------------------------
# dpo_loss
# ----------------------------------------------------------------------------------------------------


def test_dpo_loss_matches_closed_form_on_random_numbers():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-50, 10, size=16) for _ in range(4))
    beta = 0.3
    # closed form in float64 numpy: -log sigmoid(x) = log(1 + exp(-x))
    x = beta * ((pc - rc) - (pr - rr))
    expected_loss = np.mean(np.log1p(np.exp(-x)))
    loss, m = expo_dpo.dpo_loss(*(torch.tensor(a, dtype=torch.float64) for a in (pc, pr, rc, rr)), beta)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert m["reward_accuracy"] == pytest.approx(np.mean(x > 0))
    assert m["margin"] == pytest.approx(np.mean(x))
    assert m["rewards_chosen"] == pytest.approx(np.mean(beta * (pc - rc)))
    assert m["rewards_rejected"] == pytest.approx(np.mean(beta * (pr - rr)))
    assert m["logps_chosen"] == pytest.approx(np.mean(pc))
    assert m["logps_rejected"] == pytest.approx(np.mean(pr))
    assert m["ref_logps_chosen"] == pytest.approx(np.mean(rc))
    assert m["ref_logps_rejected"] == pytest.approx(np.mean(rr))


def test_dpo_loss_hand_values():
    # beta 0.5; chosen: -1 vs ref -2 (reward +0.5); rejected: -3 vs ref -2 (reward -0.5); margin 1
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    loss, m = expo_dpo.dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), 0.5)
    assert loss.item() == pytest.approx(0.31326168751822286)  # log(1 + e^-1)
    assert m["rewards_chosen"] == pytest.approx(0.5)
    assert m["rewards_rejected"] == pytest.approx(-0.5)
    assert m["margin"] == pytest.approx(1.0)
    assert m["reward_accuracy"] == 1.0


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.randn(2, 8, dtype=torch.float64) * 30
    loss, m = expo_dpo.dpo_loss(logps[0], logps[1], logps[0].clone(), logps[1].clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-12)
    assert m["margin"] == 0.0 and m["reward_accuracy"] == 0.0


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-20.0, -5.0, -9.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-21.0, -4.0, -30.0], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-19.0, -6.0, -9.5], dtype=torch.float64)
    rr = torch.tensor([-22.0, -3.0, -29.0], dtype=torch.float64)
    beta = 0.2
    loss, _ = expo_dpo.dpo_loss(pc, pr, rc, rr, beta)
    loss.backward()
    # descent moves against the gradient: chosen log-prob up (gradient < 0), rejected down (gradient > 0)
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/d pc of -log sigmoid(m)/B = -beta sigmoid(-m) / B
    x = beta * ((pc - rc) - (pr - rr)).detach().numpy()
    expected = -beta / (1 + np.exp(x)) / 3
    np.testing.assert_allclose(pc.grad.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(pr.grad.numpy(), -expected, rtol=1e-12)


# ----------------------------------------------------------------------------------------------------
# Pair building with a stubbed sampler
# ----------------------------------------------------------------------------------------------------

ROWS = {
    10: {"question": "What is 3 + 4?", "answer": "7", "solution": "3 + 4 = 7, so \\boxed{7}.", "level": 1},
    11: {"question": "What is 2 + 2?", "answer": "4", "solution": "\\boxed{4}", "level": 1},
    12: {"question": "What is 5 * 5?", "answer": "25", "solution": "\\boxed{25}", "level": 2},
    13: {"question": "What is 9 - 1?", "answer": "8", "solution": None, "level": 3},
}
# per question: the CoTs (question prompt) and the explanations (explanation prompt), served in order
COTS = {
    10: ["so \\boxed{7}", "so \\boxed{9}", "so \\boxed{7}"],   # one wrong CoT: rejected = "so \\boxed{9}"
    11: ["\\boxed{4}", "\\boxed{4}", "\\boxed{4}"],            # all correct: no pair
    12: ["no box at all", "\\boxed{24}", "\\boxed{25}"],     # first wrong one is the unboxed CoT
    13: ["\\boxed{7}", "\\boxed{8}", "\\boxed{9}"],
}
EXPLANATIONS = {
    10: ["5 + 2 ... \\boxed{7}", "\\boxed{7}"],
    11: ["\\boxed{4}", "\\boxed{4}"],
    12: ["\\boxed{20}", "\\boxed{25} at last"],              # the first does not verify, the second does
    13: ["\\boxed{1}", "\\boxed{2}"],                         # none verifies: skipped
}


class StubSampler:
    """Plays the policy: recognises the question in each prompt and returns the scripted texts."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, n):
        self.calls.append((len(prompts), n))
        texts = []
        for p in prompts:
            qid = next(q for q, row in ROWS.items() if row["question"] in p)
            texts += (EXPLANATIONS[qid] if "The correct final answer is" in p else COTS[qid])[:n]
        ids = [[7] * len(t) for t in texts]  # every scripted response ended with its (stand-in) EOS
        return {"texts": texts, "completion_ids": ids, "eos": [True] * len(texts)}


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return engine.load_tokenizer("tiny")


def test_build_pairs_with_stubbed_sampler(tokenizer):
    sampler = StubSampler()
    pairs, stats = expo_dpo.build_pairs(list(ROWS.items()), tokenizer, sampler, "explanation",
                                        num_generations=3, num_explanations=2)
    by_qid = {p["qid"]: p for p in pairs}
    assert sorted(by_qid) == [10, 12]
    assert by_qid[10]["chosen"] == "5 + 2 ... \\boxed{7}" and by_qid[10]["rejected"] == "so \\boxed{9}"
    assert by_qid[12]["chosen"] == "\\boxed{25} at last" and by_qid[12]["rejected"] == "no box at all"
    for p in pairs:  # the rejected response is always wrong, the chosen explanation always verifies
        assert common.verify_answer(p["rejected"], p["answer"]) == 0.0
        assert common.verify_answer(p["chosen"], p["answer"]) == 1.0
    # 11: all CoTs correct; 13: no explanation verifies; explanations sampled only for 10, 12, 13
    assert stats["all_correct"] == 1 and stats["unverified"] == 1 and stats["built"] == 2
    assert stats["explained"] == 6 and stats["explanations_verified"] == 3  # 10: 2, 12: 1, 13: 0
    assert stats["cot_correct"] == 2 + 3 + 1 + 1


def test_build_pairs_question_with_only_correct_samples_gives_no_pair(tokenizer):
    pairs, stats = expo_dpo.build_pairs([(11, ROWS[11])], tokenizer, StubSampler(), "explanation", 3, 1)
    assert pairs == [] and stats["all_correct"] == 1 and stats["built"] == 0


def test_build_pairs_calls_the_sampler_equally_often_whatever_the_data(tokenizer):
    # sampling is an FSDP collective: a rank with nothing to explain (or no questions) must still call
    counts = []
    for items in ([], [(11, ROWS[11])], list(ROWS.items())):
        sampler = StubSampler()
        expo_dpo.build_pairs(items, tokenizer, sampler, "explanation", 3, 2)
        counts.append(len(sampler.calls))
    assert counts == [2, 2, 2]


def test_build_pairs_expert_uses_the_dataset_solution(tokenizer):
    sampler = StubSampler()
    pairs, stats = expo_dpo.build_pairs(list(ROWS.items()), tokenizer, sampler, "expert", 3, 2)
    assert {p["qid"]: p["chosen"] for p in pairs} == {10: "3 + 4 = 7, so \\boxed{7}.", 12: "\\boxed{25}"}
    assert stats["no_solution"] == 1 and stats["all_correct"] == 1 and stats["explained"] == 0
    assert sampler.calls == [(4, 3)]  # no explanation is sampled


def test_build_pairs_with_the_real_tiny_model_skips_unverified_explanations(tiny, tokenizer):
    # random weights never write the gold \boxed{}: every question has a wrong CoT, no explanation verifies
    model, _ = tiny
    rows = toy.synthetic_problems(3, seed=5)
    sampler = lambda prompts, n: engine.sample(model, tokenizer, prompts, n=n, max_new_tokens=8)  # noqa: E731
    # 8 new tokens: most wrong CoTs are cut, and by default a question with only cut ones makes no pair; the rest
    # get an explanation, which never verifies
    pairs, stats = expo_dpo.build_pairs(list(enumerate(rows)), tokenizer, sampler, "explanation", 2, 1)
    assert pairs == [] and stats["truncated"] + stats["unverified"] == 3 and stats["explained"] == 3 - stats["truncated"]
    pairs, stats = expo_dpo.build_pairs(list(enumerate(rows)), tokenizer, sampler, "explanation", 2, 1,
                                        rejected_truncated="keep")
    assert pairs == []
    assert stats["questions"] == 3 and stats["unverified"] == 3 and stats["explained"] == 3
    assert stats["explanations_verified"] == 0 and stats["all_correct"] == 0


def test_sequence_logps_is_the_sum_over_response_tokens_under_the_question_prompt(tiny, tokenizer):
    model, _ = tiny
    pair = {"question": "What is 3 + 4?", "chosen": "It is \\boxed{7}", "rejected": "\\boxed{9}"}
    for side in ("chosen", "rejected"):  # as sampled: both ended with EOS
        pair[f"{side}_ids"] = tokenizer(pair[side], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    chosen, rejected, _ = expo_dpo.sequence_logps(model, tokenizer, [pair], torch.device("cpu"))
    # independent: full causal-LM log-softmax over prompt + response + EOS, summed over the response part
    prompt = tokenizer(common.question_prompt(tokenizer, pair["question"]), add_special_tokens=False)["input_ids"]
    for text, got in ((pair["chosen"], chosen), (pair["rejected"], rejected)):
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
        want = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(response))
        assert got.item() == pytest.approx(want, abs=1e-3)


# ----------------------------------------------------------------------------------------------------
# Splitting pairs over ranks, flags
# ----------------------------------------------------------------------------------------------------


def test_rank_micro_batches_same_count_on_every_rank_each_pair_once():
    pairs = ["p0", "p1", "p2", "p3", "p4"]
    r0 = expo_dpo.rank_micro_batches(pairs, 0, 2, 2)
    r1 = expo_dpo.rank_micro_batches(pairs, 1, 2, 2)
    assert r0 == [(["p0", "p2"], True), (["p4"], True)]
    assert r1 == [(["p1", "p3"], True), (["p0"], False)]  # a dummy keeps FSDP's collectives matched
    real = [p for mbs in (r0, r1) for mb, ok in mbs if ok for p in mb]
    assert sorted(real) == pairs


BAD_FLAGS = [
    (dict(batch_size=6), 4, "multiple of the world size"),
    (dict(batch_size=8, micro_batch_size=3), 2, "micro_batch_size"),
    (dict(beta=-0.1), 1, "--beta"),
    (dict(beta=0.0), 1, "--beta"),
    (dict(lr=-1e-6), 1, "--lr"),
    (dict(num_generations=0), 1, "--num_generations"),
    (dict(chosen="gold"), 1, "--chosen"),
    (dict(regen_every=-1), 1, "--regen_every"),
    (dict(temperature=0.0), 1, "--temperature"),
    (dict(warmup_ratio=1.5), 1, "--warmup_ratio"),
    (dict(resume=True), 1, "no checkpoint"),
    (dict(model="no/such/model"), 1, "model"),
    (dict(dataset="missing.jsonl"), 1, "dataset"),
]


@pytest.mark.parametrize("overrides,world,message", BAD_FLAGS)
def test_validate_args_rejects(overrides, world, message, tmp_path):
    args = expo_dpo.Args(output_dir=str(tmp_path), **overrides)
    with pytest.raises(SystemExit, match=message):
        expo_dpo.validate_args(args, world)


def test_validate_args_accepts_the_defaults_on_4_ranks(tmp_path):
    expo_dpo.validate_args(expo_dpo.Args(output_dir=str(tmp_path)), 4)


def test_no_flag_is_swallowed_by_torchrun():
    # torchrun's argparse takes any flag that abbreviates one of its own, even after the script name
    from torch.distributed.run import get_args_parser
    from transformers import HfArgumentParser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    ours = [o for a in HfArgumentParser(expo_dpo.Args)._actions for o in a.option_strings if o != "--help"]
    assert "--regen_every" in ours and "--no_gradient_checkpointing" in ours
    for flag in ours:
        assert not any(t.startswith(flag) for t in theirs), f"{flag} abbreviates a torchrun flag"


# ----------------------------------------------------------------------------------------------------
# 2 ranks with half the pairs each == 1 rank with all of them
# ----------------------------------------------------------------------------------------------------

GRAD_SCRIPT = textwrap.dedent("""
    import torch
    import engine, expo_dpo
    info = engine.init_distributed()
    tok = engine.load_tokenizer("tiny")
    pairs = [{"qid": i, "question": f"What is {i} + {i}?", "chosen_ids": list(range(10, 20 + 3 * i)),
              "rejected_ids": list(range(30, 32 + i)), "ref_chosen_logp": -60.0 - 7 * i, "ref_rejected_logp": -40.0 + 3 * i}
             for i in range(5)]
    sharded = engine.shard_model(engine.load_model("tiny", info.device), info.device)
    single = engine.load_model("tiny", info.device)  # one process holding every pair
    # 5 pairs in micro-batches of 2: uneven shares and a dummy; 1 pair: rank 1 runs only a dummy
    for n in (5, 1):
        sums, _, _ = expo_dpo.dpo_backward(sharded, tok, pairs[:n], 0.5, info.rank, info.world_size, 2, info.device)
        summed = engine.sum_over_ranks(sums)  # fails if the ranks' metric keys differ
        grads = {name: p.grad.full_tensor() for name, p in sharded.named_parameters()}
        expo_dpo.dpo_backward(single, tok, pairs[:n], 0.5, 0, 1, 2, info.device)
        worst = max((grads[name] - p.grad).abs().max().item() / (p.grad.abs().max().item() + 1e-12)
                    for name, p in single.named_parameters())
        total = sum(p.grad.abs().sum().item() for p in single.parameters())
        if info.rank == 0:
            print(f"RESULT n={n} worst_rel_diff={worst:.3e} total_grad={total:.3e} loss={summed['loss'] / n:.6f}")
        sharded.zero_grad(set_to_none=True)
        single.zero_grad(set_to_none=True)
    del sharded, single
    engine.close_distributed()
""")


def test_two_ranks_give_the_gradient_of_one_rank(tmp_path, tiny_path):
    script = tmp_path / "grad_check.py"
    script.write_text(GRAD_SCRIPT)
    proc = run_torchrun(str(script), [], nproc=2, timeout=180)
    results = [dict(kv.split("=") for kv in ln.split()[1:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert [r["n"] for r in results] == ["5", "1"]
    for r in results:
        assert float(r["total_grad"]) > 0 and math.isfinite(float(r["loss"]))
        assert float(r["worst_rel_diff"]) < 1e-4


# ----------------------------------------------------------------------------------------------------
# The real script on 2 processes
# ----------------------------------------------------------------------------------------------------

TINY = ["--model", "tiny", "--dataset", "synthetic", "--limit", "12", "--batch_size", "4", "--micro_batch_size", "2",
        "--num_generations", "2", "--max_new_tokens", "16", "--gen_batch_size", "8", "--lr", "1e-4", "--save_every", "1",
        "--no_gradient_checkpointing", "--rejected_truncated", "keep"]  # random weights never end a response




def assert_finite(rows):
    for row in rows:
        for k, v in row.items():
            if isinstance(v, float):
                assert math.isfinite(v), f"step {row['step']}: {k} = {v}"


def test_offline_run_checkpoint_and_resume(tmp_path, tiny_path):
    out = str(tmp_path / "offline")
    args = TINY + ["--chosen", "expert", "--regen_every", "0", "--output_dir", out, "--save_total_limit", "4"]
    run_torchrun("expo_dpo.py", args + ["--max_steps", "4"])
    # the run is cut after step 2: its later checkpoints are gone
    for step in (3, 4):
        shutil.rmtree(os.path.join(out, f"checkpoint-{step}"))
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))[:2]
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite(rows)
    # synthetic levels 1-5 in 12 questions (3 steps an epoch, so 4 steps use all 12), random weights: every CoT
    # wrong, every solution present
    assert rows[0]["pairs_built"] == 12 and rows[0]["pairs_skipped"] == 0 and rows[0]["rounds_built"] == 1
    assert "pairs_built" not in rows[1]  # offline: built once
    assert rows[0]["pairs_in_step"] == 4
    # the reference is the initial policy, so the first step's loss is log 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert rows[1]["loss"] < math.log(2)  # one step of lr 1e-4 already separates the pairs
    pairs_path = os.path.join(out, "pairs-round0.jsonl")
    pairs = read_jsonl(pairs_path)
    assert len(pairs) == 12 and all(math.isfinite(p["ref_chosen_logp"]) for p in pairs)
    assert os.path.exists(os.path.join(out, "hf", "config.json"))
    state = torch.load(os.path.join(out, "checkpoint-2", "trainer_state.pt"), weights_only=False)
    assert state["step"] == 2 and state["extra"]["round"] == 0 and state["extra"]["pairs_path"] == pairs_path

    # resume for 2 more steps; one pair of the last step gets a NaN reference log-prob, so that step's
    # loss is NaN on one rank: the step must be skipped on both ranks together, and counted
    last_step_qids = common.global_batch(list(range(12)), 4, 4, seed=0)  # the seed is Args' default
    poisoned = [{**p, "ref_chosen_logp": float("nan")} if p["qid"] == last_step_qids[0] else p for p in pairs]
    with open(pairs_path, "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in poisoned)
    before = open(pairs_path).read()
    proc = run_torchrun("expo_dpo.py", args + ["--max_steps", "4", "--resume"])
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert_finite(rows[:3])
    assert "pairs_built" not in rows[2] and rows[2]["rounds_built"] == 1  # same pairs, not rebuilt
    assert open(pairs_path).read() == before
    assert "optimizer step skipped" in proc.stdout
    assert rows[2]["skipped_steps"] == 0 and rows[3]["skipped_steps"] == 1
    assert os.path.exists(os.path.join(out, "checkpoint-4"))
    proc = run_torchrun("expo_dpo.py", args + ["--max_steps", "6", "--resume"], check=False)
    assert proc.returncode != 0 and "resume with --max_steps 4" in proc.stderr


def test_online_run_rebuilds_pairs_every_step(tmp_path, tiny_path):
    out = str(tmp_path / "online")
    run_torchrun("expo_dpo.py", TINY + ["--chosen", "expert", "--regen_every", "1", "--max_steps", "2",
                                        "--output_dir", out, "--eval_every", "2", "--eval_dataset", "synthetic",
                                        "--eval_limit", "4", "--eval_num_samples", "2"])
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2] and "eval/pass@2" in evals[0]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert_finite(rows)
    assert [r["rounds_built"] for r in rows] == [1, 2]
    assert [r["pairs_built"] for r in rows] == [4, 4]  # each round: the 4 questions of its step
    assert all(r["pairs_in_step"] == 4 and r["empty_steps"] == 0 for r in rows)
    rounds = [read_jsonl(os.path.join(out, f"pairs-round{r}.jsonl")) for r in (0, 1)]
    assert all(len(r) == 4 for r in rounds)
    # the reference stays the initial model: round 0's pairs start at loss log 2, later ones need not
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert os.path.exists(os.path.join(out, "checkpoint-2")) and os.path.exists(os.path.join(out, "hf", "config.json"))
    samples = read_jsonl(os.path.join(out, "samples.jsonl"))
    assert {s["step"] for s in samples} == {1, 2} and all("chosen" in s and "rejected" in s for s in samples)
