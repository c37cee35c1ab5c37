"""ProcessTracker: a tracker in a helper process, replaying the training process's calls in order. Real processes,
a real MLflow sqlite store, real SIGKILLs.

    .venv/bin/python -m pytest tests/test_tracker_process.py      # ~20 s
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from nanogpt.tracking import JsonlTracker
from pipelines.mlflow_adapter.store import tracking_uri_for
from pipelines.mlflow_adapter.tracker_process import ProcessTracker
from tests.test_mlflow_tracking import make_config

REPO = Path(__file__).resolve().parents[1]


class PidTracker(JsonlTracker):
    """A JSON-lines tracker that also records which process it ran in."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.set_tags({"pid": os.getpid()})


class SlowStartTracker(JsonlTracker):
    """A JSON-lines tracker that takes `delay` seconds to build, as an MlflowTracker does while MLflow imports."""

    def __init__(self, path: str, delay: float) -> None:
        time.sleep(delay)
        super().__init__(path)


def failing_factory() -> JsonlTracker:
    raise RuntimeError("no tracker today")


def test_calls_replay_in_order_in_another_process(tmp_path):
    tracker = ProcessTracker(functools.partial(PidTracker, str(tmp_path / "metrics.jsonl")))
    tracker.log_params({"lr": 0.001, "n_layer": 2})
    for step in range(5):
        tracker.log_metrics({"loss": 4.0 - step, "lr": 0.001}, step)
    tracker.log_text("To be, or not", "samples/step_000004.txt")
    tracker.log_artifact(str(Path(__file__)), "code")
    tracker.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(d["step"], d["loss"]) for d in lines] == [(s, 4.0 - s) for s in range(5)]
    assert json.loads((tmp_path / "params.json").read_text()) == {"lr": 0.001, "n_layer": 2}
    helper_pid = json.loads((tmp_path / "tags.json").read_text())["pid"]
    assert helper_pid != os.getpid()
    assert (tmp_path / "samples" / "step_000004.txt").read_text() == "To be, or not"
    assert (tmp_path / "code" / Path(__file__).name).exists()
    assert ended(helper_pid, within=10), "close() returns as the helper exits"


def ended(pid: int, within: float) -> bool:
    """Whether process `pid` is gone, or a zombie waiting for init to reap it, within `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_a_helper_that_cannot_start_costs_a_warning_not_the_run(caplog):
    tracker = ProcessTracker(failing_factory)
    with caplog.at_level(logging.WARNING, logger="pipelines.mlflow_adapter.tracker_process"):
        deadline = time.monotonic() + 60
        while "is gone" not in caplog.text and time.monotonic() < deadline:
            tracker.log_metrics({"loss": 1.0}, 0)  # each call returns; the first after the helper died warns
            time.sleep(0.05)
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.close()
    assert caplog.text.count("is gone") == 1, caplog.text
    assert "nothing more is tracked" in caplog.text


TRAINING_PROCESS = textwrap.dedent("""
    import functools, json, sys, time
    from nanogpt.config import Config
    from pipelines.mlflow_adapter.job_run import start_worker_tracker
    from pipelines.mlflow_adapter.tracker_process import ProcessTracker

    config = Config.from_dict(json.loads(sys.argv[1]))
    tracker = ProcessTracker(functools.partial(start_worker_tracker, config, sys.argv[2], sys.argv[3]))
    for step in range(20):
        tracker.log_metrics({"train/loss": 5.0 - step / 10}, step)
    print("logged", flush=True)
    time.sleep(600)  # killed here, like a worker on a lost node
""")


def test_metrics_reach_mlflow_when_the_training_process_is_killed(tmp_path):
    config = make_config(tmp_path / "out", "killed", "process-tracker")
    uri = tracking_uri_for(None, config.run.out_dir)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("process-tracker")).info.run_id
    # the driver has ended the run already (Ctrl-C), before the worker's helper got to it: it stays ended
    client.set_terminated(run_id, "KILLED")
    proc = subprocess.Popen([sys.executable, "-c", TRAINING_PROCESS, json.dumps(config.to_dict()),
                             str(tmp_path / "run"), run_id], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == "logged"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    deadline = time.monotonic() + 120  # the helper reads the end of its socket, sends what it has, exits
    points: list = []
    while len(points) < 20 and time.monotonic() < deadline:
        points = client.get_metric_history(run_id, "train/loss")
        time.sleep(0.5)
    assert sorted((p.step, p.value) for p in points) == [(s, 5.0 - s / 10) for s in range(20)]
    assert client.get_run(run_id).info.status == "KILLED"


def test_metrics_outlive_a_ray_worker_that_ray_kills(ray_local, tmp_path):
    """A sweep trial the scheduler stops: Ray SIGKILLs its worker, and the worker's children with it. The helper is
    not the worker's child, so it still sends every point it was handed, though it was still starting then."""
    import ray

    @ray.remote(num_cpus=0)
    class Worker:
        def log(self, path: str) -> None:
            self.tracker = ProcessTracker(functools.partial(SlowStartTracker, path, 3.0))
            for step in range(20):
                self.tracker.log_metrics({"loss": 5.0 - step / 10}, step)

    worker = Worker.remote()
    ray.get(worker.log.remote(str(tmp_path / "metrics.jsonl")))
    ray.kill(worker)

    deadline = time.monotonic() + 60
    lines: list[str] = []
    while len(lines) < 20 and time.monotonic() < deadline:
        time.sleep(0.5)
        path = tmp_path / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
    assert [json.loads(line)["step"] for line in lines] == list(range(20))
