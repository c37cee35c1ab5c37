"""Ray Train's controller run in the driver process, for a job on its own local Ray instance.

Ray's DataParallelTrainer starts its TrainController as an actor: one more Ray process to start between `fit()` and
the worker's start, which then wakes many times a second while the job trains, each wake-up taking a core from the
worker's compute threads on a small machine (figures: bench/NOTES.md). On a job's own instance the actor buys
nothing: it is pinned to the driver's node anyway, and it dies with the driver. Here the same controller runs its
control loop in the driver instead (`asyncio.run`, as the actor runs it on its event loop): it starts the worker
group, polls it every 2 s, keeps the checkpoints, restarts failed workers under FailureConfig, and returns the same
Result. Ctrl-C then reaches the loop as KeyboardInterrupt, and the workers end with the instance.

    if can_run_in_driver():                              # not inside a running event loop (a notebook)
        result = run_in_driver(**controller_init_kwargs)   # what DataParallelTrainer passes to its controller actor

What the workers lose: a handle to the controller, which Ray Train uses only for
`ray.train.get_all_reported_checkpoints()` inside the training function; nanoGPT's loop never calls it.
"""

from __future__ import annotations

import asyncio
import contextlib

import ray
from ray.train import Result
from ray.train.v2._internal.execution.controller import TrainController
from ray.train.v2._internal.execution.worker_group import WorkerGroup

from pipelines.ray_adapter.lean.lone_worker_sync import lone_worker_sync


def can_run_in_driver() -> bool:
    """False where this thread already runs an event loop (a notebook's), in which asyncio.run cannot start: there
    Ray's controller actor runs the loop (and handles Ctrl-C as Ray does)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def run_in_driver(**controller_init_kwargs) -> Result:
    """Run Ray Train's control loop for one training run in this process, to its end; its Result. A group of one
    worker gets no synchronization actor (pipelines/ray_adapter/lean/lone_worker_sync.py)."""
    controller = DriverController(**controller_init_kwargs)
    lone = controller_init_kwargs["train_run_context"].scaling_config.num_workers == 1
    with lone_worker_sync() if lone else contextlib.nullcontext():
        asyncio.run(controller.run())
    return controller.get_result()


class DriverWorkerGroup(WorkerGroup):
    """Ray's WorkerGroup started from a driver: it gives each worker's train context no controller handle (Ray's
    asks for the current actor's, and a driver is none)."""

    def _init_train_context_on_workers(self, workers, sync_actor, train_context_args) -> None:

        # passes every argument Ray's does)
        ray.get([
            worker.actor.init_train_context.remote(
                train_run_context=self._train_run_context,
                distributed_context=worker.distributed_context,
                synchronization_actor=sync_actor,
                storage_context=self._storage_context,
                worker_callbacks=self._worker_callbacks_to_propagate,
                controller_actor=None,
                **{arg: values[i] for arg, values in train_context_args.items()},
            )
            for i, worker in enumerate(workers)
        ])
        self._decorate_worker_log_file_paths(workers)


class DriverController(TrainController):
    """Ray Train's controller with the driver's worker group."""

    worker_group_cls = DriverWorkerGroup
