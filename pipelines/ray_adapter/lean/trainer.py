"""Ray's TorchTrainer less what a nanoGPT job has no use for: each default callback left out starts an actor process,
which on a small machine takes CPU from the worker while it starts and wakes every 10 ms while it trains (figures:
bench/NOTES.md). The trainers here are Ray's DataParallelTrainer given the torch set-up by `backend_config`, which
is all that TorchTrainer adds, less its import of torch in the driver (pipelines/ray_adapter/lean/controller.py).

- TrainerWithoutDatasets, wherever the wing applies: no Ray Train datasets callback, whose DatasetManager actor hands
  out Ray Data shards of the trainer's `datasets`. The workers read their token shards themselves
  (nanogpt/data/windows.py) and no job passes datasets.
- ControllerInDriverTrainer, on a local instance this process started without the dashboard (a job's own, which
  dies with its driver and cannot grow), also without:
  - Ray Train's placement-group cleaner, which asks the dashboard's State API every second whether the controller
    is alive, to free the workers of a controller that died while the cluster lives on (Tune stopping a trial);
  - the autoscaling coordinator, to which a fixed-size worker group sends its resource request so that an
    autoscaler can add nodes (the controller waits for that actor to start before it starts the workers);
  - the controller's own actor: the controller runs in the driver (pipelines/ray_adapter/lean/driver_controller.py).

And in the worker: a single worker that replicates the model (train.parallel=ddp) trains as one plain process
(nanogpt/train/parallel.py's SingleProcess) and never uses torch.distributed, so it gets no process group, whose
gloo thread wakes every 10 ms (`backend_config`). That job's driver and Ray Train's controller import no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ray.train import RunConfig, ScalingConfig
from ray.train.backend import BackendConfig
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from pipelines.ray_adapter.lean.controller import FixedScalingWithoutRequests, TorchConfigWithoutProcessGroup
from pipelines.ray_adapter.lean.driver_controller import can_run_in_driver, run_in_driver


class TrainerWithoutDatasets(DataParallelTrainer):
    """A TorchTrainer (with `backend_config(...)`) without Ray Data's DatasetManager (a trainer given no
    `datasets`)."""

    LEFT_OUT: tuple[type, ...] = (DatasetsCallback,)

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("datasets"):
            raise ValueError("TrainerWithoutDatasets leaves out Ray Train's datasets callback: it takes no datasets")
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self) -> list:
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, self.LEFT_OUT)]


class ControllerInDriverTrainer(TrainerWithoutDatasets):
    """TrainerWithoutDatasets also without the placement-group cleaner and the autoscaling coordinator, for a local
    instance with no State API; its controller runs in the driver, unless the driver's thread runs an event loop
    already (a notebook)."""

    LEFT_OUT = (*TrainerWithoutDatasets.LEFT_OUT, PlacementGroupCleanerCallback)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedScalingWithoutRequests(self.scaling_config)
        if can_run_in_driver():
            return run_in_driver(**controller_init_kwargs)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def lean_trainer(train_fn: Callable, parallel: str, *, controller_in_driver: bool, train_loop_config: Any,
                 scaling_config: ScalingConfig, run_config: RunConfig) -> TrainerWithoutDatasets:
    """The wing's trainer for a job training with `parallel` (train.parallel) on `scaling_config`'s workers."""
    return trainer_class(controller_in_driver)(
        train_fn, train_loop_config=train_loop_config, scaling_config=scaling_config, run_config=run_config,
        backend_config=backend_config(scaling_config.num_workers, parallel, scaling_config.use_gpu),
    )


def trainer_class(controller_in_driver: bool) -> type[TrainerWithoutDatasets]:
    """ControllerInDriverTrainer for a job's own local instance without the dashboard, else TrainerWithoutDatasets."""
    return ControllerInDriverTrainer if controller_in_driver else TrainerWithoutDatasets


def backend_config(num_workers: int, parallel: str, use_gpu: bool) -> BackendConfig:
    """Ray Train's torch set-up for a job of `num_workers` workers training with `parallel` (train.parallel): no
    process group for one worker under ddp, which never uses it; otherwise Ray's TorchConfig with TorchTrainer's
    default backend (FSDP needs a group even on one rank)."""
    if num_workers == 1 and parallel == "ddp":
        return TorchConfigWithoutProcessGroup()
    from ray.train.torch import TorchConfig  # imports torch

    return TorchConfig(backend="nccl" if use_gpu else "gloo")
