"""Batch arithmetic: how a step's micro-batches split over the workers, and, for sweeps over the batch size, the
micro-batch and accumulation that keep tokens per optimizer step constant, and schedule lengths kept constant in
tokens when tokens per step change.

    rank_micro_batches(gradient_accumulation_steps=8, world_size=2, rank=1)                     # -> range(4, 8)
    rank_micro_batches(gradient_accumulation_steps=8, world_size=3, rank=2)                     # -> range(6, 8)
    sizes_that_cannot_split(gradient_accumulation_steps=8, sizes=range(2, 10), parallel="fsdp") # -> [3, 5, 6, 7, 9]

    accumulation_for_tokens(tokens_per_step=6144, batch_size=24, block_size=64, num_workers=2, parallel="ddp")  # -> 4
    steps_for_tokens(num_tokens=614_400, tokens_per_step=12288)                                    # -> 50
    rescale_steps(100, old_total=2000, new_total=500)      # -> 25: a warmup keeps its fraction of the run

Pure functions of integers (no torch): table-tested in tests/test_batch_geometry.py.
Tokens per step = batch_size * block_size * gradient_accumulation_steps, whatever the number of workers
(gradient_accumulation_steps counts micro-batches summed over workers; see nanogpt/data/windows.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from nanogpt.config import ConfigError


def rank_micro_batches(gradient_accumulation_steps: int, world_size: int, rank: int) -> range:
    """The global micro-batch indices rank `rank` runs in each optimizer step: consecutive blocks, as even as the
    world size allows (the first G mod W ranks take one more), so that the step's micro-batches, and their order,
    are the same on any world size. An even split gives every rank G / W."""
    if not 1 <= world_size <= gradient_accumulation_steps:
        raise ConfigError(
            f"{world_size} workers cannot split train.gradient_accumulation_steps={gradient_accumulation_steps} "
            "micro-batches per optimizer step: a worker would have none; use at most "
            f"{gradient_accumulation_steps} workers or more micro-batches"
        )
    base, extra = divmod(gradient_accumulation_steps, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def sizes_that_cannot_split(gradient_accumulation_steps: int, sizes: Iterable[int], parallel: str) -> list[int]:
    """The world sizes among `sizes` that cannot train every step on all its micro-batches: more workers than
    micro-batches, and, under FSDP, any size that does not divide them (FSDP's per-micro-batch collectives need
    the same micro-batch count on every rank; DDP communicates once per step and takes uneven splits)."""
    return [n for n in sizes if n < 1 or n > gradient_accumulation_steps
            or (parallel == "fsdp" and gradient_accumulation_steps % n)]


def check_worker_range(gradient_accumulation_steps: int, min_workers: int, max_workers: int, parallel: str) -> None:
    """ConfigError naming every size in [min_workers, max_workers] whose split cannot keep the step's data."""
    bad = sizes_that_cannot_split(gradient_accumulation_steps, range(min_workers, max_workers + 1), parallel)
    if not bad:
        return
    workers = (f"run.num_workers={max_workers}" if min_workers == max_workers
               else f"run.min_workers={min_workers} .. run.num_workers={max_workers}")
    raise ConfigError(
        f"{workers}: at {_sizes(bad)} workers the {gradient_accumulation_steps} micro-batches per optimizer step "
        f"(train.gradient_accumulation_steps={gradient_accumulation_steps}) cannot be split ({_split_rule(parallel)}); use "
        f"{'a worker count that fits' if min_workers == max_workers else 'a range whose every size fits'}, or raise "
        "train.gradient_accumulation_steps (and lower train.batch_size to keep tokens per step)"
    )


def _split_rule(parallel: str) -> str:
    """Why a size cannot split a step's micro-batches (sizes_that_cannot_split), in a message's words."""
    return "under train.parallel=fsdp every size must divide it" if parallel == "fsdp" else \
        "a worker would have no micro-batch"


def _sizes(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes[:-1])) + (" and " if len(sizes) > 1 else "") + str(sizes[-1])


def tokens_per_step(batch_size: int, block_size: int, gradient_accumulation_steps: int) -> int:
    return batch_size * block_size * gradient_accumulation_steps


def accumulation_for_tokens(tokens_per_step: int, batch_size: int, block_size: int, num_workers: int,
                            parallel: str) -> int:
    """train.gradient_accumulation_steps that makes micro-batches of `batch_size` sequences add up to
    `tokens_per_step` tokens per optimizer step, split over `num_workers` as any run splits them
    (sizes_that_cannot_split: DDP takes an uneven split, FSDP needs an even one). ConfigError (naming the batch
    size) when no whole number of micro-batches does it."""
    tokens_per_micro_batch = batch_size * block_size
    if tokens_per_step % tokens_per_micro_batch:
        raise ConfigError(
            f"train.batch_size={batch_size} cannot keep {tokens_per_step:,} tokens per step: {tokens_per_step:,} / "
            f"({batch_size} x block_size {block_size}) is not a whole number of micro-batches; use one of "
            f"{_batch_sizes_that_fit(tokens_per_step, block_size, num_workers, parallel)}"
        )
    accumulation = tokens_per_step // tokens_per_micro_batch
    if sizes_that_cannot_split(accumulation, [num_workers], parallel):
        raise ConfigError(
            f"train.batch_size={batch_size} cannot keep {tokens_per_step:,} tokens per step on {num_workers} "
            f"workers: its {accumulation} micro-batches per step cannot be split over them ({_split_rule(parallel)}); "
            "use one of "
            f"{_batch_sizes_that_fit(tokens_per_step, block_size, num_workers, parallel)}"
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


def _batch_sizes_that_fit(tokens_per_step: int, block_size: int, num_workers: int, parallel: str) -> str:
    sequences = tokens_per_step // block_size if tokens_per_step % block_size == 0 else 0
    fits = [b for b in range(1, sequences + 1)
            if sequences % b == 0 and not sizes_that_cannot_split(sequences // b, [num_workers], parallel)]
    if fits:
        return ", ".join(map(str, fits))
    if not sequences:
        return f"none (tokens per step is not a multiple of {block_size})"
    return f"none (its {sequences} sequences per step cannot be split over {num_workers} workers)"
