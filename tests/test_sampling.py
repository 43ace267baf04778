"""sample(): exactly SPEC's sampling, every declared end token, per-prompt n, no decoding for ended rows.

Each test checks against an independent computation: transformers' own greedy `generate` with a clean
GenerationConfig, softmax(logits / T) from a plain forward pass, or counts made by hand.
Models are random 2-layer, width-64 Qwen2s over a 300-word vocabulary, with a biased lm_head so that the end
tokens come at varied lengths. Runs in a few seconds with OMP_NUM_THREADS=1.
"""

import math
import os

import pytest
import torch
from torch import nn

from conftest import run_torchrun

from engine import end_token_ids, next_tokens, sample

V = 300
PAD, EOS, END2 = 0, 1, 2  # END2: a second end token; in `pad_is_end` models PAD itself is also an end token


def word_tokenizer(pad_is_end: bool = False):
    """A whitespace word-level tokenizer: <pad> 0, <eos> 1, <end2> 2, then w3 .. w299."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<end2>": END2, **{f"w{i}": i for i in range(3, V)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token=None,
                                   additional_special_tokens=["<end2>"])


def tiny_qwen2(bias: dict[int, float] | None = None, gen_eos=(EOS,), seed: int = 0, head_std: float = 0.3):
    """Random Qwen2 (2 layers, width 64). Its lm_head has a bias (`bias`: id -> value) so that end tokens are
    sampled at varied lengths; `gen_eos` is what its generation_config declares as end tokens."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    head = nn.Linear(64, V, bias=True)
    nn.init.normal_(head.weight, std=head_std)
    with torch.no_grad():
        head.bias.zero_()
        for i, b in (bias if bias is not None else {EOS: 3.0}).items():
            head.bias[i] = b
    model.lm_head = head
    model.generation_config = GenerationConfig(eos_token_id=list(gen_eos), pad_token_id=PAD, bos_token_id=None)
    return model.eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(3, V, (n,), generator=g)) for n in lengths]


def reference_greedy(model, tok, prompt: str, max_new: int, end_ids) -> list[int]:
    """transformers' greedy generate, one prompt alone (no padding), clean config, cut at the first end id."""
    from transformers import GenerationConfig

    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=list(end_ids), pad_token_id=PAD)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, ids.shape[1]:]
    out = out.tolist()
    cut = next((k + 1 for k, t in enumerate(out) if t in end_ids), len(out))
    return out[:cut]


def first_token_probs(model, tok, prompt: str, temperature: float) -> torch.Tensor:
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1)


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor, z: float = 3.72) -> tuple[bool, float, float]:
    """Pearson chi-square of `counts` against `probs`, bins with expected < 5 pooled; passes below the
    (Wilson-Hilferty) critical value at p = 1e-4 (z = 3.72)."""
    total = counts.sum().item()
    exp = probs * total
    big = exp >= 5
    obs_b = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    exp_b = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp_b > 0
    assert (obs_b[~keep] == 0).all(), "a token of probability 0 was drawn"
    stat = (((obs_b - exp_b) ** 2) / exp_b)[keep].sum().item()
    k = int(keep.sum()) - 1
    crit = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return stat < crit, stat, crit


def first_token_counts(model, tok, prompt, draws, **kw):
    out = sample(model, tok, [prompt], n=draws, max_new_tokens=1, micro_batch_size=1000, **kw)
    return torch.bincount(torch.tensor([c[0] for c in out["completion_ids"]]), minlength=V)


# --------------------------------------------------------------------------------------------------------


def test_end_token_ids_merges_tokenizer_and_generation_config():
    tok = word_tokenizer()
    assert end_token_ids(tiny_qwen2(gen_eos=(EOS,)), tok) == [EOS]
    assert end_token_ids(tiny_qwen2(gen_eos=(END2, EOS, PAD)), tok) == [EOS, END2, PAD]
    model = tiny_qwen2()
    model.generation_config.eos_token_id = END2  # an int, as many checkpoints write it
    assert end_token_ids(model, tok) == [EOS, END2]


def test_greedy_matches_generate_with_refill_and_mixed_prompt_lengths():
    """12 prompts of lengths 2..9 through a 4-row batch: rows end at varied lengths, leave, and pending prompts
    (of other lengths) are prefilled and merged into the left-padded cache. Each completion must equal
    transformers' greedy generate of that prompt alone."""
    tok, model = word_tokenizer(), tiny_qwen2()
    prompts = prompts_of([2, 9, 3, 7, 5, 4, 8, 6, 2, 9, 5, 3])
    out = sample(model, tok, prompts, n=1, max_new_tokens=24, temperature=0.0, micro_batch_size=4)
    ref = [reference_greedy(model, tok, p, 24, [EOS]) for p in prompts]
    assert out["completion_ids"] == ref
    lengths = [len(c) for c in ref]
    assert min(lengths) < 12 and max(lengths) == 24, lengths  # the case really has varied lengths
    assert out["eos"] == [c[-1] == EOS and len(c) <= 24 and EOS in c for c in ref]
    assert out["prompt_ids"] == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert out["texts"] == tok.batch_decode(ref, skip_special_tokens=True)
    assert out["stats"]["forwards"] > 1 and out["stats"]["mean_rows"] <= 4


def test_greedy_one_micro_batch_different_prompt_lengths():
    """All prompts (lengths 1..10) in one left-padded micro-batch: position ids must count from each row's
    first real token, or the rotary embeddings shift and the greedy tokens change."""
    tok, model = word_tokenizer(), tiny_qwen2(seed=3)
    prompts = prompts_of([1, 10, 4, 7, 2, 9], seed=5)
    out = sample(model, tok, prompts, max_new_tokens=16, temperature=0.0, micro_batch_size=16)
    assert out["completion_ids"] == [reference_greedy(model, tok, p, 16, [EOS]) for p in prompts]
    assert out["stats"]["forwards"] <= 16  # one prefill, then one forward per step of the longest row


def test_first_token_frequencies_follow_softmax_over_temperature():
    tok, model = word_tokenizer(), tiny_qwen2(head_std=0.1)
    prompt = prompts_of([5])[0]
    torch.manual_seed(0)
    counts = first_token_counts(model, tok, prompt, 6000, temperature=0.7)
    ok, stat, crit = chi_square_ok(counts, first_token_probs(model, tok, prompt, 0.7))
    assert ok, (stat, crit)
    # a wrong temperature is rejected by the same test (it has the power to see the difference)
    assert not chi_square_ok(counts, first_token_probs(model, tok, prompt, 1.0))[0]


def test_top_p_keeps_exactly_the_nucleus():
    tok, model = word_tokenizer(), tiny_qwen2(bias={}, head_std=0.2)
    prompt = prompts_of([6], seed=2)[0]
    probs = first_token_probs(model, tok, prompt, 1.0)
    top_p = 0.6
    # the nucleus, by hand: most likely first, until the kept mass reaches top_p
    nucleus, mass = [], 0.0
    for i in probs.argsort(descending=True).tolist():
        nucleus.append(i)
        mass += probs[i].item()
        if mass >= top_p:
            break
    assert 3 <= len(nucleus) < V // 2, len(nucleus)  # a case where the cut matters
    torch.manual_seed(1)
    counts = first_token_counts(model, tok, prompt, 6000, temperature=1.0, top_p=top_p)
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(nucleus)
    renorm = torch.zeros(V, dtype=torch.float64)
    renorm[nucleus] = probs[nucleus] / probs[nucleus].sum()
    ok, stat, crit = chi_square_ok(counts, renorm)
    assert ok, (stat, crit)
    # next_tokens alone, on logits with a known nucleus: p = .5 .3 .15 .05, top_p .79 -> {0, 1}; .81 -> {0, 1, 2}
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    torch.manual_seed(2)
    assert set(next_tokens(logits, 1.0, 0.79).tolist()) == {0, 1}
    assert set(next_tokens(logits, 1.0, 0.81).tolist()) == {0, 1, 2}
    assert set(next_tokens(logits, 1.0, 0.4).tolist()) == {0}
    assert set(next_tokens(logits, 1.0, 1.0).tolist()) == {0, 1, 2, 3}
    assert set(next_tokens(logits, 0.0, 1.0).tolist()) == {0}


def test_next_tokens_draws_from_softmax_over_t_row_by_row():
    """The draw of next_tokens against softmax(logits / T) computed here in float64: two rows with different
    distributions over a 152k-token vocabulary (Qwen2.5's size), each with tokens of probability 0 (-inf logits)
    that are never drawn."""
    g = torch.Generator().manual_seed(0)
    V_big, T, draws = 151936, 0.7, 3000
    logits = torch.randn(2, V_big, generator=g, dtype=torch.float64) * 4
    logits[0, ::3] = float("-inf")  # a third of row 0's vocabulary, the last token included, has probability 0
    logits[1, 1000:] = float("-inf")
    probs = torch.softmax(logits / T, dim=-1)  # (2, V) the reference, in float64
    torch.manual_seed(3)
    rows = logits.float().repeat(100, 1)  # 100 draws per call from each row: (200, V)
    drawn = torch.cat([next_tokens(rows, T, 1.0).view(100, 2) for _ in range(draws // 100)])  # (draws, 2)
    for row in range(2):
        counts = torch.bincount(drawn[:, row], minlength=V_big)
        ok, stat, crit = chi_square_ok(counts, probs[row])
        assert ok, (row, stat, crit)
    assert (drawn[:, 0] % 3 != 0).all() and (drawn[:, 1] < 1000).all()


def test_tokens_below_float32_resolution_of_a_running_sum_are_drawn():
    """Token 0 holds 1 - m of the mass and 65,535 tokens hold 2e-8 each (m = 1.3e-3 in all). After token 0 a
    float32 running sum (~0.9988, spacing 6e-8) rounds each 2e-8 step to 0 or 6e-8: the tokens whose step is 0
    (44,231 of them, 8.8e-4 of the mass, found here from torch's own float32 cumsum) can never be drawn by
    inverting that sum, the others three times too often. Drawn exactly, 4,096 draws hit the rare tokens
    Poisson(5.4) times and the invisible ones Poisson(3.6) times: with this seed fixed numbers, asserted inside
    the Poisson 99.9% ranges; an inverse-CDF draw gives 0 invisible ones whatever the seed."""
    V_rare, p_rare = 65536, 2e-8
    logits = torch.full((V_rare,), math.log(p_rare), dtype=torch.float64)
    logits[0] = math.log(1 - (V_rare - 1) * p_rare)  # softmax of these logits is the distribution above
    rows = logits.float().repeat(256, 1)  # (256, V)
    cdf = torch.softmax(rows[0], -1).cumsum(-1)
    invisible = torch.diff(cdf, prepend=cdf.new_zeros(1)) == 0  # (V,) tokens an inverse-CDF draw cannot reach
    assert 40000 < int(invisible.sum()) < 50000
    torch.manual_seed(1)
    drawn = torch.cat([next_tokens(rows, 1.0, 1.0) for _ in range(16)])  # (4096,)
    assert 1 <= int((drawn != 0).sum()) <= 15
    assert 1 <= int(invisible[drawn].sum()) <= 12


def test_non_finite_logits_raise_a_clear_error_and_minus_inf_entries_are_fine():
    ok = torch.tensor([[0.0, float("-inf"), 1.0]])
    assert next_tokens(ok, 1.0, 1.0).item() in (0, 2)
    for bad in ([float("nan"), 0.0, 1.0], [float("inf"), 0.0, 1.0], [float("-inf")] * 3):
        for t in (0.0, 1.0):
            with pytest.raises(ValueError, match="non-finite logits"):
                next_tokens(torch.tensor([[0.0, 1.0, 2.0], bad]), t, 1.0)


def test_seeded_completions_do_not_depend_on_the_rest_of_the_batch():
    """With `seeds`, a completion is a function of its prompt and its seed: sampled alone, in a batch with other
    prompts, in another order or micro-batch size, it is the same token list; another seed gives other draws."""
    tok, model = word_tokenizer(), tiny_qwen2(bias={EOS: 1.0})
    prompts = prompts_of([3, 8, 5, 2, 6])
    kw = dict(max_new_tokens=20, temperature=1.0)
    alone = [sample(model, tok, [p], seeds=[100 + i], **kw)["completion_ids"][0] for i, p in enumerate(prompts)]
    together = sample(model, tok, prompts, seeds=[100 + i for i in range(5)], micro_batch_size=2, **kw)
    reverse = sample(model, tok, prompts[::-1], seeds=[104 - i for i in range(5)], micro_batch_size=5, **kw)
    assert together["completion_ids"] == alone
    assert reverse["completion_ids"][::-1] == alone
    other = sample(model, tok, prompts, seeds=[200 + i for i in range(5)], **kw)["completion_ids"]
    assert other != alone


def test_checkpoint_generation_config_never_applies():
    """A generation_config with do_sample, top_k 1, temperature 0.1 and repetition_penalty 2.0: the draws still
    follow softmax(logits / T) of the T asked for, and generate (with its logits processors) is never called."""
    tok, model = word_tokenizer(), tiny_qwen2(head_std=0.1)
    model.generation_config.update(do_sample=True, top_k=1, temperature=0.1, top_p=0.05, repetition_penalty=2.0,
                                   no_repeat_ngram_size=1, min_new_tokens=50)
    model.generate = lambda *a, **k: pytest.fail("sample() must not call generate")
    prompt = prompts_of([5])[0]
    torch.manual_seed(3)
    counts = first_token_counts(model, tok, prompt, 6000, temperature=1.0)
    ok, stat, crit = chi_square_ok(counts, first_token_probs(model, tok, prompt, 1.0))
    assert ok, (stat, crit)
    # repetition penalty / no-repeat n-gram would push these down: over longer samples, prompt tokens recur
    out = sample(model, tok, [prompt], n=40, max_new_tokens=30, temperature=1.0)
    assert len(set(map(tuple, out["completion_ids"]))) > 30  # top_k 1 would make them all the same


def test_stops_at_the_second_end_token_which_is_also_pad():
    """Qwen2.5-Instruct's case: generation_config lists <|im_end|> and <|endoftext|>, the latter also the pad
    token. A completion is cut at the first sampled end token, whichever it is, and pad is told from end by
    position only."""
    tok = word_tokenizer()
    model = tiny_qwen2(bias={PAD: 3.0, EOS: -30.0}, gen_eos=(EOS, PAD))  # only the pad-that-is-end gets sampled
    prompts = prompts_of([3, 8, 5, 2, 6, 4])
    out = sample(model, tok, prompts, max_new_tokens=30, temperature=0.0, micro_batch_size=3)
    ref = [reference_greedy(model, tok, p, 30, [EOS, PAD]) for p in prompts]
    assert out["completion_ids"] == ref
    assert any(c[-1] == PAD for c in ref)
    for c, e in zip(out["completion_ids"], out["eos"]):
        assert e == (c[-1] == PAD) and PAD not in c[:-1] and EOS not in c
    # explicit stop_ids override the declared ones: stopping on EOS only, PAD no longer ends anything
    out = sample(model, tok, prompts, max_new_tokens=30, temperature=0.0, stop_ids=[EOS])
    assert all(len(c) == 30 and not e for c, e in zip(out["completion_ids"], out["eos"]))


def test_never_ending_completion_is_cut_at_max_new_tokens_with_eos_false():
    tok, model = word_tokenizer(), tiny_qwen2(bias={EOS: -50.0})
    torch.manual_seed(4)
    out = sample(model, tok, prompts_of([4, 7]), n=3, max_new_tokens=11, temperature=1.0, micro_batch_size=4)
    assert [len(c) for c in out["completion_ids"]] == [11] * 6
    assert out["eos"] == [False] * 6


def test_min_new_tokens_is_honoured():
    tok, model = word_tokenizer(), tiny_qwen2(bias={EOS: 40.0})  # without the floor, EOS comes first
    torch.manual_seed(5)
    free = sample(model, tok, prompts_of([4]), n=8, max_new_tokens=20)
    assert all(len(c) == 1 for c in free["completion_ids"])
    out = sample(model, tok, prompts_of([4, 6]), n=8, max_new_tokens=20, min_new_tokens=7, micro_batch_size=5)
    for c, e in zip(out["completion_ids"], out["eos"]):
        assert EOS not in c[:7] and len(c) == 8 and e and c[-1] == EOS  # the floor, then EOS at once


def test_n_as_list_prompt_major_order_and_determinism():
    tok, model = word_tokenizer(), tiny_qwen2()
    prompts = prompts_of([3, 9, 5])
    torch.manual_seed(6)
    a = sample(model, tok, prompts, n=[2, 0, 3], max_new_tokens=12, micro_batch_size=2)
    p = [tok(x, add_special_tokens=False)["input_ids"] for x in prompts]
    assert a["prompt_ids"] == [p[0], p[0], p[2], p[2], p[2]]
    assert len(a["completion_ids"]) == len(a["texts"]) == len(a["eos"]) == 5
    torch.manual_seed(6)
    b = sample(model, tok, prompts, n=[2, 0, 3], max_new_tokens=12, micro_batch_size=2)
    assert a["completion_ids"] == b["completion_ids"]


def test_zero_prompts_and_zero_new_tokens():
    tok, model = word_tokenizer(), tiny_qwen2()
    out = sample(model, tok, [], n=4)
    assert out["prompt_ids"] == out["completion_ids"] == out["texts"] == out["eos"] == []
    assert out["stats"]["decoded_slots"] == out["stats"]["useful_tokens"] == 0 and out["stats"]["pad_waste"] == 0
    out = sample(model, tok, prompts_of([3]), n=2, max_new_tokens=0)
    assert out["completion_ids"] == [[], []] and out["eos"] == [False, False]


def test_pad_waste_and_decoded_slots_by_hand():
    """Lengths forced to 4 (three tokens, then EOS, which the bias makes certain): 5 rows decode exactly
    5 x 4 slots. On a mixed case every decoded slot is a useful token: no row decodes after it ended."""
    tok, model = word_tokenizer(), tiny_qwen2(bias={EOS: 40.0})
    out = sample(model, tok, prompts_of([3, 6]), n=[2, 3], max_new_tokens=10, min_new_tokens=3, micro_batch_size=2)
    assert [len(c) for c in out["completion_ids"]] == [4] * 5
    s = out["stats"]
    assert s["useful_tokens"] == 20 and s["decoded_slots"] == 20 and s["pad_waste"] == 0.0
    assert s["seconds"] > 0
    tok, model = word_tokenizer(), tiny_qwen2()
    torch.manual_seed(7)
    out = sample(model, tok, prompts_of([2, 5, 9, 4]), n=3, max_new_tokens=40, micro_batch_size=4)
    lengths = [len(c) for c in out["completion_ids"]]
    assert max(lengths) > 2 * min(lengths), lengths
    s = out["stats"]
    assert s["useful_tokens"] == sum(lengths) == s["decoded_slots"]
    assert s["pad_waste"] == pytest.approx(1 - sum(lengths) / s["decoded_slots"]) == 0.0


def test_eval_mode_during_sampling_and_mode_restored():
    tok, model = word_tokenizer(), tiny_qwen2()
    seen = []
    model.model.layers[0].register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    model.train()
    sample(model, tok, prompts_of([3]), n=2, max_new_tokens=4)
    assert seen and not any(seen) and model.training
    model.eval()
    sample(model, tok, prompts_of([3]), n=2, max_new_tokens=4)
    assert not model.training


def test_fsdp_two_ranks_uneven_work_no_collectives_while_decoding(tmp_path):
    """torchrun, 2 gloo ranks, FSDP2-sharded model: rank 1 gets no prompt in the first call and one long
    completion in the second, rank 0 several; a collective while decoding would deadlock (1-minute timeout)
    or fail. Each rank's greedy completions equal generate's on an unsharded copy (tests/workers/sampling_worker.py).
    FSDP's forward hooks, taken off while decoding, are back afterwards (one pre, one post per sharded module),
    and a forward + backward after sampling gives the unsharded copy's gradient."""
    import json

    run_torchrun(os.path.join("tests", "workers", "sampling_worker.py"), [str(tmp_path)], timeout=180)
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r in results:
        assert r["match"], r
        assert r["hooks_back"] and r["hooks"] == [1, 1] and r["grads_match"], r
    assert results[0]["counts"] == [5, 3] and results[1]["counts"] == [0, 1]
