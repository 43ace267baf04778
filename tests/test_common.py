"""common.py: answers and their verification, data (rows, files, levels, batches), and the prompts."""

import json
import os

import pytest

import common
import toy
from conftest import SHARED_DATA

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
