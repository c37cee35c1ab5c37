"""FSDP2: parameters, gradients and AdamW state sharded over the workers (`train.parallel=fsdp`).

`fully_shard` on every transformer block and then on the GPT itself: the root unit holds what is left (token and
position embeddings, the final LayerNorm, and lm_head, which IS transformer.wte: one parameter, sharded once). In
each forward and backward a block all-gathers its weights just before it runs and frees them after; gradients are
reduce-scattered, so each rank keeps 1/N of them and steps AdamW on its 1/N. With train.dtype=bfloat16 the
all-gathered weights are cast to bfloat16 for compute and gradients are reduced in float32
(`MixedPrecisionPolicy`); the sharded master weights and AdamW state stay float32.

What differs from DDP for the loop, all behind the `Strategy` slot of nanogpt/train/parallel.py:
- gradient accumulation: only the last micro-step reduce-scatters (`set_requires_gradient_sync`); the others
  accumulate unsharded gradients (a full model's worth of extra memory: the price of fewer collectives);
- the gradient norm comes back as a DTensor (step.py takes `.full_tensor()`);
- every forward is a collective: evaluation pads the ranks to the same number of batches, and sampling runs on
  every rank (`collective_forward`);
- checkpoints are sharded (nanogpt/checkpoint/sharded.py): every rank writes its part, rank 0 the metadata.

    strategy = FullySharded(rank, world_size, "cuda:0", torch.bfloat16)   # torch.distributed initialized first
    model = strategy.wrap(model)                                          # in place; the optimizer is built after
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from nanogpt.checkpoint.files import has_optimizer_shards
from nanogpt.checkpoint.format import (
    Checkpoint,
    CheckpointRecord,
    full_optimizer_state,
    sharded,
    write_record,
)
from nanogpt.config import ConfigError
from nanogpt.model import GPT


class FullySharded:
    """FSDP2 over an initialized process group (gloo on CPU, nccl on CUDA), one or more ranks."""

    collective_forward = True

    def __init__(self, rank: int, world_size: int, device: str, dtype: torch.dtype) -> None:
        if not dist.is_initialized():
            raise ConfigError("train.parallel=fsdp needs torch.distributed initialized, also on one worker (Ray "
                              "Train and torchrun do it); a plain process trains with --train.parallel=ddp")
        if dtype == torch.float16:
            raise ConfigError("train.parallel=fsdp trains in bfloat16 or float32, not float16 (its loss scaler "
                              "would see only each worker's shard of the gradients): use --train.dtype=bfloat16")
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, dtype

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard the GPT in place (under torch.compile's wrapper, which then traces the sharded model)."""
        gpt = _gpt(model)
        mesh = init_device_mesh(torch.device(self.device).type, (self.world_size,))
        policy = (MixedPrecisionPolicy() if self.dtype == torch.float32
                  else MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32))
        for block in gpt.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(gpt, mesh=mesh, mp_policy=policy)  # the root: embeddings, ln_f and the tied lm_head
        return model

    def no_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        _gpt(model).set_requires_gradient_sync(sync)  # for this micro-step's backward
        return contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def save_checkpoint(self, dir: Path, model: GPT, optimizer: torch.optim.Optimizer,
                        record: CheckpointRecord) -> Path:
        """Collective: every rank writes its shards into its own `dir`; rank 0 adds the metadata and state.json
        listing every rank's files with their sizes. Every rank's `dir` is a part to report."""
        dir.mkdir(parents=True, exist_ok=True)
        mine = sharded.write_shards(dir, model, optimizer)
        every = [None] * self.world_size
        dist.all_gather_object(every, mine)
        if self.rank == 0:
            sizes = {name: size for part in every for name, size in sorted(part.items())}
            write_record(dir, sizes, record, tied=sharded.tied_aliases(model))
        return dir

    def load_optimizer_state(self, model: GPT, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> bool:
        """Collective: the checkpoint's AdamW state into this rank's shards: from a sharded checkpoint's shards
        (resharded when it was written by another number of ranks), or from a whole optimizer.pt."""
        files = list(checkpoint.state.get("files") or [])
        if checkpoint.sharded and has_optimizer_shards(files):
            sharded.load_optimizer_shards(model, optimizer, checkpoint.path)
            return True
        state = full_optimizer_state(checkpoint)
        if state is None:
            return False
        sharded.load_full_optimizer_state(model, optimizer, state)
        return True


def _gpt(model: torch.nn.Module) -> GPT:
    """The GPT under torch.compile's wrapper (the only wrapper FSDP2 leaves: it shards in place)."""
    return getattr(model, "_orig_mod", model)
