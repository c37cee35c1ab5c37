"""One optimizer update, and what to do when it is not finite.

`compute_gradients` runs a step's micro-batches on this rank and returns the step's statistics, reduced over
ranks, as a tensor on the device; `read_stats` brings them to the host (the step's one host sync, which the
non-finite check needs before the update); `apply_update` then steps the optimizer, or skips the update when
`NonFinitePolicy` says so. Batches and
dropout masks are pure functions of (seed, step, global micro-batch), so a resumed run redoes exactly the
uninterrupted run's updates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from nanogpt.data.windows import TokenWindows, to_device
from nanogpt.train.batch_geometry import rank_micro_batches
from nanogpt.train.devices import Precision
from nanogpt.train.parallel import Strategy

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN/inf; raised before the optimizer update, naming the step."""


@dataclass(frozen=True)
class StepStats:
    loss: float
    """The update's training loss: mean over its micro-batches and over ranks."""
    grad_norm: float
    """Global gradient norm before clipping."""
    finite: bool
    """False when any rank saw a NaN/inf loss (or, without loss scaling, gradient norm)."""


def dropout_seed(seed: int, step: int, g: int) -> int:
    """The torch seed for micro-batch g of step `step` (a different stream from the data's, same inputs)."""
    return int(np.random.SeedSequence([seed % 2**63, step, g, 1]).generate_state(1, np.uint64)[0])


def compute_gradients(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, windows: TokenWindows, step: int, *, seed: int,
    batch_size: int, accumulation: int, strategy: Strategy, precision: Precision, scaler: torch.amp.GradScaler,
    grad_clip: float,
) -> torch.Tensor:
    """Forward and backward over this rank's share of the `accumulation` micro-batches of `step`
    (batch_geometry.rank_micro_batches; the gradients averaged over ranks by the strategy), unscaled and clipped;
    one small all-reduce for the statistics, so every rank gets the same and skips or stops at the same step (a
    rank leaving alone would hang the others). Returns them on the device, unread: [loss, non-finite flag, gradient
    norm], each summed over ranks (`read_stats`)."""
    device = precision.device
    loss_sum = torch.zeros((), device=device)
    mine = rank_micro_batches(accumulation, strategy.world_size, strategy.rank)
    # Each micro-batch's loss is divided by the mean share G / W, not by this rank's own count: the strategy then
    # averages over W ranks, so the step's gradient is the mean over all G micro-batches even when the split is
    # uneven. An even split divides by exactly the integer G / W, as nanoGPT does.
    share = accumulation / strategy.world_size
    x, y = to_device(*windows.train_batch(seed, step, mine[0], batch_size), device)
    for g in mine:
        # Dropout draws from torch's global RNG. Reseeding it from (seed, step, g) makes the masks a function of
        # where the loop is: a resumed run draws exactly the uninterrupted run's masks with no RNG state in
        # the checkpoint, and micro-batch g gets the same masks whatever the number of workers.
        torch.manual_seed(dropout_seed(seed, step, g))
        last = g == mine[-1]
        with strategy.no_sync(model, sync=last):
            with precision.autocast():
                _, loss = model(x, y)
                scaled = loss / share  # scale the loss to account for gradient accumulation
            if not last:  # fetch the next micro-batch while the forward pass runs on the GPU (nanoGPT)
                x, y = to_device(*windows.train_batch(seed, step, g + 1, batch_size), device)
            scaler.scale(scaled).backward()
        loss_sum += loss.detach().float()
    scaler.unscale_(optimizer)  # a no-op without float16; clipping and the norm need true gradients
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the ranks' shards; the whole norm on every rank
        grad_norm = grad_norm.full_tensor()
    # With float16, inf gradients are the GradScaler's business (it skips the update and lowers the scale).
    bad = ~torch.isfinite(loss_sum)
    if not scaler.is_enabled():
        bad = bad | ~torch.isfinite(grad_norm)
    stats = torch.stack([loss_sum / share, bad.float(), grad_norm.float()])
    strategy.all_reduce_sum(stats)
    return stats


def read_stats(stats: torch.Tensor, world_size: int) -> StepStats:
    """compute_gradients' statistics on the host: waits for the step's work on the device to finish."""
    step_loss, num_bad, norm = stats.tolist()
    # the norm is the same on every rank (the gradients are all-reduced): the sum over ranks / world size
    return StepStats(step_loss / world_size, norm / world_size, finite=num_bad == 0)


def apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, stats: StepStats) -> None:
    """Step the optimizer with the computed gradients, or drop them when the step was not finite."""
    if stats.finite:
        scaler.step(optimizer)
    scaler.update()  # float16: a NaN/inf gradient lowers the loss scale
    optimizer.zero_grad(set_to_none=True)  # flush the gradients as soon as we can, no need for this memory


class NonFinitePolicy:
    """Skip up to `max_skips` non-finite steps over a call of the loop, then stop with NonFiniteError."""

    def __init__(self, max_skips: int) -> None:
        self.max_skips = max_skips
        self.num_skipped = 0

    def check(self, step: int, stats: StepStats, log_warning: bool = True) -> None:
        """Raise NonFiniteError when a non-finite step is one too many; count it otherwise."""
        if stats.finite:
            return
        self.num_skipped += 1
        if self.num_skipped > self.max_skips:
            raise NonFiniteError(
                f"step {step}: non-finite loss {stats.loss} or gradient norm {stats.grad_norm}; stopped before the "
                f"optimizer update (the weights are those after {step} updates). train.max_nonfinite_skips="
                f"{self.max_skips} lets a run skip such steps; lower optim.learning_rate or use bfloat16 if it "
                "keeps happening"
            )
        if log_warning:
            log.warning("step %d: non-finite loss %s or gradient norm %s: update skipped (%d of %d allowed)",
                        step, stats.loss, stats.grad_norm, self.num_skipped, self.max_skips)
