"""Device and precision: which device a process trains on, in which dtype, and the autocast context for it.

    precision = Precision.resolve(device="auto", dtype="auto")   # cuda + bfloat16 on a recent GPU, cpu + float32
    with precision.autocast():
        logits, loss = model(x, y)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from nanogpt.config import ConfigError


def resolve_device(device: str) -> str:
    """"auto" -> cuda if available, else mps, else cpu. Asking for an absent accelerator is a ConfigError."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but CUDA is not available; use --train.device=cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={device} but MPS is not available; use --train.device=cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto" -> bfloat16 on a CUDA GPU that supports it, float16 on an older one, float32 elsewhere.
    float16 needs CUDA (its GradScaler); on any other device it is a ConfigError."""
    kind = torch.device(device).type
    if dtype == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "float16" and kind != "cuda":
        raise ConfigError(
            f"train.dtype=float16 needs a CUDA device (loss scaling with GradScaler), not {device}; "
            "use --train.dtype=float32 or bfloat16"
        )
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ConfigError(f"train.dtype must be auto, float32, bfloat16 or float16; got {dtype!r}") from None


@dataclass(frozen=True)
class Precision:
    """A resolved device and the dtype its forward passes run in."""

    device: str
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str, dtype: str) -> Precision:
        device = resolve_device(device)
        return cls(device, resolve_dtype(dtype, device))

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def needs_loss_scaling(self) -> bool:
        """float16 only: bfloat16 has float32's exponent range and needs no GradScaler."""
        return self.dtype == torch.float16

    @property
    def mfu_dtype(self) -> torch.dtype | str:
        """What the matmuls run on, for the MFU peak: tensor-core TF32 for float32 on CUDA (see `activate`)."""
        return "tf32" if self.dtype == torch.float32 else self.dtype

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def activate(self) -> None:
        """Make this process use the device: the CUDA device index, and TF32 for float32 matmuls (nanoGPT)."""
        if self.device_type != "cuda":
            return
        if torch.device(self.device).index is not None:
            torch.cuda.set_device(torch.device(self.device))
        torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
        torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
