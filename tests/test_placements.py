"""Issue 27: where the positive sample goes. Each placement's loss and gradient against an independent computation
on a hand-sized example, then each runs end to end on the toy lab's shipped base, whose self-explanations verify."""

import copy
import math
import os

import pytest
import torch
from conftest import ROOT, read_jsonl, run_torchrun

import common
import engine
import expo_grpo
from expo_grpo import (Args, explanation_prefix, group_advantages, grpo_loss, place_in_groups, shaped_surrogate,
                       sft_loss, train_on_rollouts, validate_args)

# ---------------------------------------------------------------- group (LUFFY): the shaped, unclipped term


def test_shaped_surrogate_value_and_gradient_by_hand():
    p = torch.tensor([0.1, 0.5, 0.9])
    logps = p.log().requires_grad_()
    value = shaped_surrogate(logps, torch.tensor(0.875))
    torch.testing.assert_close(value, 0.875 * p / (p + 0.1))  # 0.4375 at p = 0.1, as the docstring says
    value.sum().backward()
    # d/dlogp [A p / (p + g)] = A g p / (p + g)^2, since dp/dlogp = p
    torch.testing.assert_close(logps.grad, 0.875 * 0.1 * p / (p + 0.1) ** 2)


def test_off_policy_rows_get_the_shaped_term_unclipped_the_others_grpo():
    logps = torch.log(torch.tensor([[0.2, 0.6, 0.5], [0.3, 0.7, 0.9]])).requires_grad_()
    old = logps.detach() - torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # row 1: ratio e > 1 + eps (clipped)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([-0.25, 0.75])
    loss, metrics = grpo_loss(logps, old, None, adv, mask, 0.2, 0.2, 0.0, "seq-mean",
                              off_policy=torch.tensor([False, True]))
    # by hand: row 0 is GRPO at ratio 1 (mean of A over its 2 tokens); row 1 is A p / (p + 0.1), never clipped
    p1 = torch.tensor([0.3, 0.7, 0.9])
    expected = -((-0.25 * 2) / 2 + (0.75 * p1 / (p1 + 0.1)).sum() / 3) / 2
    torch.testing.assert_close(loss, expected)
    assert metrics["clip_frac"] == 0.0  # the off-policy row's ratio would be clipped, but it has none
    loss.backward()
    torch.testing.assert_close(logps.grad[1], -0.75 * 0.1 * p1 / (p1 + 0.1) ** 2 / 3 / 2)
    torch.testing.assert_close(logps.grad[0], torch.tensor([0.25 / 2 / 2, 0.25 / 2 / 2, 0.0]))


def test_the_positive_sample_replaces_the_last_member_of_its_all_fail_group():
    G = 4
    rollouts = {"prompt_ids": [[1]] * 8, "completion_ids": [[10 + j] for j in range(8)], "advantages": [0.0] * 4 + [
        0.5, -0.5, 0.5, -0.5], "in_pg": [False] * 8, "in_sft": [False] * 8}
    place_in_groups(rollouts, [[7, 8, 9], None], G)
    # r = [0, 0, 0, 1] and A = r - mean(r), no std: the same as group_advantages without it
    expected = group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0]), G, scale_by_std=False).tolist()
    assert rollouts["advantages"][:4] == pytest.approx(expected) == [-0.25, -0.25, -0.25, 0.75]
    assert rollouts["advantages"][4:] == [0.5, -0.5, 0.5, -0.5]  # a group without one keeps its advantages
    assert rollouts["completion_ids"][3] == [7, 8, 9] and rollouts["completion_ids"][2] == [12]
    assert rollouts["off_policy"] == [False, False, False, True, False, False, False, False]
    assert rollouts["in_pg"][3] and not rollouts["in_pg"][2]  # the others keep theirs (here: cut, masked)


# ---------------------------------------------------------------- prompt (QuestA): the hinted prompt


def test_explanation_prefix_is_the_first_steps_and_never_the_answer():
    toy_style = "0909 1506 3508 0202 1304 1405 \\boxed{542869}"
    assert explanation_prefix(toy_style, 0.5) == "0909 1506 3508 "
    assert explanation_prefix(toy_style, 0.25) == "0909 "
    assert explanation_prefix("First.\nSecond.\nThird.\nSo \\boxed{3}.", 0.5) == "First.\nSecond.\n"
    for n in range(1, 12):  # the last step, which holds the answer, is never in a prefix of half or less
        text = " ".join(f"s{k}" for k in range(n - 1)) + " \\boxed{9}"
        assert "boxed" not in explanation_prefix(text, 0.5) + explanation_prefix(text, 0.25)


def test_prompt_placement_redraws_the_hinted_groups_from_the_hinted_prompt(tiny, monkeypatch):
    _, tokenizer = tiny
    G = 2
    batch = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}]
    out = {"prompt_ids": [[1], [1], [2], [2]], "completion_ids": [[5], [6], [7], [8]], "texts": ["a", "b", "c", "d"],
           "eos": [True] * 4}
    seen = {}

    def fake_sample(model, tok, prompts, n, **kwargs):
        seen["prompts"], seen["n"] = prompts, n
        return {"prompt_ids": [[99]] * n * len(prompts), "completion_ids": [[42], [43]],
                "texts": ["so \\boxed{4}", "\\boxed{" + "9" * 600 + "}"], "eos": [True, False]}

    monkeypatch.setattr(expo_grpo, "sample", fake_sample)
    explanations = [None, {"explanation": "Add.\nTwo and two.\nFour: \\boxed{4}"}]
    new, rewards, advantages, verified = expo_grpo.hinted_groups(None, tokenizer, batch, out, torch.zeros(4), [None, [1, 2]],
                                                       explanations, 0.5, Args(model="tiny", num_generations=G))
    assert seen["n"] == G and seen["prompts"] == [common.question_prompt(tokenizer, "What is 2 + 2?") + "Add.\n"]
    assert new["completion_ids"] == [[5], [6], [42], [43]] and new["eos"] == [True, True, True, False]
    assert rewards.tolist() == [0.0, 0.0, 1.0, 0.0]  # the redrawn group's rewards, scored against its gold
    torch.testing.assert_close(advantages, group_advantages(rewards, G))
    # what the verifier saw of the redrawn samples counts in the step's metrics: one answer of 600 characters
    assert verified == {"verify_timeouts": 0.0, "verify_errors": 0.0, "verify_prefiltered": 1.0}


# ---------------------------------------------------------------- sft_only (STaR): the SFT term alone


def test_sft_only_moves_the_policy_by_the_sft_terms_gradient_alone(tiny, monkeypatch):
    base, tokenizer = tiny
    G, g = 2, torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (5,), generator=g).tolist() for _ in range(2)]
    completions = [torch.randint(3, 500, (4,), generator=g).tolist() for _ in range(2 * G)]
    positives = [torch.randint(3, 500, (6,), generator=g).tolist() for _ in range(2)]
    rollouts = {"prompt_ids": [prompts[j // G] for j in range(2 * G)] + prompts, "completion_ids": completions + positives,
                "advantages": [1.0, -1.0, 0.5, -0.5, 0.0, 0.0],  # a GRPO signal that sft_only must ignore
                "in_pg": [False] * 6, "in_sft": [False] * 4 + [True, True]}  # main's rollouts for sft_only
    grads = {}

    def capture(model, optimizer, scheduler, finite, max_grad_norm, state):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        optimizer.zero_grad()
        return {"grad_norm": 0.0, "skipped": 0.0}

    monkeypatch.setattr(expo_grpo, "optimizer_step", capture)
    args = Args(model="tiny", num_generations=G, beta=0.0, sft_coef=0.5, positive_in="sft_only")
    model = copy.deepcopy(base)
    train_on_rollouts(model, None, torch.optim.SGD(model.parameters(), lr=0.0), None, rollouts, args,
                      tokenizer.pad_token_id)
    # independently: 0.5 x the mean token NLL of the two positive samples, nothing else
    reference = copy.deepcopy(base)
    batch = engine.make_batch(prompts, positives, tokenizer.pad_token_id)
    logps = engine.token_logprobs(reference, batch["input_ids"], batch["attention_mask"])
    (0.5 * sft_loss(logps, batch["completion_mask"])).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- flags, and each placement end to end


def test_a_placement_without_explanations_is_refused():
    for place in ("group", "prompt", "sft_only"):
        with pytest.raises(SystemExit, match=f"--positive_in {place} places the self-explanation"):
            validate_args(Args(model="tiny", dataset="synthetic", sft_source="none", positive_in=place), 1)
    with pytest.raises(SystemExit, match="--sft_anchor adds to the SFT term"):
        validate_args(Args(model="tiny", dataset="synthetic", positive_in="group", sft_anchor=True), 1)


@pytest.mark.parametrize("place", ["group", "prompt", "sft_only"])
def test_each_placement_trains_on_the_toy_base(place, tmp_path):
    """The shipped toy base explains 5-6 digit sums it cannot solve: every placement gets positive samples."""
    out = tmp_path / place
    run_torchrun("expo_grpo.py", [
        "--model", os.path.join(ROOT, "examples", "toy_base"), "--dataset", "addition", "--levels", "5-6",
        "--batch_size", "4", "--num_generations", "4", "--max_new_tokens", "64", "--temperature", "1.0", "--lr",
        "1e-4", "--beta", "0", "--max_steps", "2", "--save_every", "0", "--probe_every", "0", "--log_samples", "2",
        "--no_gradient_checkpointing", "--positive_in", place, "--output_dir", str(out)],
        env={"EXPO_CACHE": str(tmp_path / "cache")}, timeout=400)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["grad_norm"]) for r in rows)
    assert sum(r["sft_used"] for r in rows) > 0  # positive samples were placed
    if place == "sft_only":
        assert all(r["policy_loss"] == 0 and r["sft_loss"] > 0 for r in rows)
    else:
        assert all(r["sft_loss"] == 0 for r in rows)  # no SFT term: the sample is in the group or the prompt
