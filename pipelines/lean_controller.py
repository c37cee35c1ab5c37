"""The parts of a job's trainer that Ray Train's controller process unpickles, kept free of torch, so that the
controller starts without importing it: `import ray.train.torch.config`, where Ray's TorchConfig lives, imports
torch, about 3 s of one core here, on the way from `fit()` to the workers' start. The main job's first update came
1.5 s sooner (30.6 against 32.1 s, medians of 5 alternating runs on a slow day). Under a TorchConfig (a job of
several workers, or FSDP) the controller still imports torch.

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
    (the worker's CUDA device) without its process group. `backend` is TorchConfig's field, which TorchTrainer
    fills in (gloo or nccl); nothing starts it."""

    backend: str | None = None

    @property
    def backend_cls(self):
        return NoProcessGroupBackend

    @property
    def train_func_context(self):
        from ray.train.torch.config import TorchConfigContextManager  # read by the driver, used by the worker

        return TorchConfigContextManager

    @property
    def framework(self):
        return TrainingFramework.TORCH

    def to_dict(self) -> dict:
        return {"backend": self.backend, "process_group": False}


class NoProcessGroupBackend(Backend):
    """Ray's torch backend less the process group: nothing to start or shut down on one worker."""

    share_cuda_visible_devices = True  # as Ray's torch backend

    def on_start(self, worker_group, backend_config) -> None:
        if len(worker_group) != 1:
            raise ValueError(f"SingleProcessConfig is for one worker, not {len(worker_group)}")
