"""Faults a run must survive or report clearly: a bad batch on one rank, non-finite steps."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from fault_cases import abort_rank0, hang_on_rank1, run_bad_batch
from helpers import ROOT, torchrun
from pool import WorkerPool, get_pool

from dtllama.train.optim import step_if_finite

# A bad rank must not leave its peers in a collective: the pool would time out after 120 s. A few
# seconds covers the check's two small collectives and a forward of a tiny model on a loaded CPU.
PROMPT_SECONDS = 10.0


@pytest.mark.parametrize("fault, expected", [
    ("label", "label 71 is outside the vocabulary"),
    ("cu_seqlens", "cu_seqlens must start at 0 and end at T"),
    ("max_seqlen", "max_seqlen=1 is smaller than the longest sequence"),
])
@pytest.mark.parametrize("world, layout", [(2, dict(dp_shard=-1)), (4, dict(dp_shard=2, tp=2))])
def test_bad_batch_on_one_rank_raises_the_same_error_on_every_rank(world, layout, fault, expected):
    results = get_pool(world).run(run_bad_batch, layout, fault, 1, int(torch.randint(0, 2**16, ())))
    messages = [m for m, _ in results]
    assert messages[0] is not None and all(m == messages[0] for m in messages), messages
    assert expected in messages[0] and "rank 1" in messages[0], messages[0]
    assert max(s for _, s in results) < PROMPT_SECONDS, results
    # The pool stays usable: the same layout with good batches everywhere steps normally.
    assert all(m is None for m, _ in get_pool(world).run(run_bad_batch, layout, fault, -1, 3))


def _tiny():
    torch.manual_seed(int(torch.randint(0, 2**16, ())))
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    return model, opt, sched


def _step(model, opt, sched, poison: bool, policy: str):
    loss = model(torch.randn(4, 6)).pow(2).sum()
    loss.backward()
    if poison:
        model[0].weight.grad[1, 2] = float("nan")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    return step_if_finite(opt, sched, float(loss.detach()), float(norm), policy)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_non_finite_gradient_never_reaches_the_optimizer(policy):
    model, opt, sched = _tiny()
    assert _step(model, opt, sched, False, policy)  # one good step: AdamW has moments now
    params = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    lr_steps = sched.last_epoch
    if policy == "stop":
        with pytest.raises(FloatingPointError, match="gradient norm nan.*on_nonfinite='skip'"):
            _step(model, opt, sched, True, policy)
    else:
        assert not _step(model, opt, sched, True, policy)
    for before, p in zip(params, model.parameters()):
        assert torch.equal(before, p) and p.grad is None
    for before, s in zip(moments, opt.state.values()):
        assert torch.equal(before, s["exp_avg"])
    assert sched.last_epoch == lr_steps
    # The run goes on (skip) with finite moments: a later good step moves every parameter.
    if policy == "skip":
        assert _step(model, opt, sched, False, policy)
        assert all(not torch.equal(b, p) for b, p in zip(params, model.parameters()))
        assert all(torch.isfinite(s["exp_avg"]).all() and torch.isfinite(s["exp_avg_sq"]).all()
                   for s in opt.state.values())


def test_recipe_stops_or_skips_on_a_diverged_run(tmp_path):
    """lr=1e30 makes step 2's forward overflow: `stop` exits with the message, `skip` keeps going."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "recipes", "train.py"), "--flavor", "debug", "--steps", "3", "--export-hf", "",
           "--lr", "1e30", "--warmup-steps", "1"]
    stop = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert stop.returncode != 0 and "FloatingPointError: non-finite training step" in stop.stderr, stop.stderr[-3000:]
    skip = subprocess.run(cmd + ["--on-nonfinite", "skip"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert skip.returncode == 0, skip.stderr[-3000:]
    assert skip.stdout.count("(non-finite: step skipped)") == 2, skip.stdout


def test_pool_runs_a_task_again_after_a_worker_died_by_a_signal_and_quotes_its_stderr(tmp_path):
    """A worker killed by a signal (here its own abort) gets the task one more try on fresh workers, with a
    warning that quotes its stderr log (faulthandler's stack included); a second death fails with both logs; an
    error of the task's own on another rank is not retried."""
    pool = get_pool(2)
    with pytest.warns(RuntimeWarning, match=r"(?s)died by a signal.*exit code -6.*aborts on purpose.*abort_rank0"):
        assert pool.run(abort_rank0, str(tmp_path / "aborted")) == [0, 1]
    with pytest.raises(RuntimeError, match=r"(?s)exit code -6.*aborts on purpose.*the first try.*aborts on purpose"), \
            pytest.warns(RuntimeWarning, match="died by a signal"):
        pool.run(abort_rank0, None)
    assert pool.run(abort_rank0, str(tmp_path / "aborted")) == [0, 1]  # and the pool is usable after
    # An error of the task's own on another rank is never retried, whatever else died.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match=r"(?s)fails on purpose|exit code -6"):
            pool.run(abort_rank0, None, True)


def test_pool_quotes_where_a_rank_that_did_not_answer_hangs():
    """A rank stuck past the timeout is named, with the Python stacks it dumped on SIGUSR1 before the kill."""
    with WorkerPool(2, timeout=5.0) as pool:
        with pytest.raises(TimeoutError, match=r"(?s)ranks \[1\] did not answer.*rank 1 did not answer; its stacks"
                                               r".*in hang_on_rank1"):
            pool.run(hang_on_rank1, 60.0)
        assert pool.run(hang_on_rank1, 0.0) == [0, 1]  # fresh workers after the kill


def test_torchrun_runs_a_job_again_after_a_rank_crashed_and_quotes_its_stack(tmp_path):
    """The torchrun helper's counterpart of the pool's retry: a rank's abort gets the job one more run, with a
    warning quoting faulthandler's stack; a second abort fails with both outputs; an error of the job's own on
    another rank is not retried."""
    job = os.path.join(ROOT, "tests", "abort_job.py")
    with pytest.warns(RuntimeWarning, match=r"(?s)died by a crash signal.*aborts on purpose.*Fatal Python error"
                                            r".*abort_rank0.*exitcode\s*: -6"):
        torchrun(2, job, str(tmp_path / "aborted"))
    with pytest.raises(AssertionError, match=r"(?s)SIGABRT.*the first try.*aborts on purpose"), \
            pytest.warns(RuntimeWarning, match="died by a crash signal"):
        torchrun(2, job, "-")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
            torchrun(2, job, "-", "rank1-raises")
        with pytest.raises(AssertionError, match="SIGABRT"):
            torchrun(2, job, "-", repeatable=False)


def test_a_stopped_rank_is_named_within_the_timeout(tmp_path):
    """The main job at `--timeout 5` on 2 processes; rank 1 is SIGSTOPped mid-run. Rank 0's next collective times
    out and the run ends with rank 0 naming rank 1 (its heartbeat stopped) within the timeout and a few heartbeats,
    instead of hanging for torch's default 30 minutes."""
    import json
    import signal
    import time

    from test_checkpoint_resume import descendants, worker_of_rank

    metrics, out = tmp_path / "metrics.jsonl", tmp_path / "out.txt"
    cmd = [sys.executable, "-m", "dtllama.train.launch", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "recipes", "train.py"), "--flavor", "debug", "--steps", "1000", "--batch-tokens", "600",
           "--timeout", "5", "--metrics", str(metrics), "--export-hf", ""]
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, out.read_text()[-3000:]
            time.sleep(0.05)
        # dtllama.train.launch runs torchrun's agent in its own process: the workers are its children
        os.kill(worker_of_rank(proc.pid, 1), signal.SIGSTOP)
        stopped = time.time()
        while "did not finish within --timeout" not in out.read_text():
            assert time.time() < stopped + 60, out.read_text()[-3000:]
            time.sleep(0.1)
        waited = time.time() - stopped
    finally:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    text = out.read_text()
    line = next(x for x in text.splitlines() if "did not finish within --timeout" in x)
    line = line[line.index("error: "):]  # after rank 0's progress bar
    assert line.startswith("error: rank 0: a collective of step") and "waiting for rank 1 (no heartbeat for" in line
    assert waited <= 5 + 15, (waited, line)
    assert len(json.loads(metrics.read_text().splitlines()[-1])) > 0
