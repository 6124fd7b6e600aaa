"""Training-state checkpoints: exact resume on the same mesh, resharded resume on another, crash safety."""

import os
import shutil
import signal
import subprocess
import sys
import time

from helpers import train

COMMON = ("--steps", "6", "--batch-tokens", "600", "--lr", "3e-3", "--export-hf", "")


def test_resume_on_the_same_mesh_is_bitwise_and_on_another_within_1e6(tmp_path):
    straight = train(tmp_path, 2, *COMMON, "--dp-shard", "2")
    ckpt = str(tmp_path / "ckpt")
    first = train(tmp_path, 2, *COMMON[:1], "3", *COMMON[2:], "--dp-shard", "2", "--checkpoint-dir", ckpt,
                  "--async-checkpoint")  # dcp.async_save, committed by wait() before exit
    assert sorted(os.listdir(ckpt)) == ["step-3"]
    ckpt4 = str(tmp_path / "ckpt4")
    shutil.copytree(ckpt, ckpt4)
    second = train(tmp_path, 2, *COMMON, "--dp-shard", "2", "--checkpoint-dir", ckpt, "--resume")
    assert [r["step"] for r in first + second] == list(range(1, 7))
    # Same mesh, new process group: model, AdamW moments, LR schedule and data position all restored.
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    # Another mesh (tp=2 x dp_shard=2 on 4 processes) reads the dp_shard=2 shards, resharded.
    other = train(tmp_path, 4, *COMMON, "--dp-shard", "2", "--tp", "2", "--checkpoint-dir", ckpt4, "--resume")
    assert [r["step"] for r in other] == [4, 5, 6]
    for a, b in zip(other, straight[3:]):
        # fp32 sums in another order (sharded matmuls) over 3 steps.
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a, b)
    assert sorted(os.listdir(ckpt4)) == ["step-3", "step-6"]  # keep-last 2


CRASH_SCRIPT = r"""
import sys, torch, dtllama
from dtllama.checkpoint import Checkpointer, TrainState
cfg = dtllama.flavors["debug"]
cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 256, 1024, 8  # ~40 MB of state
model = dtllama.LlamaForCausalLM(cfg)
model.init_weights(0)
opt = torch.optim.AdamW(model.parameters())
ckpt = Checkpointer(sys.argv[1], keep_last=100)
for step in range(1, 1000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    ckpt.save(step, TrainState(model, opt, extra={"step": step}))
    print("saved", step, flush=True)
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    import torch

    import dtllama
    from dtllama.checkpoint import Checkpointer, TrainState

    folder = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        while proc.stdout.readline().strip() != "saved 2":
            assert proc.poll() is None, "the saving process died before its second checkpoint"
        deadline = time.time() + 60
        while not any(n.endswith(".partial") for n in os.listdir(folder)):  # a save is under way
            assert time.time() < deadline
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    ckpt = Checkpointer(str(folder))
    steps = ckpt.steps()
    assert len(steps) >= 2 and any(n.endswith(".partial") for n in os.listdir(folder)), os.listdir(folder)
    cfg = dtllama.flavors["debug"]
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 256, 1024, 8
    model = dtllama.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters())
    state = TrainState(model, opt, extra={"step": 0})
    assert ckpt.load_latest(state) == steps[-1]
    assert state.extra["step"] == steps[-1]
    assert all(float(p.min()) == float(p.max()) == steps[-1] for p in model.parameters())
