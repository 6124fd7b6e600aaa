"""bench/cp.py on the CPU (gloo, 2 processes, tiny shape), so that the 2-GPU benchmark cannot rot."""

import json
import os
import subprocess
import sys

from helpers import ROOT


def test_cp_benchmark_runs_each_layout_in_its_own_torchrun_and_both_agree(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "cp.py"), "--nproc", "2", "--shape", "tiny", "--min-len", "64",
           "--max-len", "128", "--loss-len", "48", "--steps", "1", "--ac", "selective"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(proc.stdout.split("JSON ", 1)[1])
    assert [r["cp"] for r in report["layouts"]] == [1, 2] and report["world"] == 2
    # No OOM on the host: the search stops at --max-len for both layouts.
    assert [r["longest"] for r in report["layouts"]] == [128, 128] and report["length_both_fit"] == 128
    assert all(v > 0 for v in report["tok_s_gpu_at_length_both_fit"].values()), report
    # fp32 on the CPU: the same batch through FSDP alone and through Ulysses differs by rounding only.
    assert report["loss_rel_diff"] <= 1e-5, report
