"""Numbers reported about training: MFU against the GPU's real peak, perplexity, bits per byte.

Pure functions, checked against hand-worked values in tests/test_metrics.py.

    peak = peak_flops(torch.cuda.get_device_name(), torch.bfloat16)   # 989e12 on "NVIDIA H100 80GB HBM3"
    mfu(flops_per_iter, dt, peak)                                      # None when the GPU is not in the table
    bits_per_byte(val_loss, num_tokens, num_bytes)                     # tokenizer-independent loss
"""

from __future__ import annotations

import math
import re

import torch

# Dense peak FLOP/s (no 2:4 sparsity: datasheets often print the sparse figure, twice this) per precision:
# bf16/fp16 = tensor cores with fp32 accumulate (what autocast training uses; GeForce cards run fp16 accumulate
# twice as fast, which training does not use), tf32 = tensor-core fp32 matmuls (torch.backends.cuda.matmul
# .allow_tf32), fp32 = plain CUDA cores. A precision a GPU has no tensor-core path for (bf16 before Ampere) is
# absent, so peak_flops returns None rather than a number the GPU cannot reach.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Blackwell / Hopper (datasheets: H100 SXM bf16 1979 TFLOP/s with sparsity -> 989 dense)
    "B200": {"bf16": 2250e12, "fp16": 2250e12},
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},  # H100 SXM compute, more HBM
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12},
    "GH200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    # Ada
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    # Ampere (A100 SXM and PCIe share the compute figures)
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A40": {"bf16": 149.7e12, "fp16": 149.7e12, "tf32": 74.8e12, "fp32": 37.4e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    # AWS's A10G: 80 SMs (fp32 80*128*2*1.71 GHz = 35 TFLOP/s) but half the A10's tensor-core rate
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 35e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    # Volta / Turing: fp16 tensor cores, no bf16 or tf32
    "V100 SXM2": {"fp16": 125e12, "fp32": 15.7e12},
    "V100 PCIe": {"fp16": 112e12, "fp32": 14e12},
    "V100S": {"fp16": 130e12, "fp32": 16.4e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}

# torch.cuda.get_device_name() strings -> table key, first match wins, so the more specific patterns come first:
# "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe",
# "NVIDIA A10G", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 4090", ... \b keeps "A10" from matching "A100".
_DEVICE_PATTERNS: list[tuple[str, str]] = [
    (r"\bB200\b", "B200"),
    (r"\bGH200\b", "GH200"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bL40S\b", "L40S"),
    (r"\bL40\b", "L40"),
    (r"\bL4\b", "L4"),
    (r"\bRTX 4090$", "RTX 4090"),  # not the 4090 D (fewer SMs)
    (r"\bRTX 3090$", "RTX 3090"),  # not the 3090 Ti (more SMs)
    (r"\bA100\b", "A100"),
    (r"\bA40\b", "A40"),
    (r"\bA10G\b", "A10G"),
    (r"\bA10\b", "A10"),
    (r"\bV100S\b", "V100S"),
    (r"\bV100\b.*\bPCIe\b", "V100 PCIe"),
    (r"\bV100\b", "V100 SXM2"),
    (r"\bT4\b", "T4"),
]

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def device_key(device_name: str) -> str | None:
    """The PEAK_FLOPS key for a torch.cuda.get_device_name() string, or None if the GPU is not in the table.

    A MIG slice ("NVIDIA A100-SXM4-40GB MIG 3g.20gb") is None too: it has a fraction of the GPU's peak."""
    name = device_name.strip()
    if re.search(r"\bMIG\b", name):
        return None
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return key
    return None


def peak_flops(device_name: str, dtype: torch.dtype | str) -> float | None:
    """Dense peak FLOP/s of the named GPU in `dtype` (torch.bfloat16/float16/float32 or 'bf16', 'fp16', 'tf32',
    'fp32'); None for an unknown device (a CPU included) or a precision it has no fast path for."""
    key = device_key(device_name)
    if key is None:
        return None
    precision = _DTYPE_KEYS.get(dtype) if isinstance(dtype, torch.dtype) else dtype
    if precision not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"dtype must be bf16, fp16, tf32 or fp32, got {dtype!r}")
    return PEAK_FLOPS[key].get(precision)


def mfu(flops_per_iter: float, dt: float, peak: float | None) -> float | None:
    """Model FLOPs utilization: (flops_per_iter / dt) / peak, a fraction in [0, 1]; None when peak is None."""
    if dt <= 0:
        raise ValueError(f"dt must be positive, got {dt}")
    if peak is None:
        return None
    return flops_per_iter / dt / peak


def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats per token); inf past float range (a diverged run's loss of 1e4)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def bits_per_byte(loss_nats_per_token: float, num_tokens: int, num_bytes: int) -> float:
    """Total loss in bits over the UTF-8 bytes of the text it was measured on: loss * tokens / (ln 2 * bytes).

    Unlike per-token loss this compares across tokenizers: a char tokenizer (1 token per byte of ASCII) and
    GPT-2 BPE (~4 bytes per token) score the same text on the same scale."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    return loss_nats_per_token * num_tokens / (math.log(2) * num_bytes)
