"""What several test files share: the error measure, the plain reference formulas and the torchrun
launcher. Kept light (torch only): the pool's worker processes import it, which conftest (it needs
transformers) cannot be."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from dtllama.ops import IGNORE_INDEX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max|a - b| / max|b|, with `max|b|` raised to `floor` for values that are (near) zero by nature
    (the absolute error where both are 0)."""
    if not b.numel():
        return 0.0
    err = float((a.detach().double() - b.detach().double()).abs().max())
    scale = max(float(b.detach().double().abs().max()), floor)
    return err / scale if scale else err


def rms_norm_reference(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm in the inputs' dtype (call it on fp32 copies for a reference)."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def logprobs_entropy_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-prob of the label and entropy from full logits; 0 where the label is ignored."""
    logp = torch.log_softmax(logits, -1)
    valid = labels != IGNORE_INDEX
    lp = logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    """Run `script` under torchrun on `nproc` local processes; fails the test with the output's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), script,
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train(tmp_path, nproc: int, *args: str, flavor: str = "debug", timeout: int = 600) -> list[dict]:
    """Run the main job (`recipes/train.py`) under torchrun in `tmp_path`; returns its per-step metrics."""
    metrics = tmp_path / f"metrics-{len(list(tmp_path.glob('metrics-*')))}.jsonl"
    proc = torchrun(nproc, os.path.join(ROOT, "recipes", "train.py"), "--flavor", flavor, "--metrics", str(metrics),
                    *args, timeout=timeout, cwd=tmp_path)
    print(proc.stdout[-4000:])
    return [json.loads(line) for line in metrics.read_text().splitlines()]


# Two-process layouts of the main job, each compared with the one-process run of the same global batches
# (tests/test_train_recipe.py on CPU gloo, tests/gpu/test_layouts_gpu.py on 2 GPUs over NCCL).
TWO_PROCESS_LAYOUTS = {
    "fsdp": ("--dp-shard", "2"),
    "hsdp": ("--dp-replicate", "2", "--dp-shard", "1"),
    "tp": ("--tp", "2"),
    "tp_compiled": ("--tp", "2", "--compile"),
    "cp": ("--cp", "2"),
    "pp": ("--pp", "2", "--pp-schedule", "1F1B", "--microbatches", "2"),
}
