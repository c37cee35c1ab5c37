"""A local Ray instance started by the project (pipelines/ray_session.init_ray) is private to the machine: every
listening socket of its processes is on loopback, the token file is the owner's alone, it runs only the processes
a job uses, and a `kill -9` of the driver does not leave its processes running (Ray's own clean-up takes ~80 s, ports open). Real processes, real
sockets: the driver runs in a subprocess with its own Ray instance."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRIVER = f"""
import json, os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pipelines.ray_session import init_ray, serves_state_api
init_ray(address="local", num_cpus=1)
import ray

@ray.remote
def worker_pid():
    return os.getpid()

print(json.dumps({{"driver": os.getpid(), "worker": ray.get(worker_pid.remote()), "state_api": serves_state_api()}}),
      flush=True)
time.sleep(600)
"""
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening(pids: set[int]) -> list[tuple[int, str, int]]:
    return [(c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def test_local_ray_is_private_and_dies_with_its_driver(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=tmp_path)
    try:
        started = json.loads(proc.stdout.readline())
        time.sleep(2)  # let the agents open their ports
        family = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | {proc.pid}
        sockets = listening(family)
        assert started["worker"] in family and len(sockets) >= 4, sockets  # GCS, raylet, workers, agents
        assert [s for s in sockets if s[1] not in LOOPBACK] == []
        # a training job's instance runs no dashboard modules (its driver did not ask for the State API)
        assert started["state_api"] is False
        commands = [" ".join(psutil.Process(p).cmdline()) for p in family]
        assert [c for c in commands if "ray-dashboard-" in c] == []
        # nor Ray's API server and autoscaler monitor, which every head node runs unless told otherwise
        assert [c for c in commands if "/dashboard.py " in c or "/monitor.py " in c] == []
        token = Path.home() / ".ray" / "auth_token"
        if token.exists():
            assert token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)
        ray_processes = [psutil.Process(pid) for pid in family - {proc.pid}]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 20
        alive = ray_processes
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], [p.name() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
