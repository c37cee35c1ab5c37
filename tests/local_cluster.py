"""Helpers for tests that start Ray clusters of their own on this machine, beside other people's and beside the test
session's `ray_local`, and must stop exactly what they started (never `ray stop`, which stops every Ray here).

Each such cluster gets a short directory of its own (Unix socket paths must stay under 107 bytes) that is both its
--temp-dir and RAY_TMPDIR (where Ray writes the address file that a bare `ray.init()` would find), its own token,
and free ports. What it started is found again by that directory: every Ray process names it on its command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp")


def cluster_env(temp_dir: str, **extra: str) -> dict[str, str]:
    """The environment of a private cluster and of its clients: token auth on with a token of its own (so
    ~/.ray/auth_token is neither read nor written), no usage stats, Ray's default temp dir inside `temp_dir`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TMPDIR=temp_dir,
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `ray` and `python` of this venv
        **extra,
    )
    return env


def processes_of(temp_dir: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line names `temp_dir` (Linux /proc; elsewhere none)."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmd:
                found.append((int(entry), cmd))
    return found


def leftovers(temp_dir: str, wait_s: float = 20) -> list[tuple[int, str]]:
    """processes_of(temp_dir), after giving them up to `wait_s` to exit (Ray workers notice a dead raylet late)."""
    deadline = time.monotonic() + wait_s
    while (found := processes_of(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def stop_group(proc: subprocess.Popen, temp_dir: str, grace_s: float = 15) -> None:
    """Stop a process started with start_new_session=True: SIGTERM (a `ray start --block` then stops what it
    started), SIGKILL to its process group after `grace_s`, then any process still naming `temp_dir`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group holds only what this test launched
    proc.wait(timeout=30)
    for pid, _ in processes_of(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def dashboard_get(url: str, token: str | None, timeout: float = 10) -> tuple[int, dict | None]:
    """(HTTP status, JSON body) of a GET on the Ray dashboard, with the cluster's token when given."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{url}/api/gcs_healthz", timeout=2)  # unauthenticated health check
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def unless_ended(call, default):
    """call() on a process, or `default` when the process ended since it was listed (psutil.Error): a short-lived
    helper of Ray's can end between psutil's listing and the next question about it."""
    import psutil

    try:
        return call()
    except psutil.Error:
        return default
