"""The weights a GPTConfig needs, worked out on the meta device (shapes, no storage), to check a file's weights
against the config it came with BEFORE a model of that config is allocated: a crafted state.json or config.json
may declare a 64-layer, 16384-wide model beside a few kilobytes of weights.

    expected = meta_state_dict(config, weights)    # ValueError when n_layer is not the number of blocks in weights
    mismatch = first_mismatch(expected, weights)   # "transformer.h.0.mlp.c_fc.weight: (4, 2) in the weights, ..."
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from nanogpt.model import GPT, GPTConfig

_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.")


def meta_state_dict(config: GPTConfig, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT(config)'s state dict on the meta device. Every block is a module to build, even there: a config whose
    n_layer differs from the blocks `weights` holds is a ValueError before any is built."""
    blocks = {m[1] for key in weights if (m := _BLOCK.match(key))}
    if config.n_layer != len(blocks):
        raise ValueError(f"n_layer={config.n_layer}, but the weights hold {len(blocks)} transformer blocks")
    with torch.device("meta"):
        return GPT(config).state_dict()


def first_mismatch(expected: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
                   optional: tuple[str, ...] = ()) -> str | None:
    """The first key (in sorted order) that is missing from `weights`, unexpected in it, or of another shape than
    `expected` has, as a sentence; None when they agree. Keys in `optional` may be missing (a tied alias)."""
    for key in sorted(set(expected) | set(weights)):
        if key not in weights:
            if key not in optional:
                return f"{key}: missing from the weights"
        elif key not in expected:
            return f"{key}: in the weights, but not a weight of this model"
        elif tuple(weights[key].shape) != tuple(expected[key].shape):
            return (f"{key}: {tuple(weights[key].shape)} in the weights, {tuple(expected[key].shape)} for this "
                    "model")
    return None
