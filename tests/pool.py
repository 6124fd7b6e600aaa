"""A persistent pool of torch.distributed (gloo) worker processes for property-based tests.

Why: hypothesis draws many examples inside the one pytest process, and spawning W processes and
joining a process group costs seconds per example. `WorkerPool` starts W "spawn" processes once.
Each joins one gloo process group and then runs any number of tasks: `run(fn, *args, **kwargs)`
calls `fn(*args, **kwargs)` on every rank and returns the results as a list in rank order.

A failing task must fail the test, never hang it, and must not break later tasks. After any remote
exception, dead worker or timeout, the pool kills its workers and starts fresh ones (new port, new
process group) before it raises. Ranks may be out of step by then: one rank skipped a collective
that the others entered.

Each worker writes its stderr to a log file with `faulthandler` on, so a worker that dies by a signal (a C++
abort, a segfault) leaves its last words and Python stacks; the error quotes them. A task whose worker died by a
signal, its peers failing only for the lost connection, runs once more on fresh workers, with a warning that
quotes the log: a process killed from outside (the OOM killer, an exhausted thread limit on a loaded machine) is
not the code's failure, while a crash that the task causes happens again and fails the test with both logs.
A rank that does not answer within the timeout dumps its Python stacks to its log on SIGUSR1 before the
pool kills it, and the TimeoutError quotes them: a hang says where it hangs.

Usage (tests/ is not a package; pytest puts it on sys.path):

    from pool import get_pool
    outs = get_pool(2).run(my_task, x, n=3)   # [result of rank 0, result of rank 1]

`fn` must be a module-level function that the workers can import by name. They get the parent's
sys.path, so a test module works. Every worker imports fn's module, though, so put tasks in a light
module (not one that imports transformers or conftest). Use hypothesis `settings(deadline=None)`.
The first run() after a failure waits for the new workers to start (a few seconds).
"""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings

_CTX = mp.get_context("spawn")
# Every DeviceMesh a task builds adds process groups, and gloo keeps threads for each (a device loop and work
# threads) for the life of the process; a worker that ran a few hundred property examples held thousands of
# threads, and the load average passed 400 on 2 cores, slowing every test after. Destroying a task's groups is not
# safe (torch caches groups by name, e.g. for functional collectives), so a pool whose workers hold more than
# this many groups is restarted after the task.
MAX_GROUPS = 60
GRACE = 5.0  # once one rank has failed, wait at most this long for the rest (they may hang in a collective)
LOG_TAIL = 40  # lines of a dead worker's stderr log quoted in the error


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _add_paths(paths: list[str]) -> None:
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)


def _exit_with_parent() -> None:
    """Watchdog thread: if the parent dies without closing the pool (SIGKILL), exit even when a task hangs."""
    mp.connection.wait([mp.parent_process().sentinel])
    os._exit(1)


def _log_tail(path: str, lines: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 64 * 1024))  # the end is what matters; logs can grow long
            text = f.read().decode(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text[-lines:]) or "(its log is empty)"


# What a rank raises when a peer's process is gone: a consequence of the death, not an error of its own.
PEER_LOST = re.compile(r"Connection reset by peer|Connection closed by peer|Broken pipe|gloo.*(Read|Write) error")


def _worker(rank: int, world_size: int, port: int, pg_timeout: float, paths: list[str], log: str,
            task_q, reply) -> None:
    """A worker's main loop. It sets the environment before importing torch, because OpenMP reads it at load time.
    `reply` is this rank's own pipe to the parent: a worker that dies while writing (or holding a shared queue's
    lock) would otherwise cut off the other ranks' replies too, and their errors would read as missing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; no traceback per worker
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)  # C++ messages (an abort's `what()`) go to fd 2 too, not only Python's sys.stderr
    os.close(fd)
    faulthandler.enable(sys.stderr, all_threads=True)  # the main thread's stack too when a gloo thread aborts
    faulthandler.register(signal.SIGUSR1, sys.stderr, all_threads=True)  # where a hung task is: see _where
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks are local; don't depend on hostname resolution
    _add_paths(paths)
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}",
                                timeout=datetime.timedelta(seconds=pg_timeout))
    except BaseException:
        reply.send((0, False, traceback.format_exc()))
        return
    reply.send((0, True, None))  # task id 0 means "ready"
    while True:
        msg = task_q.get()
        if msg is None:
            break
        task_id, paths, blob = msg
        try:
            _add_paths(paths)
            fn, args, kwargs = pickle.loads(blob)
            # Pickle here, by value: a bad result is reported as this rank's error, and tensors don't travel
            # through torch's shared-memory reductions, which would need file descriptors kept alive.
            result = fn(*args, **kwargs)
            from torch.distributed.distributed_c10d import _world

            answer = (True, pickle.dumps((result, len(_world.pg_map))))
        except BaseException:  # pytest.skip/fail outcomes are BaseExceptions too
            answer = (False, traceback.format_exc())
        reply.send((task_id, *answer))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class WorkerPool:
    """`world_size` worker processes in one gloo process group. They stay up across run() calls."""

    def __init__(self, world_size: int, timeout: float = 120.0, start_timeout: float = 120.0):
        # start_timeout is separate: on a loaded 2-core machine, starting 4 workers that import torch takes 5-15 s
        self.world_size, self.timeout, self.start_timeout = world_size, timeout, start_timeout
        self.closed = False
        self._procs: list = []
        self._queues: list = []
        self._replies: list = []
        self._logs: list[str] = []
        self._task_id = 0
        self._logdir = tempfile.TemporaryDirectory(prefix=f"pool{world_size}-")
        self._start()
        self._wait_ready()  # so the first test doesn't pay the start-up cost, and so start-up errors show here

    def _start(self) -> None:
        """Start fresh workers without waiting for them, so that a failing run() raises at once."""
        self.port = _free_port()  # a new port on every start: the old one may still be in TIME_WAIT
        self._task_qs = [_CTX.Queue() for _ in range(self.world_size)]
        pipes = [_CTX.Pipe(duplex=False) for _ in range(self.world_size)]  # (parent's reading end, worker's end)
        self._replies = [r for r, _ in pipes]
        self._queues = list(self._task_qs)
        # The gloo timeout only bounds rendezvous and collectives; a hung task is killed by run() after `timeout`.
        pg_timeout = max(self.timeout, self.start_timeout)
        self._logs = [os.path.join(self._logdir.name, f"rank{r}-{self.port}.log") for r in range(self.world_size)]
        self._procs = [_CTX.Process(target=_worker, name=f"pool{self.world_size}-rank{r}", daemon=True,
                                    args=(r, self.world_size, self.port, pg_timeout, list(sys.path), self._logs[r],
                                          self._task_qs[r], pipes[r][1]))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        for _, w in pipes:
            w.close()  # the worker holds its end now: its death reads as end-of-file here
        self._ready = False

    def _kill(self) -> None:
        """SIGKILL the workers: they may be stuck in a C++ collective and have no state worth saving."""
        procs, self._procs = self._procs, []
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)
            if p.exitcode is not None:
                p.close()
        for log in self._logs:  # its tail, if needed, was read in _collect
            if os.path.exists(log):
                os.remove(log)
        for q in self._queues:  # a worker killed while writing may leave a queue unusable: always use new ones
            q.cancel_join_thread()  # never block interpreter exit on data that no one will read
            q.close()
        for c in self._replies:
            c.close()
        self._queues, self._replies = [], []

    def _restart(self) -> None:
        self._kill()
        self._start()

    def _collect(self, task_id: int, timeout: float) -> tuple[dict, dict, list]:
        """Gather replies to `task_id`: ({rank: payload}, {rank: traceback text}, [ranks that did not answer])."""
        ok: dict = {}
        failed: dict = {}
        deadline = time.monotonic() + timeout
        while len(ok) + len(failed) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            had_failed = bool(failed)
            waiting = {self._replies[r]: r for r in range(self.world_size)
                       if r not in ok and r not in failed and not self._replies[r].closed}
            msgs = []
            for conn in mp.connection.wait(list(waiting), timeout=min(left, 0.5)):
                try:
                    msgs.append((waiting[conn], *conn.recv()))
                except (EOFError, OSError, pickle.UnpicklingError):
                    conn.close()  # its worker is gone (mid-write, perhaps): reported as dead below
            if not waiting:
                time.sleep(min(left, 0.1))
            # Look for dead workers before recording a failure: when a rank dies, its peers' "connection closed"
            # errors arrive soon after, and the death is the error to report first.
            for r, p in enumerate(self._procs):
                if r not in ok and r not in failed and not p.is_alive() and not any(m[0] == r for m in msgs):
                    failed[r] = (f"worker process of rank {r} died (exit code {p.exitcode}); the end of its "
                                 f"stderr:\n{_log_tail(self._logs[r])}\n")
            for rank, tid, good, payload in msgs:
                if tid == task_id:  # a reply to an earlier task is stale
                    (ok if good else failed).setdefault(rank, payload)
            if failed and not had_failed:
                deadline = min(deadline, time.monotonic() + GRACE)
        return ok, failed, [r for r in range(self.world_size) if r not in ok and r not in failed]

    def _where(self, ranks: list[int]) -> str:
        """Where the ranks that did not answer are stuck: each dumps its Python threads' stacks to its log on
        SIGUSR1 (a collective that a peer skipped, a deadlock), quoted before the pool kills them."""
        for r in ranks:
            try:
                os.kill(self._procs[r].pid, signal.SIGUSR1)
            except (ProcessLookupError, ValueError):
                pass
        time.sleep(1.0)
        return "".join(f"--- rank {r} did not answer; its stacks ---\n{_log_tail(self._logs[r], 3 * LOG_TAIL)}\n" for r in ranks)

    def _wait_ready(self) -> None:
        __tracebackhide__ = True
        ok, failed, missing = self._collect(0, self.start_timeout)
        if failed or missing:
            self._kill()  # the next run() starts fresh workers
            detail = "".join(f"--- rank {r} ---\n{tb}" for r, tb in failed.items())
            raise RuntimeError(f"gloo worker pool (world {self.world_size}, port {self.port}) failed to start; "
                               f"failed ranks {sorted(failed)}, no answer from {missing}\n{detail}")
        self._ready = True

    def run(self, fn, *args, **kwargs) -> list:
        """Call fn(*args, **kwargs) on every rank; return the results in rank order.

        It raises RuntimeError with the first failing rank's traceback, or TimeoutError naming the ranks that
        did not answer in `timeout` seconds. Either way the pool has been restarted and stays usable. A worker
        that died by a signal gets the task a second try on fresh workers (module docstring), not a third.
        """
        __tracebackhide__ = True  # pytest: show the remote traceback, not this frame's locals
        if self.closed:
            raise RuntimeError("WorkerPool is closed")
        blob = pickle.dumps((fn, args, kwargs))  # a pickling error shows here, not as a silent hang
        name = getattr(fn, "__qualname__", repr(fn))
        ok, failed, missing, signalled, where = self._run_once(blob)
        if signalled:
            warnings.warn(f"{name}: a worker of world {self.world_size} died by a signal; running it again on "
                          f"fresh workers.\n{signalled}", RuntimeWarning, stacklevel=2)
            ok, failed, missing, again, where = self._run_once(blob)
            if again:
                failed = {r: f"{tb}\n--- the first try ---\n{signalled}" for r, tb in failed.items()}
        if failed:
            first = next(iter(failed))
            others = "".join(f"\nrank {r} also failed: {tb.strip().splitlines()[-1]}"
                             for r, tb in failed.items() if r != first)
            hung = f"\nranks {missing} did not answer within {GRACE:g} s after the failure\n{where}" if missing else ""
            raise RuntimeError(f"{name} failed on rank {first} of world {self.world_size} "
                               f"(pool restarted){others}{hung}\n--- remote traceback (rank {first}) ---\n"
                               f"{failed[first]}")
        if missing:
            raise TimeoutError(f"{name} timed out after {self.timeout:g} s on world {self.world_size}: "
                               f"ranks {missing} did not answer (pool restarted)\n{where}")
        results, groups = zip(*(pickle.loads(ok[r]) for r in range(self.world_size)))
        if max(groups) > MAX_GROUPS:
            self._restart()  # fresh workers, started now, awaited by the next run()
        return list(results)

    def _run_once(self, blob: bytes) -> tuple[dict, dict, list, str, str]:
        """One try of a task: `_collect`'s three results, the failures of workers that died by a signal (text;
        empty if none, or if another rank raised an error of its own) and the stacks of the ranks that did not
        answer. After a failure or timeout the pool has been restarted."""
        if not self._procs:
            self._start()
        if not self._ready:
            self._wait_ready()
        self._task_id += 1
        try:
            for q in self._task_qs:
                q.put((self._task_id, list(sys.path), blob))
            ok, failed, missing = self._collect(self._task_id, self.timeout)
        except BaseException:  # e.g. KeyboardInterrupt while ranks are mid-task: their state is unknown
            self._kill()
            raise
        dead = {r for r, p in enumerate(self._procs) if r in failed and p.exitcode is not None and p.exitcode < 0}
        # Retried only when the deaths are the whole story: every other failing rank lost its peer.
        own_errors = [r for r in failed if r not in dead and not PEER_LOST.search(failed[r])]
        signalled = "" if own_errors else "".join(failed[r] for r in sorted(dead))
        where = self._where(missing) if missing else ""
        if failed or missing:
            self._restart()
        return ok, failed, missing, signalled, where

    def close(self) -> None:
        """Ask the workers to leave, give them a few seconds, then kill whatever is left."""
        if self._procs:
            for q in self._task_qs:
                try:
                    q.put(None)
                except (ValueError, OSError):
                    pass
            deadline = time.monotonic() + 5.0
            for p in self._procs:
                p.join(max(0.0, deadline - time.monotonic()))
        self._kill()
        self._logdir.cleanup()
        self.closed = True

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_POOLS: dict[int, WorkerPool] = {}


def get_pool(world_size: int) -> WorkerPool:
    """The pool for `world_size`, started on first use and kept until `close_pools` (after each test module)."""
    pool = _POOLS.get(world_size)
    if pool is None or pool.closed:
        pool = _POOLS[world_size] = WorkerPool(world_size)
    return pool


@atexit.register
def close_pools() -> None:
    """Close every pool (at exit, and after each test module: idle workers should not hold threads meanwhile)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
