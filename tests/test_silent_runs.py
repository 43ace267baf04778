"""Issue 26: inputs that used to do the wrong thing without a word. Each case runs the real script as a user meets
it and failed before its fix: a stale explanation cache, level ranges that meant "all", an evaluation on the
training rows, an arm whose positive samples do not exist, flags the chosen arm ignores, Ctrl-C, a resume with the
other trainer, completions cut at --max_new_tokens."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import common
from conftest import ENV, ROOT, math_rows, read_jsonl, torchrun_cmd, write_jsonl
from test_bad_inputs import cli, one_line

SMALL = ["--batch_size", "4", "--num_generations", "2", "--max_new_tokens", "8", "--max_steps", "1", "--save_every",
         "0", "--probe_every", "0"]


def grpo(data, out, *flags, env=None):
    proc = cli("expo_grpo.py", "--model", "tiny", "--dataset", data, "--levels", "all", *SMALL, *flags,
               "--output_dir", out, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- 1. the explanation cache


def test_the_explanation_cache_finds_a_question_only_with_its_gold_answer(tmp_path):
    rows = math_rows(4)
    wrong = [{**r, "solution": r["solution"].replace("\\boxed{", "\\boxed{9")} for r in rows]  # every answer wrong
    env = {"EXPO_CACHE": str(tmp_path / "cache")}
    first = grpo(write_jsonl(tmp_path / "wrong.jsonl", wrong), tmp_path / "a", env=env)
    assert "0 cached, 4 sampled now" in first.stdout
    # the answers mended: the explanations written for the wrong answers must not be reused
    fixed = grpo(write_jsonl(tmp_path / "fixed.jsonl", rows), tmp_path / "b", env=env)
    assert "0 cached, 4 sampled now" in fixed.stdout, fixed.stdout
    again = grpo(tmp_path / "fixed.jsonl", tmp_path / "c", env=env)
    assert "4 cached, 0 sampled now" in again.stdout
    # the run says where the cache is (README: how to clear it); it holds both answers' explanations
    cache = [line for line in again.stdout.splitlines() if "sampled now ->" in line][0].split("-> ")[1]
    assert cache.startswith(str(tmp_path / "cache" / "explanations"))
    gold = {common.normalize_row(r)["answer"] for r in rows}
    assert sorted(r["answer"] for r in read_jsonl(cache)) == sorted(gold | {"9" + a for a in gold})


# ---------------------------------------------------------------- 3. level ranges


@pytest.mark.parametrize("script, flags, words", [
    ("expo_grpo.py", ["--levels", "7-3"], "--levels 7-3: a range runs from low to high (3-7)"),
    ("expo_dpo.py", ["--levels", "6-5"], "--levels 6-5: a range runs from low to high (5-6)"),
    ("expo_grpo.py", ["--levels", "x"], "--levels x: give all, a level (5), a range (3-5) or a list (1,3-5)"),
    ("expo_grpo.py", ["--eval_every", "1", "--eval_levels", "3-1"], "--eval_levels 3-1: a range runs from low to high"),
    ("expo_dpo.py", ["--levels", "1,,2"], "--levels 1,,2: give all, a level (5), a range (3-5) or a list (1,3-5)"),
])
def test_a_level_range_that_means_nothing_is_one_line(script, flags, words, tmp_path):
    line = one_line(cli(script, "--model", "tiny", "--dataset", "synthetic", "--batch_size", "4", *flags,
                        "--output_dir", tmp_path / "run"))
    assert line.startswith(f"{script}: error: ") and words in line, line


# ---------------------------------------------------------------- 4. evaluation data of a local file


@pytest.mark.parametrize("script", ["expo_grpo.py", "expo_dpo.py"])
def test_periodic_evaluation_of_a_local_file_needs_its_own_questions(script, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", math_rows(8))
    line = one_line(cli(script, "--model", "tiny", "--dataset", data, "--levels", "all", "--batch_size", "4",
                        "--eval_every", "1", "--output_dir", tmp_path / "run"))
    assert "--eval_dataset" in line and "no test split" in line, line
    # with evaluation questions of its own, the run starts (and fails later only for want of a flag given here)
    held_out = write_jsonl(tmp_path / "test.jsonl", math_rows(4, seed=1))
    proc = cli(script, "--model", "tiny", "--dataset", data, "--levels", "all", "--batch_size", "4", "--eval_every",
               "1", "--eval_dataset", held_out, "--num_generations", "1", "--output_dir", tmp_path / "run")
    assert "no test split" not in proc.stderr


# ---------------------------------------------------------------- 5. positive samples that do not exist, ignored flags


def test_expert_positives_need_solutions(tmp_path):
    bare = [{"question": r["problem"], "answer": "7"} for r in math_rows(8)]  # an answer, no solution
    line = one_line(cli("expo_grpo.py", "--model", "tiny", "--dataset", write_jsonl(tmp_path / "bare.jsonl", bare),
                        "--levels", "all", "--batch_size", "4", "--sft_source", "expert", "--output_dir", tmp_path / "r"))
    assert "none of the run's 8 questions has a solution" in line, line
    line = one_line(cli("expo_dpo.py", "--model", "tiny", "--dataset", tmp_path / "bare.jsonl", "--batch_size", "4",
                        "--chosen", "expert", "--output_dir", tmp_path / "d"))
    assert "none of the run's 8 questions has a solution" in line, line
    some = bare[:5] + [{"problem": r["problem"], "solution": r["solution"]} for r in math_rows(3, seed=2)]
    proc = grpo(write_jsonl(tmp_path / "some.jsonl", some), tmp_path / "s", "--sft_source", "expert",
                "--batch_size", "8")
    assert "warning: 5 of the run's 8 questions have no solution: they get no SFT term" in proc.stdout


def test_flags_the_arm_ignores_are_named(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", math_rows(4))
    proc = grpo(data, tmp_path / "r", "--sft_source", "none", "--sft_coef", "0.5", "--explanations", "online")
    assert "warning: --sft_coef 0.5, --explanations online do nothing with --sft_source none" in proc.stdout
    proc = grpo(data, tmp_path / "e", "--sft_source", "expert", "--explanations", "online", "--overwrite_output_dir")
    assert "warning: --explanations online does nothing with --sft_source expert" in proc.stdout
    quiet = grpo(data, tmp_path / "q", "--sft_source", "none")
    assert "nothing with" not in quiet.stdout + quiet.stderr


# ---------------------------------------------------------------- 6. Ctrl-C


def interrupt(cmd, out, signal_group: bool) -> subprocess.CompletedProcess:
    """Start `cmd`, wait for its second logged step, then Ctrl-C it as a terminal does (SIGINT to its group)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        path = os.path.join(out, "metrics.jsonl")
        if os.path.exists(path) and len(read_jsonl(path)) >= 2:
            break
        time.sleep(0.2)
    (os.killpg if signal_group else os.kill)(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


RUN = ["--model", "tiny", "--dataset", "synthetic", "--levels", "1-2", "--batch_size", "4", "--num_generations", "2",
       "--max_new_tokens", "8", "--max_steps", "200", "--save_every", "1", "--probe_every", "0"]


def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path):
    out = str(tmp_path / "run")
    proc = interrupt([sys.executable, "expo_grpo.py", *RUN, "--output_dir", out], out, signal_group=False)
    line = one_line(proc, code=130)
    assert line.startswith("expo_grpo.py: interrupted during step ") and "newest complete checkpoint: " in line, line
    assert line.endswith(f"continue with: python expo_grpo.py {' '.join(RUN)} --output_dir {out} --resume"), line
    checkpoint = line.split("newest complete checkpoint: ")[1].split(";")[0]
    assert os.path.isdir(checkpoint) and os.path.exists(os.path.join(checkpoint, "manifest.json"))


def test_ctrl_c_under_torchrun_prints_no_traceback_from_the_ranks(tmp_path):
    out = str(tmp_path / "run")
    proc = interrupt(torchrun_cmd("expo_grpo.py", [*RUN, "--output_dir", out]), out, signal_group=True)
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("expo_grpo.py: ")]
    assert len(ours) == 1 and "continue with: torchrun --nproc_per_node 2 expo_grpo.py" in ours[0], proc.stderr
    assert "KeyboardInterrupt" not in proc.stderr and 'File "' + os.path.join(ROOT, "expo_grpo.py") not in proc.stderr


# ---------------------------------------------------------------- 7. the other trainer's run, cut completions


def test_resuming_another_trainers_run_says_so(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", math_rows(4))
    grpo(data, tmp_path / "run", "--save_every", "1")
    line = one_line(cli("expo_dpo.py", "--model", "tiny", "--dataset", data, "--batch_size", "4", "--resume",
                        "--output_dir", tmp_path / "run"))
    assert f"{tmp_path / 'run'} holds an expo_grpo.py run: resume it with expo_grpo.py" in line, line


def test_completions_cut_at_max_new_tokens_are_worth_a_word(tmp_path):
    proc = grpo(write_jsonl(tmp_path / "d.jsonl", math_rows(4)), tmp_path / "run", "--max_steps", "2")
    # the tiny model's random weights never end a completion within 8 tokens
    warnings = [ln for ln in proc.stdout.splitlines() if "cut at --max_new_tokens" in ln]
    assert len(warnings) == 1 and "100% of step 1's completions were cut at --max_new_tokens 8" in warnings[0], warnings


def test_a_run_from_before_a_flag_existed_resumes_at_its_default(tmp_path):
    """A run folder written before --positive_in existed has no such key in run_config.json: it ran as the default
    does, so a resume at the default goes on, and one with another value is refused naming the flag."""
    data = write_jsonl(tmp_path / "d.jsonl", math_rows(4))
    grpo(data, tmp_path / "run", "--save_every", "1")
    path = tmp_path / "run" / "run_config.json"
    config = json.loads(path.read_text())
    del config["args"]["positive_in"]
    path.write_text(json.dumps(config))
    grpo(data, tmp_path / "run", "--save_every", "1", "--max_steps", "2", "--resume")
    line = one_line(cli("expo_grpo.py", "--model", "tiny", "--dataset", data, "--levels", "all", *SMALL, "--max_steps",
                        "3", "--positive_in", "group", "--resume", "--output_dir", tmp_path / "run"))
    assert "--positive_in None -> group" in line or "--positive_in sft -> group" in line, line
