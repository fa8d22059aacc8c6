"""`Pool`: N runs in parallel for reward throughput, with back-pressure."""

import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from sandbox import launch
from sandbox.runner import run
from sandbox.spec import Result


class Pool:
    """Runs programs on `workers` threads, each driving one jailed run at a time (the work happens in the
    jails' processes, so threads are enough). At most `max_pending` runs are queued or running: `submit`
    blocks beyond that, so a fast producer cannot pile up unbounded work. Every run keeps its own limits,
    including its wall-clock deadline. `defaults` (e.g. `limits=`, `timeout=`) apply to every run unless the
    run overrides them.

        with sandbox.Pool(4) as pool:
            results = pool.map([{"source": code, "tests": tests} for code in completions])
    """

    def __init__(
        self,
        workers: int,
        *,
        max_pending: int | None = None,
        allow_weak_isolation: bool = False,
        **defaults: object,
    ) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        max_pending = 2 * workers if max_pending is None else max_pending
        if max_pending < workers:
            raise ValueError(f"max_pending ({max_pending}) must be at least workers ({workers})")
        launch.require_isolation(allow_weak_isolation)  # fail loudly now, not on the first run
        self.workers = workers
        self._defaults = {"allow_weak_isolation": allow_weak_isolation, **defaults}
        self._slots = threading.BoundedSemaphore(max_pending)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="sandbox")

    def submit(self, source: str, **kwargs: object) -> "Future[Result]":
        """Queue one run (same arguments as `sandbox.run`); blocks while `max_pending` runs are in flight."""
        self._slots.acquire()
        try:
            future = self._executor.submit(run, source, **{**self._defaults, **kwargs})
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def run(self, source: str, **kwargs: object) -> Result:
        """`sandbox.run` on one of the pool's workers."""
        return self.submit(source, **kwargs).result()

    def map(self, jobs: Iterable[dict]) -> list[Result]:
        """Run every job (a dict of `sandbox.run` keyword arguments, `source` included); results in order."""
        futures = [self.submit(**job) for job in jobs]
        return [future.result() for future in futures]

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
