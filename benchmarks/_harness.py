"""What the benchmarks share: running expo_grpo.py for a few steps and reading its per-step times, medians,
and a markdown table. Not a benchmark itself (pytest never collects this folder: it has no test_*.py)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Same threads for every contender: the machine is shared and the comparison is per process.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}

def machine() -> str:
    """Printed by every benchmark that reports a time: the CPU (or GPU) it ran on, and the threads of each contender."""
    from engine import machine_line

    return f"machine: {machine_line().split(', torch threads')[0]}; each contender on {ENV['OMP_NUM_THREADS']} thread(s)"


# Every answer verifies: with a random-weight model no explanation ever reaches a*, so without this the
# ExP-GRPO arm would never train on one and its cost would be understated. Rewards being all 1 changes
# no amount of work (the policy loss is computed the same way), so both arms run with it.
ALL_VERIFIED = "import common; common.verify_answer = lambda *a, **k: 1.0; common.check_answer = lambda *a, **k: (1.0, None); "


def run_expo(args: list[str], warmup: int, all_verified: bool = False, timeout: int = 900) -> list[float]:
    """Run `python expo_grpo.py ARGS` in one process; return step_seconds of the steps after `warmup`."""
    with tempfile.TemporaryDirectory() as out:
        code = ("import runpy, sys; sys.argv = ['expo_grpo.py'] + sys.argv[1:]; "
                + (ALL_VERIFIED if all_verified else "") + "runpy.run_path('expo_grpo.py', run_name='__main__')")
        cmd = [sys.executable, "-c", code, *args, "--output_dir", out, "--save_every", "0", "--probe_every", "0",
               "--log_samples", "0"]
        proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return [r["step_seconds"] for r in rows[warmup:]]


def median(xs):
    return statistics.median(xs)


def table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def torchrun(nproc: int) -> list[str]:
    """The start of a command line that launches a script on `nproc` local gloo ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port)]


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024  # kB -> MiB


def rss_mb() -> float:
    """Resident memory of this process now, MiB (Linux)."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> float:
    """Return memory that the allocator holds but no longer uses, then restart the peak-RSS count from the
    current RSS (Linux: writing 5 to clear_refs resets VmHWM). Returns the RSS, MiB."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb()


def peak_rss_mb() -> float:
    """Peak resident memory since the last `reset_peak_rss`, MiB."""
    return _status_mb("VmHWM")


class Phases:
    """Wall seconds spent in named functions, for a profile by phase: `wrap(owner, name, label)` replaces
    `owner.name` with a wrapper that adds its time to `label` (a string, or a function of no argument that
    returns one, evaluated at the call). A wrapped call made inside another wrapped call counts for the outer
    one only, so phases never overlap; what no wrapper covers is the step time minus their sum."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.busy = False
        self.marks: list[tuple[float, dict[str, float]]] = []  # (time, seconds so far) at each step's end

    def wrap(self, owner, name: str, label) -> None:
        import functools
        import time

        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.busy:
                return fn(*args, **kwargs)
            key = label() if callable(label) else label
            self.busy, start = True, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.busy = False
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def mark(self) -> None:
        """Call at the end of each optimizer step."""
        import time

        self.marks.append((time.perf_counter(), dict(self.seconds)))

    def per_step(self, warmup: int, steps: int) -> dict[str, float]:
        """Mean seconds per step of each phase over `steps` steps after the first `warmup` (>= 1), with `step`
        (the whole step) and `other` (the step minus the phases)."""
        (t0, s0), (t1, s1) = self.marks[warmup - 1], self.marks[warmup - 1 + steps]
        out = {k: (s1.get(k, 0.0) - s0.get(k, 0.0)) / steps for k in s1}
        out["step"] = (t1 - t0) / steps
        out["other"] = out["step"] - sum(v for k, v in out.items() if k != "step")
        return out
