"""Warm worker processes that run calls under a hard deadline.

A reward can hang in C code (sympy computing ``10**(10**10)``), where no signal handler ever runs and a
thread cannot be stopped. The only bound that always holds is killing the process, so every call runs in a
worker process and the parent kills a worker whose current call passed its deadline, records a timeout for
that call, starts one replacement and gives the rest of the worker's chunk back to the queue.

Calls travel in chunks (one pickle and one pipe write per chunk, not per call); a worker answers after each
call, which is what tells the parent where the deadline of the next call starts.

A new worker first runs the pool's warm-up calls (importing the reward functions' modules and doing their lazy
set-up, which on a loaded machine can take longer than a call's deadline) and says it is ready; the deadline
of its first call starts only then.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)
_IN_WORKER = False
_READY = "ready"  # what a worker sends once its warm-up is done, before the answers to its first chunk
_NO_WARMUP = pickle.dumps([])


def in_worker() -> bool:
    """True inside a pool worker: the pool's deadline already bounds whatever runs here."""
    return _IN_WORKER


@dataclass(frozen=True)
class Call:
    """One function call for the pool: ``fn(*args)``, killed after ``timeout_s`` seconds."""

    fn: Callable[..., Any]
    args: tuple
    timeout_s: float


@dataclass
class Outcome:
    """What one call produced: its value, or the text of its exception, or a timeout."""

    value: Any = None
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent dies, so a hung worker never outlives the trainer."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _worker_main(conn: Connection, parent_sys_path: list[str], parent_environ: dict[str, str]) -> None:
    global _IN_WORKER
    _IN_WORKER = True
    # The fork server started with the parent's path and environment of that moment; rewards must see the
    # parent's as of this worker's start (a plug-in's folder added later, an API key set later).
    sys.path[:] = parent_sys_path
    os.environ.clear()
    os.environ.update(parent_environ)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us.
    _die_with_parent()
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        warmup, count, payload = message
        if warmup is not None:
            _warm_up(warmup)
            conn.send(_READY)
        try:
            chunk = pickle.loads(payload)
        except Exception as exc:  # e.g. the reward's module does not import here
            for _ in range(count):
                conn.send((None, f"could not load the call in the worker: {describe_exception(exc)}"))
            continue
        for fn, args in chunk:
            try:
                reply = (fn(*args), None)
            except BaseException as exc:  # noqa: BLE001 - a reward's failure is data, never our crash
                reply = (None, describe_exception(exc))
            try:
                conn.send(reply)
            except Exception as exc:  # the value did not pickle
                conn.send((None, f"result could not be sent back: {describe_exception(exc)}"))


def _warm_up(payload: bytes) -> None:
    """Run the warm-up calls for their side effects (imports, caches); their failures are not ours to report:
    the same calls under a deadline report them."""
    try:
        calls = pickle.loads(payload)
    except Exception:  # noqa: BLE001 - the scored chunk will fail to load and say why
        return
    for fn, args in calls:
        try:
            fn(*args)
        except BaseException:  # noqa: BLE001 - only a warm-up
            pass


def describe_exception(exc: BaseException) -> str:
    """The exception's type and message plus the innermost frame, which is where the reward failed."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


class _Worker:
    def __init__(self, ctx: mp.context.BaseContext) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main, args=(child_conn, list(sys.path), dict(os.environ)), daemon=True
        )
        self.process.start()
        child_conn.close()
        self.indices: deque[int] = deque()  # call indices sent and not answered yet, in order
        self.deadline = math.inf
        self.warmup = _NO_WARMUP  # the warm-up sent with its first chunk
        self.ready = False  # it has run that warm-up and said so

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class BoundedPool:
    """``workers`` warm processes; ``map`` runs calls with a hard per-call deadline and never raises for them.

    Workers are started with ``forkserver`` (``spawn`` where it does not exist): the fork server imports
    ``preload`` once, so a replacement for a killed worker is ready in milliseconds, and no worker inherits
    the parent's threads, CUDA context or locks. Functions travel by reference (module and name), so they
    must be importable module-level functions, or picklable objects.

    Calls given to ``set_warmup`` run in each worker before its first chunk, and its first call's deadline
    starts only after them. A worker's start and warm-up together are bounded by ``warmup_timeout_s``: a
    warm-up that does not finish in time (it hangs) or kills the worker is dropped, and later workers start
    without it.
    """

    def __init__(
        self,
        workers: int,
        preload: Sequence[str] = ("rewards", "rewards.warm"),
        start_method: str | None = None,
        warmup_timeout_s: float = 60.0,
    ):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(list(preload))
        self._workers = [_Worker(self._ctx) for _ in range(workers)]
        self._busy: dict[Connection, _Worker] = {}
        self._warmup = _NO_WARMUP
        self.warmup_timeout_s = warmup_timeout_s
        self.restarts = 0
        atexit.register(self.close)

    def set_warmup(self, calls: Sequence[Call]) -> None:
        """Calls each worker runs, outcomes discarded, before its first chunk: from now on, for a worker that
        has not taken work yet and for every replacement of a killed one. Their own ``timeout_s`` is not used:
        ``warmup_timeout_s`` bounds the warm-up as a whole."""
        try:
            self._warmup = pickle.dumps([(call.fn, call.args) for call in calls])
        except Exception as exc:
            raise TypeError(f"calls for the worker processes must pickle: {describe_exception(exc)}") from exc

    def map(self, calls: Sequence[Call], chunk_size: int | None = None) -> list[Outcome]:
        """Run every call once; a call that raises, or outlives its ``timeout_s``, gives a failed Outcome.

        Consecutive calls go to the same worker in chunks of ``chunk_size`` (default: about four chunks per
        worker, so a slow chunk does not leave the other workers idle at the end).
        """
        if not self._workers:
            raise RuntimeError("BoundedPool.map called after close()")
        try:  # fail here, on bad input, rather than half-way with calls in flight
            pickle.dumps([(call.fn, call.args) for call in calls])
        except Exception as exc:
            raise TypeError(f"calls for the worker processes must pickle: {describe_exception(exc)}") from exc
        chunk_size = chunk_size or max(1, math.ceil(len(calls) / (4 * len(self._workers))))
        self._calls, self._outcomes = calls, [None] * len(calls)
        self._queue = deque(
            list(range(s, min(s + chunk_size, len(calls)))) for s in range(0, len(calls), chunk_size)
        )
        self._busy = {}
        try:
            while self._queue or self._busy:
                self._dispatch()
                next_deadline = min(worker.deadline for worker in self._busy.values())
                for conn in wait(list(self._busy), timeout=max(0.0, next_deadline - time.monotonic())):
                    self._read_replies(self._busy[conn])
                now = time.monotonic()
                for worker in [w for w in self._busy.values() if w.deadline <= now]:
                    if worker.ready:
                        why = f"timed out after {calls[worker.indices[0]].timeout_s:g} s"
                    else:
                        why = f"worker not ready after {self.warmup_timeout_s:g} s"
                    self._fail_current(worker, Outcome(error=why, timed_out=True))
        except (
            BaseException
        ):  # e.g. Ctrl-C: busy workers hold calls whose answers must not reach the next map
            for worker in list(self._busy.values()):
                self._replace(worker)
            raise
        return self._outcomes

    def _dispatch(self) -> None:
        """Give the next queued chunk to every idle worker."""
        for worker in list(self._workers):
            if not self._queue:
                return
            if worker.conn in self._busy:
                continue
            if not worker.process.is_alive():  # it died while idle
                worker = self._replace(worker)
            indices = self._queue.popleft()
            chunk = [(self._calls[i].fn, self._calls[i].args) for i in indices]
            warmup = None  # a ready worker has run it
            if not worker.ready:
                worker.warmup = warmup = self._warmup
            worker.conn.send((warmup, len(indices), pickle.dumps(chunk)))
            worker.indices = deque(indices)
            bound = self._calls[indices[0]].timeout_s if worker.ready else self.warmup_timeout_s
            worker.deadline = time.monotonic() + bound
            self._busy[worker.conn] = worker

    def _read_replies(self, worker: _Worker) -> None:
        """Record the answers a worker has sent; its readiness and each answer start the deadline of its next
        call."""
        try:
            while worker.indices and worker.conn.poll():
                reply = worker.conn.recv()
                if reply == _READY:
                    worker.ready = True
                else:
                    value, error = reply
                    self._outcomes[worker.indices.popleft()] = Outcome(value=value, error=error)
                if worker.indices:
                    worker.deadline = time.monotonic() + self._calls[worker.indices[0]].timeout_s
        except (EOFError, ConnectionError):  # it died: a segfault, os._exit, the OOM killer
            worker.process.join(1)
            self._fail_current(
                worker, Outcome(error=f"worker process died (exit code {worker.process.exitcode})")
            )
            return
        if not worker.indices:
            del self._busy[worker.conn]

    def _fail_current(self, worker: _Worker, failed: Outcome) -> None:
        """Record ``failed`` for the worker's current call, requeue the calls it had not begun, replace it.
        A worker that failed in its warm-up had no current call: all of its chunk goes back to the queue, and
        since the warm-up would fail every new worker the same way, later workers start without it."""
        if not worker.ready and worker.warmup != _NO_WARMUP:
            logger.warning("reward workers' warm-up failed (%s); new workers start without it", failed.error)
            self._warmup = _NO_WARMUP
            self._queue.appendleft(list(worker.indices))
            self._replace(worker)
            return
        self._outcomes[worker.indices.popleft()] = failed
        if worker.indices:
            self._queue.appendleft(list(worker.indices))
        self._replace(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        self._busy.pop(worker.conn, None)
        fresh = _Worker(self._ctx)
        self._workers[self._workers.index(worker)] = fresh
        self.restarts += 1
        return fresh

    def close(self) -> None:
        """Stop the workers (idempotent; also runs at interpreter exit)."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=1)
            if worker.process.is_alive():
                worker.kill()
        self._workers = []
        atexit.unregister(self.close)

    def __enter__(self) -> BoundedPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def cpu_count() -> int:
    """The CPUs this process may use: the default number of workers."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_shared_pool: BoundedPool | None = None
_shared_lock = threading.Lock()


def run_bounded(calls: Sequence[Call]) -> list[Outcome]:
    """Run ``calls`` under their deadlines from any thread: inline when this already is a pool worker (whose own
    deadline bounds us), else in a shared pool started on first use with one worker per CPU."""
    global _shared_pool
    if in_worker():
        return [_call_inline(call) for call in calls]
    with _shared_lock:  # one map at a time: the pool's bookkeeping is not shared between threads
        if _shared_pool is None:
            _shared_pool = BoundedPool(cpu_count())
        return _shared_pool.map(calls)


def _call_inline(call: Call) -> Outcome:
    try:
        return Outcome(value=call.fn(*call.args))
    except Exception as exc:  # noqa: BLE001 - same contract as a worker: failures are outcomes
        return Outcome(error=describe_exception(exc))
