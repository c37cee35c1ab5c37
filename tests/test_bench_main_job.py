"""bench/bench_main_job.py's CPU accounting of the main job's processes: labels, the split, the /proc tree walk."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.bench_main_job import _cpu_split, _label, _tree_cpu


@pytest.mark.parametrize("argv, label", [
    (["ray::RayTrainWorker", ""], "ray::RayTrainWorker"),
    (["ray::TrainController.run", ""], "ray::TrainController"),
    (["/venv/bin/python", "-m", "pipelines.tracker_process", "7"], "-m pipelines.tracker_process"),
    (["/venv/bin/python", "-u", "/venv/lib/ray/_private/log_monitor.py", "--x"], "log_monitor.py"),
    (["/venv/lib/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=s"], "raylet"),
])
def test_label_names_what_a_process_is(argv, label):
    assert _label(argv) == label


def test_cpu_split_separates_the_worker_from_the_rest_by_kind():
    before = {1: ("pretrain.py", 1.0), 2: ("ray::RayTrainWorker", 10.0), 3: ("raylet", 0.5)}
    after = {1: ("pretrain.py", 1.2), 2: ("ray::RayTrainWorker", 48.0), 3: ("raylet", 0.9), 4: ("raylet", 0.2)}
    split = _cpu_split(before, after, seconds=20.0)
    assert split["worker"] == pytest.approx(1.9)
    assert split["rest_by_kind"] == pytest.approx({"pretrain.py": 0.01, "raylet": 0.03})  # a new pid counts from 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_tree_cpu_follows_children_and_grandchildren():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(30)"])
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            tree = _tree_cpu(parent.pid)
            grandchildren = [cpu for pid, (_, cpu) in tree.items() if pid != parent.pid]
            if grandchildren and grandchildren[0] >= 0.25:
                break
            time.sleep(0.1)
        assert parent.pid in tree
        assert len(grandchildren) == 1 and grandchildren[0] >= 0.25  # its burn, seen through the parent
    finally:
        for pid in _tree_cpu(parent.pid) if parent.poll() is None else ():
            if pid != parent.pid:
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_tree_cpu_counts_the_detached_tracking_helper():
    """pipelines/tracker_process.py starts its helper outside the tree; the job's CPU still includes it."""
    script = ("import time\nfrom nanogpt.tracking import NullTracker\n"
              "from pipelines.tracker_process import ProcessTracker\n"
              "tracker = ProcessTracker(NullTracker)\nprint('started', flush=True)\ntime.sleep(30)")
    repo = Path(__file__).resolve().parents[1]
    job = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        assert job.stdout.readline().strip() == "started"
        tree = _tree_cpu(job.pid)
        assert [label for label, _ in tree.values()].count("-m pipelines.tracker_process") == 1
    finally:
        job.kill()  # the helper reads the end of its socket and exits
        job.wait()
