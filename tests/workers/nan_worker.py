"""Run a training script with non-finite log-probs on ONE rank at chosen steps (tests/test_reliability.py).

    torchrun ... tests/workers/nan_worker.py SCRIPT RANK STEPS [script flags...]     STEPS: counted from 1, e.g. "1,2"

Only that rank's training forward passes (gradient enabled) give NaN, as a bad row of its data would; the
script must skip the step on every rank together. The step is the one `global_batch` was last asked for.
"""

import os
import runpy
import sys

import torch

import common
import engine
import toy  # noqa: F401  (registers --model tiny)

script, nan_rank, nan_steps = sys.argv[1], int(sys.argv[2]), {int(s) for s in sys.argv[3].split(",")}
current = {"step": None}
_global_batch, _token_logprobs = common.global_batch, engine.token_logprobs


def global_batch(rows, step, *args, **kwargs):
    current["step"] = step
    return _global_batch(rows, step, *args, **kwargs)


def token_logprobs(*args, **kwargs):
    out = _token_logprobs(*args, **kwargs)
    if torch.is_grad_enabled() and int(os.environ["RANK"]) == nan_rank and current["step"] in nan_steps:
        if isinstance(out, tuple):
            return (out[0] * float("nan"), *out[1:])
        return out * float("nan")
    return out


common.global_batch, engine.token_logprobs = global_batch, token_logprobs  # before the script imports them
sys.argv = [script, *sys.argv[4:]]
runpy.run_path(script, run_name="__main__")
