"""Loss, perplexity and bits per byte of a checkpoint, or of pretrained GPT-2, on a prepared shard set. No Ray needed.

    python pipelines/evaluate.py --checkpoint out/<run>/checkpoint_000300 --data-dir data/shakespeare_char
    python pipelines/evaluate.py --checkpoint out/<run>/checkpoint_000300 --split train --eval-iters 50 --json
    python pipelines/evaluate.py --config eval_gpt2 --data-dir data/openwebtext        # nanoGPT's eval_gpt2.py
    python pipelines/evaluate.py --config eval_gpt2_xl --train.batch_size=4 --device cuda

The windows are the training loop's eval windows (nanogpt/batches.py): eval_iters * batch_size windows of
block_size tokens, evenly spaced over the split, so a checkpoint evaluated with its own run's settings (the defaults
with --checkpoint) gets the val loss the run reported at that step. Bits per byte are exact for the evaluated
tokens: the total loss in bits over the UTF-8 bytes of exactly the target tokens scored, byte lengths taken token by
token (GPT-2 tokens may hold part of a character, so decoding windows to text would miscount).
--data-dir defaults to the data.dir of the checkpoint's run (or of the preset).
"""
# ruff: noqa: E402 -- the sys.path line below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

# `python pipelines/evaluate.py` puts pipelines/ first on sys.path, not the repo root: make `import nanogpt` work.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from nanogpt import shards
from nanogpt.batches import BatchError, TokenWindows, to_device
from nanogpt.checkpoint import CheckpointError, build_model, load_checkpoint
from nanogpt.config import ConfigError, load_config
from nanogpt.metrics import bits_per_byte, perplexity
from nanogpt.model import GPT
from nanogpt.tokenizers import Tokenizer, TokenizerError, token_byte_lengths, tokenizer_from_dict
from nanogpt.train import resolve_device, resolve_dtype
from pipelines.sample import local_checkpoint_dir

log = logging.getLogger("nanogpt.evaluate")

PRESET_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class EvalResult:
    split: str
    loss: float
    """Mean cross-entropy in nats per target token."""
    perplexity: float
    bits_per_byte: float
    num_windows: int
    num_tokens: int
    num_bytes: int
    block_size: int
    seconds: float


@torch.no_grad()
def evaluate_model(
    model: GPT,
    tokenizer: Tokenizer,
    data_dir: str,
    split: str = "val",
    eval_iters: int = 200,
    batch_size: int = 12,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> EvalResult:
    """Mean loss over the split's eval windows (nanogpt/batches.py), perplexity, and exact bits per byte."""
    start = time.perf_counter()
    manifest = shards.verify(data_dir, check_hashes=False)
    if manifest.tokenizer != tokenizer.to_dict():
        raise ConfigError(
            f"{data_dir} was tokenized with {manifest.tokenizer.get('name')} ({manifest.vocab_size} tokens) but the "
            f"model's tokenizer is {tokenizer.name} ({tokenizer.vocab_size} tokens): its token ids mean other text"
        )
    if split not in manifest.splits:
        raise shards.ShardError(Path(data_dir) / shards.MANIFEST_NAME, f"has no {split!r} split")
    block_size = model.config.block_size
    windows = TokenWindows(shards.load_split(data_dir, split), block_size)
    byte_lengths = token_byte_lengths(tokenizer)
    num_windows = eval_iters * batch_size
    autocast = (torch.autocast(device_type=torch.device(device).type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    model.eval()
    total_nats, num_tokens, num_bytes = 0.0, 0, 0
    for x, y in windows.eval_batches(num_windows, batch_size):
        num_bytes += int(byte_lengths[y].sum())
        xt, yt = to_device(x, y, device)
        with autocast:
            _, loss = model(xt, yt)  # mean over the batch's B * T targets
        total_nats += loss.double().item() * y.size
        num_tokens += y.size
    mean_loss = total_nats / num_tokens
    return EvalResult(
        split=split, loss=mean_loss, perplexity=perplexity(mean_loss),
        bits_per_byte=bits_per_byte(mean_loss, num_tokens, num_bytes), num_windows=num_windows,
        num_tokens=num_tokens, num_bytes=num_bytes, block_size=block_size, seconds=time.perf_counter() - start,
    )


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
        if args.checkpoint:
            with local_checkpoint_dir(args.checkpoint, args.tracking_uri) as ckpt_dir:  # read whole: then dropped
                ckpt = load_checkpoint(ckpt_dir, with_optimizer=False)
            config = ckpt.config
            if ckpt.tokenizer is None:
                raise CheckpointError(f"{args.checkpoint}: has no tokenizer.json")
            model, tokenizer = build_model(ckpt, dropout=0.0), tokenizer_from_dict(ckpt.tokenizer)
            data_dir = args.data_dir or config.data.dir
        else:
            config = load_config(args.config, overrides, search_dirs=[PRESET_DIR])
            init_from = config.model.init_from
            if init_from in ("scratch", "resume"):
                raise ConfigError(f"model.init_from={init_from}: evaluate a trained model with --checkpoint, or set "
                                  "model.init_from to gpt2* or a Hugging Face GPT-2 directory")
            model = GPT.from_pretrained(init_from, dict(dropout=0.0))
            if config.model.block_size < model.config.block_size:
                model.crop_block_size(config.model.block_size)
            data_dir = args.data_dir or config.data.dir
            if not data_dir:
                raise ConfigError("no shards to evaluate on: pass --data-dir")
            tokenizer = tokenizer_from_dict(shards.load_manifest(data_dir).tokenizer)
        if not data_dir:
            raise ConfigError("no shards to evaluate on: pass --data-dir")
        device = resolve_device(args.device or config.train.device)
        dtype = resolve_dtype(args.dtype or config.train.dtype, device)
        result = evaluate_model(
            model.to(device), tokenizer, data_dir, args.split,
            eval_iters=args.eval_iters or config.train.eval_iters, batch_size=args.batch_size or config.train.batch_size,
            device=device, dtype=dtype,
        )
    except (CheckpointError, ConfigError, shards.ShardError, TokenizerError, BatchError, ValueError) as e:
        log.error("%s", e)
        return 2
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print(f"{result.split} loss {result.loss:.4f}, perplexity {result.perplexity:.3f}, bits per byte "
              f"{result.bits_per_byte:.4f} ({result.num_tokens:,} tokens in {result.num_windows} windows of "
              f"{result.block_size}, {result.num_bytes:,} bytes, {result.seconds:.1f} s)")
    return 0 if math.isfinite(result.loss) else 1


if __name__ == "__main__":
    sys.exit(main())
