"""Text samples from a GPT: nanoGPT's sample.py as a function, on the model's KV cache.

    texts = sample_text(model, tokenizer, "ROMEO:", max_new_tokens=200, num_samples=3, temperature=0.8, top_k=200)

The draws come from a private torch.Generator seeded with `seed`: the same call gives the same text, and the
caller's global RNG (which the training loop reseeds for dropout) is neither read nor advanced.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from nanogpt.model import GPT, sample_next_token
from nanogpt.tokenizers import Tokenizer


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
    for _ in range(max_new_tokens):
        logits = model.next_token_logits(idx, kv_cache)  # (B, V)
        logits[:, vocab_size:] = float("-inf")
        idx_next = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx
