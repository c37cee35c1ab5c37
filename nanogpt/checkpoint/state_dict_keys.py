"""State dicts in nanoGPT's key layout, whatever wrapped the model that produced them: every checkpoint we write
and every nanoGPT checkpoint we read goes through `clean_state_dict`, so keys never carry a wrapper's prefix (one
of nanoGPT's own pitfalls: its compiled runs save `_orig_mod.` keys).

    model.load_state_dict(clean_state_dict(torch.compile(DDP(model)).state_dict()))
"""

from __future__ import annotations

import torch

# Wrappers that prefix state-dict keys: torch.compile (`_orig_mod.`) and DDP/DataParallel (`module.`).
_WRAPPER_PREFIXES = ("_orig_mod", "module")


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A nanoGPT-layout state dict without wrapper prefixes or causal-mask buffers, ready for
    `model.load_state_dict(clean_state_dict(sd))` (strict) here or in nanoGPT's flash-attention model.

    Strips any leading run of `_orig_mod.` / `module.` in any order (compile of DDP, DDP of compile, ...) and
    `_orig_mod.` anywhere (blocks compiled one by one), and drops the `.attn.bias` causal-mask buffers that
    nanoGPT registers on its non-flash path (constants, not weights; our load_state_dict skips them anyway,
    but nanoGPT's flash model would refuse them)."""
    cleaned = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        while parts and parts[0] in _WRAPPER_PREFIXES:
            parts = parts[1:]
        parts = [p for p in parts if p != "_orig_mod"]
        key = ".".join(parts)
        if key.endswith(".attn.bias"):  # not ".attn.c_attn.bias": those are weights
            continue
        cleaned[key] = value
    return cleaned
