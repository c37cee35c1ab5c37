"""A real `mlflow server` for tests: sqlite backend and proxied artifacts in a temp dir, on 127.0.0.1.

Use it from a test module with

    pytest_plugins = ("tests.mlflow_server",)

    def test_x(mlflow_server):
        client = MlflowClient(mlflow_server.uri)
        mlflow_server.kill()      # SIGKILL the whole process group: the server "dies"
        mlflow_server.start()     # same port, same database and artifacts

One server serves the whole session (it takes about 15 s to answer /health); each module gets it running again if
a test before left it killed. Modules share its store, so each names its own experiments and models. It runs in
its own process group
(`start_new_session=True`) so that killing the group takes its uvicorn workers with it, with
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false so there are no job-runner processes to leak.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL the process group a server was started in (start_new_session=True), and wait for its leader."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class MlflowServer:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.backend_uri = f"sqlite:///{self.root / 'mlflow.db'}"
        self.artifacts = self.root / "artifacts"
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Start the server (again, on the same port and stores) and wait until /health answers."""
        if self.running:
            return
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_cli)] if mlflow_cli.exists() else [sys.executable, "-m", "mlflow"]
        cmd += ["server", "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.artifacts),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log_path, "a") as log:
            log.write(f"\n=== {' '.join(cmd)}\n")
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"mlflow server did not answer {self.uri}/health within {timeout:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server's process group and wait for it: the port refuses connections at once."""
        kill_group(self.proc)
        self.proc = None

    def restart(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        self.kill()
        self.start(timeout)

    def log_tail(self, num_lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no server log)"


@pytest.fixture(scope="session")
def mlflow_session_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.kill()


@pytest.fixture(scope="module")
def mlflow_server(mlflow_session_server: MlflowServer) -> MlflowServer:
    """The session's server, answering: started on first use, or again (same port and store) after a module that
    killed it."""
    try:
        mlflow_session_server.start()
    except RuntimeError as e:
        mlflow_session_server.kill()
        pytest.fail(str(e))
    return mlflow_session_server
