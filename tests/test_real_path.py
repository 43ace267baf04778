"""The path a real run takes: a hub-shaped instruct checkpoint (tests/hub_fixture.py: its own generation_config,
two end tokens, bf16 weights, Qwen's tokenizer class and chat template), real data file formats, the real CLI.

Each test here failed before the fix it names (issue 11). Expected values are computed independently.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, gsm8k_rows, math_rows, run_torchrun, write_jsonl

import common
import engine
import expo_dpo
import expo_grpo

CPU = torch.device("cpu")


def test_fixture_is_shaped_like_the_hub_checkpoint(hub_path):
    from transformers import GenerationConfig

    tokenizer = engine.load_tokenizer(hub_path)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"  # the class AutoTokenizer picks for the hub id
    gen = GenerationConfig.from_pretrained(hub_path)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert gen.eos_token_id == [im_end, endoftext] and tokenizer.pad_token_id == endoftext
    assert (gen.do_sample, gen.temperature, gen.top_p, gen.top_k, gen.repetition_penalty) == (True, 0.7, 0.8, 20, 1.05)
    no_system = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert no_system.startswith("<|im_start|>system\nYou are Qwen")
    # the project's prompts bring their own system message, which replaces the default one
    assert common.question_prompt(tokenizer, "q").count("<|im_start|>system") == 1
    assert "You are Qwen" not in common.question_prompt(tokenizer, "q")


# ---------------------------------------------------------------- fix 1: the policy trains in training mode


def count_layer_calls(model):
    """How often the decoder layers' forward runs. transformers checkpoints a layer's `forward`, not its
    `__call__`, and module hooks do not fire in the recompute, so the count wraps the `forward` of a module
    inside each layer (its MLP), which the recompute in backward calls again."""
    calls = [0]
    for layer in model.model.layers:
        def counted(*args, _forward=layer.mlp.forward, **kwargs):
            calls[0] += 1
            return _forward(*args, **kwargs)
        layer.mlp.forward = counted
    return calls


@pytest.mark.parametrize("checkpointing, calls_per_layer", [(True, 2), (False, 1)])
def test_grpo_step_recomputes_layers_with_checkpointing(hub_path, checkpointing, calls_per_layer):
    model = engine.load_model(hub_path, CPU, gradient_checkpointing=checkpointing)
    tokenizer = engine.load_tokenizer(hub_path)
    engine.sample(model, tokenizer, ["a"], max_new_tokens=2)  # sampling switches to eval mode and back
    model.eval()  # and so may evaluation: the training step must not depend on what ran before
    rollouts = {"prompt_ids": [[5, 6, 7]] * 2, "completion_ids": [[8, 9], [10, 11, 12]], "advantages": [1.0, -1.0],
                "in_pg": [True, True], "in_sft": [False, False]}
    args = expo_grpo.Args(model=hub_path, beta=0.0, micro_batch_size=2)
    calls = count_layer_calls(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    expo_grpo.train_on_rollouts(model, None, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
                                rollouts, args, tokenizer.pad_token_id)
    assert calls[0] == calls_per_layer * len(model.model.layers)  # one micro-batch: forward (+ recompute)


def test_dpo_step_recomputes_layers_with_checkpointing(hub_path):
    model = engine.load_model(hub_path, CPU, gradient_checkpointing=True).eval()
    tokenizer = engine.load_tokenizer(hub_path)
    pair = {"qid": 0, "question": "q", "chosen_ids": [8, 9, 2], "rejected_ids": [10, 11],
            "ref_chosen_logp": -1.0, "ref_rejected_logp": -1.0}
    calls = count_layer_calls(model)
    expo_dpo.dpo_backward(model, tokenizer, [pair], 0.1, 0, 1, 1, CPU)
    assert calls[0] == 2 * len(model.model.layers)


def test_training_mode_adds_no_dropout(hub_path):
    model = engine.load_model(hub_path, CPU, gradient_checkpointing=True)
    assert model.training
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    a = engine.token_logprobs(model, ids, torch.ones_like(ids))
    b = engine.token_logprobs(model, ids, torch.ones_like(ids))
    assert torch.equal(a, b)  # two training-mode passes agree: no dropout anywhere


# ---------------------------------------------------------------- fix 2 and 6: sampling ignores the checkpoint's defaults


def test_sampling_draws_from_softmax_over_t_whatever_the_generation_config_says(hub_path, monkeypatch):
    """The fixture's generation_config asks for top_k 20, top_p 0.8, repetition penalty 1.05 at T 0.7; sample()
    at T = 30 (the random fixture's logits are peaked: a high T spreads them) must draw from softmax(logits / 30)
    all the same, and never through model.generate."""
    model = engine.load_model(hub_path, CPU).eval()
    tokenizer = engine.load_tokenizer(hub_path)
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("generate() applies generation_config"))
    prompt = common.question_prompt(tokenizer, "What is 2+3?")
    torch.manual_seed(0)
    out = engine.sample(model, tokenizer, [prompt], n=3000, max_new_tokens=1, temperature=30.0, micro_batch_size=3000)
    with torch.no_grad():
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        want = torch.softmax(model(ids).logits[0, -1].float() / 30.0, -1)
    got = torch.bincount(torch.tensor([c[0] for c in out["completion_ids"]]), minlength=len(want)).float()
    # 10 bins of about equal mass under softmax(logits / T): each should hold ~300 of the 3000 draws
    order = want.argsort()
    bins = (want[order].cumsum(0) * 10).clamp(max=9.999).long()
    expected = torch.zeros(10).index_add_(0, bins, want[order]) * 3000
    counts = torch.zeros(10).index_add_(0, bins, got[order])
    assert ((counts - expected).abs() < 5 * expected.sqrt() + 5).all(), (counts, expected)
    assert int((got > 0).sum()) > 20  # top_k 20 of the generation_config would allow 20 tokens at most


def test_sampling_stops_at_every_end_token_the_checkpoint_declares(hub_path):
    model = engine.load_model(hub_path, CPU).eval()
    tokenizer = engine.load_tokenizer(hub_path)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert engine.end_token_ids(model, tokenizer) == [im_end, endoftext]
    def end_often(module, inputs, logits):  # <|endoftext|> (also the pad token) likely at every step, <|im_end|> never
        logits[..., :] = 0.0
        logits[..., endoftext], logits[..., im_end] = 2.0, float("-inf")
        return logits

    model.lm_head.register_forward_hook(end_often)
    out = engine.sample(model, tokenizer, ["a", "bb c"], n=8, max_new_tokens=30, temperature=1.0)
    for ids, ended in zip(out["completion_ids"], out["eos"]):
        ends = [k for k, t in enumerate(ids) if t in (im_end, endoftext)]
        assert ended == bool(ends) and ends in ([], [len(ids) - 1])  # cut at the first end token, nothing after
    assert any(ids[-1] == endoftext for ids in out["completion_ids"])  # the second end token ended some


# ---------------------------------------------------------------- fix 3: responses are the sampled token ids


def stub_sampler(by_prompt):
    """`sample()`'s dict from canned responses: by_prompt(prompt) -> [(text, ids, ended)] * n."""
    def sampler(prompts, n):
        out = {"texts": [], "completion_ids": [], "eos": []}
        for p in prompts:
            for text, ids, ended in by_prompt(p)[:n]:
                out["texts"].append(text)
                out["completion_ids"].append(ids)
                out["eos"].append(ended)
        return out
    return sampler


@pytest.mark.parametrize("policy, expect_pair", [("skip", False), ("keep", True)])
def test_dpo_rejected_prefers_an_ended_wrong_cot(hub_path, policy, expect_pair):
    tokenizer = engine.load_tokenizer(hub_path)
    rows = [(0, {"question": "q0", "answer": "7"}), (1, {"question": "q1", "answer": "7"})]
    cots = {  # q0: a truncated wrong CoT first, then an ended one; q1: only truncated wrong CoTs
        "q0": [("\\boxed{9} and on", [40, 41, 42], False), ("\\boxed{8}", [43, 44, 2], True)],
        "q1": [("\\boxed{9} and on", [50, 51], False), ("\\boxed{1} and", [52, 53], False)],
    }

    def by_prompt(p):
        if "correct final answer" in p:  # explanation prompt
            return [("so \\boxed{7}", [60, 61, 2], True)]
        return cots["q0" if "q0" in p else "q1"]

    pairs, stats = expo_dpo.build_pairs(rows, tokenizer, stub_sampler(by_prompt), num_generations=2,
                                        rejected_truncated=policy)
    by_qid = {p["qid"]: p for p in pairs}
    assert by_qid[0]["rejected_ids"] == [43, 44, 2] and by_qid[0]["rejected_eos"]
    assert by_qid[0]["chosen_ids"] == [60, 61, 2]
    assert (1 in by_qid) == expect_pair and stats["truncated"] == (0 if expect_pair else 1)
    if expect_pair:
        assert by_qid[1]["rejected_ids"] == [50, 51] and not by_qid[1]["rejected_eos"]


def test_dpo_scores_exactly_the_sampled_tokens(hub_path):
    model = engine.load_model(hub_path, CPU).eval()
    tokenizer = engine.load_tokenizer(hub_path)
    pair = {"question": "What is 2+3?", "chosen_ids": [70, 71, tokenizer.eos_token_id], "rejected_ids": [72, 73, 74]}
    chosen, rejected, _ = expo_dpo.sequence_logps(model, tokenizer, [pair], CPU)
    prompt = tokenizer(common.question_prompt(tokenizer, pair["question"]), add_special_tokens=False)["input_ids"]
    for got, response in ((chosen, pair["chosen_ids"]), (rejected, pair["rejected_ids"])):
        with torch.no_grad():  # naive: full logits, log-softmax, one response token at a time
            logits = model(torch.tensor([prompt + response])).logits[0].float()
        want = sum(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[t] for k, t in enumerate(response))
        assert got.item() == pytest.approx(want.item(), abs=1e-4)  # no EOS added to the truncated one


def test_offline_explanations_keep_sampled_ids(tmp_path, hub_path):
    tokenizer = engine.load_tokenizer(hub_path)
    path = write_jsonl(tmp_path / "e.jsonl", [
        {"question": "cut", "explanation": "so", "completion_ids": [80, 81], "verified": 0.0},  # truncated: no EOS
        {"question": "from elsewhere", "explanation": "so \\boxed{3}"},  # text only: a complete answer
    ])
    found = expo_grpo.read_explanations(path, tokenizer)
    assert found[("cut", None)]["completion_ids"] == [80, 81]
    assert found[("from elsewhere", None)]["completion_ids"] == tokenizer("so \\boxed{3}", add_special_tokens=False)[
        "input_ids"] + [tokenizer.eos_token_id]


# ---------------------------------------------------------------- fix 4: offline phases sample only what is used


def test_progress_reports_when_not_a_terminal(capsys):
    """In a log (not a terminal) a phase shows only once it has lasted `every` seconds, then with its count."""
    import time

    bar = engine.progress(None, "pairs", total=3, every=0.05)
    bar.update()
    assert capsys.readouterr().out == ""  # too short to show
    time.sleep(0.1)
    bar.update()
    assert "pairs" in capsys.readouterr().out
    bar.close()
    assert "3/3" not in capsys.readouterr().out  # closing a bar that never finished does not invent a count
    bar = engine.progress(range(3), "quick", every=30.0)
    assert list(bar) == [0, 1, 2] and capsys.readouterr().out == ""


def test_offline_dpo_builds_pairs_only_for_the_steps_it_runs(tmp_path, hub_path):
    out = str(tmp_path / "run")
    proc = run_torchrun("expo_dpo.py", [
        "--model", hub_path, "--dataset", "synthetic", "--regen_every", "0", "--max_steps", "1", "--batch_size", "4",
        "--micro_batch_size", "1", "--num_generations", "2", "--max_new_tokens", "8", "--chosen", "expert",
        "--output_dir", out], timeout=240)
    assert "pairs from 4 questions" in proc.stdout  # not from the 2000 questions of the data set


# ---------------------------------------------------------------- fix 5 and 7: the CLI on the hub-shaped checkpoint


def test_grpo_cli_on_hub_checkpoint_exports_bf16_with_its_generation_config(tmp_path, hub_path):
    from safetensors import safe_open

    data = write_jsonl(tmp_path / "math.jsonl", math_rows(8))
    out = str(tmp_path / "run")
    run_torchrun("expo_grpo.py", [
        "--model", hub_path, "--dataset", data, "--batch_size", "2", "--num_generations", "2",
        "--max_new_tokens", "8", "--max_steps", "1", "--micro_batch_size", "4", "--output_dir", out], timeout=240)
    with safe_open(os.path.join(out, "hf", "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    src, exported = (json.load(open(os.path.join(d, "generation_config.json"))) for d in (hub_path, out + "/hf"))
    for key in ("eos_token_id", "pad_token_id", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty"):
        assert exported[key] == src[key], key
    assert json.load(open(os.path.join(out, "hf", "config.json")))["dtype"] == "bfloat16"


def test_data_without_levels_is_trained_on_unless_levels_are_asked_for(tmp_path, hub_path):
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(8))
    rows, stats = common.load_problems(data, levels=[5])  # the trainer's default levels, not the user's
    assert len(rows) == 8 and stats["no_levels"] == 8
    with pytest.raises(ValueError, match="--levels 5 keeps none of its 8 rows.*`all`"):
        common.load_problems(data, levels=[5], levels_flag="--levels 5")
    out = str(tmp_path / "run")
    proc = run_torchrun("expo_grpo.py", [
        "--model", hub_path, "--dataset", data, "--batch_size", "2", "--num_generations", "2", "--max_new_tokens", "4",
        "--max_steps", "1", "--save_every", "0", "--output_dir", out], nproc=1, timeout=240)
    assert "data: 8 questions" in proc.stdout


def test_a_model_that_cannot_be_loaded_is_one_line(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", math_rows(4))
    proc = subprocess.run(
        [sys.executable, "expo_grpo.py", "--model", "no-such-org/no-such-model", "--dataset", data,
         "--batch_size", "2", "--output_dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("expo_grpo.py: error: cannot load the tokenizer of 'no-such-org/no-such-model'")


# ---------------------------------------------------------------- bf16 compute on CPU


def test_bf16_steps_are_finite_and_close_to_fp32(tmp_path, hub_path):
    """One ExP-GRPO and one ExP-DPO step under FSDP2 with bf16 compute (MixedPrecisionPolicy: bf16 parameters,
    fp32 reduction and master weights) against the same steps in fp32, on 2 gloo ranks."""
    run_torchrun(os.path.join("tests", "workers", "bf16_worker.py"), [hub_path, str(tmp_path)], timeout=240)
    res = {k: json.load(open(tmp_path / f"{k}.json")) for k in ("fp32", "bf16")}
    for key in ("grpo_sft_loss", "dpo_logps_chosen", "dpo_logps_rejected"):
        a, b = res["fp32"][key], res["bf16"][key]
        assert all(map(lambda x: x == x and abs(x) < float("inf"), (a, b))), key
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2% per value): a sum of per-token
        # log-probs over ~a hundred tokens through two layers stays within 2% of fp32
        assert b == pytest.approx(a, rel=0.02), key
    assert res["bf16"]["grpo_grad_norm"] == pytest.approx(res["fp32"]["grpo_grad_norm"], rel=0.05)
    assert res["bf16"]["param_dtype"] == "torch.float32"  # master weights stay fp32
    assert res["bf16"]["compute_dtype"] == "torch.bfloat16"
