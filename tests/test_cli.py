"""One name per concept across the three scripts, and the README's flag tables against `--help` (issue 12)."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

import eval as ev
import expo_dpo
import expo_grpo

# fields both trainers have whose default or meaning is the algorithm's own (appendix C.1 gives each its own)
ALGORITHM_DEFAULTS = {"levels", "lr", "warmup_ratio", "beta", "micro_batch_size", "epochs", "output_dir",
                      "num_generations"}


def fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def test_shared_trainer_fields_have_one_default_and_one_help():
    grpo, dpo = fields(expo_grpo.Args), fields(expo_dpo.Args)
    shared = sorted(set(grpo) & set(dpo))
    assert len(shared) >= 30, shared  # model, data, sampling, optimisation, checkpoints, evaluation
    for name in shared:
        if name not in ALGORITHM_DEFAULTS:
            assert default(grpo[name]) == default(dpo[name]), name
        assert grpo[name].metadata["help"] == dpo[name].metadata["help"] or name in ALGORITHM_DEFAULTS, name


@pytest.mark.parametrize("cls", [expo_grpo.Args, expo_dpo.Args])
def test_a_trainers_eval_flag_is_eval_pys_flag(cls):
    theirs = fields(ev.Args)
    for name in fields(cls):
        if name.startswith("eval_") and name != "eval_every":
            assert name[len("eval_"):] in theirs, f"--{name} has no --{name[len('eval_'):]} in eval.py"
    # the names the three scripts share mean the same
    for name in ("output_dir", "dataset_config", "gen_batch_size", "limit", "levels", "seed", "max_new_tokens"):
        assert name in theirs and name in fields(cls), name


@pytest.mark.parametrize("cls", [expo_grpo.Args, expo_dpo.Args, ev.Args])
def test_help_texts_are_short_and_name_no_path_outside_the_repository(cls):
    for f in dataclasses.fields(cls):
        text = f.metadata["help"]
        assert len(text) <= 160, (f.name, len(text))  # two lines of a terminal at most
        assert "../" not in text, f.name


def readme_flag_rows(section: str) -> dict[str, str]:
    """`| `--flag` | default | meaning |` rows of the README table under `section`: flag -> default cell."""
    text = open(os.path.join(ROOT, "README.md")).read()
    table = text[text.index(section):].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        flags = re.findall(r"`--(\w+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(",")]
        for flag, value in zip(flags, defaults if len(defaults) == len(flags) else defaults * len(flags)):
            rows[flag] = value.strip("`")
    return rows


@pytest.mark.parametrize("section, cls", [("### Flags that matter (expo_grpo.py)", expo_grpo.Args),
                                          ("### Flags that matter (expo_dpo.py)", expo_dpo.Args)])
def test_readme_flag_tables_match_the_scripts(section, cls):
    rows = readme_flag_rows(section)
    assert len(rows) >= 8
    ours = fields(cls)
    for flag, value in rows.items():
        assert flag in ours, f"README names --{flag}, which {cls.__module__} does not have"
        want = default(ours[flag])
        if value.startswith("("):  # decided at run time, e.g. "(on GPU)": the field itself is empty
            assert want in ("", None), (flag, value, want)
        elif value in ("off", "on"):
            assert want == (value == "on") or (value == "off" and want in (0, None)), (flag, value, want)
        else:
            assert str(want) == value or (isinstance(want, float) and float(value) == want), (flag, value, want)


@pytest.mark.parametrize("script", ["expo_grpo.py", "expo_dpo.py", "eval.py"])
def test_help_runs(script):
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--output_dir" in proc.stdout and "--gen_batch_size" in proc.stdout
