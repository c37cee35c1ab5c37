"""Ray's TorchTrainer less what a nanoGPT job has no use for. The trainers here are Ray's DataParallelTrainer given
the torch set-up by `backend_config`, which is all that TorchTrainer adds, less its import of torch in the driver
(pipelines/ray_adapter/lean/controller.py). And they leave out default callbacks: each of them starts an actor process, which on
a small machine takes CPU from the worker while it starts (about 2 CPU-s each on 2 cores) and while it trains (a
wake-up every 10 ms).

- Ray Train's datasets callback, always: its DatasetManager actor hands out Ray Data shards of the trainer's
  `datasets`. The workers here read their token shards themselves (nanogpt/data/windows.py) and no job passes datasets.
- Where the driver started its own local Ray instance without the dashboard (pipelines/ray_adapter/session.py,
  `serves_state_api()` False), two more:
  - Ray Train's placement-group cleaner. Every second it asks the dashboard's State API whether the controller is
    still alive, so that it can free the worker placement group of a controller that died while the cluster lives
    on (Tune stopping a trial). Such an instance dies with its driver (the watchdog stops it after a `kill -9`),
    and with no dashboard to ask, the cleaner would warn every second.
  - The autoscaling coordinator, to which a fixed-size worker group sends its resource request so that an
    autoscaler can add nodes for it. A local instance cannot grow; and the controller waits for that actor to start
    (about 2 s here) before it starts the workers.
  - And the controller's own actor: the controller runs in the driver (pipelines/ray_adapter/lean/driver_controller.py).

And one thing in the worker: a single worker that replicates the model (train.parallel=ddp) trains as one plain
process (nanogpt/train/parallel.py's SingleProcess) and never uses torch.distributed, so it gets no process group
(`backend_config`). Gloo's process group keeps a thread that wakes every 10 ms; on 2 cores each wake-up pre-empts
one of the two compute threads, and the other waits for it: the plain loop took 2-8% longer per step with an idle
one-rank gloo group than without. That job's driver and Ray Train's controller then import no torch either.
"""

from __future__ import annotations

from ray.train.backend import BackendConfig
from ray.train.v2._internal.callbacks import DatasetsCallback  # Ray 2.60; private, Ray is pinned
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from pipelines.ray_adapter.lean.controller import FixedScalingOnFixedCluster, SingleProcessConfig
from pipelines.ray_adapter.lean.driver_controller import can_run_in_driver, run_in_driver


class ShardsTorchTrainer(DataParallelTrainer):
    """A TorchTrainer (with `backend_config(...)`) without Ray Data's DatasetManager (a trainer given no
    `datasets`)."""

    LEFT_OUT: tuple[type, ...] = (DatasetsCallback,)

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("datasets"):
            raise ValueError("ShardsTorchTrainer leaves out Ray Train's datasets callback: it takes no datasets")
        super().__init__(*args, **kwargs)

    def _create_default_callbacks(self) -> list:
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, self.LEFT_OUT)]


class PrivateInstanceTorchTrainer(ShardsTorchTrainer):
    """ShardsTorchTrainer also without the placement-group cleaner and the autoscaling coordinator, for a local
    instance with no State API; its controller runs in the driver (pipelines/ray_adapter/lean/driver_controller.py), unless the driver's
    thread runs an event loop already (a notebook)."""

    LEFT_OUT = (*ShardsTorchTrainer.LEFT_OUT, PlacementGroupCleanerCallback)

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if type(controller_init_kwargs["scaling_policy"]) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedScalingOnFixedCluster(self.scaling_config)
        if can_run_in_driver():
            return run_in_driver(**controller_init_kwargs)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def trainer_class(state_api: bool) -> type[ShardsTorchTrainer]:
    """The trainer for a Ray that serves the State API (a cluster, a sweep's instance) or not (a job's own)."""
    return ShardsTorchTrainer if state_api else PrivateInstanceTorchTrainer


def backend_config(num_workers: int, parallel: str, use_gpu: bool) -> BackendConfig:
    """Ray Train's torch set-up for a job of `num_workers` workers training with `parallel` (train.parallel): no
    process group for one worker under ddp, which never uses it (pipelines/ray_adapter/lean/controller.py); otherwise Ray's
    TorchConfig with TorchTrainer's default backend (FSDP needs a group even on one rank)."""
    if num_workers == 1 and parallel == "ddp":
        return SingleProcessConfig()
    from ray.train.torch import TorchConfig  # imports torch

    return TorchConfig(backend="nccl" if use_gpu else "gloo")
