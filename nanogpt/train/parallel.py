"""How a model is spread over processes: one strategy object per way, chosen by the world size and
`train.parallel` (ddp: SingleProcess or DataParallel here; fsdp: nanogpt/train/fsdp.py's FullySharded). The loop never
asks which one it has.

The order the loop follows, which FSDP2 needs: build the model on the CPU, move it to the device, compile, `wrap`
it, and only then build the optimizer over the wrapped model's parameters.

    strategy = strategy_for(rank=0, world_size=1, device="cpu")   # SingleProcess
    model = strategy.wrap(model)
    with strategy.no_sync(model, sync=last_micro_step):
        loss.backward()
    strategy.all_reduce_sum(stats)                                 # a no-op on one process
    part = strategy.save_checkpoint(tmp / "checkpoint_000100", raw_model, optimizer, record)   # every rank
    strategy.load_optimizer_state(raw_model, optimizer, checkpoint)   # after wrap, from either checkpoint kind
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt.checkpoint.format import Checkpoint, CheckpointRecord, full_optimizer_state, save_checkpoint
from nanogpt.checkpoint.state_dict_keys import clean_state_dict
from nanogpt.model import GPT


class Strategy(Protocol):
    rank: int
    world_size: int
    collective_forward: bool
    """True when every forward is a collective (FSDP all-gathers weights in it): all ranks must run the same
    number of forward passes, evaluation and sampling included."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to train (the model already on its device, maybe compiled)."""
        ...

    def no_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Around a micro-step's backward: gradients are reduced across processes only when `sync`."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over all processes, in place."""
        ...

    def save_checkpoint(self, dir: Path, model: GPT, optimizer: torch.optim.Optimizer,
                        record: CheckpointRecord) -> Path | None:
        """Called on every rank with a fresh directory of its own: write this rank's part of the checkpoint there
        and return it, or None when the rank has nothing to report (DDP: rank 0 writes the whole checkpoint)."""
        ...

    def load_optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> bool:
        """Called on every rank after `wrap`: the checkpoint's AdamW state (either kind of checkpoint, written on
        any number of ranks) into `optimizer`. False when the checkpoint has none."""
        ...


class SingleProcess:
    """One process: nothing to wrap, reduce or gather."""

    rank, world_size = 0, 1
    collective_forward = False

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

    def save_checkpoint(self, dir: Path, model: GPT, optimizer: torch.optim.Optimizer,
                        record: CheckpointRecord) -> Path | None:
        """Rank 0 writes the whole checkpoint (every rank holds the same weights and AdamW state)."""
        if self.rank != 0:
            return None
        return save_checkpoint(dir, model_state=self.model_state_dict(model), model_args=record.model_args,
                               optimizer_state=self.optimizer_state_dict(model, optimizer),
                               scaler_state=record.scaler_state, step=record.step,
                               best_val_loss=record.best_val_loss, config=record.config, tokenizer=record.tokenizer,
                               manifest_json=record.manifest_json, extra=record.extra,
                               world_size=record.world_size, tokens_seen=record.tokens_seen)

    def load_optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> bool:
        """The whole state, as saved or read whole from a sharded checkpoint's shards (an FSDP run's, any size)."""
        state = full_optimizer_state(checkpoint)
        if state is None:
            return False
        optimizer.load_state_dict(state)
        return True


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


def strategy_for(rank: int, world_size: int, device: str, parallel: str = "ddp",
                 dtype: torch.dtype = torch.float32) -> Strategy:
    """`parallel` is train.parallel: fsdp shards the model (also on one rank); ddp replicates it (no wrapper at all
    on one process). `dtype`: the compute dtype, FSDP's mixed-precision policy."""
    if parallel == "fsdp":
        from nanogpt.train.fsdp import FullySharded  # here: DDP runs skip torch.distributed.fsdp's import

        return FullySharded(rank, world_size, device, dtype)
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
