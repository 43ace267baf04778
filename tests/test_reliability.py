"""Reliability (issue 7): crashes and resume, atomic checkpoints, bad data, bad model output, non-finite
values, bad flags, multi-node. CPU, gloo, the tiny model.

Each training launch is expensive, so one uninterrupted reference run per script serves several checks:
the report of bad rows, save_total_limit, and the parameters that a run killed and resumed, on one node or
two, must end with.
"""

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import common
import runs
import toy
from conftest import ENV, ROOT, free_port, read_jsonl, torchrun_cmd

def torchrun(script, args, nproc=2, nnodes=1, node_rank=0, port=None) -> subprocess.Popen:
    """Start `script` without waiting, so that a test can kill ranks mid-run."""
    return subprocess.Popen(torchrun_cmd(script, args, nproc, nnodes, node_rank, port), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300, ok=True) -> str:
    out, _ = proc.communicate(timeout=timeout)
    if ok:
        assert proc.returncode == 0, out[-6000:]
    return out


def worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of global rank `rank` (a child of the agent), from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if env.get(b"RANK") == str(rank).encode():
            return int(entry)
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def launch(script, args, nodes: int) -> list[subprocess.Popen]:
    """2 ranks: one torchrun with --nproc_per_node 2, or two (--nnodes 2, a rendezvous on 127.0.0.1) of 1 each."""
    if nodes == 1:
        return [torchrun(script, args, nproc=2)]
    port = free_port()
    return [torchrun(script, args, nproc=1, nnodes=2, node_rank=k, port=port) for k in range(2)]


def kill_rank_after(agents, out_dir, checkpoint, rank=1, timeout=240) -> dict:
    """SIGKILL global rank `rank` once `checkpoint` exists; how long the job (every torchrun) took to exit."""
    deadline = time.time() + timeout
    while not os.path.isdir(os.path.join(out_dir, checkpoint)):
        assert all(a.poll() is None for a in agents), [a.stdout.read()[-3000:] for a in agents]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    pid = lambda r: next(p for p in (worker_pid(a.pid, r) for a in agents) if p)  # noqa: E731
    victim, survivor = pid(rank), pid(1 - rank)
    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    outputs = [finish(a, timeout=120, ok=False) for a in agents]
    return {"exit_seconds": time.time() - killed, "returncodes": [a.returncode for a in agents],
            "output": "".join(outputs), "survivor_alive": alive(survivor)}




def assert_same_params(dir_a, dir_b, atol=1e-6):
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (dir_a, dir_b))
    for sd in (a, b):  # the tiny model ties lm_head to the embeddings: an export may hold the tensor once or twice
        sd.setdefault("lm_head.weight", sd["model.embed_tokens.weight"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def max_change(hf_dir, initial_dir):
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (hf_dir, initial_dir))
    return max((a[n] - b[n]).abs().max().item() for n in b)


def checkpoints(out_dir):
    return sorted(d for d in os.listdir(out_dir) if d.startswith("checkpoint-"))


# ----------------------------------------------------------------------------------------------------
# Data with bad rows, and the two reference runs
# ----------------------------------------------------------------------------------------------------

BAD_LINES = [
    '{"question": "What is 1 + 1?", "answer": "2"',  # cut: malformed JSON
    "[1, 2, 3]",  # JSON, not an object
    json.dumps({"question": "", "answer": "3"}),  # empty question
    json.dumps({"question": "What is 2 + 5?", "answer": ""}),  # empty answer
    json.dumps({"question": "What is 1/2?", "answer": "\\frac{1"}),  # unbalanced: unparseable
    json.dumps({"problem": "What is 3 + 3?", "solution": "It is six, no box."}),  # no answer to extract
    json.dumps({"problem": "What is 4 + 4?", "solution": "\\boxed{}"}),  # empty box
]
BAD_COUNTS = {"malformed_lines": 2, "no_question": 1, "no_answer": 4}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    rows = toy.synthetic_problems(24, seed=3)
    lines = [json.dumps(r) for r in rows]
    for k, bad in enumerate(BAD_LINES):
        lines.insert(3 * k + 1, bad)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    return str(path)


def grpo_args(data, out):
    # expert arm: its SFT term moves the random model; beta 0.5 makes the sampled completions (KL term) count
    return ["--model", "tiny", "--dataset", data, "--levels", "all", "--batch_size", "4", "--num_generations", "2",
            "--max_new_tokens", "8", "--micro_batch_size", "8", "--gen_batch_size", "16", "--sft_source", "expert",
            "--beta", "0.5", "--lr", "1e-3", "--warmup_ratio", "0", "--probe_every", "0", "--max_steps", "4",
            "--save_every", "1", "--save_total_limit", "2", "--no_gradient_checkpointing", "--output_dir", out,
            "--eval_every", "2", "--eval_dataset", "synthetic", "--eval_limit", "4",
            "--eval_num_samples", "2"]  # evaluation samples too: before the save


def dpo_args(data, out):
    # online: the rejected CoTs of every step are sampled with the current policy
    return ["--model", "tiny", "--dataset", data, "--limit", "12", "--batch_size", "4", "--micro_batch_size", "2",
            "--num_generations", "2", "--rejected_truncated", "keep", "--max_new_tokens", "8", "--gen_batch_size", "8", "--lr", "1e-3",
            "--warmup_ratio", "0", "--chosen", "expert", "--regen_every", "1", "--max_steps", "3", "--save_every", "1",
            "--save_total_limit", "2", "--no_gradient_checkpointing", "--output_dir", out,
            "--eval_every", "1", "--eval_dataset", "synthetic", "--eval_limit", "2", "--eval_num_samples", "2"]


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory, bad_data):
    out = str(tmp_path_factory.mktemp("grpo") / "reference")
    return out, finish(torchrun("expo_grpo.py", grpo_args(bad_data, out)))


@pytest.fixture(scope="module")
def dpo_reference(tmp_path_factory, bad_data):
    out = str(tmp_path_factory.mktemp("dpo") / "reference")
    return out, finish(torchrun("expo_dpo.py", dpo_args(bad_data, out)))


@pytest.mark.parametrize("script", ["expo_grpo.py", "expo_dpo.py"])
def test_reference_run_reports_bad_rows_once_and_keeps_disk_bounded(script, request, tiny_path):
    out, stdout = request.getfixturevalue("grpo_reference" if script == "expo_grpo.py" else "dpo_reference")
    reports = [line for line in stdout.splitlines() if line.startswith("data: ")]
    assert len(reports) == 1, reports  # rank 0 only, once
    for key, count in BAD_COUNTS.items():
        assert f"'{key}': {count}" in reports[0], reports[0]
    last = 4 if script == "expo_grpo.py" else 3
    assert checkpoints(out) == [f"checkpoint-{last - 1}", f"checkpoint-{last}"]  # --save_every 1, --save_total_limit 2
    assert max_change(os.path.join(out, "hf"), tiny_path) > 1e-3  # it trained: the equality checks below mean something


# ----------------------------------------------------------------------------------------------------
# Crash and resume, atomic checkpoints
# ----------------------------------------------------------------------------------------------------


# The same runs are the multi-node test: two torchrun launches (--nnodes 2 --nproc_per_node 1, rendezvous
# on 127.0.0.1) train and checkpoint like one node with 2 ranks, the checkpoint resumes on the other layout,
# and --hybrid_shard (HSDP: replicate across nodes, shard within) resumes a fully sharded checkpoint.
@pytest.mark.parametrize("script, kill_nodes, resume_nodes, resume_flags", [
    ("expo_grpo.py", 2, 1, []),
    ("expo_dpo.py", 1, 2, ["--hybrid_shard"]),
])
def test_sigkill_one_rank_then_resume_equals_uninterrupted_run(script, kill_nodes, resume_nodes, resume_flags, request,
                                                               bad_data, tmp_path):
    grpo = script == "expo_grpo.py"
    ref, _ = request.getfixturevalue("grpo_reference" if grpo else "dpo_reference")
    out = str(tmp_path / "run")
    make_args = grpo_args if grpo else dpo_args
    killed = kill_rank_after(launch(script, make_args(bad_data, out), kill_nodes), out,
                             "checkpoint-2" if grpo else "checkpoint-1")
    print(f"{script}: job on {kill_nodes} node(s) exited {killed['exit_seconds']:.1f}s after SIGKILL of rank 1")
    assert all(code != 0 for code in killed["returncodes"]) and killed["exit_seconds"] < 60
    assert not killed["survivor_alive"]  # the other rank was torn down: nothing waits forever
    assert "world size 2" in killed["output"]

    # a kill during the next save left a partial checkpoint-N.tmp: --resume must ignore it
    latest = int(runs.latest_checkpoint(out).rsplit("-", 1)[1])
    partial = os.path.join(out, f"checkpoint-{latest + 1}.tmp")
    os.makedirs(partial, exist_ok=True)
    with open(os.path.join(partial, "__0_0.distcp"), "wb") as f:
        f.write(b"\0" * 100)
    resumed = "".join(finish(a) for a in launch(script, make_args(bad_data, out) + ["--resume", *resume_flags],
                                                resume_nodes))
    assert f"step {latest}" in resumed.split("resumed from", 1)[1].splitlines()[0]

    assert_same_params(os.path.join(out, "hf"), os.path.join(ref, "hf"))
    assert not [d for d in os.listdir(out) if d.endswith(".tmp")]
    assert checkpoints(out) == checkpoints(ref)
    rows, ref_rows = read_jsonl(os.path.join(out, "metrics.jsonl")), read_jsonl(os.path.join(ref, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == ([1, 2, 3, 4] if grpo else [1, 2, 3])
    assert sum("eval/accuracy" in r for r in rows) == (2 if grpo else 3)  # in the step's row, not a row of its own
    for r, q in zip(rows, ref_rows):  # same data, same samples, same numbers (timings aside)
        for key in ("reward", "sft_loss", "kl", "grad_norm", "lr") if grpo else ("loss", "margin", "grad_norm", "lr"):
            assert r[key] == pytest.approx(q[key], rel=1e-5, abs=1e-7), (r["step"], key)
    if grpo:  # the sampled completions themselves: the random state was restored exactly
        assert read_jsonl(os.path.join(out, "samples.jsonl")) == read_jsonl(os.path.join(ref, "samples.jsonl"))
    else:
        for name in (f"pairs-round{r}.jsonl" for r in range(3)):  # the sampled rejected CoTs of every round
            assert read_jsonl(os.path.join(out, name)) == read_jsonl(os.path.join(ref, name))


def test_latest_checkpoint_skips_partial_saves(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-11.tmp", "checkpoint-x", "checkpoint-12.tmp"):
        os.makedirs(tmp_path / name)
    assert runs.latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")


# ----------------------------------------------------------------------------------------------------
# Non-finite values on one rank: skipped on all, counted, and a stop with the last good state
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["expo_grpo.py", "expo_dpo.py"])
def test_nan_on_one_rank_skips_everywhere_then_stops_with_last_good_state(script, bad_data, tmp_path, tiny_path):
    grpo = script == "expo_grpo.py"
    out = str(tmp_path / "run")
    args = (grpo_args if grpo else dpo_args)(bad_data, out)
    args += ["--max_bad_steps", "2", "--max_steps", "5", "--save_every", "0"]
    proc = torchrun("tests/workers/nan_worker.py", [script, "1", "1,2", *args])
    stdout = finish(proc, ok=False)
    assert proc.returncode != 0
    assert stdout.count("stopping: 2 steps in a row with a non-finite loss or gradient") == 1, stdout[-4000:]
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["skipped_steps"] for r in rows] == [1, 2]  # counted in the metrics, then the run stopped
    assert checkpoints(out) == ["checkpoint-2"]
    # no rank took a step the other skipped: the sharded parameters are all still the initial model's
    assert max_change(os.path.join(out, "hf"), tiny_path) == 0.0


# ----------------------------------------------------------------------------------------------------
# Bad flags and bad data files: one line, non-zero exit, before any model is loaded
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flag_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("flags")
    (d / "a_file").write_text("x")
    (d / "columns.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?", "target": "2"}) + "\n")
    (d / "empty_run").mkdir()
    return {"FILE": str(d / "a_file"), "COLUMNS": str(d / "columns.jsonl"), "EMPTY": str(d / "empty_run")}


TINY_G = ["expo_grpo.py", "--model", "tiny", "--dataset", "synthetic", "--batch_size", "4", "--output_dir", "EMPTY"]
TINY_D = ["expo_dpo.py", "--model", "tiny", "--dataset", "synthetic", "--batch_size", "4", "--output_dir", "EMPTY"]
# the real scripts, once per way an error can leave them (a python start with torch takes ~4 s); every
# invalid combination of the issue is then checked on validate_args, for both scripts, below
BAD_RUNS = [  # (command, expected words)
    (TINY_G + ["--num_generations", "1"], "--num_generations must be >= 2"),
    (TINY_G + ["--dataset", "COLUMNS"], "found columns: ['prompt', 'target']"),  # the data is read before any model
    (TINY_D + ["--micro_batch_size", "3"], "not divisible by --micro_batch_size 3"),
    (TINY_D + ["--dataset", "COLUMNS"], "found columns: ['prompt', 'target']"),
    (["eval.py", "--output_dir", "FILE/eval"], "cannot be written"),  # eval k > n: tests/test_eval.py
]
BAD_FLAGS = [  # (script, Args fields, world size, expected words)
    ("grpo", {"num_generations": 1}, 1, "--num_generations must be >= 2"),
    ("grpo", {"batch_size": 3}, 2, "multiple of the world size 2"),  # a question's G samples stay on one rank
    ("dpo", {"batch_size": 6}, 4, "multiple of the world size 4"),
    ("dpo", {"batch_size": 8, "micro_batch_size": 3}, 2, "not divisible by --micro_batch_size 3"),
    ("grpo", {"beta": -0.1}, 1, "--beta must be >= 0"),
    ("dpo", {"beta": -0.1}, 1, "--beta must be > 0"),
    ("grpo", {"lr": -1.0}, 1, "--lr and --weight_decay must be >= 0"),
    ("dpo", {"lr": -1.0}, 1, "--lr and --weight_decay must be >= 0"),
    ("grpo", {"model": "no/such/model"}, 1, "neither a local directory"),
    ("dpo", {"model": "no/such/model"}, 1, "neither a local directory"),
    ("grpo", {"dataset": "missing.jsonl"}, 1, "neither a built-in one"),
    ("dpo", {"dataset": "missing.jsonl"}, 1, "neither a built-in one"),
    ("grpo", {"output_dir": "FILE/run"}, 1, "cannot be written"),
    ("dpo", {"output_dir": "FILE/run"}, 1, "cannot be written"),
    ("grpo", {"resume": True}, 1, "--resume: no checkpoint"),
    ("dpo", {"resume": True}, 1, "--resume: no checkpoint"),
    ("grpo", {"max_bad_steps": 0}, 1, "--max_bad_steps must be >= 1"),
    ("dpo", {"max_bad_steps": 0}, 1, "--max_bad_steps must be >= 1"),
]


@pytest.mark.parametrize("script, overrides, world, words", BAD_FLAGS)
def test_validate_args_table(script, overrides, world, words, flag_paths):
    import expo_dpo
    import expo_grpo

    module = expo_grpo if script == "grpo" else expo_dpo
    overrides = {k: v.replace("FILE", flag_paths["FILE"]) if isinstance(v, str) else v for k, v in overrides.items()}
    args = module.Args(**{"model": "tiny", "dataset": "synthetic", "output_dir": flag_paths["EMPTY"], **overrides})
    with pytest.raises((SystemExit, ValueError), match=re.escape(words)):
        module.validate_args(args, world_size=world)


def run_bad(command, paths):
    for key, path in paths.items():  # FILE/run -> /tmp/.../a_file/run
        command = [path + a[len(key):] if a == key or a.startswith(key + "/") else a for a in command]
    start = time.time()
    proc = subprocess.run([sys.executable, *command], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    return proc, time.time() - start


def test_bad_flags_fail_with_one_line_before_any_model_is_loaded(flag_paths):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda case: run_bad(case[0], flag_paths), BAD_RUNS))
    for (command, words), (proc, seconds) in zip(BAD_RUNS, results):
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        assert proc.returncode != 0, (command, lines)
        assert len(lines) == 1 and "error: " in lines[0] and words in lines[0], (command, lines)
        assert seconds < 20, (command, seconds)  # no model was loaded (a python start with torch takes ~4 s)


# ----------------------------------------------------------------------------------------------------
# Bad model output: reward 0 (or 1 where it is right), no exception, no hang, in any thread, fast
# ----------------------------------------------------------------------------------------------------

ADVERSARIAL = [
    None, "", "no box at all", "The answer is \\boxed{7",  # no EOS: cut in the middle of the box
    "\\boxed{}", "\\boxed{ }", "}{\\boxed}{", "\\boxed{\\frac{1}{2}", "\\fbox{",
    "\\boxed{" * 20000,  # thousands of unclosed boxes (was quadratic: minutes)
    "\\boxed{" + "{" * 5000 + "7" + "}" * 5000 + "}",  # deep nesting
    "\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}",
    "\\boxed{" + "(" * 200 + "1" + ")" * 200 + "}",
    "\\boxed{10^{10^{10^{10}}}}", "\\boxed{10^10^10^10}", "\\boxed{e^{e^{e^{e^{100}}}}}",
    "\\boxed{2^{99999999}}", "\\boxed{(x+1)^{100000}}",
    "\\boxed{(10^{10})!}", "\\boxed{10000000!}", "\\boxed{100!!!}",
    "\\boxed{\\sum_{k=1}^{10^{12}} k^{k}}", "\\boxed{\\prod_{k=1}^{10^{9}} k}", "\\boxed{\\binom{10^{9}}{10^{5}}}",
    "\\boxed{" + "9" * 100000 + "}", "x" * 1_000_000 + "\\boxed{8}" * 1000,
    "\\boxed{" + "+".join(["123456789"] * 50) + "}",  # a long sum (within the length limit)
]
RIGHT = [  # (completion, gold): correct answers, some of them large, must still score 1
    ("\\boxed{" + "+".join(["1"] * 200) + "}", "200"),
    ("so \\boxed{5!}", "120"),
    ("so \\boxed{2^{10}}", "1024"),
    ("\\boxed{10^{10^{10}}}", "10^{10^{10}}"),  # too complex for sympy, but the very string of the gold
    ("\\boxed{\\frac{1}{2004!}}", "\\frac{1}{2004!}"),
    ("\\boxed{\\dfrac{1}{2}} and then nothing, no EOS", "0.5"),
]


def test_bad_outputs_score_zero_without_exception_or_hang():
    for text in ADVERSARIAL:
        start = time.perf_counter()
        assert common.verify_answer(text, "7", timeout=5.0) == 0.0, str(text)[:80]
        assert time.perf_counter() - start < 6.5, str(text)[:80]
    for text, gold in RIGHT:
        assert common.verify_answer(text, gold) == 1.0, (text[:80], gold)
    assert common.extract_boxed("\\boxed{" * 20000 + "\\boxed{7}") == "7"


def test_time_limit_holds_in_a_thread():
    common.verify_answer("\\boxed{1}", "2")  # the verifier process is up
    results = {}

    def call(name, fn):
        start = time.perf_counter()
        results[name] = (fn(), time.perf_counter() - start)

    # a gold answer sympy would evaluate for minutes (the answer filter looks at completions, not golds)
    slow = lambda: common.check_answer("\\boxed{7}", "2^{2^{40}}", timeout=2.0)  # noqa: E731
    worker = threading.Thread(target=call, args=("slow gold", slow))
    worker.start()
    worker.join(30)
    assert results["slow gold"][0] == (0.0, "timeout") and results["slow gold"][1] < 3.0, results
    scores, seen = common.score_answers(["\\boxed{7}", "\\boxed{2}"], ["2^{2^{40}}", "2"])
    assert scores == [0.0, 1.0] and seen["verify_timeouts"] == 1 and seen["verify_errors"] == 0
    # a verifier that never answers (no soft limit helps): the hard limit kills and replaces it
    hung = common._Verifier(source="import sys\nprint('ready', flush=True)\nimport time\ntime.sleep(600)\n")
    for k in range(2):  # the second call runs on the replacement process
        worker = threading.Thread(target=call, args=(f"hung {k}", lambda: hung("\\boxed{1}", "\\boxed{1}", 1.0)))
        worker.start()
        worker.join(30)
        assert results[f"hung {k}"][0] == (0.0, "timeout") and results[f"hung {k}"][1] < 3.0, results
    hung.proc.kill()
    hung.proc.wait()


def test_a_batch_of_adversarial_outputs_keeps_its_throughput():
    common.verify_answer("\\boxed{1}", "2")
    normal = [(f"so \\boxed{{\\frac{{{i + 1}}}{{{i + 2}}}}}", f"\\frac{{{i + 1}}}{{{i + 3}}}") for i in range(64)]
    adversarial = [(text, "7") for text in (ADVERSARIAL * 3)[:64]]
    seconds = {}
    for name, batch in (("normal", normal), ("adversarial", adversarial)):
        start = time.perf_counter()
        scores = [common.verify_answer(text, gold) for text, gold in batch]
        seconds[name] = time.perf_counter() - start
        assert scores == [0.0] * 64
    print(f"verify 64 answers: normal {seconds['normal']:.2f}s, adversarial {seconds['adversarial']:.2f}s")
    assert seconds["adversarial"] < 3 * seconds["normal"] + 2.0, seconds
