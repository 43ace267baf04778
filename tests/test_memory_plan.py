"""benchmarks/memory_plan.py: its formulas against hand counts, and its predicted peak against a measured one (CPU).

`python tests/test_memory_plan.py` measures every config of CONFIGS and prints the validation table of
benchmarks/README.md; the test keeps one of them.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, run_torchrun

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory_plan  # noqa: E402

# name: (Qwen2Config fields, memory_plan flags, ranks); random weights, fp32 unless --bf16 true
CONFIGS = {
    "4L-256w": (dict(num_hidden_layers=4, hidden_size=256, intermediate_size=768, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=8192),
                ["--prompt_tokens", "32", "--max_new_tokens", "96", "--micro_batch_size", "4",
                 "--gen_batch_size", "16", "--beta", "0", "--gradient_checkpointing", "false"], 1),
    "6L-384w": (dict(num_hidden_layers=6, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
                     num_key_value_heads=2, vocab_size=16384),
                ["--prompt_tokens", "64", "--max_new_tokens", "192", "--micro_batch_size", "4",
                 "--gen_batch_size", "8", "--beta", "0.04", "--gradient_checkpointing", "true"], 2),
    "3L-256w-long": (dict(num_hidden_layers=3, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=4096),
                     ["--prompt_tokens", "128", "--max_new_tokens", "384", "--micro_batch_size", "2",
                      "--gen_batch_size", "8", "--beta", "0", "--gradient_checkpointing", "false"], 2),
    "8L-256w-ckpt": (dict(num_hidden_layers=8, hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=4096),
                     ["--prompt_tokens", "128", "--max_new_tokens", "384", "--micro_batch_size", "4",
                      "--gen_batch_size", "32", "--beta", "0.04", "--gradient_checkpointing", "true"], 1),
    "6L-384w-bf16": (dict(num_hidden_layers=6, hidden_size=384, intermediate_size=1024, num_attention_heads=6,
                          num_key_value_heads=2, vocab_size=16384),
                     ["--prompt_tokens", "64", "--max_new_tokens", "192", "--micro_batch_size", "4",
                      "--gen_batch_size", "8", "--beta", "0.04", "--gradient_checkpointing", "true",
                      "--bf16", "true"], 2),
}


def build(path: str, fields: dict) -> str:
    """A random-weight Qwen2 saved with save_pretrained, so the plan reads a real config.json."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        config = Qwen2Config(tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=None,
                             eos_token_id=None, pad_token_id=0, **fields)
        Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def measure(path: str, flags: list, ranks: int) -> list[dict]:
    proc = run_torchrun(os.path.join(ROOT, "benchmarks", "memory_plan.py"),
                        ["--model", path, "--device", "cpu", "--gpus", str(ranks), "--measure", *flags], nproc=ranks,
                        env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    return [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("MEASURE ")]


QWEN25_3B = {"model_type": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
             "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}


def test_sharded_state_is_16_bytes_per_parameter_over_gpus(tmp_path):
    """fp32 parameters + gradients + AdamW's two moments = 16 P / gpus, P counted by hand and by the model itself."""
    from transformers import AutoModelForCausalLM

    path = build(str(tmp_path / "m"), CONFIGS["4L-256w"][0])
    H, I, V, L, kv = 256, 768, 8192, 4, 2 * 64
    layer = H * (H + 2 * kv) + (H + 2 * kv) + H * H + 3 * H * I + 2 * H  # q,k,v + biases, o, MLP, 2 norms
    P = L * layer + V * H + H  # tied embeddings counted once, final norm
    assert P == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    s = memory_plan.read_config(path)
    a = memory_plan.setting(memory_plan.parse_args(["--model", path, "--gpus", "4"]), s)
    assert s.params == P and sum(memory_plan.sharded_state(s, a).values()) == 16 * P // 4


def test_qwen25_3b_figures_by_hand(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_3B))
    s = memory_plan.read_config(str(tmp_path))
    assert s.params == 3_085_938_688  # Qwen2.5-3B: 3.09B
    a = memory_plan.setting(memory_plan.parse_args(["--model", str(tmp_path), "--gen_batch_size", "32"]), s)
    # 36 layers x (k, v) x 2 kv heads x 128 x (300 + 1024 tokens) x 32 sequences x 2 bytes (bf16)
    assert memory_plan.kv_cache(s, a) == 36 * 2 * 256 * 1324 * 32 * 2 == 1_561_853_952
    assert memory_plan.logprob_chunk(s) == 441  # 2**26 // 151936: a 256 MiB fp32 block
    assert memory_plan.layer_activations(s, a) == 24 * 2048 + 4 * 256 + 8 * 11008  # bf16: see its docstring


def test_cli_fits_and_largest_batches(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(QWEN25_3B))
    memory_plan.main(["--model", str(tmp_path), "--gpus", "4", "--gpu_gib", "80"])
    out = capsys.readouterr().out
    assert "FITS" in out and "largest --micro_batch_size that fits" in out
    memory_plan.main(["--model", str(tmp_path), "--gpus", "1", "--gpu_gib", "24", "--gradient_checkpointing", "false"])
    assert "DOES NOT FIT" in capsys.readouterr().out


@pytest.mark.parametrize("model, says", [
    ("Qwen/Qwen2.5-3B-Instruct", ["'Qwen/Qwen2.5-3B-Instruct'", "HF_HUB_OFFLINE", "download", "local folder"]),
    ("no/such/folder", ["'no/such/folder'", "neither a local folder"]),
    ("{tmp}", ["has no config.json"]),  # a folder, but not a model's
])
def test_a_model_it_cannot_read_is_one_line(tmp_path, model, says):
    """Offline, with nothing cached (an empty HF_HOME), a hub id ended in a 27-line traceback (issue 26): one line
    naming the model and what to do, rc != 0; the same for a path that is no hub id and a folder without config.json."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "memory_plan.py"),
                           "--model", model.format(tmp=tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memory_plan.py: error: "), proc.stderr
    assert all(s in lines[0] for s in says), lines[0]


def test_predicted_peak_within_25_percent_of_measured_on_cpu(tmp_path):
    """One config of the validation table (benchmarks/README.md), sampling and training phase, fp32 on CPU."""
    fields, flags, ranks = CONFIGS["4L-256w"]
    rows = measure(build(str(tmp_path / "m"), fields), flags, ranks)
    assert [r["phase"] for r in rows] == ["sampling", "training"]
    for r in rows:
        assert 0.75 <= r["ratio"] <= 1.25, r


def test_bench_gpu_command_runs_on_cpu():
    """benchmarks/bench_gpu.py (the GPU figures, with the plan's prediction beside them) runs to its tables on 2
    gloo ranks in its small shape, and counts the parameters of that shape as counted here by hand."""
    proc = run_torchrun(os.path.join(ROOT, "benchmarks", "bench_gpu.py"),
                        ["--shape", "small", "--device", "cpu", "--batch_size", "2", "--num_generations", "2",
                         "--prompt_tokens", "12", "--max_new_tokens", "6", "--micro_batch_size", "2", "--steps", "1"],
                        timeout=600)
    H, I, V, L, q, kv = 128, 256, 151936, 2, 128, 64  # 2 heads of 64, 1 KV head
    layer = H * (q + 2 * kv) + q + 2 * kv + q * H + 3 * H * I + 2 * H  # q,k,v + biases, o, MLP, 2 norms
    assert f"{L * layer + V * H + H:,} parameters" in proc.stdout, proc.stdout
    assert "| rollout tok/s |" in proc.stdout and "| sampling |" in proc.stdout, proc.stdout


if __name__ == "__main__":
    import tempfile

    root = tempfile.mkdtemp()
    print("| config | ranks | phase | predicted MiB | measured MiB | predicted / measured |")
    print("|---|---|---|---|---|---|")
    for name, (fields, flags, ranks) in CONFIGS.items():
        for r in measure(build(os.path.join(root, name), fields), flags, ranks):
            print(f"| {name} {' '.join(flags)} | {ranks} | {r['phase']} | {r['predicted'] / 2**20:.0f} | "
                  f"{r['measured'] / 2**20:.0f} | {r['ratio']:.2f} |", flush=True)
