"""A tracker that runs in a helper process: the training process only sends it its calls.

    tracker = ProcessTracker(functools.partial(start_worker_tracker, config, run_dir, run_id))
    tracker.log_metrics({"loss": 1.2}, step)   # one write to a socket; MLflow's work happens in the helper
    tracker.close()                             # waits until the helper has sent everything

Why a process and not a thread: MLflow's import and its sqlite store take about 3 s of CPU, holding the GIL, right
when rank 0 builds its model; and every later call it makes competes with the training thread for the GIL. In a
helper process that work runs on another core, beside the training. The helper builds its tracker by calling the
picklable `factory` it is sent, then replays each call in order. When the training process dies (a SIGKILL, a lost
node), the helper reads the end of its socket, closes its tracker (sending what it has) and exits.

Run as `python -m pipelines.tracker_process FD`, by ProcessTracker only.
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
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._process = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], env=env)
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
        """Send `close(status)`, then wait until the helper has closed its tracker and exited."""
        self._call(_CLOSE, status)
        if self._conn is not None:
            try:
                self._conn.recv()  # _CLOSED, or EOFError when the helper died on the way
            except (EOFError, OSError):
                log.warning("the tracking helper process (pid %d) ended before it confirmed the close",
                            self._process.pid)
            self._conn.close()
            self._conn = None
        self._process.wait()

    def _call(self, name: str, *args: Any) -> None:
        self._send((name, args))

    def _send(self, message: Any) -> None:
        if self._conn is None:
            return
        try:
            self._conn.send(message)
        except OSError as e:  # BrokenPipeError / ConnectionResetError: the helper is gone
            log.warning("the tracking helper process (pid %d) is gone (%s, exit code %s): nothing more is tracked",
                        self._process.pid, e, self._process.poll())
            self._conn.close()
            self._conn = None


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
    # Ctrl-C in a terminal reaches the whole process group: the training process decides what it means, and the
    # helper ends with it (the end of its socket), having sent what it holds
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conn = Connection(int(sys.argv[1]))
    try:
        serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
