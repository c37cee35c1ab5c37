"""The trainer of a job's own Ray instance runs Ray Train's controller in the driver (pipelines/ray_adapter/lean/driver_controller.py):
on a real Ray local cluster, with a real worker killed by SIGKILL, it restarts the worker group under FailureConfig,
hands the restarted worker the last checkpoint, and returns the run's Result, with no controller actor and, for one
worker, no synchronization actor started (pipelines/ray_adapter/lean/lone_worker_sync.py); two workers meet at Ray's synchronization
actor; and where the driver's thread already runs an event loop (a notebook), the trainer still runs, on Ray's
controller actor."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
from pathlib import Path

import psutil
import pytest
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig

from pipelines.ray_adapter.lean.trainer import ControllerInDriverTrainer, backend_config
from pipelines.ray_adapter.runs import RAY_SNAPSHOT
from tests.local_cluster import unless_ended

CONTROLLER, SYNC = "ray::TrainController", "ray::SynchronizationActor"


def _ray_actors() -> dict[str, set[int]]:
    """The pids of the processes of this session's Ray instance that run Ray Train's controller and synchronization
    actors now (an idle Ray worker process takes an actor's name when it starts running it). Only this instance's:
    other Ray instances on the machine (another test session's) run such actors too."""
    processes = _this_instances_raylet().children(recursive=True)
    return {name: {p.pid for p in processes if name in " ".join(unless_ended(p.cmdline, []))} for name in (CONTROLLER, SYNC)}


def _this_instances_raylet() -> psutil.Process:
    """The raylet of the session's Ray instance: a child of the driver (which started it), a parent of its workers."""
    me = psutil.Process()
    [raylet] = [p for p in [*me.parents(), *me.children(recursive=True)] if unless_ended(p.name, "") == "raylet"]
    return raylet


def _record_ray_actors(config: dict) -> None:
    """Write to config["seen"] the pids of the actors (_ray_actors) that run now."""
    Path(config["seen"]).write_text(json.dumps({name: sorted(pids) for name, pids in _ray_actors().items()}))


def _fit_in_driver(train_fn, num_workers: int, tmp_path: Path, max_failures: int = 0):
    """fit() a job's own instance's trainer on `num_workers` workers running `train_fn`, which calls
    _record_ray_actors: its Result, and the actors (_ray_actors) that started for it."""
    seen, before, name = tmp_path / "actors.json", _ray_actors(), f"in-driver-{num_workers}"
    config = {"seen": str(seen), "snapshot": str(tmp_path / "runs" / name / RAY_SNAPSHOT)}
    result = ControllerInDriverTrainer(
        train_fn, train_loop_config=config, backend_config=backend_config(num_workers, "ddp", False),
        scaling_config=ScalingConfig(num_workers=num_workers),
        run_config=RunConfig(name=name, storage_path=str(tmp_path / "runs"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    ).fit()
    return result, {name: set(pids) - before[name] for name, pids in json.loads(seen.read_text()).items()}


def _train_then_die_once(config: dict) -> None:
    """Step 1 reports a checkpoint; the first attempt then SIGKILLs its own worker (once the controller recorded the
    checkpoint in the run's snapshot, at its next poll of the workers); a restart goes on from it."""
    import ray.train

    from tests.faults import wait_for_latest

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        _report_step(1, restored_from=0)
        _record_ray_actors(config)
        wait_for_latest(config["snapshot"], None)
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
    result, actors = _fit_in_driver(_train_then_die_once, 1, tmp_path, max_failures=1)
    assert result.error is None
    assert result.metrics == {"step": 2, "restored_from": 1}
    assert json.loads(Path(result.checkpoint.path, "state.json").read_text()) == {"step": 2}
    assert actors == {CONTROLLER: set(), SYNC: set()}  # neither actor ran for this run


def _meet_then_report(config: dict) -> None:
    """Both ranks wait for each other (at the synchronization actor), then report a checkpoint (meeting there
    again, to agree on its directory)."""
    import ray.train
    import ray.train.collective

    rank = ray.train.get_context().get_world_rank()
    assert ray.train.collective.broadcast_from_rank_zero(f"from rank {rank}") == "from rank 0"
    _report_step(1, restored_from=0)
    if rank == 0:
        _record_ray_actors(config)


@pytest.mark.slow
def test_two_workers_in_the_driver_meet_at_rays_synchronization_actor(ray_local, tmp_path):
    result, actors = _fit_in_driver(_meet_then_report, 2, tmp_path)
    assert result.error is None
    assert result.metrics == {"step": 1, "restored_from": 0}
    assert actors[CONTROLLER] == set() and len(actors[SYNC]) == 1


def _report_once(config: dict) -> None:
    _report_step(1, restored_from=0)


@pytest.mark.slow
def test_a_driver_that_runs_an_event_loop_gets_rays_controller_actor(ray_local, tmp_path):
    """fit() from a notebook, whose event loop runs in the calling thread: asyncio.run would refuse to start there,
    so Ray's controller actor runs the run."""
    trainer = ControllerInDriverTrainer(
        _report_once, train_loop_config={}, backend_config=backend_config(1, "ddp", False),
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="in-a-loop", storage_path=str(tmp_path / "runs")),
    )

    async def notebook_cell():
        return trainer.fit()

    result = asyncio.run(notebook_cell())
    assert result.metrics == {"step": 1, "restored_from": 0}


def _keywords_of_init_train_context(method) -> set[str]:
    """The keyword arguments a WorkerGroup method passes to each worker's `init_train_context.remote(...)`."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    [call] = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and n.func.attr == "remote" and getattr(n.func.value, "attr", None) == "init_train_context"]
    return {k.arg for k in call.keywords if k.arg is not None}


def test_the_driver_worker_group_passes_every_argument_rays_own_method_passes():
    """DriverWorkerGroup copies Ray's method but for the controller handle: an argument Ray adds there would be
    dropped silently. The wing runs only under the Ray release it was written for; this says the copy matches it."""
    from ray.train.v2._internal.execution.worker_group import WorkerGroup

    from pipelines.ray_adapter.lean.driver_controller import DriverWorkerGroup

    rays = _keywords_of_init_train_context(WorkerGroup._init_train_context_on_workers)
    assert "controller_actor" in rays and "synchronization_actor" in rays
    assert _keywords_of_init_train_context(DriverWorkerGroup._init_train_context_on_workers) == rays
