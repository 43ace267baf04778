"""runs.py: a run owns its --output_dir, --resume checks what it resumes, and a damaged checkpoint is skipped
(issue 19, items 1-3). Every case goes through the CLI, where a user meets it; the tiny model, one process, a few
steps.

One finished 3-step run (checkpoints 1-3) is shared: a test that would change it works on a copy.
"""

import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ENV, ROOT, math_rows, read_jsonl, torchrun_cmd, write_jsonl

import common
import runs

LR = 1e-3
# warm-up 0, so the lr of step s of an N-step run is LR * (1 + cos(pi (s - 1) / N)) / 2
GRPO = ["--dataset", "synthetic", "--levels", "1-2", "--batch_size", "2", "--num_generations", "2",
        "--max_new_tokens", "8", "--sft_source", "none", "--beta", "0", "--lr", str(LR), "--warmup_ratio", "0",
        "--probe_every", "0", "--no_gradient_checkpointing", "--save_every", "1", "--save_total_limit", "3"]


def cli(script: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def grpo(out, *extra, model="tiny") -> subprocess.CompletedProcess:
    return cli("expo_grpo.py", ["--model", model, *GRPO, "--output_dir", str(out), *extra])


def lines(proc) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]


def one_line(proc) -> str:
    """The single line a refused command printed (and that it was refused, before any model was loaded)."""
    assert proc.returncode != 0 and len(lines(proc)) == 1, lines(proc)
    return lines(proc)[0]


def finished(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def listing(out) -> list[str]:
    return sorted(os.listdir(out))


def steps(out) -> list[int]:
    return [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


def checkpoints(out) -> list[str]:
    return sorted((d for d in os.listdir(out) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("run") / "run"
    finished(grpo(out, "--max_steps", "3"))
    return str(out)


@pytest.fixture
def copy(run, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(run, out)
    return out


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tiny_path) -> str:
    """A model of the tiny model's shape with other weights, in another directory."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(tiny_path, path)
    weights = load_file(path / "model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


# ----------------------------------------------------------------------------------------------------
# A run owns its folder
# ----------------------------------------------------------------------------------------------------


def test_run_config_and_manifests_are_written(run, tiny_path):
    config = json.load(open(os.path.join(run, "run_config.json")))
    assert config["script"] == "expo_grpo.py" and config["world_size"] == 1
    assert config["args"]["batch_size"] == 2 and config["args"]["max_steps"] == 3 and config["args"]["lr"] == LR
    assert config["model"]["path"] == os.path.abspath(tiny_path)
    assert set(config["model"]["files"]) == {f for f in os.listdir(tiny_path)
                                             if os.path.isfile(os.path.join(tiny_path, f))}
    questions, _ = common.load_problems("synthetic", levels=[1, 2], seed=0)
    assert config["data"]["questions"] == len(questions)
    assert checkpoints(run) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for name in checkpoints(run):
        manifest = json.load(open(os.path.join(run, name, "manifest.json")))
        assert set(manifest["files"]) == set(os.listdir(os.path.join(run, name))) - {"manifest.json"}
        assert runs.checkpoint_problem(os.path.join(run, name)) is None


@pytest.mark.parametrize("script", ["expo_grpo.py", "expo_dpo.py"])
def test_a_fresh_start_in_a_used_folder_refuses_with_one_line(run, script):
    def outputs():  # all but run.lock, which the refused run held for a moment
        return {name: os.path.getmtime(os.path.join(run, name)) for name in listing(run) if name != "run.lock"}

    before = outputs()
    args = (["--model", "tiny", *GRPO, "--max_steps", "3"] if script == "expo_grpo.py" else
            ["--model", "tiny", "--dataset", "synthetic", "--batch_size", "2", "--micro_batch_size", "1"])
    line = one_line(cli(script, args + ["--output_dir", run]))
    assert line == (f"{script}: error: {run} holds another run (checkpoint-1, checkpoint-2, checkpoint-3, hf, "
                    "metrics.jsonl, samples.jsonl): continue it with --resume, or start over with "
                    "--overwrite_output_dir (deletes those)")
    assert outputs() == before


def test_overwrite_output_dir_deletes_the_old_run_and_only_it(copy):
    with open(os.path.join(copy, "notes.txt"), "w") as f:
        f.write("mine")
    out = finished(grpo(copy, "--max_steps", "1", "--seed", "1", "--overwrite_output_dir"))
    assert (f"--overwrite_output_dir: deleted the previous run's checkpoint-1, checkpoint-2, checkpoint-3, hf, "
            f"metrics.jsonl, samples.jsonl in {copy}") in out
    assert listing(copy) == ["checkpoint-1", "hf", "metrics.jsonl", "notes.txt", "run.lock", "run_config.json",
                             "samples.jsonl"]
    assert steps(copy) == [1]
    config = json.load(open(os.path.join(copy, "run_config.json")))
    assert config["args"]["seed"] == 1 and config["args"]["max_steps"] == 1 and "resumes" not in config


def test_a_second_run_on_the_folder_stops_at_once_on_every_rank(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / "run.lock", "a+") as held:  # the first run, as far as the second can tell
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on a test")
        held.flush()
        start = time.time()
        proc = subprocess.run(torchrun_cmd("expo_grpo.py", ["--model", "tiny", *GRPO, "--output_dir", str(out)]),
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        seconds = time.time() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and seconds < 60, (seconds, output[-3000:])  # neither rank waited
    line = f"expo_grpo.py: error: another run is using {out} (pid 4242 on a test): one run at a time per --output_dir"
    assert output.count(line) == 1, output[-3000:]  # rank 0's line; rank 1 exits without one
    assert "Loading weights" not in output and listing(out) == ["run.lock"]


# ----------------------------------------------------------------------------------------------------
# Resume checks what it resumes
# ----------------------------------------------------------------------------------------------------


def test_resume_names_each_flag_that_would_change_the_run(run, other_model):
    before = open(os.path.join(run, "run_config.json")).read()
    line = one_line(grpo(run, "--max_steps", "3", "--resume", "--batch_size", "4", "--seed", "1", model=other_model))
    assert line.startswith(f"expo_grpo.py: error: --resume: the run in {run} has other settings (its -> given): ")
    differences = line.split("(its -> given): ")[1].split(". Resume with its values")[0].split("; ")
    assert sorted(differences) == sorted([f"--model tiny -> {other_model}", "--batch_size 2 -> 4", "--seed 0 -> 1"])
    assert line.endswith("Resume with its values, or start over with --overwrite_output_dir")
    assert open(os.path.join(run, "run_config.json")).read() == before


def test_resume_refuses_other_weights_and_other_questions_behind_the_same_names(tmp_path, tiny_path, other_model):
    model = str(tmp_path / "model")
    shutil.copytree(tiny_path, model)
    data = write_jsonl(tmp_path / "train.jsonl", math_rows(8, seed=0))
    out = tmp_path / "run"
    finished(grpo(out, "--dataset", data, "--levels", "all", "--max_steps", "1", model=model))
    shutil.copy(os.path.join(other_model, "model.safetensors"), os.path.join(model, "model.safetensors"))
    write_jsonl(data, math_rows(8, seed=1))
    line = one_line(grpo(out, "--dataset", data, "--levels", "all", "--max_steps", "1", "--resume", model=model))
    assert f"--model {model} (its model.safetensors changed); --dataset {data} (its questions changed" in line, line


def test_resume_may_change_length_logging_and_memory_knobs_and_the_lr_follows_the_new_schedule(copy):
    # the old schedule ended at step 3 (lr 0): steps 4 and 5 must train on the new one, over 5 steps
    out = finished(grpo(copy, "--max_steps", "5", "--resume", "--save_every", "2", "--save_total_limit", "2",
                        "--log_samples", "0", "--micro_batch_size", "4", "--gen_batch_size", "8", "--eval_limit", "4",
                        "--max_bad_steps", "3"))
    assert "resumed from step 3" in out
    rows = read_jsonl(os.path.join(copy, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows[3:]:
        assert r["lr"] == pytest.approx(LR * (1 + math.cos(math.pi * (r["step"] - 1) / 5)) / 2, rel=1e-6), r["step"]
    assert all(r["lr"] > 0 for r in rows)
    assert checkpoints(copy) == ["checkpoint-4", "checkpoint-5"]  # --save_every 2, --save_total_limit 2 (and the last)
    config = json.load(open(os.path.join(copy, "run_config.json")))
    assert config["args"]["max_steps"] == 3  # what the run started as; each resume says what it changed
    resume = config["resumes"][-1]
    assert resume["from"] == "checkpoint-3" and resume["changed"]["max_steps"] == [3, 5]


def test_online_dpo_resumed_with_a_larger_max_steps_trains_its_new_steps_on_their_pairs(tmp_path):
    out = str(tmp_path / "dpo")
    args = ["--model", "tiny", "--dataset", "synthetic", "--limit", "12", "--batch_size", "2",
            "--micro_batch_size", "1", "--num_generations", "2", "--max_new_tokens", "8", "--chosen", "expert",
            "--rejected_truncated", "keep", "--regen_every", "2", "--lr", str(LR), "--warmup_ratio", "0",
            "--no_gradient_checkpointing", "--output_dir", out]
    finished(cli("expo_dpo.py", args + ["--max_steps", "1"]))
    finished(cli("expo_dpo.py", args + ["--max_steps", "2", "--resume"]))
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    # the round built at step 1 served step 1 only (the run ended there): step 2 gets its questions' pairs (the
    # tiny model never answers right, every question has a solution) and the new schedule's lr, not 0
    assert rows[1]["pairs_in_step"] == 2
    assert rows[1]["lr"] == pytest.approx(LR / 2, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Damaged checkpoints
# ----------------------------------------------------------------------------------------------------


def truncate(path) -> int:
    """Cut the file to half its size; returns the size it had."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return size


def zero_start(path) -> None:
    """Overwrite the first bytes with zeros: the same size, unreadable."""
    with open(path, "r+b") as f:
        f.write(b"\0" * 64)


def test_resume_falls_back_past_damaged_checkpoints_and_never_keeps_them(copy):
    os.remove(os.path.join(copy, "checkpoint-3", "__0_0.distcp"))
    state = os.path.join(copy, "checkpoint-2", "trainer_state.pt")
    size = truncate(state)
    # back at step 1, for 1 step, keeping 1 checkpoint: the new checkpoint-2, not the damaged checkpoint-3
    out = finished(grpo(copy, "--max_steps", "2", "--save_total_limit", "1", "--resume"))
    assert "--resume: skipped checkpoint-3: __0_0.distcp is missing\n" in out
    assert f"--resume: skipped checkpoint-2: trainer_state.pt has {size // 2} bytes, not {size}\n" in out
    assert "resumed from step 1\n" in out
    assert steps(copy) == [1, 2]
    assert checkpoints(copy) == ["checkpoint-2"]
    assert runs.checkpoint_problem(os.path.join(copy, "checkpoint-2")) is None


def test_resume_with_no_complete_checkpoint_is_one_line(copy):
    for step in (1, 2, 3):
        os.remove(os.path.join(copy, f"checkpoint-{step}", "manifest.json"))
    line = one_line(grpo(copy, "--max_steps", "3", "--resume"))
    why = "no manifest.json: its save did not finish"
    assert line == (f"expo_grpo.py: error: --resume: no complete checkpoint in {copy} (checkpoint-3: {why}; "
                    f"checkpoint-2: {why}; checkpoint-1: {why})")


@pytest.mark.parametrize("damage, problem", [
    (lambda d: os.remove(os.path.join(d, "__0_0.distcp")), "__0_0.distcp is missing"),
    (lambda d: os.remove(os.path.join(d, "rng-rank0.pt")), "rng-rank0.pt is missing"),
    (lambda d: truncate(os.path.join(d, "__0_0.distcp")), "__0_0.distcp has "),
    (lambda d: truncate(os.path.join(d, ".metadata")), ".metadata has "),
    (lambda d: zero_start(os.path.join(d, "trainer_state.pt")), "trainer_state.pt cannot be read"),
    (lambda d: zero_start(os.path.join(d, ".metadata")), ".metadata cannot be read"),
    (lambda d: os.remove(os.path.join(d, "manifest.json")), "no manifest.json"),
], ids=["shard deleted", "rng deleted", "shard cut", "metadata cut", "trainer_state zeroed", "metadata zeroed",
        "manifest deleted"])
def test_checkpoint_problem_names_the_damage(run, tmp_path, damage, problem):
    path = str(tmp_path / "checkpoint-3")
    shutil.copytree(os.path.join(run, "checkpoint-3"), path)
    damage(path)
    assert runs.checkpoint_problem(path).startswith(problem)
