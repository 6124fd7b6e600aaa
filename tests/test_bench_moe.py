"""bench/moe.py on the CPU (tiny shapes, Llama 4 and Qwen3-MoE), so that the GPU benchmark cannot rot: every backend
equals the loop."""

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_moe_benchmark_runs_and_every_backend_equals_the_loop(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "moe.py"), "--shape", "tiny", "--tokens", "256", "--reps", "1",
           "--train-layers", "2", "--steps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {r["impl"]: r for r in json.loads(proc.stdout.split("JSON ", 1)[1])}
    assert set(rows) == {"dtllama grouped", "dtllama loop", "transformers", "Scout, 2 layers"}
    for name in ("dtllama grouped", "transformers"):  # fp32 on the CPU: the same sums in another order
        assert rows[name]["max_rel_diff_vs_loop"] <= 1e-5, rows[name]
    assert rows["dtllama grouped"]["experts_tflops"] > 0
    losses = rows["Scout, 2 layers"]["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses  # AdamW on one batch: the loss falls


def test_qwen3_moe_benchmark_runs_and_every_backend_equals_the_loop(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "moe.py"), "--family", "qwen3", "--shape", "tiny", "--tokens",
           "256", "--reps", "1", "--train-layers", "2", "--steps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {r["impl"]: r for r in json.loads(proc.stdout.split("JSON ", 1)[1])}
    assert set(rows) == {"dtllama grouped", "dtllama loop", "transformers", "Qwen3-30B-A3B, 2 layers"}
    assert {r["family"] for r in rows.values()} == {"qwen3"}
    for name in ("dtllama grouped", "transformers"):  # fp32 on the CPU: the same sums in another order
        assert rows[name]["max_rel_diff_vs_loop"] <= 1e-5, rows[name]
    assert rows["dtllama grouped"]["experts_tflops"] > 0
    losses = rows["Qwen3-30B-A3B, 2 layers"]["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses  # AdamW on one batch: the loss falls
