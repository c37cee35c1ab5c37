"""The trainer of a job's own Ray instance runs Ray Train's controller in the driver (pipelines/driver_controller.py):
on a real Ray local cluster, with a real worker killed by SIGKILL, it restarts the worker group under FailureConfig,
hands the restarted worker the last checkpoint, and returns the run's Result, with no controller actor started; and
where the driver's thread already runs an event loop (a notebook), the trainer still runs, on Ray's controller
actor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig

from pipelines.lean_trainer import PrivateInstanceTorchTrainer, backend_config

CONTROLLER = "ray::TrainController"


def _train_then_die_once(config: dict) -> None:
    """Step 1 reports a checkpoint; the first attempt then SIGKILLs its own worker; a restart goes on from it."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        _report_step(1, restored_from=0)
        controllers = [p.pid for p in psutil.process_iter(["cmdline", "create_time"])
                       if CONTROLLER in " ".join(p.info["cmdline"] or ()) and p.info["create_time"] >= config["since"]]
        Path(config["seen"]).write_text(json.dumps(controllers))
        time.sleep(5)  # the controller takes a report in at its next poll of the workers (every 2 s)
        os.kill(os.getpid(), signal.SIGKILL)
    with checkpoint.as_directory() as path:
        step = json.loads(Path(path, "state.json").read_text())["step"]
    _report_step(step + 1, restored_from=step)


def _report_step(step: int, restored_from: int) -> None:
    """A report with a checkpoint: Ray Train's Result carries the metrics of the last such one."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "state.json").write_text(json.dumps({"step": step}))
        ray.train.report({"step": step, "restored_from": restored_from}, checkpoint=Checkpoint.from_directory(tmp))


@pytest.mark.slow
def test_the_controller_in_the_driver_restarts_a_killed_worker_from_its_checkpoint(ray_local, tmp_path):
    seen = tmp_path / "controllers.json"
    result = PrivateInstanceTorchTrainer(
        _train_then_die_once, train_loop_config={"seen": str(seen), "since": time.time() - 1},
        backend_config=backend_config(1, "ddp", False), scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="in-driver", storage_path=str(tmp_path / "runs"),
                             failure_config=FailureConfig(max_failures=1)),
    ).fit()
    assert result.error is None
    assert result.metrics == {"step": 2, "restored_from": 1}
    assert json.loads(Path(result.checkpoint.path, "state.json").read_text()) == {"step": 2}
    assert json.loads(seen.read_text()) == []  # no controller actor was started for this run


def _report_once(config: dict) -> None:
    _report_step(1, restored_from=0)


@pytest.mark.slow
def test_a_driver_that_runs_an_event_loop_gets_rays_controller_actor(ray_local, tmp_path):
    """fit() from a notebook, whose event loop runs in the calling thread: asyncio.run would refuse to start there,
    so Ray's controller actor runs the run."""
    trainer = PrivateInstanceTorchTrainer(
        _report_once, train_loop_config={}, backend_config=backend_config(1, "ddp", False),
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="in-a-loop", storage_path=str(tmp_path / "runs")),
    )

    async def notebook_cell():
        return trainer.fit()

    result = asyncio.run(notebook_cell())
    assert result.metrics == {"step": 1, "restored_from": 0}
