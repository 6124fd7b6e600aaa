"""Training-state checkpoints: exact resume on the same mesh (torchrun restarting a job whose worker died),
resharded resume on another, crash safety."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from helpers import ROOT, torchrun, train

from dtllama.train.checkpoint import Checkpointer

COMMON = ("--steps", "6", "--batch-tokens", "600", "--lr", "3e-3", "--export-hf", "")
LONG = ("--steps", "12", *COMMON[2:])  # long enough to be killed mid-way (a step takes ~0.15 s here)


TRAIN_JOB = ("train.py", "--flavor", "debug", *LONG, "--dp-shard", "4")


def restarted_run(tmp_path, ckpt: str, after_step: int, rank: int = 2, job: tuple = TRAIN_JOB, nproc: int = 4
                  ) -> tuple[list[dict], int, int]:
    """A recipe's `job` (script under recipes/, then its flags) under `torchrun --max-restarts 1` (`nproc`
    processes, `--resume`, a checkpoint every step, saved asynchronously): the worker of `rank` is SIGKILLed once
    the metrics show `after_step` and a complete checkpoint of step `after_step - 1` or later
    exists (an async save may still be writing when the next step logs); torchrun then stops the others and starts
    the job again, which resumes by itself. Returns every step it logged (both tries, in order), the newest complete
    checkpoint at the kill and the one the second try resumed from."""
    metrics = tmp_path / "restarted.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", "1", os.path.join(ROOT, "recipes", job[0]), *job[1:], "--checkpoint-dir", ckpt,
           "--checkpoint-every", "1", "--keep-last", "20", "--async-checkpoint", "--resume", "--metrics", str(metrics)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= after_step
                   and max(Checkpointer(ckpt).steps(), default=0) >= after_step - 1):
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
        saved = Checkpointer(ckpt).steps()[-1]
        worker = worker_of_rank(proc.pid, rank)
        os.kill(worker, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts its workers in sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    (tmp_path / "restarted.log").write_text(out)
    assert proc.returncode == 0, out[-3000:]
    resumed = re.findall(r"resumed from \S*step-(\d+)", out)
    assert len(resumed) == 1, out[-3000:]  # the first try started afresh, the second resumed
    return [json.loads(line) for line in metrics.read_text().splitlines()], saved, int(resumed[0])


def worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (a child of the `launcher` process whose environment says RANK=rank;
    not what that worker started, which inherits it)."""
    found = []
    for p in _children().get(launcher, []):
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if f"\0RANK={rank}\0".encode() in env:
            found.append(p)
    assert len(found) == 1, (rank, found)
    return found[0]


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children before the parent exits, so none is re-parented)."""
    children = _children()
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def test_run_whose_worker_died_is_restarted_by_torchrun_resumes_bitwise_and_within_1e6_on_another_mesh(tmp_path):
    """The shipped demo corpus on 4 processes: rank 2's worker SIGKILLed after step 3; torchrun (--max-restarts 1)
    restarts the job, which resumes from the newest complete checkpoint; its whole loss curve is the uninterrupted
    run's, bitwise. That checkpoint then resumes on 2 processes at tp=2."""
    straight = train(tmp_path, 4, *LONG, "--dp-shard", "4")
    ckpt = str(tmp_path / "ckpt")
    logged, at_kill, saved = restarted_run(tmp_path, ckpt, after_step=3)
    steps = [r["step"] for r in logged]
    # `saved`: the newest complete checkpoint when the job came back (an async save under way may have finished)
    assert at_kill <= saved < 12 and steps[-(12 - saved):] == list(range(saved + 1, 13)), (steps, saved)
    # Same mesh, new process group: model, AdamW moments, LR schedule and data position all restored.
    curve = {r["step"]: r["loss"] for r in logged}  # the second try's steps replace the first's
    assert [curve[s] for s in range(1, 13)] == [r["loss"] for r in straight]
    # Another mesh (tp=2 on 2 processes) reads the dp_shard=4 shards, resharded.
    ckpt_copy = str(tmp_path / "ckpt-copy")
    os.makedirs(ckpt_copy)
    shutil.copytree(Checkpointer(ckpt).path(saved), os.path.join(ckpt_copy, f"step-{saved}"))
    other = train(tmp_path, 2, *LONG, "--tp", "2", "--checkpoint-dir", ckpt_copy, "--resume")
    assert [r["step"] for r in other] == list(range(saved + 1, 13))
    for i, (a, b) in enumerate(zip(other, straight[saved:])):
        # fp32 sums in another order (sharded matmuls): ~1e-7 a step, then grown by later AdamW steps.
        assert abs(a["loss"] - b["loss"]) <= (1e-6 if i < 3 else 1e-5) * abs(b["loss"]), (a, b)


PPO_JOB = ("ppo.py", "--iterations", "8", "--prompts", "4", "--group-size", "2", "--max-new-tokens", "3",
           "--ppo-epochs", "2", "--lr", "1e-3", "--dp-shard", "2")


def test_ppo_run_whose_worker_died_is_restarted_by_torchrun_and_resumes_bitwise(tmp_path):
    """PPO on 2 processes (FSDP): rank 1's worker SIGKILLed after iteration 3; the restarted job resumes the actor,
    the critic and both optimizers from the newest complete checkpoint, and every iteration's rollout and losses
    are the uninterrupted run's, bitwise."""
    straight = tmp_path / "straight.jsonl"
    torchrun(2, os.path.join(ROOT, "recipes", PPO_JOB[0]), *PPO_JOB[1:], "--metrics", str(straight), cwd=tmp_path)
    straight = [json.loads(line) for line in straight.read_text().splitlines()]
    logged, at_kill, saved = restarted_run(tmp_path, str(tmp_path / "ckpt"), after_step=3, rank=1, job=PPO_JOB,
                                           nproc=2)
    its = [r["iteration"] for r in logged]
    assert at_kill <= saved < 8 and its[-(8 - saved):] == list(range(saved + 1, 9)), (its, saved)
    curve = {r["iteration"]: r for r in logged}  # the second try's iterations replace the first's
    for key in ("pg_loss", "vf_loss", "kl", "entropy", "reward_mean", "samples", "approx_kl", "clip_frac"):
        assert [curve[i][key] for i in range(1, 9)] == [r[key] for r in straight], key
    assert straight[-1]["approx_kl"] > 0  # the actor moved: the weights restored were not the initial ones


CRASH_SCRIPT = r"""
import sys, torch, dtllama
from dtllama.train.checkpoint import Checkpointer, TrainState
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
    from dtllama.train.checkpoint import Checkpointer, TrainState

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


def test_a_second_model_and_optimizer_round_trip_and_a_mismatched_one_is_named(tmp_path):
    """`TrainState(..., others={"critic": (model, opt)})` (PPO's actor and critic in one checkpoint): both models'
    parameters and both optimizers' moments come back; a critic of another shape is named before DCP loads."""
    import dataclasses

    import pytest
    import torch

    import dtllama
    from dtllama.train.checkpoint import TrainState, check_compatible

    cfg = dataclasses.replace(dtllama.flavors["debug"], num_hidden_layers=2)

    def pair(seed):
        actor, critic = dtllama.LlamaForCausalLM(cfg), dtllama.model_class(cfg, value=True)(cfg)
        actor.init_weights(seed)
        critic.init_weights(seed + 1)
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (actor, critic)]
        return actor, critic, opts

    actor, critic, (a_opt, c_opt) = pair(0)
    for m, o in ((actor, a_opt), (critic, c_opt)):  # moments that are not zero
        sum(p.square().sum() for p in m.parameters()).backward()
        o.step()
    ckpt = Checkpointer(str(tmp_path / "ck"))
    ckpt.save(1, TrainState(actor, a_opt, extra={"iteration": 1}, others={"critic": (critic, c_opt)}))
    actor2, critic2, (a2, c2) = pair(7)
    for m, o in ((actor2, a2), (critic2, c2)):  # optimizer state to load into
        sum(p.sum() for p in m.parameters()).backward()
        o.step()
    state = TrainState(actor2, a2, extra={"iteration": 0}, others={"critic": (critic2, c2)})  # DCP fills given keys
    assert ckpt.load_latest(state) == 1 and state.extra == {"iteration": 1}
    for m, o, m2, o2 in ((actor, a_opt, actor2, a2), (critic, c_opt, critic2, c2)):
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
        for p, q in zip(m.parameters(), m2.parameters()):
            assert torch.equal(o.state[p]["exp_avg_sq"], o2.state[q]["exp_avg_sq"])
    wide = dtllama.model_class(cfg, value=True)(dataclasses.replace(cfg, hidden_size=2 * cfg.hidden_size))
    with pytest.raises(ValueError, match=r"another model: model.embed_tokens.weight \(critic\) has shape"):
        check_compatible(ckpt.path(1), wide, "critic.model")
    with pytest.raises(ValueError, match="'model' is a key of the state itself"):
        TrainState(actor, a_opt, others={"model": (critic, c_opt)})
