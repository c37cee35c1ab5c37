"""The model a run starts from (`model.init_from`): a checkpoint, fresh weights, or pretrained GPT-2, checked
against the dataset it will train on before anything else is built.

    model = initial_model(config, manifest, checkpoint)   # a GPT on the CPU, in train mode
"""

from __future__ import annotations

import logging

import torch

from nanogpt import shards
from nanogpt.checkpoint import Checkpoint, build_model
from nanogpt.config import Config, ConfigError
from nanogpt.model import ARCHITECTURE_FIELDS, GPT, GPTConfig

log = logging.getLogger(__name__)


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round up to a multiple of 64 (50257 -> 50304): faster matmuls, the extra logits are never targets."""
    return -(-vocab_size // multiple) * multiple


def default_vocab_size(manifest: shards.Manifest) -> int:
    """model.vocab_size=null: nanoGPT's choice. GPT-2 BPE is padded to 50304; a char vocabulary (its meta.pkl) is
    used as is, so the shakespeare_char recipes reproduce nanoGPT's numbers."""
    if manifest.tokenizer.get("name") == "char":
        return manifest.vocab_size
    return padded_vocab_size(manifest.vocab_size)


def initial_model(config: Config, manifest: shards.Manifest, checkpoint: Checkpoint | None) -> GPT:
    """The model to train, on the CPU: from the checkpoint, from scratch, or from GPT-2 weights."""
    mc = config.model
    if checkpoint is not None:
        check_resumable(config, manifest, checkpoint)
        model = build_model(checkpoint, dropout=mc.dropout)
    elif mc.init_from == "scratch":
        vocab_size = mc.vocab_size if mc.vocab_size is not None else default_vocab_size(manifest)
        torch.manual_seed(config.train.seed)  # the same initial weights on every rank (DDP broadcasts them anyway)
        model = GPT(GPTConfig(
            n_layer=mc.n_layer, n_head=mc.n_head, n_embd=mc.n_embd, block_size=mc.block_size,
            vocab_size=vocab_size, dropout=mc.dropout, bias=mc.bias,
        ))
    elif mc.init_from == "resume":
        raise ConfigError("model.init_from=resume needs a checkpoint: pass resume_from (the run's latest checkpoint)")
    else:  # gpt2, gpt2-medium, ... or a local Hugging Face directory
        from nanogpt.hf import from_pretrained

        log.info("initializing from OpenAI GPT-2 weights: %s", mc.init_from)
        model = from_pretrained(mc.init_from, dict(dropout=mc.dropout))
        if mc.block_size < model.config.block_size:
            model.crop_block_size(mc.block_size)  # model surgery: fewer learned positions
    if model.config.vocab_size < manifest.vocab_size:
        raise ConfigError(
            f"the model's vocabulary has {model.config.vocab_size} tokens but the dataset's tokenizer "
            f"({manifest.tokenizer.get('name')}) has {manifest.vocab_size}: set model.vocab_size >= "
            f"{manifest.vocab_size} (or null to use the dataset's: {default_vocab_size(manifest)})"
        )
    return model


def check_resumable(config: Config, manifest: shards.Manifest, checkpoint: Checkpoint) -> None:
    """The checkpoint's architecture must be the config's, and its tokens must mean the dataset's text."""
    saved, current = checkpoint.config.model, config.model
    diff = [f for f in ARCHITECTURE_FIELDS if getattr(saved, f) != getattr(current, f)]
    if diff:
        was = ", ".join(f"model.{f}={getattr(saved, f)}" for f in diff)
        now = ", ".join(f"model.{f}={getattr(current, f)}" for f in diff)
        raise ConfigError(
            f"checkpoint {checkpoint.path} was trained with {was} but this config has {now}; resume with the "
            "checkpoint's model settings, or start a new run"
        )
    if checkpoint.tokenizer is not None and checkpoint.tokenizer != manifest.tokenizer:
        raise ConfigError(
            f"checkpoint {checkpoint.path} was trained on tokens of a different tokenizer "
            f"({_describe_tokenizer(checkpoint.tokenizer)}) than this dataset's "
            f"({_describe_tokenizer(manifest.tokenizer)}); its token ids would mean other text"
        )


def _describe_tokenizer(d: dict) -> str:
    return f"{d.get('name')}, {d.get('vocab_size')} tokens"
