"""bench/bench_main_job.py's arms (the lean wing on and off, Ray Train's local mode) and its CPU accounting of the main
job's processes: labels, the split, the /proc tree walk."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.bench_main_job import MainJob, ProcUse, _cpu_split, _label, _tree_cpu, main_jobs


@pytest.mark.parametrize("argv, label", [
    (["ray::RayTrainWorker", ""], "ray::RayTrainWorker"),
    (["ray::TrainController.run", ""], "ray::TrainController"),
    (["/venv/bin/python", "-m", "pipelines.mlflow_adapter.tracker_process", "7"], "-m pipelines.mlflow_adapter.tracker_process"),
    (["/venv/bin/python", "-u", "/venv/lib/ray/_private/log_monitor.py", "--x"], "log_monitor.py"),
    (["/venv/lib/ray/core/src/ray/raylet/raylet", "--raylet_socket_name=s"], "raylet"),
    (["/venv/bin/python", "/repo/bench/local_mode_job.py", "--config", "x"], "local_mode_job.py"),
    (["ray-dashboard-NodeHead-0 (/venv/bin/python -B -c from multiprocessing.spawn import spawn_main; "
      "sys.path=['/venv/lib/python3.11/site-packages'])"], "ray-dashboard-NodeHead-0"),
])
def test_label_names_what_a_process_is(argv, label):
    assert _label(argv) == label


def test_cpu_split_separates_the_worker_from_the_rest_by_kind():
    before = {1: ProcUse("pretrain.py", 1.0, 100, 5), 2: ProcUse("ray::RayTrainWorker", 10.0, 50, 1000),
              3: ProcUse("raylet", 0.5, 300, 2)}
    after = {1: ProcUse("pretrain.py", 1.2, 300, 6), 2: ProcUse("ray::RayTrainWorker", 48.0, 90, 13000),
             3: ProcUse("raylet", 0.9, 1300, 4), 4: ProcUse("raylet", 0.2, 200, 1)}
    split = _cpu_split(before, after, seconds=20.0)
    assert split["worker"] == pytest.approx(1.9)
    assert split["worker_preempted"] == pytest.approx(600.0)
    assert split["rest_by_kind"] == pytest.approx({"pretrain.py": 0.01, "raylet": 0.03})  # a new pid counts from 0
    assert split["rest_wakeups_by_kind"] == pytest.approx({"pretrain.py": 10.0, "raylet": 60.0})


def test_in_local_mode_the_driver_is_the_training_worker():
    before = {1: ProcUse("local_mode_job.py", 10.0, 50, 1000), 2: ProcUse("raylet", 0.5, 300, 2)}
    after = {1: ProcUse("local_mode_job.py", 48.0, 90, 13000), 2: ProcUse("raylet", 0.9, 1300, 4)}
    split = _cpu_split(before, after, seconds=20.0, worker="local_mode_job.py")
    assert split["worker"] == pytest.approx(1.9) and split["worker_preempted"] == pytest.approx(600.0)
    assert split["rest_by_kind"] == pytest.approx({"raylet": 0.02})


def test_the_main_jobs_arms_are_the_wing_on_and_off_and_local_mode():
    assert main_jobs(["on", "off"], local_mode=True) == [
        MainJob("(c) main job, lean on", "pipelines/pretrain.py", ("--run.lean=on",), "ray::RayTrainWorker"),
        MainJob("(d) main job, lean off", "pipelines/pretrain.py", ("--run.lean=off",), "ray::RayTrainWorker"),
        MainJob("(e) main job, local mode", "bench/local_mode_job.py", (), "local_mode_job.py"),
    ]
    assert [job.name for job in main_jobs(["off"], local_mode=False)] == ["(d) main job, lean off"]
    assert all((Path(__file__).resolve().parents[1] / job.script).is_file() for job in main_jobs(["on"], True))


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_tree_cpu_follows_children_and_grandchildren():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, '-c', {burn!r}])\ntime.sleep(30)"])
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            tree = _tree_cpu(parent.pid)
            grandchildren = [use.cpu_s for pid, use in tree.items() if pid != parent.pid]
            if grandchildren and grandchildren[0] >= 0.25:
                break
            time.sleep(0.1)
        assert parent.pid in tree
        assert len(grandchildren) == 1 and grandchildren[0] >= 0.25  # its burn, seen through the parent
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True) if parent.poll() is None else ():
            child.kill()  # its own descendants only: _tree_cpu also counts other jobs' tracking helpers
        parent.kill()
        parent.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_tree_cpu_counts_the_detached_tracking_helper():
    """pipelines/mlflow_adapter/tracker_process.py starts its helper outside the tree; the job's CPU still includes it."""
    script = ("import time\nfrom nanogpt.tracking import NullTracker\n"
              "from pipelines.mlflow_adapter.tracker_process import ProcessTracker\n"
              "tracker = ProcessTracker(NullTracker)\nprint(tracker._pid, flush=True)\ntime.sleep(30)")
    repo = Path(__file__).resolve().parents[1]
    job = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        helper = int(job.stdout.readline())
        tree = _tree_cpu(job.pid)
        assert tree[helper].label == "-m pipelines.mlflow_adapter.tracker_process"  # counted, though not a child
        assert job.pid not in psutil.Process(helper).parents()
    finally:
        job.kill()  # the helper reads the end of its socket and exits
        job.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_tree_cpu_counts_the_wakeups_of_every_thread():
    """A process whose second thread sleeps 10 ms at a time wakes up to 100 times a second: all its threads count."""
    naps = "import threading, time\nt = threading.Thread(target=lambda: [time.sleep(0.01) for _ in range(3000)])\n" \
           "t.start()\nprint('started', flush=True)\nt.join()"
    proc = subprocess.Popen([sys.executable, "-c", naps], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        before = _tree_cpu(proc.pid)[proc.pid].wakeups
        time.sleep(1.0)
        woke = _tree_cpu(proc.pid)[proc.pid].wakeups - before
        assert 20 <= woke <= 150  # the main thread, waiting in join(), wakes none of these
    finally:
        proc.kill()
        proc.wait()
