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
import os
import tempfile
from collections.abc import Sequence

from nanogpt.checkpoint import CheckpointError, build_model, load_checkpoint
from nanogpt.config import ConfigError
from nanogpt.model import GPT
from nanogpt.sampling import sample_text
from nanogpt.tokenizers import Tokenizer, TokenizerError, build_tokenizer, tokenizer_from_dict
from nanogpt.train import resolve_device, resolve_dtype

log = logging.getLogger("nanogpt.sample")

SEPARATOR = "---------------"


def load_checkpoint_model(ckpt_dir: str, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """The checkpoint's GPT (eval mode, on `device`) and the tokenizer its data was made with."""
    ckpt = load_checkpoint(ckpt_dir, map_location="cpu", with_optimizer=False)
    if ckpt.tokenizer is None:
        raise CheckpointError(f"{ckpt_dir}: has no tokenizer.json, so its token ids cannot be decoded")
    model = build_model(ckpt).to(device)
    model.eval()
    return model, tokenizer_from_dict(ckpt.tokenizer)


def load_pretrained_model(init_from: str, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """gpt2 / gpt2-medium / gpt2-large / gpt2-xl (Hugging Face hub) or a local HF GPT-2 directory, GPT-2 BPE."""
    model = GPT.from_pretrained(init_from, dict(dropout=0.0)).to(device)
    model.eval()
    return model, build_tokenizer("gpt2")


def read_prompt(start: str) -> str:
    """nanoGPT's --start: the text itself, or FILE:<path> for a file's contents."""
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--start {start}: cannot read {path} ({e.strerror})") from None
    return start


def generate_from_checkpoint(
    ckpt_dir: str,
    start: str = "\n",
    *,
    max_new_tokens: int = 500,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int = 1337,
    device: str = "cpu",
) -> list[str]:
    model, tokenizer = load_checkpoint_model(ckpt_dir, device)
    return sample_text(model, tokenizer, start, max_new_tokens, num_samples, temperature, top_k, top_p, seed, device)


@contextlib.contextmanager
def local_checkpoint_dir(path: str, tracking_uri: str | None = None):
    """A checkpoint as a local directory: a path as is; an MLflow `models:/<name>/<version>` (or `@alias`,
    `/latest`) or `runs:/<run id>/checkpoints/best` URI downloaded from the tracking store (`tracking_uri`, else
    MLFLOW_TRACKING_URI, else pretrain's default local store out/mlflow.db); an s3:// / gs:// URI through Ray."""
    if path.startswith(("models:/", "runs:/")):
        from nanogpt.config import RunConfig
        from pipelines.mlflow_tracking import default_tracking_uri, resolve_checkpoint_uri

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(RunConfig().out_dir)
        with tempfile.TemporaryDirectory(prefix="nanogpt-ckpt-") as tmp:
            try:
                yield resolve_checkpoint_uri(path, tmp, tracking_uri=uri)
            except FileNotFoundError as e:
                raise CheckpointError(str(e)) from None
        return
    if "://" not in path:
        yield path
        return
    import ray.train

    with ray.train.Checkpoint(path).as_directory() as d:
        yield d


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
                model, tokenizer = load_checkpoint_model(stack.enter_context(local_checkpoint_dir(args.checkpoint, args.tracking_uri)),
                                                         device)
            else:
                model, tokenizer = load_pretrained_model(args.init_from, device)
        texts = sample_text(model, tokenizer, prompt, args.max_new_tokens, args.num_samples, args.temperature,
                            args.top_k or None, args.top_p, args.seed, device, dtype)
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        log.error("%s", e)
        return 2
    for text in texts:
        print(text)
        print(SEPARATOR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
