"""The model a run starts from (`model.init_from`): a checkpoint, fresh weights, or pretrained GPT-2, checked
against the dataset it will train on before anything else is built.

    model = initial_model(config, manifest, checkpoint)   # a GPT on the CPU, in train mode
"""

from __future__ import annotations

import logging

import torch

from nanogpt.checkpoint.format import Checkpoint, build_model
from nanogpt.config import Config, ConfigError
from nanogpt.data import shards
from nanogpt.model import GPT, GPTConfig
from nanogpt.train.model_fit import check_resumable, check_vocab_size, default_vocab_size

log = logging.getLogger(__name__)


def initial_model(config: Config, manifest: shards.Manifest, checkpoint: Checkpoint | None) -> GPT:
    """The model to train, on the CPU: from the checkpoint, from scratch, or from GPT-2 weights."""
    mc = config.model
    if checkpoint is not None:
        check_resumable(str(checkpoint.path), checkpoint.config.model, checkpoint.tokenizer, config,
                        manifest.tokenizer)
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
    check_vocab_size(model.config.vocab_size, manifest)
    return model
