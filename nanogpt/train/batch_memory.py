"""The memory a worker needs at least for its batches, from the config alone: checked on the driver before
anything starts, so that a typo such as train.batch_size=1000000000 is one line naming the setting instead of a
worker's allocation of tens of GiB failing (and being retried).

Only buffers that grow with these settings are counted, each a lower bound on what a worker allocates:
  a micro-batch (train.batch_size)    its float32 logits and their gradient (the loss upcasts the logits to
                                      float32 under any dtype): 2 x batch_size x block_size x vocab x 4 bytes,
                                      plus its int64 token windows
  an evaluation (train.eval_iters)    the int64 indices of its eval_iters x batch_size windows, built three times
                                      over (nanogpt/data/windows.py, TokenWindows.eval_positions)
Weights, optimizer state and activations come on top, so a setting whose lower bound exceeds a machine's memory can
never run there, and one below it may still not fit. nanoGPT's GPT-2 XL finetune at 12 x 1024 tokens per
micro-batch needs 4.6 GiB of these: it passes on any machine that can hold the model.

    check_batch_memory(config, vocab_size=50257, memory_bytes=machine_memory(), where="this machine")
"""

from __future__ import annotations

import os

from nanogpt.config import Config, ConfigError

LOGIT_BYTES = 2 * 4  # a float32 logit and its gradient
TOKEN_BYTES = 3 * 8  # an int64 token in x, in y and in the window buffer they are cut from
INDEX_BYTES = 3 * 8  # an int64 window index, built three times over


def micro_batch_bytes(batch_size: int, block_size: int, vocab_size: int) -> int:
    return batch_size * block_size * (vocab_size * LOGIT_BYTES + TOKEN_BYTES)


def eval_index_bytes(num_windows: int) -> int:
    return num_windows * INDEX_BYTES


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_batch_memory(config: Config, vocab_size: int, memory_bytes: int, where: str) -> None:
    """ConfigError naming the setting when a worker's batches need more than `memory_bytes` (the memory of
    `where`, e.g. "this machine"). `vocab_size`: the dataset's, a lower bound of the model's."""
    tc, block_size = config.train, config.model.block_size
    need = micro_batch_bytes(tc.batch_size, block_size, vocab_size)
    if need > memory_bytes:
        raise ConfigError(
            f"train.batch_size={tc.batch_size}: one micro-batch of {tc.batch_size:,} x {block_size:,} tokens needs "
            f"at least {_gib(need)} per worker (float32 logits over {vocab_size:,} tokens and their gradient), more "
            f"than the {_gib(memory_bytes)} of {where}: lower train.batch_size (and raise "
            "train.gradient_accumulation_steps to keep the tokens per step)"
        )
    num_windows = tc.eval_iters * tc.batch_size
    need = eval_index_bytes(num_windows)
    if need > memory_bytes:
        raise ConfigError(
            f"train.eval_iters={tc.eval_iters}: an evaluation of eval_iters x batch_size = {num_windows:,} windows "
            f"needs at least {_gib(need)} per worker for their indices alone, more than the {_gib(memory_bytes)} of "
            f"{where}: lower train.eval_iters"
        )


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:,.1f} GiB"
