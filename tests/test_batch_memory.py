"""The memory bounds on the batch settings (nanogpt/train/batch_memory.py): real large settings pass, typos do not, and
the error names the setting. The driver's use of them: tests/test_pretrain_checks.py."""

from __future__ import annotations

import pytest

from nanogpt.config import Config, ConfigError
from nanogpt.train.batch_memory import check_batch_memory, micro_batch_bytes

GIB = 2**30


@pytest.mark.parametrize(
    "case, settings, vocab_size",
    [
        # nanoGPT's finetune of GPT-2 XL at 12 sequences of 1024 tokens per micro-batch, 40 micro-batches per step
        ("GPT-2 XL finetune", {"model": {"init_from": "gpt2-xl", "block_size": 1024},
                               "train": {"batch_size": 12, "gradient_accumulation_steps": 40}}, 50257),
        ("nanoGPT's train_gpt2", {"model": {"block_size": 1024}, "train": {"batch_size": 12, "eval_iters": 200}},
         50304),
        ("char model, big batch", {"model": {"block_size": 256}, "train": {"batch_size": 4096, "eval_iters": 5000}},
         65),
    ],
)
def test_real_large_settings_pass_the_memory_bounds(case, settings, vocab_size):
    check_batch_memory(Config.from_dict(settings), vocab_size, 24 * GIB, "a 24 GiB machine")


@pytest.mark.parametrize(
    "settings, vocab_size, expected",
    [
        ({"model": {"block_size": 32}, "train": {"batch_size": 10**9}}, 65, r"^train\.batch_size=1000000000: .* 16,212\.5 GiB per worker .* 24\.0 GiB"),
        # GPT-2's vocabulary: 62 sequences of 1024 tokens per micro-batch still pass, 63 cannot fit
        ({"model": {"block_size": 1024}, "train": {"batch_size": 63}}, 50257, r"^train\.batch_size=63: .* 24\.2 GiB"),
        ({"model": {"block_size": 32}, "train": {"eval_iters": 10**9, "batch_size": 8}}, 65, r"^train\.eval_iters=1000000000: .* 178\.8 GiB"),
    ],
)
def test_settings_past_the_memory_bounds_name_the_field(settings, vocab_size, expected):
    config = Config.from_dict(settings)
    with pytest.raises(ConfigError, match=expected):
        check_batch_memory(config, vocab_size, 24 * GIB, "a 24 GiB machine")
    if settings["train"]["batch_size"] == 63:
        check_batch_memory(config.replace(train__batch_size=62), vocab_size, 24 * GIB, "a 24 GiB machine")


def test_micro_batch_bytes_by_hand():
    # 12 x 1024 tokens: float32 logits and gradient over 50257 tokens (8 bytes each), 3 int64 token buffers
    assert micro_batch_bytes(12, 1024, 50257) == 12 * 1024 * (50257 * 8 + 24) == 4_940_759_040
