"""How a model's weights sit in memory while it generates on the CPU.

A KV-cached step forwards one token: every Linear layer is a matrix-vector product that reads its whole weight once,
so the step is bound by memory bandwidth. MKL streams a weight faster for `x @ W.T` when `W.T` is the contiguous
tensor (column-major `W`) than when `W` is, so cached generation runs with every Linear weight stored that way (the
same shape and values; the tied `wte` too, whose embedding lookup reads one row a token). Figures: bench/NOTES.md.

    with decode_layout(model):          # a no-op on GPUs, for FSDP's DTensors, in training, under torch.distributed
        ... model.next_token_logits(idx, kv_cache) ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn


@contextmanager
def decode_layout(model: nn.Module) -> Iterator[None]:
    """Every contiguous CPU nn.Linear weight of `model` stored column-major for the block, then row-major again
    with the same values. The Parameter objects stay (an optimizer's state stays theirs); only their storage moves.
    Left alone: a model in training mode, one whose parameters are not plain CPU tensors, any under an initialized
    torch.distributed (a DDP or FSDP wrapper may hold views of the weights)."""
    weights = _weights(model) if _applies(model) else []
    _relayout(weights, column_major=True)
    try:
        yield
    finally:
        _relayout(weights, column_major=False)


def _applies(model: nn.Module) -> bool:
    if model.training or (dist.is_available() and dist.is_initialized()):
        return False
    return all(type(p.data) is torch.Tensor and p.device.type == "cpu" for p in model.parameters())


def _weights(model: nn.Module) -> list[nn.Parameter]:
    """Each Linear weight once (a weight tied to an embedding is one Parameter), those stored row-major only."""
    unique = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}
    return [w for w in unique.values() if w.is_contiguous()]


def _relayout(weights: list[nn.Parameter], column_major: bool) -> None:
    # outside inference mode: the new storage must stay usable by autograd once generation is over
    with torch.inference_mode(False), torch.no_grad():
        for weight in weights:
            weight.data = weight.data.t().contiguous().t() if column_major else weight.data.contiguous()
