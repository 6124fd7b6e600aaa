"""What several test files share: the error measure, the plain reference formulas and the torchrun
launcher. Kept light (torch only): the pool's worker processes import it, which conftest (it needs
transformers) cannot be."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import torch

from dtllama.ops import IGNORE_INDEX
from pool import PEER_LOST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max|a - b| / max|b|, with `max|b|` raised to `floor` for values that are (near) zero by nature
    (the absolute error where both are 0)."""
    if not b.numel():
        return 0.0
    err = float((a.detach().double() - b.detach().double()).abs().max())
    scale = max(float(b.detach().double().abs().max()), floor)
    return err / scale if scale else err


def head_inputs(g: torch.Generator, T: int, H: int, V: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(hidden [T, H], weight [V, H], labels [T])` of a fused-head test: random fp32 tensors needing gradients,
    labels in the vocabulary (the caller marks which to ignore)."""
    hidden = torch.randn(T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    return hidden, weight, torch.randint(0, V, (T,), generator=g)


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


# Exit codes of a rank ended by a crash: SIGABRT (a C++ std::terminate), SIGBUS, SIGSEGV.
_CRASHES = {-6, -7, -11}


def _exit_codes(output: str) -> list[int]:
    """The exit code of every failed rank in torchrun's failure report."""
    return [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", output)]


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600, cwd=None, env: dict | None = None,
             repeatable: bool = True) -> subprocess.CompletedProcess:
    """Run `script` (or `"-m", module`) under torchrun on `nproc` local processes, in `env` (default: this one);
    fails the test with the output's tail.

    Ranks run with faulthandler on: one killed by a crash signal prints every thread's Python stack. A
    `repeatable` job (it starts from nothing it wrote itself) whose failure is such a crash, its peers failing at
    most for the lost connection, runs once more with a RuntimeWarning quoting the first output - as the test
    pool does: CI lost healthy gloo jobs to a `std::terminate` twice that no run here reproduced (40 runs of the
    same job). A second crash, an exception of the job's own or a wrong number still fails the test.
    """
    __tracebackhide__ = True
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), script,
           *args]
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    first = ""
    if proc.returncode and repeatable and _crashed_alone(proc.stderr):
        first = proc.stdout[-3000:] + proc.stderr[-12000:]
        warnings.warn(f"{os.path.basename(args[0] if script == '-m' else script)}: a rank of {nproc} died by a crash signal; running the job "
                      f"again.\n{first}", RuntimeWarning, stacklevel=2)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:] + (
        f"\n--- the first try ---\n{first}" if first else "")
    return proc


# A Python exception's last line, as a rank prints it (torch prefixes "[rankN]:").
_EXCEPTION = re.compile(r"^(?:\[rank\d+\]:)?\s*((?:\w+\.)*\w*(?:Error|Exception)):.*$", re.M)


def _crashed_alone(output: str) -> bool:
    """Whether a rank died by a crash signal and no rank raised an error of its own: the others were killed by
    torchrun or failed for the lost peer. (Exit codes cannot tell: a rank that raised can be killed before it
    exits.)"""
    own_errors = [m[0] for m in _EXCEPTION.finditer(output)
                  if not m[1].endswith("ChildFailedError") and not PEER_LOST.search(m[0])]
    return bool(_CRASHES.intersection(_exit_codes(output))) and not own_errors


def train(tmp_path, nproc: int, *args: str, flavor: str = "debug", timeout: int = 600) -> list[dict]:
    """Run the main job (`recipes/train.py`) under torchrun in `tmp_path`; returns its per-step metrics. A run with
    a checkpoint folder is not repeated after a crash (a second try would resume from the first one's saves)."""
    metrics = tmp_path / f"metrics-{len(list(tmp_path.glob('metrics-*')))}.jsonl"
    proc = torchrun(nproc, os.path.join(ROOT, "recipes", "train.py"), "--flavor", flavor, "--metrics", str(metrics),
                    *args, timeout=timeout, cwd=tmp_path, repeatable="--checkpoint-dir" not in args)
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
