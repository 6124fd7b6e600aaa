"""A run that stops, naming the rank it waited for, instead of hanging.

Each rank's background thread writes a heartbeat (the time, and the step it is in) into the job's key-value store
(torchrun's, at MASTER_ADDR:MASTER_PORT, over a connection of its own) every second or so. A collective that does
not finish within the process group's timeout (`--timeout`) raises on the ranks waiting in it; `Watchdog.step` turns
that into a `CollectiveTimeout` naming the ranks whose heartbeat stopped (a stopped, dead or wedged process) with
the step each was in, or saying that all are alive (one is slow or hung inside the step), and the operation that
waited; the recipe prints it on every rank that saw it. A hang no collective reports (host code spinning, a device
op that never returns) is caught by `faulthandler`'s timer: at twice the timeout without a new step the rank prints
every thread's stack and exits.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager

import torch.distributed as dist

_KEY = "dtllama/heartbeat/{attempt}/{rank}"  # per torchrun restart attempt: a dead attempt's beats are not read


class CollectiveTimeout(TimeoutError):
    """A collective waited longer than `--timeout` for another rank; the message names it."""


def _timed_out(error: BaseException) -> bool:
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


class Watchdog:
    """`with watchdog.step(n): ...` around each step of a run (see the module docstring). `timeout` in seconds: the
    process group's, so that the message names what the collective waited for."""

    def __init__(self, timeout: float, interval: float = 1.0):
        if not timeout > 0:
            raise ValueError(f"--timeout {timeout}: give the seconds a collective may wait (e.g. 1800)")
        self.timeout, self.interval, self.current = timeout, min(interval, timeout / 4), 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.store, self._lock, self._stop, self._thread = None, threading.Lock(), threading.Event(), None
        self.attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if dist.is_initialized() and "MASTER_ADDR" in os.environ:
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                       timeout=dist.constants.default_pg_timeout)
            self._beat()
            self._thread = threading.Thread(target=self._beats, daemon=True, name="dtllama-heartbeat")
            self._thread.start()

    def close(self) -> None:
        """Stop the heartbeat and drop the store connection, before the process group goes: a daemon thread still
        inside a store call while the interpreter finalizes can abort the process at exit."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval + 5)
        self._thread, self.store = None, None

    def _beat(self) -> None:
        with self._lock:  # the step's own beat and the thread's share one connection
            self.store.set(_KEY.format(attempt=self.attempt, rank=self.rank), f"{time.time()} {self.current}")

    def _beats(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return

    @contextmanager
    def step(self, n: int):
        self.current = n
        if self.store is not None:
            self._beat()
        faulthandler.dump_traceback_later(2 * self.timeout, exit=True, file=sys.stderr)
        try:
            yield
        except Exception as e:
            if self.store is not None and _timed_out(e):
                raise CollectiveTimeout(self.message(n, e)) from e
            raise
        finally:
            faulthandler.cancel_dump_traceback_later()

    def silent(self) -> dict[int, tuple[float, int]]:
        """The ranks whose heartbeat stopped: `{rank: (seconds since it, the step it was in)}`."""
        out, now = {}, time.time()
        for r in range(self.world):
            key = _KEY.format(attempt=self.attempt, rank=r)
            if not self.store.check([key]):
                out[r] = (float("inf"), 0)
                continue
            t, step = self.store.get(key).decode().split()
            if now - float(t) > 3 * self.interval + 1.0:
                out[r] = (now - float(t), int(step))
        return out

    def message(self, n: int, error: BaseException) -> str:
        silent = self.silent()
        if silent:
            who = ", ".join(f"rank {r} (no heartbeat for {s:.0f} s, in step {k})" for r, (s, k) in silent.items())
            cause = f"waiting for {who}: stopped, dead or wedged (its own log or stack dump says where)"
        else:
            cause = "every rank's heartbeat is alive, so one is slow or hung inside its step"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"rank {self.rank}: a collective of step {n} did not finish within --timeout {self.timeout:g} s, "
                f"{cause}; the collective said: {first}")


__all__ = ["CollectiveTimeout", "Watchdog"]
