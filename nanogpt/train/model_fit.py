"""Whether a model fits the dataset it will train on, from records alone (no weights, no torch): its vocabulary
must cover the dataset's tokens, and a checkpoint to resume must have the config's model shape and the dataset's
tokenizer (its config.yaml and tokenizer.json say). The driver checks these before Ray starts
(pipelines/pretrain.py), the worker again as it builds the model (nanogpt/train/init_from.py).

    default_vocab_size(manifest)                      # model.vocab_size=null: 65 for char, 50304 for GPT-2 BPE
    check_vocab_size(config.model.vocab_size, manifest)
    check_resumable_dir("s3://bucket/runs/r1/checkpoint_000300", config, manifest.tokenizer)
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from nanogpt.checkpoint.files import CONFIG_FILE, TOKENIZER_FILE, CheckpointError
from nanogpt.config import Config, ConfigError, ModelConfig
from nanogpt.data import shards, storage


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round up to a multiple of 64 (50257 -> 50304): faster matmuls, the extra logits are never targets."""
    return -(-vocab_size // multiple) * multiple


def default_vocab_size(manifest: shards.Manifest) -> int:
    """model.vocab_size=null: nanoGPT's choice. GPT-2 BPE is padded to 50304; a char vocabulary (its meta.pkl) is
    used as is, so the shakespeare_char recipes reproduce nanoGPT's numbers."""
    if manifest.tokenizer.get("name") == "char":
        return manifest.vocab_size
    return padded_vocab_size(manifest.vocab_size)


def check_vocab_size(vocab_size: int, manifest: shards.Manifest) -> None:
    """ConfigError unless a model of `vocab_size` logits can score every token id of the dataset."""
    if vocab_size < manifest.vocab_size:
        raise ConfigError(
            f"the model's vocabulary has {vocab_size} tokens but the dataset's tokenizer "
            f"({manifest.tokenizer.get('name')}) has {manifest.vocab_size}: set model.vocab_size >= "
            f"{manifest.vocab_size} (or null to use the dataset's: {default_vocab_size(manifest)})"
        )


# The model settings that fix the shapes of the weights: a checkpoint continues only under the same ones (dropout,
# and where the weights came from, may change).
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def check_resumable(path: str, saved: ModelConfig, saved_tokenizer: dict[str, Any] | None, config: Config,
                    tokenizer: dict[str, Any]) -> None:
    """ConfigError unless the checkpoint at `path` (trained with `saved`, on tokens of `saved_tokenizer`) has the
    config's model shape and the dataset's tokenizer: its token ids must mean the dataset's text."""
    current = config.model
    diff = [f for f in SHAPE_FIELDS if getattr(saved, f) != getattr(current, f)]
    if diff:
        was = ", ".join(f"model.{f}={getattr(saved, f)}" for f in diff)
        now = ", ".join(f"model.{f}={getattr(current, f)}" for f in diff)
        raise ConfigError(f"checkpoint {path} was trained with {was} but this config has {now}; resume with the "
                          "checkpoint's model settings, or start a new run")
    if saved_tokenizer is not None and saved_tokenizer != tokenizer:
        raise ConfigError(f"checkpoint {path} was trained on tokens of a different tokenizer "
                          f"({_describe(saved_tokenizer)}) than this dataset's ({_describe(tokenizer)}); its token "
                          "ids would mean other text")


def check_resumable_dir(path: str, config: Config, tokenizer: dict[str, Any]) -> None:
    """check_resumable for the checkpoint directory (or URI) `path`, from its config.yaml and tokenizer.json."""
    saved = _read(path, CONFIG_FILE, lambda text: Config.from_dict(yaml.safe_load(text) or {}, source=CONFIG_FILE))
    saved_tokenizer = _read(path, TOKENIZER_FILE, json.loads, optional=True)
    check_resumable(path, saved.model, saved_tokenizer, config, tokenizer)


def _read(directory: str, name: str, parse, optional: bool = False):
    """`parse` of the file `name` of a checkpoint directory or URI; CheckpointError naming it when it is missing
    (None when `optional`) or does not parse."""
    path = storage.join(directory, name)
    try:
        if not storage.exists(path):
            if optional:
                return None
            raise CheckpointError(f"{path}: missing, so {directory} is not a complete checkpoint")
        text = storage.read_bytes(path).decode() if storage.is_uri(path) else open(path).read()
        return parse(text)
    except CheckpointError:
        raise
    except storage.StorageError as e:
        raise CheckpointError(f"{path}: {e.reason}; {storage.REACH_HINT}") from None
    except Exception as e:  # yaml, a ConfigError of the saved config, a decoding error: the file is damaged
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _describe(tokenizer: dict[str, Any]) -> str:
    return f"{tokenizer.get('name')}, {tokenizer.get('vocab_size')} tokens"
