"""The parts of a job's trainer that the driver builds and Ray Train's controller process unpickles, kept free of
torch: `import ray.train.torch`, where Ray's TorchTrainer and TorchConfig live, imports torch, about 3 s of one core
here, twice on the way from `fit()` to the workers' start (in the driver, then in the controller). For a lone worker
that replicates the model (the main job, a one-worker sweep trial) only the worker imports it. The main job's
first update, medians of 5 alternating runs on slow days: 26.0 against 31.0 s with the driver's import gone, 30.6
against 32.1 s earlier with the controller's. Under Ray's TorchConfig (a job of several workers, or FSDP) driver
and controller still import torch.

    FixedScalingOnFixedCluster(scaling_config)   # Ray's fixed-size scaling policy, no autoscaler requests
    SingleProcessConfig()                         # a lone worker's backend: no torch process group
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy  # Ray 2.60; private, pinned
from ray.train.v2._internal.util import TrainingFramework  # Ray 2.60; private, pinned


class FixedScalingOnFixedCluster(FixedScalingPolicy):
    """Ray Train's fixed-size scaling policy without its resource requests to the autoscaling coordinator."""

    def after_controller_start(self, train_run_context) -> None:
        pass  # where Ray's policy creates the coordinator's client and sends the first request

    def _maybe_send_resource_request(self) -> None:
        pass


@dataclass
class SingleProcessConfig(BackendConfig):
    """Ray Train's torch set-up for a lone worker that never uses torch.distributed: TorchConfig's worker context
    (the worker's CUDA device) without its process group."""

    @property
    def backend_cls(self):
        return NoProcessGroupBackend

    @property
    def train_func_context(self):
        return WorkerDeviceContext

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"process_group": False}


class WorkerDeviceContext:
    """Ray's TorchConfig context around the worker function (it sets the worker's CUDA device), imported as the
    worker enters it: the driver, which only passes it along, never imports torch."""

    def __enter__(self) -> None:
        from ray.train.torch.config import TorchConfigContextManager

        self._inner = TorchConfigContextManager()
        self._inner.__enter__()

    def __exit__(self, *exc_info) -> bool:
        return self._inner.__exit__(*exc_info)


class NoProcessGroupBackend(Backend):
    """Ray's torch backend less the process group: nothing to start or shut down on one worker."""

    share_cuda_visible_devices = True  # as Ray's torch backend

    def on_start(self, worker_group, backend_config) -> None:
        if len(worker_group) != 1:
            raise ValueError(f"SingleProcessConfig is for one worker, not {len(worker_group)}")
