"""MFU, peak-FLOPs lookup, perplexity and bits per byte against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from nanogpt.metrics import PEAK_FLOPS, bits_per_byte, device_key, mfu, peak_flops, perplexity


@pytest.mark.parametrize(
    "name, key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-SXM4-40GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA A40", "A40"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
        ("Tesla V100S-PCIE-32GB", "V100S"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("NVIDIA B200", "B200"),
    ],
)
def test_device_names(name, key):
    assert device_key(name) == key


@pytest.mark.parametrize(
    "name",
    ["cpu", "", "AMD Instinct MI300X", "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D",
     "NVIDIA A100-SXM4-40GB MIG 3g.20gb", "Apple M2", "NVIDIA A800-SXM4-80GB"],
)
def test_unknown_devices_are_none(name):
    assert device_key(name) is None
    assert peak_flops(name, torch.bfloat16) is None


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),  # nanoGPT's hard-coded figure
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
        ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
        ("NVIDIA H100 PCIe", torch.float16, 756e12),
        ("NVIDIA H200", torch.bfloat16, 989e12),
        ("NVIDIA L4", torch.bfloat16, 121e12),
        ("NVIDIA L40S", torch.float32, 91.6e12),
        ("NVIDIA A10G", torch.bfloat16, 70e12),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
        ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
        ("Tesla V100-SXM2-16GB", torch.bfloat16, None),  # no bf16 tensor cores before Ampere
        ("Tesla T4", torch.bfloat16, None),
        ("Tesla T4", torch.float32, 8.1e12),
    ],
)
def test_peak_flops(name, dtype, peak):
    assert peak_flops(name, dtype) == peak


def test_peak_flops_rejects_unknown_precision():
    with pytest.raises(ValueError, match="int8"):
        peak_flops("NVIDIA H100 80GB HBM3", "int8")


def test_table_is_ordered_by_speed_where_it_must_be():
    for entry in PEAK_FLOPS.values():
        assert set(entry) <= {"bf16", "fp16", "tf32", "fp32"}
        if "bf16" in entry and "fp32" in entry:
            assert entry["bf16"] > entry["fp32"]


@pytest.mark.parametrize(
    "flops_per_iter, dt, peak, expected",
    [
        (312e12, 1.0, 312e12, 1.0),
        (156e12, 1.0, 312e12, 0.5),
        (989e12, 2.0, 989e12, 0.5),
        # 5 sequences of 1024 tokens at 6e8 FLOP/token = 3.072e12 FLOP in 0.05 s = 61.44 TFLOP/s: 19.69% of 312
        (5 * 1024 * 6e8, 0.05, 312e12, 61.44e12 / 312e12),
        (1e12, 1.0, None, None),
    ],
)
def test_mfu(flops_per_iter, dt, peak, expected):
    result = mfu(flops_per_iter, dt, peak)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected, rel=1e-12)


def test_mfu_rejects_nonpositive_dt():
    with pytest.raises(ValueError, match="dt"):
        mfu(1.0, 0.0, 1.0)


@pytest.mark.parametrize(
    "loss, expected",
    [(0.0, 1.0), (math.log(50257), 50257.0), (math.log(65), 65.0), (1.0, math.e), (2.0, 7.38905609893065)],
)
def test_perplexity(loss, expected):
    assert perplexity(loss) == pytest.approx(expected, rel=1e-12)


def test_perplexity_of_a_diverged_loss_is_inf_not_a_crash():
    assert perplexity(1e4) == math.inf and perplexity(709.0) < math.inf and math.isnan(perplexity(math.nan))


@pytest.mark.parametrize(
    "loss, num_tokens, num_bytes, expected",
    [
        (math.log(2), 100, 100, 1.0),  # 1 bit per token, 1 byte per token
        (math.log(2), 100, 400, 0.25),  # 1 bit per token, 4 bytes per token (GPT-2 BPE on English)
        (math.log(256), 10, 10, 8.0),  # uniform over bytes: 8 bits per byte
        (1.0, 1000, 4000, 1000 / (math.log(2) * 4000)),  # 0.36067... bits per byte
        (3.28, 1_000_000, 4_200_000, 3.28e6 / (0.6931471805599453 * 4.2e6)),  # 1.1267...
    ],
)
def test_bits_per_byte(loss, num_tokens, num_bytes, expected):
    assert bits_per_byte(loss, num_tokens, num_bytes) == pytest.approx(expected, rel=1e-12)


def test_bits_per_byte_rejects_empty_text():
    with pytest.raises(ValueError, match="num_bytes"):
        bits_per_byte(1.0, 10, 0)
