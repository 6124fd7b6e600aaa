"""bench/train.py on the CPU (1 process, tiny shape, bf16 compute), so that the GPU benchmark cannot rot: dtllama,
its ablations (FSDP2 on one rank instead of casts at use; every logit row recomputed; the fused loss head) and
transformers + FSDP2 train from one init to the same losses."""

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_bench_train_variants_agree_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train.py"), "--nproc", "1", "--shape", "tiny", "--batch", "2",
           "--seq", "64", "--impls", "dtllama,dtllama-fsdp1,dtllama-recompute,dtllama-loss,hf", "--steps", "2", "--warmup", "1",
           "--loss-steps", "6", "--lr", "1e-3", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"dtllama", "dtllama-fsdp1", "dtllama-recompute", "dtllama-loss", "hf"}
    assert "| dtllama-fsdp1 |" in proc.stdout
    # Casts at use and FSDP's one-rank mixed precision compute the same bf16 ops (only the embedding gradient's
    # accumulation differs); kept rows round the logits once more (fp16, relative to the row max); transformers
    # rounds its own way: all within a bf16 step's noise (2^-8) over 6 steps at lr 1e-3.
    for r in rows.values():
        assert len(r["losses"]) == 6 and r["loss_rel_diff_vs_dtllama"] <= 4e-3, (r["impl"], r["losses"])
