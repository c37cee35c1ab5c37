"""nanoGPT's `ckpt.pt`, both ways: a model from one (`load_nanogpt_ckpt`), and one from our checkpoint directory
(`export_nanogpt_ckpt`), so that runs move between this project and nanoGPT's train.py / sample.py unchanged.

    ckpt.pt = {model, optimizer, model_args, iter_num, best_val_loss, config}    (nanoGPT's train.py writes this)

    model = load_nanogpt_ckpt("nanoGPT/out/ckpt.pt")                     # a GPT, strict weights
    export_nanogpt_ckpt("out/run/checkpoint_000250", "out/ckpt.pt")      # nanoGPT's sample.py loads it

Both sides hold plain types only (tensors, dicts of str/int/float/bool/None), so both load with
`torch.load(weights_only=True)`: a ckpt.pt that needs anything else is refused, never unpickled.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from nanogpt.checkpoint.format import full_optimizer_state, load_checkpoint
from nanogpt.checkpoint.state_dict_keys import clean_state_dict
from nanogpt.model import GPT, MODEL_ARGS, GPTConfig

_AMBIGUOUS = object()


def build_from_nanogpt_ckpt(checkpoint: dict[str, Any]) -> GPT:
    """A GPT from a loaded nanoGPT checkpoint dict ({model, model_args, ...}), weights loaded strictly."""
    model_args = dict(checkpoint["model_args"])
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(model_args) - known)
    if unknown:
        raise ValueError(f"checkpoint model_args has unknown key(s) {unknown}; GPTConfig fields are {sorted(known)}")
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(clean_state_dict(checkpoint["model"]))
    return model


def load_nanogpt_ckpt(path: str | os.PathLike[str]) -> GPT:
    """A GPT from a nanoGPT `ckpt.pt` ({model, optimizer, model_args, iter_num, best_val_loss, config}).

    Loaded on the CPU with weights_only=True: nanoGPT's checkpoints hold only tensors and plain Python values.
    The model is returned in train mode, on the CPU, like a freshly built one."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, with the offending global in its message
        raise RuntimeError(
            f"could not load {path} with torch.load(weights_only=True): {e}\n"
            "nanoGPT's ckpt.pt holds only tensors and plain values (its 'config' is a dict of str/int/float/bool); "
            "a checkpoint with other objects (e.g. a custom class in 'config') is refused for safety. If you trust "
            "the file, unpickle it yourself (at your own risk) and pass the dict to "
            "nanogpt.checkpoint.nanogpt_ckpt.build_from_nanogpt_ckpt."
        ) from e
    for key in ("model", "model_args"):
        if key not in checkpoint:
            raise ValueError(f"{path} is not a nanoGPT checkpoint: no {key!r} entry (has {sorted(checkpoint)})")
    return build_from_nanogpt_ckpt(checkpoint)


def export_nanogpt_ckpt(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write nanoGPT's `ckpt.pt` ({model, optimizer, model_args, iter_num, best_val_loss, config}) from a checkpoint,
    sharded or not (a sharded one's weights and AdamW state are read whole).

    Plain types only (config is a flat dict of str/int/float/bool/None), so nanoGPT's sample.py and
    `torch.load(weights_only=True)` read it. Written to a temporary name and renamed (nanoGPT overwrites in place).
    """
    ckpt = load_checkpoint(ckpt_dir, map_location="cpu")
    payload = {
        "model": ckpt.model_state,
        "optimizer": full_optimizer_state(ckpt),
        "model_args": {k: ckpt.model_args[k] for k in MODEL_ARGS},
        "iter_num": ckpt.step,
        "best_val_loss": ckpt.best_val_loss,
        "config": _nanogpt_config(ckpt.config.to_flat()),
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _nanogpt_config(flat: dict[str, Any]) -> dict[str, Any]:
    """Our flat `section.key` config, plus nanoGPT's bare key names where they are unambiguous (its config keys
    have no section)."""
    bare: dict[str, Any] = {}
    for key, value in flat.items():
        name = key.split(".", 1)[1]
        bare[name] = value if name not in bare else _AMBIGUOUS
    return {**{k: v for k, v in bare.items() if v is not _AMBIGUOUS}, **flat}
