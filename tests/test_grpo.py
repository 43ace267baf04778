"""Tests of expo_grpo.py: every expected value is computed independently (by hand, by a naive per-token loop,
or by transformers' own cross-entropy), then the script itself runs under torchrun on the tiny model."""

import copy
import json
import math
import os
import shutil

import pytest
import torch
from conftest import read_jsonl, run_torchrun

import common
import engine
import toy
import expo_grpo
from expo_grpo import Args, group_advantages, grpo_loss, k3_kl, sft_loss, train_on_rollouts, validate_args

# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"num_generations": 1}, "num_generations"),
    ({"batch_size": 3}, "multiple of the world size"),
    ({"beta": -0.1}, "--beta"),
    ({"lr": -1e-6}, "--lr"),
    ({"clip_eps": 0.0}, "--clip_eps"),
    ({"sft_coef": -1.0}, "--sft_coef"),
    ({"num_iterations": 0}, "--num_iterations"),
    ({"explanations": "/nonexistent/explanations.jsonl"}, "--explanations"),
    ({"resume": True, "output_dir": "/nonexistent/run"}, "no checkpoint"),
    ({"sft_source": "expert", "probe_answer_logprob": True}, "needs --sft_source explanation"),
    ({"warmup_ratio": 1.0}, "--warmup_ratio"),
])
def test_validate_args_rejects_impossible_settings(overrides, message):
    with pytest.raises(SystemExit, match=message):
        validate_args(Args(**overrides), world_size=2)


def test_validate_args_accepts_defaults_and_fills_clip_eps_high():
    validate_args(Args(), world_size=4)
    assert Args(clip_eps=0.3).clip_eps_high == 0.3 and Args(clip_eps_high=0.28).clip_eps_high == 0.28


def test_no_flag_is_an_abbreviation_of_a_torchrun_flag():
    """torchrun takes any script flag that is a prefix of one of its own (`--n` -> --nnodes, `--log` -> --log_dir)."""
    from torch.distributed.run import get_args_parser
    from transformers import HfArgumentParser

    ours = {o for a in HfArgumentParser(Args)._actions for o in a.option_strings if o not in ("-h", "--help")}
    theirs = {o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")}
    assert not {(o, t) for o in ours for t in theirs if t.startswith(o)}


# ----------------------------------------------------------------------------------------------------
# Advantages, the policy loss, the SFT term
# ----------------------------------------------------------------------------------------------------


def test_group_advantages_by_hand():
    # group 1: mean 0.25, Bessel std sqrt(0.75 / 3) = 0.5; group 2: mean 0.5, std sqrt(1 / 3)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    s = math.sqrt(1 / 3)
    expected = [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001,
                0.5 / (s + 1e-4), 0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4)]
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(expected))
    torch.testing.assert_close(group_advantages(rewards, 4, scale_by_std=False),
                               torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]))


def test_group_advantages_equal_rewards_give_zeros_not_nan():
    adv = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3)
    assert torch.equal(adv, torch.zeros(6))


def naive_grpo_loss(logps, old, ref, adv, mask, eps_low, eps_high, beta, loss_agg, max_len):
    """The objective of SPEC.md token by token in plain Python floats."""
    seq_sums, seq_lens, clipped = [], [], 0
    for i in range(len(logps)):
        total, n = 0.0, 0
        for t in range(len(logps[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(logps[i][t] - old[i][t])
            a = adv[i]
            unclipped, clip = rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a
            clipped += clip < unclipped
            d = ref[i][t] - logps[i][t]
            total += min(unclipped, clip) - beta * (math.exp(d) - d - 1)
            n += 1
        seq_sums.append(total)
        seq_lens.append(n)
    n_seq, n_tok = sum(n > 0 for n in seq_lens), sum(seq_lens)
    if loss_agg == "seq-mean":
        loss = -sum(s / n for s, n in zip(seq_sums, seq_lens) if n) / n_seq
    elif loss_agg == "token-mean":
        loss = -sum(seq_sums) / n_tok
    else:
        loss = -sum(seq_sums) / (n_seq * max_len)
    return loss, clipped / n_tok


def loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    # ratios from 0.55 to 1.65: inside and outside [0.8, 1.28] for advantages of both signs
    old = logps - torch.linspace(-0.6, 0.5, 24, dtype=torch.float64).view(4, 6)[torch.randperm(4, generator=g)]
    ref = logps + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.3, -0.7, 0.9, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
    return logps, old, ref, adv, mask


@pytest.mark.parametrize("loss_agg", ["seq-mean", "token-mean", "dr-grpo"])
def test_grpo_loss_matches_naive_loop(loss_agg):
    logps, old, ref, adv, mask = loss_inputs()
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, 0.2, 0.28, 0.04, loss_agg, max_len=7)
    expected, clip_frac = naive_grpo_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                          0.2, 0.28, 0.04, loss_agg, max_len=7)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert 0 < clip_frac < 1 and metrics["clip_frac"] == pytest.approx(clip_frac)


@pytest.mark.parametrize("advantage, ratio, value, has_grad", [
    (1.0, 1.5, 1.2, False),  # pushed up far enough: clipped
    (1.0, 0.5, 0.5, True),
    (-1.0, 0.5, -0.8, False),  # pushed down far enough: clipped
    (-1.0, 1.5, -1.5, True),
])
def test_clip_both_signs_of_advantage(advantage, ratio, value, has_grad):
    logps = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    loss, _ = grpo_loss(logps, torch.zeros(1, 1, dtype=torch.float64), None, torch.tensor([advantage], dtype=torch.float64),
                        torch.ones(1, 1, dtype=torch.float64), 0.2, 0.2, 0.0, "token-mean")
    loss.backward()
    assert -loss.item() == pytest.approx(value)
    assert (logps.grad.abs().item() > 0) == has_grad


def test_k3_kl_nonnegative_and_zero_when_policies_match():
    logps, _, ref, adv, mask = loss_inputs(1)
    assert (k3_kl(logps, ref) >= 0).all() and (k3_kl(logps, ref) > 0).any()
    assert torch.equal(k3_kl(logps, logps), torch.zeros_like(logps))
    _, metrics = grpo_loss(logps, logps, logps, adv, mask, 0.2, 0.2, 0.04, "seq-mean")
    assert metrics["kl"] == 0 and metrics["clip_frac"] == 0


@pytest.mark.parametrize("loss_agg", ["seq-mean", "token-mean", "dr-grpo"])
def test_global_normalisation_gives_same_gradient_for_one_or_two_micro_batches(loss_agg):
    base, old, ref, adv, mask = loss_inputs(2)
    sft_mask = torch.flip(mask, dims=[0])

    def grad(parts):
        logps = base.clone().requires_grad_(True)
        counts = dict(num_seqs=float((mask.sum(1) > 0).sum()), num_tokens=float(mask.sum()), max_len=6)
        for rows in parts:
            loss, _ = grpo_loss(logps[rows], old[rows], ref[rows], adv[rows], mask[rows], 0.2, 0.2, 0.04, loss_agg, **counts)
            loss = loss + 0.15 * sft_loss(logps[rows], sft_mask[rows], num_tokens=float(sft_mask.sum()))
            loss.backward()
        return logps.grad

    torch.testing.assert_close(grad([slice(0, 4)]), grad([slice(0, 1), slice(1, 4)]))
    # and the defaults on the whole batch are the global counts
    logps = base.clone().requires_grad_(True)
    (grpo_loss(logps, old, ref, adv, mask, 0.2, 0.2, 0.04, loss_agg, max_len=6)[0] + 0.15 * sft_loss(logps, sft_mask)).backward()
    torch.testing.assert_close(logps.grad, grad([slice(0, 2), slice(2, 4)]))


def test_sft_loss_is_transformers_causal_lm_cross_entropy(tiny):
    model, tokenizer = tiny
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14, 15]]
    batch = engine.make_batch(prompts, completions, tokenizer.pad_token_id)
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    for r, p in enumerate(prompts):
        labels[r, : len(p)] = -100
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        logps = engine.token_logprobs(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(sft_loss(logps, batch["completion_mask"]), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The ExPO mechanism: with every reward 0, only the positive sample moves the policy
# ----------------------------------------------------------------------------------------------------


def test_all_rewards_zero_none_arm_learns_nothing_explanation_arm_does(tiny):
    base, tokenizer = tiny
    G, g = 4, torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (6,), generator=g).tolist() for _ in range(2)]
    completions = [torch.randint(3, 500, (5,), generator=g).tolist() for _ in range(2 * G)]
    advantages = group_advantages(torch.zeros(2 * G), G)  # every sample wrong: no GRPO signal
    grpo_part = {"prompt_ids": [prompts[j // G] for j in range(2 * G)], "completion_ids": completions,
                 "advantages": advantages.tolist(), "in_pg": [True] * 2 * G, "in_sft": [False] * 2 * G}
    explanations = [torch.randint(3, 500, (7,), generator=g).tolist() for _ in range(2)]
    with_positive = {"prompt_ids": grpo_part["prompt_ids"] + prompts, "completion_ids": completions + explanations,
                     "advantages": grpo_part["advantages"] + [0.0, 0.0], "in_pg": grpo_part["in_pg"] + [False, False],
                     "in_sft": grpo_part["in_sft"] + [True, True]}
    args = Args(model="tiny", num_generations=G, micro_batch_size=4, beta=0.04, sft_coef=0.15)
    moved = {}
    for arm, rollouts in (("none", grpo_part), ("explanation", with_positive)):
        model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        metrics = train_on_rollouts(model, ref_model, optimizer, scheduler, rollouts, args, tokenizer.pad_token_id)
        moved[arm] = max((p - q).abs().max().item() for p, q in zip(model.parameters(), base.parameters()))
        assert metrics["kl"] == 0  # the policy is still the reference: the KL term's gradient is 0 too
    assert moved["none"] == 0.0
    assert moved["explanation"] > 1e-4


@pytest.mark.filterwarnings("ignore:Detected call of")  # the skipped update is the first
def test_non_finite_loss_skips_the_update(tiny):
    base, tokenizer = tiny
    model = copy.deepcopy(base)
    rollouts = {"prompt_ids": [[5, 6, 7]] * 2, "completion_ids": [[8, 9], [10, 11, 12]], "advantages": [float("nan"), 1.0],
                "in_pg": [True, True], "in_sft": [False, False]}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    metrics = train_on_rollouts(model, None, optimizer, scheduler, rollouts, Args(model="tiny", beta=0.0), tokenizer.pad_token_id)
    assert metrics["skipped"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


def test_read_explanations_tokenises_text_once_and_appends_eos(tmp_path, tiny):
    _, tokenizer = tiny
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps({"question": "q1", "explanation": "so \\boxed{3}", "verified": 1.0}) + "\n"
                    + json.dumps({"question": "q2", "explanation": "so \\boxed{4}"}) + "\n")
    found = expo_grpo.read_explanations(str(path), tokenizer)
    assert found[("q1", None)]["completion_ids"] == tokenizer("so \\boxed{3}", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    assert found[("q1", None)]["verified"] == 1.0 and found[("q2", None)]["verified"] is None  # checked at use
    # a record without an answer serves its question whatever the gold; one with an answer only that answer
    assert expo_grpo.find_explanation(found, {"question": "q1", "answer": "3"}) is found[("q1", None)]


# ----------------------------------------------------------------------------------------------------
# Distributed: 2 ranks == 1 rank, and the script end to end
# ----------------------------------------------------------------------------------------------------


def test_two_fsdp_ranks_with_half_the_batch_equal_one_process_with_all(tmp_path, tiny):
    from workers.grpo_step_worker import fixed_rollouts, train_all

    base, tokenizer = tiny
    run_torchrun("tests/workers/grpo_step_worker.py", [str(tmp_path / "two.pt"), "2"], nproc=2)
    two = torch.load(tmp_path / "two.pt")
    # the reference: one process, no FSDP, the whole batch, micro-batches of 3 instead of 2
    one = train_all(fixed_rollouts(0, 1, len(tokenizer)), 3, tokenizer.pad_token_id, torch.device("cpu"), sharded=False)
    initial = base.state_dict()
    for loss_agg in one:
        for name, p in one[loss_agg]["params"].items():
            torch.testing.assert_close(two[loss_agg]["params"][name] - initial[name], p - initial[name], rtol=1e-4, atol=1e-6)
        assert max((p - initial[n]).abs().max().item() for n, p in one[loss_agg]["params"].items()) > 1e-3
        for key in ("policy_loss", "sft_loss", "kl", "clip_frac", "grad_norm"):
            assert two[loss_agg]["metrics"][key] == pytest.approx(one[loss_agg]["metrics"][key], rel=1e-4, abs=1e-7)
        assert one[loss_agg]["metrics"]["clip_frac"] > 0  # the second iteration had ratios outside the clip range


TINY = ["--model", "tiny", "--dataset", "synthetic", "--levels", "1-2", "--batch_size", "4", "--num_generations", "4",
        "--max_new_tokens", "16", "--micro_batch_size", "8", "--gen_batch_size", "16"]




def check_metrics(out_dir, steps):
    rows = read_jsonl(os.path.join(out_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == steps
    for r in rows:
        for k, v in r.items():
            assert not isinstance(v, float) or math.isfinite(v), (k, v)
        for k in ("reward", "zero_spread", "solved", "sft_used", "policy_loss", "sft_loss", "kl", "clip_frac", "entropy",
                  "grad_norm", "lr", "completion_len", "truncated", "sample_tok_s", "train_tok_s"):
            assert k in r, k
    return rows


def test_explanation_arm_online_then_resume(tmp_path):
    out = str(tmp_path / "run")
    args = TINY + ["--output_dir", out, "--explanations", "online", "--save_every", "1", "--probe_answer_logprob",
                   "--eval_every", "2", "--eval_limit", "4", "--eval_num_samples", "2"]
    run_torchrun("expo_grpo.py", args + ["--max_steps", "2"])
    rows = check_metrics(out, [1, 2])
    for k in ("expl_verified", "nll_explanation", "nll_expert", "answer_logp_after_explanation", "answer_logp_after_cot"):
        assert k in rows[0], k
    assert "eval/accuracy" in rows[1]
    assert os.path.isdir(os.path.join(out, "checkpoint-2")) and os.path.exists(os.path.join(out, "hf", "config.json"))
    assert read_jsonl(os.path.join(out, "samples.jsonl"))[0]["explanation"] is not None

    proc = run_torchrun("expo_grpo.py", args + ["--max_steps", "3", "--resume"])
    assert "resumed from step 2" in proc.stdout
    check_metrics(out, [1, 2, 3])
    assert os.path.isdir(os.path.join(out, "checkpoint-3"))
    # step 3 took the questions of step 3 of the data order: rank 0 holds batch[0::2]
    rows, _ = common.load_problems("synthetic", levels=[1, 2], seed=0)
    samples = [s for s in read_jsonl(os.path.join(out, "samples.jsonl")) if s["step"] == 3]
    assert [s["question"] for s in samples] == [r["question"] for r in common.global_batch(rows, 3, 4, 0)[0::2]]


def test_explanation_arm_from_jsonl_trains_on_verified_explanations_only(tmp_path):
    """The random tiny model never reaches a*; a file of explanations (half with a wrong answer) does."""
    rows, _ = common.load_problems("synthetic", levels=[1, 2], seed=0)
    path = tmp_path / "explanations.jsonl"
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            text = r["solution"] if i % 2 else f"Some steps. The answer is \\boxed{{{int(r['answer']) + 1}}}."
            f.write(json.dumps({"question": r["question"], "explanation": text}) + "\n")
    out = str(tmp_path / "run")
    run_torchrun("expo_grpo.py", TINY + ["--output_dir", out, "--explanations", str(path), "--max_steps", "2",
                                         "--num_iterations", "2", "--clip_eps_high", "0.28", "--probe_every", "0"])
    for step, r in enumerate(check_metrics(out, [1, 2]), start=1):
        batch = common.global_batch(rows, step, 4, 0)
        correct = sum(rows.index(q) % 2 for q in batch) / len(batch)
        assert 0 < correct < 1 and r["expl_verified"] == correct
        assert r["sft_used"] == correct  # every verified explanation is used: no sample solves its question
        assert r["sft_loss"] > 0 and r["grad_norm"] > 0


def test_offline_explanations_are_cached_per_model_data_and_prompt(tmp_path, monkeypatch, tiny):
    """Issue 13: a second run with the same model and data samples no explanation; another model, other data,
    another prompt or other sampling settings do."""
    env = {"EXPO_CACHE": str(tmp_path / "cache")}
    run = lambda name, *extra: run_torchrun("expo_grpo.py", TINY + [  # noqa: E731
        "--output_dir", str(tmp_path / name), "--max_steps", "2", "--sft_on", "unsolved", "--probe_every", "0",
        *extra], env=env).stdout
    assert "offline explanations for 8 questions: 0 cached, 8 sampled now" in run("first")
    check_metrics(str(tmp_path / "first"), [1, 2])
    assert "8 cached, 0 sampled now" in run("another_arm", "--sft_on", "all", "--explanation_check", "answer")
    assert "0 cached, 8 sampled now" in run("other_data", "--levels", "3-4")
    copy_of_tiny = shutil.copytree(toy.build_tiny_model(), tmp_path / "tiny_copy")  # another model: another key
    assert "0 cached, 8 sampled now" in run("other_model", "--model", str(copy_of_tiny))
    # the key itself: prompt and sampling settings
    _, tokenizer = tiny
    key = lambda **kw: expo_grpo.explanation_cache_path(Args(model="tiny", **kw), tokenizer)  # noqa: E731
    assert key() == key() and key() != key(temperature=0.5) and key() != key(max_new_tokens=7)
    before = key()
    monkeypatch.setattr(common, "EXPLAIN_SENTENCE", "The answer is {answer}. Explain why.")
    assert key() != before


def test_offline_explanations_do_not_depend_on_the_cache_history_or_the_seed(tmp_path):
    """Issue 19: --seed 1 on a cold cache, and --seed 1 after a --seed 0 run filled part of the cache, train on the
    same explanation of each question; so does --seed 0 (one explanation per question: a fixed data set)."""
    def explanations(cache, *seeds):  # each cache builds its own copy of the tiny model (other file times)
        for s in seeds:
            run_torchrun("expo_grpo.py", TINY + ["--output_dir", str(tmp_path / f"{cache}_{s}"), "--max_steps", "2",
                                                 "--probe_every", "0", "--save_every", "0", "--seed", str(s)],
                         env={"EXPO_CACHE": str(tmp_path / cache)})
        (path,) = (tmp_path / cache / "explanations").glob("*.jsonl")
        return {r["question"]: r["completion_ids"] for r in map(json.loads, open(path))}

    cold, warm = explanations("cold", 1), explanations("warm", 0, 1)
    assert len(warm) > len(cold) > 0  # seed 0 used other questions too
    assert all(warm[q] == ids for q, ids in cold.items())
    assert len(set(map(tuple, cold.values()))) > 1  # not one text for all


def test_expert_arm(tmp_path):
    out = str(tmp_path / "run")
    run_torchrun("expo_grpo.py", TINY + ["--output_dir", out, "--sft_source", "expert", "--max_steps", "2", "--beta", "0",
                                         "--num_iterations", "2", "--loss_agg", "token-mean", "--probe_every", "0"])
    for r in check_metrics(out, [1, 2]):
        assert r["sft_used"] == 1.0 and r["sft_loss"] > 0 and r["kl"] == 0 and "expl_verified" not in r


def test_none_arm(tmp_path):
    out = str(tmp_path / "run")
    run_torchrun("expo_grpo.py", TINY + ["--output_dir", out, "--sft_source", "none", "--max_steps", "2",
                                         "--loss_agg", "dr-grpo", "--scale_rewards", "none", "--mask_truncated",
                                         "--no_gradient_checkpointing"])
    for r in check_metrics(out, [1, 2]):
        assert r["sft_used"] == 0 and r["sft_loss"] == 0 and "nll_expert" in r and "nll_explanation" not in r


@pytest.mark.parametrize("loss_agg", ["seq-mean", "token-mean"])
def test_zero_advantage_sequences_are_skipped_without_changing_the_update(tiny, loss_agg):
    """With beta = 0, sequences with advantage 0 outside the SFT term are left out of the passes (but not out of
    the normalisers): the update equals the one where they pass through with a negligible advantage."""
    base, tokenizer = tiny
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (4 + j % 3,), generator=g).tolist() for j in range(6)]
    completions = [torch.randint(3, 500, (5 + j % 2,), generator=g).tolist() for j in range(6)]
    rollouts = {"prompt_ids": prompts, "completion_ids": completions, "advantages": [1.0, -1.0, 0.0, 0.0, 0.0, 0.0],
                "in_pg": [True] * 5 + [False], "in_sft": [False] * 5 + [True]}
    passed = {**rollouts, "advantages": [1.0, -1.0, 1e-30, 1e-30, 1e-30, 0.0]}
    results = {}
    for name, r in (("skipped", rollouts), ("passed", passed)):
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        args = Args(model="tiny", beta=0.0, micro_batch_size=2, loss_agg=loss_agg, sft_coef=0.5, max_grad_norm=1e6)
        metrics = train_on_rollouts(model, None, optimizer, scheduler, r, args, tokenizer.pad_token_id)
        results[name] = (metrics, [p.detach().clone() for p in model.parameters()])
    (skipped, p_skipped), (full, p_full) = results["skipped"], results["passed"]
    assert skipped["train_tokens"] < full["train_tokens"]  # three sequences never ran
    torch.testing.assert_close(skipped["grad_norm"], full["grad_norm"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(skipped["sft_loss"], full["sft_loss"], rtol=1e-6, atol=0)
    for a, b in zip(p_skipped, p_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
