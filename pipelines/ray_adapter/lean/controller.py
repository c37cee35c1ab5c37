"""The parts of the wing's trainer that the driver builds and Ray Train's controller unpickles, kept free of torch:
`import ray.train.torch`, where Ray's TorchTrainer and TorchConfig live, imports torch, once in the driver and once in
the controller on the way from `fit()` to the workers' start (figures: bench/NOTES.md). For a lone worker that
replicates the model only the worker imports it; under Ray's TorchConfig (several workers, or FSDP) driver and
controller still do.

    FixedScalingWithoutRequests(scaling_config)   # Ray's fixed-size scaling policy, no autoscaler requests
    TorchConfigWithoutProcessGroup()              # a lone worker's backend: no torch process group
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy
from ray.train.v2._internal.util import TrainingFramework


class FixedScalingWithoutRequests(FixedScalingPolicy):
    """Ray Train's fixed-size scaling policy without its resource requests to the autoscaling coordinator."""

    def after_controller_start(self, train_run_context) -> None:
        pass  # where Ray's policy creates the coordinator's client and sends the first request

    def _maybe_send_resource_request(self) -> None:
        pass


@dataclass
class TorchConfigWithoutProcessGroup(BackendConfig):
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
            raise ValueError(f"TorchConfigWithoutProcessGroup is for one worker, not {len(worker_group)}")
