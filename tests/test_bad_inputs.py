"""Every bad input of issue 19 (items 5-6): one clear line before any model is loaded, or a counted, logged skip;
never a traceback, never a silent change of meaning. Each case runs the real script, as a user meets it: a bad
input costs one Python start (a few seconds), since it is refused before any model loads.

Each test failed before the fix it checks.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ENV, ROOT, SHARED_DATA, math_rows, read_jsonl, run_torchrun, write_jsonl

import common
import engine
import runs

TINY = ["--model", "tiny", "--dataset", "synthetic", "--batch_size", "4"]


def cli(script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=300)


def one_line(proc, code: int = 1) -> str:
    """The single line a refused command prints on stderr (after checking there is one, and no traceback)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in proc.stderr, \
        (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_path):
    """Damaged or unusual inputs, each in its own path: data files, explanation files, model folders."""
    d = tmp_path_factory.mktemp("bad")
    rows = math_rows(8)
    write_jsonl(d / "math8.jsonl", rows)
    with open(d / "latin1.jsonl", "wb") as f:  # a file saved in Latin-1, as an old editor writes it
        f.writelines((json.dumps(r) + "\n").encode() for r in rows[:3])
        f.write('{"problem": "Un caf\xe9 co\xfbte 3 euros. Combien co\xfbtent 2 caf\xe9s ?", '
                '"solution": "\\\\boxed{6}"}\n'.encode("latin-1"))
    write_jsonl(d / "mixed.jsonl", rows[:4] + [
        {"question": "Tom has 3 apples. How many?", "answer": "He has 3 apples.\n#### "},  # GSM8K, nothing after ####
        {"problem": "What is 2 + 2?", "answer": "We add the two numbers: \\boxed{}"},  # a solution with an empty box
        {"problem": "What is 1 + 1? " * 3000, "solution": "\\boxed{2}", "level": "Level 5"},  # longer than the context
    ])
    q = [r["problem"] for r in rows]
    (d / "expl_bad_json.jsonl").write_text(json.dumps({"question": q[0], "explanation": "so \\boxed{1}"})
                                           + "\n\n{\"question\": oops\n")
    write_jsonl(d / "expl_no_key.jsonl", [{"question": q[0], "explanation": "x"}, {"question": q[1], "text": "x"}])
    write_jsonl(d / "expl_none.jsonl", [{"question": "A question of another data set?", "explanation": "x"}])
    write_jsonl(d / "expl_some.jsonl", [{"question": r["problem"], "explanation": r["solution"]} for r in rows[:3]])

    def model_dir(name, keep=lambda f: True):
        path = d / name
        path.mkdir()
        for f in os.listdir(tiny_path):
            if keep(f) and not f.endswith(".lock"):
                shutil.copy(os.path.join(tiny_path, f), path)
        return str(path)

    paths = {"DIR": str(d), "NOTOK": model_dir("no_tokenizer", lambda f: not f.startswith(("tokenizer", "chat"))),
             "CUT": model_dir("cut_weights")}
    os.truncate(os.path.join(paths["CUT"], "model.safetensors"), 100_000)
    # models whose logits are more than hidden @ lm_head.weight: Phi's lm_head has a bias, Gemma 2 soft-caps
    from transformers import Gemma2Config, Gemma2ForCausalLM, PhiConfig, PhiForCausalLM

    small = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=256)
    for key, model in (("BIAS", PhiForCausalLM(PhiConfig(**small))),
                       ("SOFTCAP", Gemma2ForCausalLM(Gemma2Config(**small, num_key_value_heads=1, head_dim=16)))):
        paths[key] = model_dir(key.lower(), lambda f: f.startswith(("tokenizer", "chat")))
        model.save_pretrained(paths[key])
    return paths


# ---------------------------------------------------------------- flags: one argparse-style line, exit code 2


@pytest.mark.parametrize("script, flags, words", [
    ("expo_grpo.py", ["--no_such_flag", "1"], "expo_grpo.py: error: unrecognized arguments: --no_such_flag 1"),
    ("expo_dpo.py", ["--no_such_flag"], "expo_dpo.py: error: unrecognized arguments: --no_such_flag"),
    ("eval.py", ["--no_such_flag"], "eval.py: error: unrecognized arguments: --no_such_flag"),
    ("expo_grpo.py", TINY + ["--lr", "nan"], "expo_grpo.py: error: --lr nan is not a finite number"),
    ("expo_grpo.py", TINY + ["--temperature", "nan"], "expo_grpo.py: error: --temperature nan is not a finite number"),
    ("expo_dpo.py", TINY + ["--beta", "inf"], "expo_dpo.py: error: --beta inf is not a finite number"),
    ("eval.py", ["--temperature", "nan"], "eval.py: error: --temperature nan is not a finite number"),
    ("expo_grpo.py", ["--bf16", "maybe"], "expo_grpo.py: error: argument --bf16: Truthy value expected"),
])
def test_a_bad_flag_is_one_argparse_line(script, flags, words):
    line = one_line(cli(script, *flags), code=2)
    assert line.startswith(words), line


def test_bf16_bare_as_the_readme_writes_it(monkeypatch):
    import expo_grpo

    for argv, want in (([], None), (["--bf16"], True), (["--bf16", "--lr", "1e-5"], True), (["--bf16", "false"], False)):
        monkeypatch.setattr(sys, "argv", ["expo_grpo.py", *argv])
        assert runs.parse_flags(expo_grpo.Args, "expo_grpo.py").bf16 is want, argv
    # through the CLI: the bare flag is taken, and the run goes on to its next check
    line = one_line(cli("expo_grpo.py", *TINY, "--bf16", "--num_generations", "1"))
    assert line == "expo_grpo.py: error: --num_generations must be >= 2: a group of one has no advantage"


@pytest.mark.parametrize("script, flags, words", [
    ("expo_grpo.py", TINY + ["--output_dir", "/proc/expo_run"], "output directory '/proc/expo_run' cannot be written"),
    ("eval.py", ["--output_dir", "/proc/expo_eval"], "output directory '/proc/expo_eval' cannot be written"),
    ("eval.py", ["--max_new_tokens", "0"], "eval.py: error: --max_new_tokens must be >= 1, got 0"),
    ("eval.py", ["--num_samples", "0"], "eval.py: error: --num_samples must be >= 1, got 0"),
    ("expo_grpo.py", TINY + ["--max_new_tokens", "4096"],
     "expo_grpo.py: error: --max_new_tokens 4096 leaves no room for a prompt in the model's context of 2048 positions"),
])
def test_a_flag_that_cannot_work_is_one_line(script, flags, words, tmp_path, tiny_path):
    flags = flags if "--output_dir" in flags or script == "eval.py" else flags + ["--output_dir", tmp_path / "run"]
    line = one_line(cli(script, *flags))
    assert words in line and "--ks" not in line, line  # --num_samples 0 used to blame --ks


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path):
    hidden = tmp_path / "site" / "matplotlib"  # an installed package that fails to import, as a missing one does
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'matplotlib'\")\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    proc = cli("eval.py", "plot", run, "--out", tmp_path / "curves.png",
               env={"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"})
    assert "pip install matplotlib" in one_line(proc) and not (tmp_path / "curves.png").exists()


# ---------------------------------------------------------------- model folders and the hub


def test_a_model_folder_without_a_tokenizer(files, tmp_path):
    line = one_line(cli("expo_grpo.py", *TINY, "--model", files["NOTOK"], "--output_dir", tmp_path / "run"))
    assert line.startswith(f"expo_grpo.py: error: cannot load the tokenizer of '{files['NOTOK']}': the folder has none "
                           "of tokenizer.json"), line


@pytest.mark.parametrize("script", ["expo_grpo.py", "eval.py"])
def test_a_cut_short_weights_file(files, tmp_path, script):
    flags = ["--model", files["CUT"], "--dataset", "synthetic", "--output_dir", tmp_path / "run"]
    line = one_line(cli(script, *flags, *(["--batch_size", "4"] if script != "eval.py" else [])))
    assert line.startswith(f"{script}: error: cannot load the model of '{files['CUT']}': Error while deserializing "
                           "header") and "cut short" in line, line


def test_the_default_command_offline(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}  # a hub that cannot be reached, no cache
    line = one_line(cli("expo_grpo.py", "--output_dir", tmp_path / "run", env=offline))
    assert line.startswith("expo_grpo.py: error: cannot load the tokenizer of 'Qwen/Qwen2.5-3B-Instruct'") \
        and "no network?" in line, line
    line = one_line(cli("expo_dpo.py", "--model", "tiny", "--output_dir", tmp_path / "run", env=offline))
    assert line.startswith("expo_dpo.py: error: cannot load the dataset 'DigitalLearningGmbH/MATH-lighteval'") \
        and "no network?" in line, line


@pytest.mark.parametrize("script", ["expo_grpo.py", "expo_dpo.py"])
@pytest.mark.parametrize("kind, words", [("BIAS", "has a bias in its lm_head"),
                                         ("SOFTCAP", "soft-caps its logits (final_logit_softcapping 30.0)")])
def test_a_model_whose_logits_are_more_than_its_head_weight_is_refused(files, tmp_path, script, kind, words):
    proc = cli(script, "--model", files[kind], "--dataset", "synthetic", "--batch_size", "4", "--max_new_tokens", "16",
               "--output_dir", tmp_path / "run")
    line = one_line(proc)
    assert line.startswith(f"{script}: error: model '{files[kind]}' {words}") and "Qwen2.5" in line, line


def test_a_tokenizer_without_a_chat_template(files, tmp_path):
    path = tmp_path / "no_template"
    shutil.copytree(files["CUT"], path)
    os.remove(path / "chat_template.jinja")
    with pytest.raises(engine.LoadError, match="has no chat template"):
        engine.load_tokenizer(str(path))


# ---------------------------------------------------------------- data rows: skipped and counted, or one line


def test_rows_without_a_gold_answer_or_too_long_are_skipped_and_counted(files, tmp_path):
    # the data line of a run holds the counts; here the batch cannot be filled, so the run stops before any model
    line = one_line(cli("expo_grpo.py", "--model", "tiny", "--dataset", os.path.join(files["DIR"], "mixed.jsonl"),
                        "--levels", "all", "--batch_size", "8", "--output_dir", tmp_path / "run"))
    assert line == ("expo_grpo.py: error: 4 training questions ({'no_answer': 2, 'too_long': 1, 'kept': 4}) cannot "
                    "fill --batch_size 8"), line
    tokenizer = engine.load_tokenizer("tiny")
    fits = common.prompt_fits(tokenizer, engine.context_length("tiny"), 32, with_answer=True)
    rows, stats = common.load_problems(os.path.join(files["DIR"], "mixed.jsonl"), fits=fits)
    assert len(rows) == 4 and stats["no_answer"] == 2 and stats["too_long"] == 1
    assert common.normalize_row({"question": "q", "answer": "so #### "}) is None  # gold "None" before
    worked = common.normalize_row({"problem": "q", "answer": "We add: 2 + 2 = \\boxed{4}"})
    assert worked["answer"] == "4" and worked["solution"] == "We add: 2 + 2 = \\boxed{4}"  # the whole text before


def test_a_six_megabyte_question_is_skipped_without_tokenizing_it():
    tokenizer = engine.load_tokenizer("tiny")
    fits = common.prompt_fits(tokenizer, 2048, 32, with_answer=False)
    huge = {"question": "What is 1 + 1? " * 400_000, "answer": "2"}
    assert fits([huge, {"question": "What is 1 + 1?", "answer": "2"}]) == [False, True]


@pytest.mark.parametrize("script", ["expo_grpo.py", "eval.py"])
def test_a_data_file_that_is_not_utf8_names_file_and_line(files, tmp_path, script):
    data = os.path.join(files["DIR"], "latin1.jsonl")
    flags = ["--model", "tiny", "--dataset", data, "--output_dir", tmp_path / "run"]
    line = one_line(cli(script, *flags, *(["--batch_size", "2"] if script != "eval.py" else [])))
    assert line == f"{script}: error: {data} line 4: not UTF-8 text (byte 0xe9); save the file as UTF-8", line


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="no real data in ../shared/data")
def test_real_data_keeps_every_row_and_its_gold():
    for name, count in (("math/test.jsonl", 5000), ("gsm8k/test.jsonl", 1319), ("math500/test.jsonl", 500)):
        rows, stats = common.load_problems(os.path.join(SHARED_DATA, name))
        assert len(rows) == count and stats == {"kept": count}, stats
        assert not any(r["answer"] == "None" or len(r["answer"]) > 200 for r in rows)


# ---------------------------------------------------------------- --explanations FILE, before the model loads


@pytest.mark.parametrize("name, words", [
    ("expl_bad_json.jsonl", "expl_bad_json.jsonl line 3: not JSON"),
    ("expl_no_key.jsonl", "expl_no_key.jsonl line 2: a record must be a JSON object with string `question` and "
                          "`explanation` fields"),
    ("expl_none.jsonl", "expl_none.jsonl explains none of the run's 8 questions"),
])
def test_a_bad_explanations_file_is_one_line(files, tmp_path, name, words):
    line = one_line(cli("expo_grpo.py", "--model", "tiny", "--dataset", os.path.join(files["DIR"], "math8.jsonl"),
                        "--levels", "all", "--batch_size", "4", "--explanations", os.path.join(files["DIR"], name),
                        "--output_dir", tmp_path / "run"))
    assert line.startswith("expo_grpo.py: error: ") and words in line, line


def test_an_explanations_file_that_covers_some_questions_says_how_many(files, tmp_path):
    path = os.path.join(files["DIR"], "expl_some.jsonl")
    proc = cli("expo_grpo.py", "--model", "tiny", "--dataset", os.path.join(files["DIR"], "math8.jsonl"), "--levels",
               "all", "--batch_size", "8", "--num_generations", "2", "--max_new_tokens", "4", "--max_steps", "1",
               "--save_every", "0", "--probe_every", "0", "--explanations", path, "--output_dir", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"self-explanations ({path}, which explains 3 of the run's 8 questions, check: answer)" in proc.stdout


# ---------------------------------------------------------------- resume, and what an FSDP run prints


def test_resuming_online_dpo_offline_names_the_flag(tmp_path):
    flags = ["--model", "tiny", "--dataset", "synthetic", "--chosen", "expert", "--batch_size", "2",
             "--micro_batch_size", "1", "--num_generations", "2", "--max_new_tokens", "8", "--rejected_truncated", "keep",
             "--max_steps", "1", "--save_every", "1", "--output_dir", tmp_path / "run"]
    assert cli("expo_dpo.py", *flags).returncode == 0
    line = one_line(cli("expo_dpo.py", *flags, "--regen_every", "0", "--resume"))
    assert "--regen_every 1 -> 0" in line and "offline pairs" not in line, line


def test_an_fsdp_run_prints_no_view_warning_and_no_loading_bars(tmp_path, tiny_path):
    proc = run_torchrun("expo_grpo.py", ["--model", "tiny", "--dataset", "synthetic", "--levels", "1-2", "--batch_size",
                                         "4", "--num_generations", "2", "--max_new_tokens", "8", "--max_steps", "1",
                                         "--output_dir", str(tmp_path / "run")])
    out = proc.stdout + proc.stderr
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]["step"] == 1  # it trained, and exported (hf/)
    for noise in ("returned a view tensor", "Loading weights", "Writing model shards", "it/s]"):
        assert noise not in out, noise
