"""A checkpoint directory exported as a Hugging Face GPT-2 directory: the checkpoint side of nanogpt/hf.py, which
holds the name map and converts a model in both directions (`from_pretrained` reads such a directory back).

    export_hf_dir("out/run/checkpoint_000250", "hf/")      # transformers.GPT2LMHeadModel.from_pretrained("hf/")
"""

from __future__ import annotations

import os
from pathlib import Path

from nanogpt.checkpoint.format import load_model
from nanogpt.hf import export_hf


def export_hf_dir(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int | None = None) -> Path:
    """A Hugging Face GPT-2 directory (config.json + model.safetensors) from a checkpoint, sharded or not.
    vocab_size cuts a padded vocabulary back to the tokenizer's (50304 -> 50257)."""
    model, _ = load_model(ckpt_dir)
    return export_hf(model, out_dir, vocab_size=vocab_size)
