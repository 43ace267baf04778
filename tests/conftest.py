"""Shared test helpers: the repository root on sys.path, a tiny model, and a torchrun launcher."""

import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import toy  # noqa: E402,F401  (registers the built-in models and data sets: --model tiny, --dataset synthetic...)
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(script: str, args: list[str], nproc: int = 2, nnodes: int = 1, node_rank: int = 0,
                 port: int | None = None) -> list[str]:
    """The command line that launches `script` (relative to the repo root, or a path) on gloo ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc_per_node", str(nproc),
            "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
            script, *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}


def run_torchrun(script: str, args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None,
                 check: bool = True) -> subprocess.CompletedProcess:
    """Run `script` on `nproc` ranks to the end; with `check`, fail the test with its output if it failed."""
    cmd = torchrun_cmd(script, args, nproc)
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_path():
    return toy.build_tiny_model()


@pytest.fixture(scope="session")
def tiny(tiny_path):
    """(model, tokenizer) of the tiny random-weight model, unsharded, fp32, on CPU."""
    import engine

    return engine.load_model("tiny", engine.torch.device("cpu")), engine.load_tokenizer("tiny")


@pytest.fixture(scope="session")
def hub_path(tmp_path_factory):
    """A directory shaped like Qwen/Qwen2.5-3B-Instruct on the hub, scaled down (tests/hub_fixture.py)."""
    from hub_fixture import build_hub_model

    return build_hub_model(str(tmp_path_factory.mktemp("hub") / "Qwen2.5-Instruct-like"))


def read_jsonl(path) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows) -> str:
    import json

    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def math_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """Rows in the MATH file format (problem, solution with the answer in \\boxed{}, level "Level k", type)."""
    return [{"problem": r["question"], "solution": r["solution"], "level": f"Level {r['level']}", "type": "Algebra"}
            for r in toy.synthetic_problems(n, seed=seed, levels=[5])]


def gsm8k_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """Rows in the GSM8K file format (question, answer = rationale with <<calc>> notes and `#### N`), no levels."""
    return [{"question": r["question"], "answer": r["solution"].replace("\\boxed{", "<<x>>").rstrip("}.")
             .replace("The answer is <<x>>", "#### ")} for r in toy.synthetic_problems(n, seed=seed, levels=[1])]
