"""Batch arithmetic: how a step's micro-batches split over the workers, and, for sweeps over the batch size, the
micro-batch and accumulation that keep tokens per optimizer step constant, and schedule lengths kept constant in
tokens when tokens per step change.

    micro_steps_per_rank(gradient_accumulation_steps=8, world_size=2)                           # -> 4

    accumulation_for_tokens(tokens_per_step=6144, batch_size=24, block_size=64, num_workers=2)   # -> 4
    steps_for_tokens(num_tokens=614_400, tokens_per_step=12288)                                    # -> 50
    rescale_steps(100, old_total=2000, new_total=500)      # -> 25: a warmup keeps its fraction of the run

Pure functions of integers (no torch): table-tested in tests/test_batch_geometry.py.
Tokens per step = batch_size * block_size * gradient_accumulation_steps, whatever the number of workers
(gradient_accumulation_steps counts micro-batches summed over workers; see nanogpt/data/windows.py).
"""

from __future__ import annotations

from nanogpt.config import ConfigError


def micro_steps_per_rank(gradient_accumulation_steps: int, world_size: int) -> int:
    """Micro-batches each rank runs per optimizer step, so that the step's total stays the same on any world size."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if gradient_accumulation_steps % world_size:
        valid = [n for n in range(1, gradient_accumulation_steps + 1) if gradient_accumulation_steps % n == 0]
        raise ConfigError(
            f"train.gradient_accumulation_steps={gradient_accumulation_steps} (micro-batches per optimizer step, "
            f"summed over workers) is not divisible by the {world_size} workers; use a worker count that divides it "
            f"({', '.join(map(str, valid))}) or a multiple of {world_size} as gradient_accumulation_steps"
        )
    return gradient_accumulation_steps // world_size


def tokens_per_step(batch_size: int, block_size: int, gradient_accumulation_steps: int) -> int:
    return batch_size * block_size * gradient_accumulation_steps


def accumulation_for_tokens(tokens_per_step: int, batch_size: int, block_size: int, num_workers: int) -> int:
    """train.gradient_accumulation_steps that makes micro-batches of `batch_size` sequences add up to
    `tokens_per_step` tokens per optimizer step, split evenly over `num_workers`. ConfigError (naming the batch
    size) when no whole number of micro-batches does it."""
    tokens_per_micro_batch = batch_size * block_size
    if tokens_per_step % tokens_per_micro_batch:
        raise ConfigError(
            f"train.batch_size={batch_size} cannot keep {tokens_per_step:,} tokens per step: {tokens_per_step:,} / "
            f"({batch_size} x block_size {block_size}) is not a whole number of micro-batches; use one of "
            f"{_batch_sizes_that_fit(tokens_per_step, block_size, num_workers)}"
        )
    accumulation = tokens_per_step // tokens_per_micro_batch
    if accumulation % num_workers:
        raise ConfigError(
            f"train.batch_size={batch_size} cannot keep {tokens_per_step:,} tokens per step on {num_workers} "
            f"workers: its {accumulation} micro-batches per step do not split evenly over the workers; use one of "
            f"{_batch_sizes_that_fit(tokens_per_step, block_size, num_workers)}"
        )
    return accumulation


def steps_for_tokens(num_tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps that train on exactly `num_tokens` tokens; ConfigError when that is not a whole number."""
    if num_tokens % tokens_per_step:
        raise ConfigError(
            f"{num_tokens:,} tokens is not a whole number of steps of {tokens_per_step:,} tokens "
            f"(the nearest multiples are {num_tokens // tokens_per_step * tokens_per_step:,} and "
            f"{(num_tokens // tokens_per_step + 1) * tokens_per_step:,})"
        )
    return num_tokens // tokens_per_step


def rescale_steps(steps: int, old_total: int, new_total: int) -> int:
    """A schedule length (warmup, decay, eval interval) of a run of `old_total` steps, as the nearest whole number
    of steps keeping its fraction of a run of `new_total` steps (at least 1 when it was at least 1). When both
    runs train on the same number of tokens, that is the same length in tokens."""
    if steps < 1:
        return 0
    return max(round(steps * new_total / old_total), 1)


def _batch_sizes_that_fit(tokens_per_step: int, block_size: int, num_workers: int) -> str:
    sequences = tokens_per_step // block_size if tokens_per_step % block_size == 0 else 0
    fits = [b for b in range(1, sequences + 1) if sequences % b == 0 and (sequences // b) % num_workers == 0]
    return ", ".join(map(str, fits)) if fits else f"none (tokens per step is not a multiple of {block_size * num_workers})"
