"""A local Ray instance started by the project (pipelines/ray_adapter/session.init_ray) is private to the machine, with
the lean wing on or off: every listening socket of its processes is on loopback, the token file is the owner's
alone, and a `kill -9` of the driver does not leave its processes running (Ray's own clean-up takes ~80 s, ports
open). With the wing a job's instance also runs only the processes a job uses, and none of them serves Prometheus
metrics without the token; without it, the dashboard and the autoscaler's monitor run, and their endpoints (on
loopback) are the only ones that answer. Real processes, real sockets: the driver runs in a subprocess with its own
Ray instance, importing ray only through init_ray (as the entry points do)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.local_cluster import unless_ended

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = f"""
import json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pipelines.ray_adapter.session import init_ray, serves_state_api
init_ray(address="local", num_cpus=1, state_api=sys.argv[1] == "state_api", lean=sys.argv[2])
import ray

@ray.remote
def worker_pid():
    return os.getpid()

print(json.dumps({{"driver": os.getpid(), "worker": ray.get(worker_pid.remote()), "state_api": serves_state_api(),
                  "wing": sorted(m for m in sys.modules if (m + ".").startswith("pipelines.ray_adapter.lean."))}}),
      flush=True)
time.sleep(600)
"""
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening(pids: set[int]) -> list[tuple[int, str, int]]:
    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def answering_without_token(sockets: list[tuple[int, str, int]]) -> list[tuple[int, int]]:
    """(pid, port) of each listening socket that serves `GET /metrics` (Prometheus) to a client with no token."""
    answering = []
    for pid, _, port in sockets:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                if response.status == 200:
                    answering.append((pid, port))
        except (urllib.error.URLError, http.client.HTTPException, OSError):  # 401, or not HTTP (gRPC)
            pass
    return answering


def start_driver(tmp_path: Path, state_api: bool, lean: str = "auto") -> tuple[subprocess.Popen, dict, set[int]]:
    """The driver process, what it printed once its instance ran a task, and its process family."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, "state_api" if state_api else "job", lean],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    started = json.loads(proc.stdout.readline())
    time.sleep(2)  # let the agents open their ports
    return proc, started, {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}


def command_lines(pids: set[int]) -> dict[int, str]:
    """{pid: command line} of those still running (one that ended meanwhile has no sockets either)."""
    lines = {pid: unless_ended(lambda pid=pid: " ".join(psutil.Process(pid).cmdline()), None) for pid in pids}
    return {pid: line for pid, line in lines.items() if line is not None}


@pytest.mark.parametrize("lean", ["auto", "off"])
def test_local_ray_is_private_and_dies_with_its_driver(tmp_path, lean):
    from ray.autoscaler._private.constants import AUTOSCALER_METRIC_PORT
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    proc = None
    try:
        proc, started, family = start_driver(tmp_path, state_api=False, lean=lean)
        sockets = listening(family)
        assert started["worker"] in family and len(sockets) >= 4, sockets  # GCS, raylet, workers, agents
        assert [s for s in sockets if s[1] not in LOOPBACK] == []
        # loopback through Ray's documented variable, read as this driver imported ray: not the wing's piece
        assert "pipelines.ray_adapter.lean.loopback" not in started["wing"]
        assert started["wing"] == (["pipelines.ray_adapter.lean", "pipelines.ray_adapter.lean.head"]
                                   if lean == "auto" else [])
        commands = command_lines(family)
        answering = answering_without_token(sockets)
        if lean == "auto":
            # Ray's metrics export is off: no Prometheus endpoint of this instance answers without the token
            assert answering == []
            # a training job's instance runs no dashboard modules (its driver did not ask for the State API)
            assert started["state_api"] is False
            assert [c for c in commands.values() if "ray-dashboard-" in c] == []
            # nor Ray's API server and autoscaler monitor, which every head node runs unless told otherwise
            assert [c for c in commands.values() if "/dashboard.py " in c or "/monitor.py " in c] == []
        else:
            # Ray's public path: the dashboard serves the State API that Ray's stock trainer asks; its endpoint and
            # the monitor's, on loopback, are the ones Ray 2.60 has no switch for
            assert started["state_api"] is True
            known = {DASHBOARD_METRIC_PORT: "/dashboard.py ", AUTOSCALER_METRIC_PORT: "/monitor.py "}
            assert all(port in known and known[port] in commands[pid] for pid, port in answering), answering
        token = Path.home() / ".ray" / "auth_token"
        if token.exists():
            assert token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)
        ray_processes = [p for p in (unless_ended(lambda pid=pid: psutil.Process(pid), None)
                                     for pid in family - {proc.pid}) if p is not None]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        alive = ray_processes
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [p for p in alive
                     if unless_ended(lambda p=p: p.is_running() and p.status() != psutil.STATUS_ZOMBIE, False)]
        assert alive == [], [p.name() for p in alive]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()


def test_a_sweeps_local_ray_runs_no_autoscaler_and_exports_no_metrics_but_the_dashboards(tmp_path):
    from ray.dashboard.consts import DASHBOARD_METRIC_PORT

    proc = None
    try:
        proc, started, family = start_driver(tmp_path, state_api=True)
        assert started["state_api"] is True
        commands = command_lines(family)
        assert [c for c in commands.values() if "/monitor.py " in c] == []  # no cluster to grow, no autoscaler
        sockets = listening(family)
        assert [s for s in sockets if s[1] not in LOOPBACK] == []
        # Ray 2.60 has no switch for the dashboard's own Prometheus endpoint (its request counts and process stats,
        # on 127.0.0.1): the one left, and only when the port was free
        answering = answering_without_token(sockets)
        assert all(port == DASHBOARD_METRIC_PORT and "/dashboard.py " in commands[pid] for pid, port in answering)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
