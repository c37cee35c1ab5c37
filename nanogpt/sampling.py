"""Text samples from a GPT: nanoGPT's sample.py as functions, on the model's KV cache.

    texts = sample_text(model, tokenizer, "ROMEO:", max_new_tokens=200, num_samples=3, temperature=0.8, top_k=200)
    texts = generate_from_checkpoint("out/run/checkpoint_000300", "ROMEO:", max_new_tokens=200)
    model, tokenizer = load_checkpoint_model("out/run/checkpoint_000300", device="cuda")
    model, tokenizer = load_pretrained_model("gpt2")          # or a local Hugging Face GPT-2 directory

The draws come from a private torch.Generator seeded with `seed`: the same call gives the same text, and the
caller's global RNG (which the training loop reseeds for dropout) is neither read nor advanced.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from nanogpt.checkpoint.files import CheckpointError
from nanogpt.checkpoint.format import Checkpoint, build_model, load_checkpoint
from nanogpt.config import ConfigError
from nanogpt.model import GPT, sample_next_token
from nanogpt.tokenizers import Tokenizer, build_tokenizer, tokenizer_from_dict
from nanogpt.weight_layout import decode_layout


def load_checkpoint_model(ckpt_dir: str, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """The checkpoint's GPT (eval mode, on `device`) and the tokenizer its data was made with."""
    return checkpoint_model(load_checkpoint(ckpt_dir, map_location="cpu", with_optimizer=False), device)


def checkpoint_model(ckpt: Checkpoint, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """A loaded checkpoint's GPT (eval mode, on `device`) and its tokenizer."""
    if ckpt.tokenizer is None:
        raise CheckpointError(f"{ckpt.path}: has no tokenizer.json, so its token ids cannot be decoded")
    tensors = {t.data_ptr(): t for t in ckpt.model_state.values()}.values()  # tied weights once
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())
    if bad:
        raise CheckpointError(f"{ckpt.path}: {bad} of its weights are NaN or inf (the run diverged): use an earlier "
                              "checkpoint")
    model = build_model(ckpt, dropout=0.0).to(device)
    model.eval()
    return model, tokenizer_from_dict(ckpt.tokenizer)


def load_pretrained_model(init_from: str, device: str = "cpu") -> tuple[GPT, Tokenizer]:
    """gpt2 / gpt2-medium / gpt2-large / gpt2-xl (Hugging Face hub) or a local HF GPT-2 directory, GPT-2 BPE."""
    from nanogpt.hf import from_pretrained  # needs the `hf` extra

    model = from_pretrained(init_from, dict(dropout=0.0)).to(device)
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
    ckpt_dir: str, start: str = "\n", *, max_new_tokens: int = 500, num_samples: int = 1, temperature: float = 0.8,
    top_k: int | None = 200, top_p: float | None = None, seed: int = 1337, device: str = "cpu",
) -> list[str]:
    model, tokenizer = load_checkpoint_model(ckpt_dir, device)
    return sample_text(model, tokenizer, start, max_new_tokens, num_samples, temperature, top_k, top_p, seed, device)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|> (GPT-2) or a newline (char, as nanoGPT's
    sample.py does with start="\\n"), else token 0 when the vocabulary has neither."""
    if prompt:
        return tokenizer.encode(prompt)
    if getattr(tokenizer, "eot_token", None) is not None:
        return [tokenizer.eot_token]
    try:
        return tokenizer.encode("\n")
    except ValueError:  # a char vocabulary without "\n"
        return [0]


@torch.no_grad()
def sample_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int = 1337,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> list[str]:
    """`num_samples` continuations of `prompt` (each returned with its prompt), decoded to text.

    `model` should be the bare GPT (not DDP/compiled); it is put in eval mode for the call and restored after.
    `dtype` bfloat16/float16 samples under autocast on CUDA, as training does."""
    ids = prompt_ids(tokenizer, prompt)
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, t)
    generator = torch.Generator(device=idx.device)
    generator.manual_seed(seed)
    autocast = (
        torch.autocast(device_type=idx.device.type, dtype=dtype)
        if dtype is not None and dtype != torch.float32
        else nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        with autocast:
            out = _generate(model, idx, max_new_tokens, tokenizer.vocab_size, temperature, top_k, top_p,
                            num_samples, generator)  # (num_samples, t + max_new_tokens)
    finally:
        model.train(was_training)
    return [tokenizer.decode(row.tolist()) for row in out]


def _generate(
    model: GPT, idx: torch.Tensor, max_new_tokens: int, vocab_size: int, temperature: float,
    top_k: int | None, top_p: float | None, num_samples: int, generator: torch.Generator,
) -> torch.Tensor:
    """GPT.generate's KV-cached loop, with the logits past the tokenizer's vocabulary masked out: a model whose
    vocabulary is padded (65 -> 128, 50257 -> 50304) could otherwise draw an id the tokenizer cannot decode."""
    idx = idx.repeat_interleave(num_samples, dim=0)  # (num_samples, t)
    kv_cache = model.new_kv_cache()
    with decode_layout(model):  # the weights as one-token steps read them best (nanogpt/weight_layout.py)
        for _ in range(max_new_tokens):
            logits = model.next_token_logits(idx, kv_cache)  # (B, V)
            logits[:, vocab_size:] = float("-inf")
            idx_next = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
    return idx
