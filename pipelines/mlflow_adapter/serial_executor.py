"""Jobs that run one at a time, in the order they were submitted, on a thread of their own: a ThreadPoolExecutor of
one worker, plus a timer that hands it a job later. The tracker's calls run here so that the training loop never
waits for a store, and still happen in the order the loop made them.

    executor = SerialExecutor("mlflow-tracker")
    executor.run(job)                  # returns at once; an exception is logged
    executor.run(job, wait=True)       # returns when it is done, raising what it raised
    executor.run_at(when, job)         # at time.monotonic() `when` (replaces the job set before)
    executor.stop()                    # after the jobs submitted so far; later jobs run in place

At interpreter exit, concurrent.futures runs what is still queued before the process ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)


class SerialExecutor:
    def __init__(self, name: str) -> None:
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._thread_ident: int | None = None
        self._stopped = False
        self._timer: threading.Timer | None = None

    def run(self, job: Callable[[], None], wait: bool = False) -> None:
        """Run `job` after the jobs before it; with `wait`, return when it is done (raising what it raised). On the
        executor's own thread (a job that submits a job), or once stopped, run it here and now."""
        if self._stopped or self._on_own_thread():
            job()
            return
        if self._pool is None:  # the thread starts with the first job
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self.name, initializer=self._mark_thread)
        if wait:
            self._pool.submit(job).result()
        else:
            self._pool.submit(_logged, job)

    def wait(self) -> None:
        """Return when every job submitted so far is done."""
        if self._pool is not None and not self._stopped and not self._on_own_thread():
            self._pool.submit(_nothing).result()

    def run_at(self, when: float, job: Callable[[], None]) -> None:
        """Submit `job` at time.monotonic() `when`, unless run_at is called again before (the later one stands)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(max(0.0, when - time.monotonic()), self._submit_from_timer, (job,))
        self._timer.daemon = True  # a pending timer never holds the process at exit
        self._timer.start()

    def stop(self) -> None:
        """Let the jobs submitted so far finish, then stop the thread (later jobs run on the caller's thread)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._pool is not None and not self._on_own_thread():
            self._pool.shutdown(wait=True)
        self._stopped = True

    def _submit_from_timer(self, job: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # stopped meanwhile, or the interpreter is exiting
            if self._pool is not None and not self._stopped:
                self._pool.submit(_logged, job)

    def _mark_thread(self) -> None:
        self._thread_ident = threading.get_ident()

    def _on_own_thread(self) -> bool:
        return self._thread_ident == threading.get_ident()


def _logged(job: Callable[[], None]) -> None:
    """Run a job nobody waits for: the tracker guards every MLflow call in it, so an exception is a bug, and
    tracking must not stop."""
    try:
        job()
    except Exception:
        log.exception("MLflow tracker: a call failed")


def _nothing() -> None:
    pass
