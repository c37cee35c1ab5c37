"""Loss, perplexity and bits per byte of a checkpoint, or of pretrained GPT-2, on a prepared shard set. No Ray needed.

    python pipelines/evaluate.py --checkpoint out/<run>/checkpoint_000300 --data-dir data/shakespeare_char
    python pipelines/evaluate.py --checkpoint out/<run>/checkpoint_000300 --split train --eval-iters 50 --json
    python pipelines/evaluate.py --config eval_gpt2 --data-dir data/openwebtext        # nanoGPT's eval_gpt2.py
    python pipelines/evaluate.py --config eval_gpt2_xl --train.batch_size=4 --device cuda

The windows are the training loop's eval windows (nanogpt/data/windows.py): eval_iters * batch_size windows of
block_size tokens, evenly spaced over the split, so a checkpoint evaluated with its own run's settings (the defaults
with --checkpoint) gets the val loss the run reported at that step (nanogpt/train/evaluation.py, the loop's own
evaluation). Bits per byte are exact for the evaluated tokens. The shards are hashed against their manifest first.
--data-dir defaults to the data.dir of the checkpoint's run (or of the preset).
"""
# ruff: noqa: E402 -- the sys.path line below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

# `python pipelines/evaluate.py` puts pipelines/ first on sys.path, not the repo root: make `import nanogpt` work.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict

from nanogpt.checkpoint.files import CheckpointError
from nanogpt.checkpoint.format import load_checkpoint
from nanogpt.config import ConfigError, load_config
from nanogpt.data import shards
from nanogpt.data.shard_cache import local_shards
from nanogpt.data.windows import BatchError
from nanogpt.sampling import checkpoint_model
from nanogpt.tokenizers import TokenizerError, tokenizer_from_dict
from nanogpt.train.devices import Precision
from nanogpt.train.evaluation import evaluate_split
from pipelines.mlflow_adapter.checkpoint_uris import local_checkpoint_dir

log = logging.getLogger("nanogpt.evaluate")

PRESET_DIR = Path(__file__).resolve().parent / "configs"


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Val loss, perplexity and bits per byte of a checkpoint or pretrained GPT-2.", allow_abbrev=False,
        epilog="With --config, any config field can be set as --section.key=value (e.g. --train.batch_size=4).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint directory written by pipelines/pretrain.py, or an MLflow "
                        "models:/<name>/<version> or runs:/<run id>/checkpoints/best URI")
    parser.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/ (default: MLFLOW_TRACKING_URI, "
                        "else out/mlflow.db)")
    source.add_argument("--config", help="a preset (eval_gpt2, eval_gpt2_medium, ...) or YAML: model.init_from is "
                                         "the pretrained model")
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", help="prepared shards (default: data.dir)")
    parser.add_argument("--split", default="val", choices=("val", "train"))
    parser.add_argument("--eval-iters", "--eval_iters", dest="eval_iters", type=int,
                        help="batches to evaluate (default: train.eval_iters of the run or preset)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int,
                        help="windows per batch (default: train.batch_size of the run or preset)")
    parser.add_argument("--device", help="auto | cpu | cuda | mps (default: train.device of the run or preset)")
    parser.add_argument("--dtype", help="auto | float32 | bfloat16 | float16 (default: train.dtype)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args, rest = parser.parse_known_args(argv)
    if rest and not args.config:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (--section.key=value overrides need --config)")
    return args, rest


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model, tokenizer, config = _model_and_config(args, overrides)
        data_dir = args.data_dir or config.data.dir
        if not data_dir:
            raise ConfigError("no shards to evaluate on: pass --data-dir")
        data_dir = local_shards(data_dir, config.data.cache_dir)  # s3://...: this machine's verified copy
        precision = Precision.resolve(args.device or config.train.device, args.dtype or config.train.dtype)
        result = evaluate_split(
            model.to(precision.device), tokenizer, data_dir, args.split,
            eval_iters=args.eval_iters or config.train.eval_iters, batch_size=args.batch_size or config.train.batch_size,
            precision=precision,
        )
    except (CheckpointError, ConfigError, shards.ShardError, TokenizerError, BatchError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        bpb = "n/a" if result.bits_per_byte is None else f"{result.bits_per_byte:.4f}"
        print(f"{result.split} loss {result.loss:.4f}, perplexity {result.perplexity:.3f}, bits per byte "
              f"{bpb} ({result.num_tokens:,} tokens in {result.num_windows} windows of "
              f"{result.block_size}, {result.num_bytes:,} bytes, {result.seconds:.1f} s)")
    return 0 if math.isfinite(result.loss) else 1


def _model_and_config(args: argparse.Namespace, overrides: list[str]):
    """The model to evaluate, its tokenizer, and the config whose eval settings and data.dir are the defaults:
    the checkpoint's run, or the preset (model.init_from = pretrained GPT-2)."""
    if args.checkpoint:
        with local_checkpoint_dir(args.checkpoint, args.tracking_uri) as ckpt_dir:  # read whole: then dropped
            ckpt = load_checkpoint(ckpt_dir, with_optimizer=False)
        return (*checkpoint_model(ckpt), ckpt.config)
    config = load_config(args.config, overrides, search_dirs=[PRESET_DIR])
    init_from = config.model.init_from
    if init_from in ("scratch", "resume"):
        raise ConfigError(f"model.init_from={init_from}: evaluate a trained model with --checkpoint, or set "
                          "model.init_from to gpt2* or a Hugging Face GPT-2 directory")
    if not (args.data_dir or config.data.dir):
        raise ConfigError("no shards to evaluate on: pass --data-dir")
    from nanogpt.hf import from_pretrained

    model = from_pretrained(init_from, dict(dropout=0.0))
    if config.model.block_size < model.config.block_size:
        model.crop_block_size(config.model.block_size)
    tokenizer = tokenizer_from_dict(shards.load_manifest(args.data_dir or config.data.dir).tokenizer)
    return model, tokenizer, config


if __name__ == "__main__":
    sys.exit(main())
