"""nanogpt/train/batch_geometry.py against values worked out by hand."""

from __future__ import annotations

import pytest

from nanogpt.config import ConfigError
from nanogpt.train.batch_geometry import (
    accumulation_for_tokens,
    check_worker_range,
    rank_micro_batches,
    rescale_steps,
    sizes_that_cannot_split,
    steps_for_tokens,
    tokens_per_step,
)


@pytest.mark.parametrize("batch_size, block_size, accumulation, expected", [
    (12, 64, 1, 768),         # nanoGPT's CPU recipe
    (12, 1024, 40, 491_520),  # train_gpt2: ~0.5M tokens per step
    (1, 1024, 32, 32_768),    # finetune_shakespeare
])
def test_tokens_per_step(batch_size, block_size, accumulation, expected):
    assert tokens_per_step(batch_size, block_size, accumulation) == expected


@pytest.mark.parametrize("tokens, batch_size, block_size, workers, parallel, expected", [
    (3072, 6, 64, 1, "ddp", 8),     # 48 sequences per step: 6 x 8
    (3072, 12, 64, 1, "ddp", 4),
    (3072, 24, 64, 2, "ddp", 2),    # 2 micro-batches, one per worker
    (3072, 48, 64, 1, "ddp", 1),
    (3072, 16, 64, 2, "ddp", 3),    # 2 + 1: DDP takes an uneven split, as a pretrain run does
    (491_520, 12, 1024, 8, "ddp", 40),  # nanoGPT's 5 x 8 GPUs
    (491_520, 24, 1024, 4, "fsdp", 20),
])
def test_accumulation_keeps_tokens_per_step(tokens, batch_size, block_size, workers, parallel, expected):
    accumulation = accumulation_for_tokens(tokens, batch_size, block_size, workers, parallel)
    assert accumulation == expected
    assert tokens_per_step(batch_size, block_size, accumulation) == tokens
    assert sizes_that_cannot_split(accumulation, [workers], parallel) == []  # the rule every run is checked by


@pytest.mark.parametrize("tokens, batch_size, workers, parallel, message", [
    (3072, 5, 1, "ddp", "train.batch_size=5 cannot keep 3,072 tokens per step: 3,072 / (5 x block_size 64) is not a "
                        "whole number of micro-batches; use one of 1, 2, 3, 4, 6, 8, 12, 16, 24, 48"),
    (3072, 16, 2, "fsdp", "train.batch_size=16 cannot keep 3,072 tokens per step on 2 workers: its 3 micro-batches "
                          "per step cannot be split over them (under train.parallel=fsdp every size must divide "
                          "it); use one of 1, 2, 3, 4, 6, 8, 12, 24"),
    (3072, 48, 2, "ddp", "train.batch_size=48 cannot keep 3,072 tokens per step on 2 workers: its 1 micro-batches "
                         "per step cannot be split over them (a worker would have no micro-batch); use one of 1, 2, "
                         "3, 4, 6, 8, 12, 16, 24"),
    (3000, 4, 1, "ddp", "use one of none (tokens per step is not a multiple of 64)"),
    (192, 1, 4, "ddp", "use one of none (its 3 sequences per step cannot be split over 4 workers)"),
])
def test_accumulation_errors_name_the_batch_size(tokens, batch_size, workers, parallel, message):
    with pytest.raises(ConfigError) as e:
        accumulation_for_tokens(tokens, batch_size, 64, workers, parallel)
    assert message in str(e.value)


@pytest.mark.parametrize("num_tokens, step_tokens, expected", [
    (1_536_000, 384, 4000), (1_536_000, 768, 2000), (1_536_000, 1536, 1000), (768, 768, 1),
])
def test_steps_for_tokens(num_tokens, step_tokens, expected):
    assert steps_for_tokens(num_tokens, step_tokens) == expected


def test_steps_for_tokens_names_the_nearest_budgets():
    with pytest.raises(ConfigError, match=r"1,000 tokens is not a whole number of steps of 768 tokens \(the nearest "
                                          r"multiples are 768 and 1,536\)"):
        steps_for_tokens(1000, 768)


@pytest.mark.parametrize("steps, old_total, new_total, expected", [
    (100, 2000, 4000, 200),   # warmup: 5% of the run either way
    (100, 2000, 1000, 50),
    (250, 2000, 1000, 125),   # eval interval: the same token counts
    (2000, 2000, 500, 500),   # lr_decay_iters = max_iters stays so
    (5, 40, 10, 1),           # 1.25 -> 1
    (1, 2000, 10, 1),         # never below one step
    (0, 2000, 1000, 0),       # 0 = off (checkpoint_interval) stays off
    (3, 40, 20, 2),           # 1.5 rounds to even
])
def test_rescale_steps_keeps_the_fraction_of_the_run(steps, old_total, new_total, expected):
    assert rescale_steps(steps, old_total, new_total) == expected


@pytest.mark.parametrize("accumulation, world_size, counts", [
    (40, 1, [40]), (40, 8, [5] * 8), (40, 40, [1] * 40), (4, 2, [2, 2]), (6, 3, [2, 2, 2]),  # even: G / W each
    (4, 3, [2, 1, 1]), (8, 3, [3, 3, 2]), (40, 3, [14, 13, 13]), (5, 2, [3, 2]), (7, 4, [2, 2, 2, 1]),  # uneven
    (12, 5, [3, 3, 2, 2, 2]), (8, 7, [2, 1, 1, 1, 1, 1, 1]), (3, 3, [1, 1, 1]),
])
def test_rank_micro_batches_split_the_step_in_order_as_evenly_as_possible(accumulation, world_size, counts):
    ranges = [rank_micro_batches(accumulation, world_size, rank) for rank in range(world_size)]
    assert [len(r) for r in ranges] == counts
    assert [g for r in ranges for g in r] == list(range(accumulation))  # every micro-batch once, in order


def test_every_split_up_to_16_covers_the_step_once_with_counts_one_apart():
    for accumulation in range(1, 17):
        for world_size in range(1, accumulation + 1):
            ranges = [rank_micro_batches(accumulation, world_size, rank) for rank in range(world_size)]
            assert [g for r in ranges for g in r] == list(range(accumulation)), (accumulation, world_size)
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1 and min(map(len, ranges)) >= 1


@pytest.mark.parametrize("accumulation, world_size", [(4, 8), (2, 3), (1, 2), (5, 0)])
def test_more_workers_than_micro_batches_is_a_config_error(accumulation, world_size):
    with pytest.raises(ConfigError, match=rf"{world_size} workers cannot split train.gradient_accumulation_steps="
                                          rf"{accumulation}"):
        rank_micro_batches(accumulation, world_size, 0)


@pytest.mark.parametrize("accumulation, sizes, parallel, bad", [
    (8, range(1, 9), "ddp", []),                       # DDP takes uneven splits
    (8, range(2, 11), "ddp", [9, 10]),                 # a rank with no micro-batch
    (8, range(2, 10), "fsdp", [3, 5, 6, 7, 9]),        # FSDP: sizes that divide 8 only
    (12, range(2, 7), "fsdp", [5]),
    (40, range(4, 9), "fsdp", [6, 7]),
    (4, range(2, 4), "ddp", []),                       # the rehearsal's range: 2 and 3 workers on 4 micro-batches
])
def test_sizes_that_cannot_split(accumulation, sizes, parallel, bad):
    assert sizes_that_cannot_split(accumulation, sizes, parallel) == bad


def test_a_worker_range_names_every_size_it_cannot_split():
    check_worker_range(4, 2, 3, "ddp")
    check_worker_range(6, 2, 3, "fsdp")
    with pytest.raises(ConfigError, match=r"run.min_workers=2 .. run.num_workers=8: at 3, 5, 6 and 7 workers the 8 "
                                          r"micro-batches per optimizer step \(train.gradient_accumulation_steps=8\) "
                                          r"cannot be split \(under train.parallel=fsdp every size must divide it\)"):
        check_worker_range(8, 2, 8, "fsdp")
    with pytest.raises(ConfigError, match=r"run.num_workers=5: at 5 workers the 4 micro-batches"):
        check_worker_range(4, 5, 5, "ddp")
