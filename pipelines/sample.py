"""Sample text from a trained checkpoint or from pretrained GPT-2: nanoGPT's sample.py. No Ray needed.

    python pipelines/sample.py --checkpoint out/<run>/checkpoint_000300 --start "ROMEO:" --num_samples 3
    python pipelines/sample.py --checkpoint out/<run>/checkpoint_000300 --start FILE:prompt.txt --max_new_tokens 200
    python pipelines/sample.py --checkpoint models:/nanogpt/3 --tracking-uri sqlite:///out/mlflow.db
    python pipelines/sample.py --init_from gpt2 --start "What is the answer to life?" --top_p 0.9
    python pipelines/sample.py --init_from path/to/hf_gpt2_dir --device cuda

--start takes the prompt text, or FILE:<path> to read it from a file (nanoGPT's convention); the default is a
newline for a char model and <|endoftext|> for GPT-2. --checkpoint is a checkpoint directory as pretrain.py writes
them (a local path, an s3:// / gs:// URI, or an MLflow models:/<name>/<version> or runs:/<id>/checkpoints/best URI
from the tracking store given by --tracking-uri, MLFLOW_TRACKING_URI or pretrain's default out/mlflow.db). The draws are seeded (--seed): the same command
prints the same text. Samples are printed separated by a line of dashes, as nanoGPT does.
"""
# ruff: noqa: E402 -- the sys.path line below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

# `python pipelines/sample.py` puts pipelines/ first on sys.path, not the repo root: make `import nanogpt` work.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import logging
from collections.abc import Sequence

from nanogpt.checkpoint.files import CheckpointError
from nanogpt.config import ConfigError
from nanogpt.sampling import load_checkpoint_model, load_pretrained_model, read_prompt, sample_text
from nanogpt.tokenizers import TokenizerError
from nanogpt.train.devices import resolve_device, resolve_dtype
from pipelines.mlflow_adapter.checkpoint_uris import local_checkpoint_dir

log = logging.getLogger("nanogpt.sample")

SEPARATOR = "---------------"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample from a nanoGPT checkpoint or pretrained GPT-2.",
                                     allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint directory written by pipelines/pretrain.py, or an MLflow "
                        "models:/<name>/<version> or runs:/<run id>/checkpoints/best URI")
    source.add_argument("--init_from", "--init-from", dest="init_from",
                        help="gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local Hugging Face GPT-2 directory")
    parser.add_argument("--start", default="", help='the prompt, or FILE:<path> (default: "\\n" / <|endoftext|>)')
    parser.add_argument("--num_samples", "--num-samples", dest="num_samples", type=int, default=3)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="< 1 less random, > 1 more random")
    parser.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=200,
                        help="keep the k likeliest tokens (0: all)")
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None,
                        help="nucleus sampling: keep the likeliest tokens up to this probability mass")
    parser.add_argument("--tracking-uri", help="MLflow store for models:/ and runs:/ (default: MLFLOW_TRACKING_URI, "
                        "else out/mlflow.db)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 | mps")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    args = parser.parse_args(argv)
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.temperature <= 0:
        parser.error("--temperature must be positive")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        parser.error("--top_p must be in (0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        prompt = read_prompt(args.start)
        with contextlib.ExitStack() as stack:
            if args.checkpoint:
                ckpt_dir = stack.enter_context(local_checkpoint_dir(args.checkpoint, args.tracking_uri))
                model, tokenizer = load_checkpoint_model(ckpt_dir, device)
            else:
                model, tokenizer = load_pretrained_model(args.init_from, device)
        texts = sample_text(model, tokenizer, prompt, args.max_new_tokens, args.num_samples, args.temperature,
                            args.top_k or None, args.top_p, args.seed, device, dtype)
    except (CheckpointError, ConfigError, TokenizerError, ValueError, OSError) as e:
        log.error("%s", e)
        return 2
    for text in texts:
        print(text)
        print(SEPARATOR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
