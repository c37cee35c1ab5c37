"""How a model is spread over processes: one strategy object per way, chosen by the world size (and, later, by
config: FSDP fills the same slot). The loop never asks which one it has.

The order the loop follows, which FSDP2 needs too: build the model on the CPU, move it to the device, compile,
`wrap` it, and only then build the optimizer over the wrapped model's parameters.

    strategy = strategy_for(rank=0, world_size=1, device="cpu")   # SingleProcess
    model = strategy.wrap(model)
    with strategy.no_sync(model, sync=last_micro_step):
        loss.backward()
    strategy.all_reduce_sum(stats)                                 # a no-op on one process
    state = strategy.model_state_dict(raw_model)                   # full, nanoGPT's keys: what a checkpoint holds
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt.model import GPT, clean_state_dict


class Strategy(Protocol):
    rank: int
    world_size: int

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train (the model already on its device, maybe compiled)."""
        ...

    def no_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around a micro-step's backward: gradients are reduced across processes only when `sync`."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over all processes, in place."""
        ...

    def model_state_dict(self, model: GPT) -> dict[str, torch.Tensor]:
        """The full model state with nanoGPT's keys (called on every rank; rank 0 writes it)."""
        ...

    def optimizer_state_dict(self, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The full optimizer state (called on every rank; rank 0 writes it)."""
        ...


class SingleProcess:
    """One process: nothing to wrap, reduce or gather."""

    rank, world_size = 0, 1

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def no_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        pass

    def model_state_dict(self, model: GPT) -> dict[str, torch.Tensor]:
        return clean_state_dict(unwrap_model(model).state_dict())

    def optimizer_state_dict(self, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()


class DataParallel(SingleProcess):
    """DistributedDataParallel over an initialized process group (gloo on CPU, nccl on CUDA; Ray Train and
    torchrun set it up). Every rank holds the whole model and optimizer, so their state is rank 0's own."""

    def __init__(self, rank: int, world_size: int, device: str) -> None:
        if not dist.is_initialized():
            raise RuntimeError(f"world size {world_size} needs torch.distributed initialized first (torchrun, Ray)")
        self.rank, self.world_size, self.device = rank, world_size, device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        on_cuda = torch.device(self.device).type == "cuda"
        return DDP(model, device_ids=[torch.cuda.current_device()] if on_cuda else None)

    def no_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        # only the last micro-step all-reduces the gradients; the others just accumulate them locally
        return contextlib.nullcontext() if sync else model.no_sync()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def strategy_for(rank: int, world_size: int, device: str) -> Strategy:
    return SingleProcess() if world_size == 1 else DataParallel(rank, world_size, device)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting."""
    while True:
        if isinstance(model, DDP) or (not isinstance(model, GPT) and isinstance(getattr(model, "module", None),
                                                                              torch.nn.Module)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model
