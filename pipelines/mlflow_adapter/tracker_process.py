"""A tracker that runs in a helper process: the training process only sends it its calls.

    tracker = ProcessTracker(functools.partial(start_worker_tracker, config, run_dir, run_id))
    tracker.log_metrics({"loss": 1.2}, step)   # one write to a socket; MLflow's work happens in the helper
    tracker.close()                             # waits until the helper has sent everything

Why a process and not a thread: MLflow's import and its sqlite store take seconds of CPU (bench/NOTES.md), holding
the GIL, right when rank 0 builds its model; and every later call it makes competes with the training thread for the
GIL. In a helper process that work runs on another core, beside the training. The helper builds its tracker by calling the
picklable `factory` it is sent, then replays each call in order. When the training process dies (a SIGKILL, a lost
node), the helper reads the end of its socket, closes its tracker (sending what it has) and exits.

The helper is not the training process's child: a launcher starts it in a session of its own and exits. Ray SIGKILLs
the children of a worker it kills (a sweep trial the scheduler stopped; a job stopped), and a child helper would die
with the metrics it had not sent yet (all of them, when it was still importing MLflow).

Run as `python -m pipelines.mlflow_adapter.tracker_process FD`, by ProcessTracker only.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from nanogpt.tracking import Tracker

log = logging.getLogger(__name__)

_CLOSE, _CLOSED = "close", "closed"


class ProcessTracker:
    """`nanogpt.tracking.Tracker` whose calls run, in order, on the tracker `factory()` builds in a helper process.
    Calls return at once, except close, which waits for the helper to finish. If the helper dies, a warning says so
    once and later calls are dropped: tracking never stops training."""

    def __init__(self, factory: Callable[[], Tracker]) -> None:
        ours, theirs = socket.socketpair()
        self._pid = _start_detached(theirs.fileno())
        theirs.close()
        self._conn: Connection | None = Connection(ours.detach())
        self._send(factory)

    def log_params(self, params: dict) -> None:
        self._call("log_params", params)

    def set_tags(self, tags: dict) -> None:
        self._call("set_tags", tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._call("log_metrics", metrics, step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._call("log_text", text, artifact_file)

    def close(self, status: str = "FINISHED") -> None:
        """Send `close(status)`, then wait until the helper has closed its tracker and its end of the socket (it
        exits then)."""
        self._call(_CLOSE, status)
        if self._conn is None:
            return
        confirmed = False
        try:
            while True:  # _CLOSED, then the end of the socket
                confirmed = self._conn.recv() == _CLOSED or confirmed
        except (EOFError, OSError):
            pass
        if not confirmed:
            log.warning("the tracking helper process (pid %d) ended before it confirmed the close", self._pid)
        self._conn.close()
        self._conn = None

    def _call(self, name: str, *args: Any) -> None:
        self._send((name, args))

    def _send(self, message: Any) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(message)
        except OSError as e:  # BrokenPipeError / ConnectionResetError: the helper is gone
            log.warning("the tracking helper process (pid %d) is gone (%s): nothing more is tracked", self._pid, e)
            self._conn.close()
            self._conn = None


# the helper's stdout is the launcher's stderr: the launcher's stdout is a pipe that must close when it exits
_LAUNCHER = ("import subprocess, sys; print(subprocess.Popen(sys.argv[1:], pass_fds=[int(sys.argv[-1])], "
             "start_new_session=True, stdout=sys.stderr).pid)")


def _start_detached(fd: int) -> int:
    """Start `python -m pipelines.mlflow_adapter.tracker_process FD` through a launcher that exits at once, so that the helper is
    no one's child (PID 1 reaps it) and in a session of its own; returns the helper's pid."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    launched = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-m", __name__, str(fd)],
                              pass_fds=[fd], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return int(launched.stdout)


def serve(conn: Connection) -> None:
    """The helper's side: build the tracker, replay calls until close (answered) or the end of the socket."""
    tracker: Tracker = conn.recv()()
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):  # the training process is gone: send what we have, as a failed run
            tracker.close("FAILED")
            return
        try:
            getattr(tracker, name)(*args)
        except Exception:  # a tracker's failures are warnings; a bug here must not stop the replay
            log.exception("tracker call %s failed", name)
        if name == _CLOSE:
            conn.send(_CLOSED)
            return


def main() -> None:
    # an interrupt is for the training process to act on: the helper ends with it (the end of its socket), having
    # sent what it holds
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conn = Connection(int(sys.argv[1]))
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
