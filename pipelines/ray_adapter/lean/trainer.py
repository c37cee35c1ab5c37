"""Ray's TorchTrainer less what a nanoGPT job has no use for: each default callback left out starts an actor process,
which on a small machine takes CPU from the worker while it starts and wakes every 10 ms while it trains (figures:
bench/NOTES.md). The trainers here are Ray's DataParallelTrainer given the torch set-up by `backend_config`, which
is all that TorchTrainer adds, less its import of torch in the driver (pipelines/ray_adapter/lean/controller.py).

- TrainerWithoutDatasets, wherever the wing applies: no Ray Train datasets callback, whose DatasetManager actor hands
  out Ray Data shards of the trainer's `datasets`. The workers read their token shards themselves
  (nanogpt/data/windows.py) and no job passes datasets.
- ControllerHereTrainer, where fit() is called in a Ray actor (a sweep trial, on a local instance its driver
  started): also without the controller's own actor, and for one worker its synchronization actor. The controller
  runs in the calling actor, whose child Ray's controller actor would be anyway; the placement-group cleaner stays,
  and watches that actor: once Tune has stopped the trial (its actor gone), it frees the workers' placement group.
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


class ControllerHereTrainer(TrainerWithoutDatasets):
    """TrainerWithoutDatasets whose controller runs in the process that calls fit(), unless its thread runs an event
    loop already (a notebook)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if can_run_in_driver():
            return run_in_driver(**controller_init_kwargs)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


class ControllerInDriverTrainer(ControllerHereTrainer):
    """ControllerHereTrainer also without the placement-group cleaner and the autoscaling coordinator, for a local
    instance with no State API, in its driver."""

    LEFT_OUT = (*TrainerWithoutDatasets.LEFT_OUT, PlacementGroupCleanerCallback)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedScalingWithoutRequests(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def lean_trainer(train_fn: Callable, parallel: str, *, controller: str, train_loop_config: Any,
                 scaling_config: ScalingConfig, run_config: RunConfig) -> TrainerWithoutDatasets:
    """The wing's trainer for a job training with `parallel` (train.parallel) on `scaling_config`'s workers, its
    controller where `controller` says (trainer_class)."""
    return trainer_class(controller)(
        train_fn, train_loop_config=train_loop_config, scaling_config=scaling_config, run_config=run_config,
        backend_config=backend_config(scaling_config.num_workers, parallel, scaling_config.use_gpu),
    )


CONTROLLER_PLACES = {"actor": TrainerWithoutDatasets, "here": ControllerHereTrainer, "driver": ControllerInDriverTrainer}
"""Where the controller runs: its own actor (Ray's way), here (the calling actor: a sweep trial), the driver of a
job's own local instance without the dashboard."""


def trainer_class(controller: str) -> type[TrainerWithoutDatasets]:
    """The wing's trainer class for a controller run where CONTROLLER_PLACES says."""
    return CONTROLLER_PLACES[controller]


def backend_config(num_workers: int, parallel: str, use_gpu: bool) -> BackendConfig:
    """Ray Train's torch set-up for a job of `num_workers` workers training with `parallel` (train.parallel): no
    process group for one worker under ddp, which never uses it; otherwise Ray's TorchConfig with TorchTrainer's
    default backend (FSDP needs a group even on one rank)."""
    if num_workers == 1 and parallel == "ddp":
        return TorchConfigWithoutProcessGroup()
    from ray.train.torch import TorchConfig  # imports torch

    return TorchConfig(backend="nccl" if use_gpu else "gloo")
