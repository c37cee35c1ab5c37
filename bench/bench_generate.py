"""KV-cached vs uncached generation on the CPU, GPT-2 124M shape (random weights), side by side.

    .venv/bin/python bench/bench_generate.py                      # 16-token prompt, 256 new tokens, 2 threads
    .venv/bin/python bench/bench_generate.py --new-tokens 64 --threads 4

Both runs use the same seed and must give the same tokens (checked); the uncached run is nanoGPT's loop, a full
forward of the whole context per token, so its cost per token grows with the length, while the cached run
forwards one token against the stored keys/values. fp32, torch.inference_mode.

The cached run stores the weights column-major for the generation (nanogpt/weight_layout.py); a last line
measures the floor under a cached step: every weight read once, nothing else. Figures: bench/NOTES.md.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from nanogpt.model import GPT, GPTConfig
from nanogpt.weight_layout import decode_layout

logger = logging.getLogger("bench_generate")


def time_generate(model: GPT, idx: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[torch.Tensor, float]:
    generator = torch.Generator().manual_seed(1337)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(idx, new_tokens, temperature=1.0, top_k=200, use_cache=use_cache, generator=generator)
    return out, time.perf_counter() - start


def weights_floor(model: GPT, repeat: int = 9) -> tuple[float, float]:
    """(seconds, bytes): one token through every Linear weight once, in the layout cached generation uses, and
    nothing else: what reading the weights costs per token, the floor under a cached step. Median of `repeat`."""
    x = {n: torch.randn(1, n) for n in {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}}
    layers = list({id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Linear)}.values())
    times = []
    with torch.inference_mode(), decode_layout(model):
        for _ in range(repeat + 2):
            start = time.perf_counter()
            for m in layers:
                torch.nn.functional.linear(x[m.in_features], m.weight, m.bias)
            times.append(time.perf_counter() - start)
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    return sorted(times[2:])[repeat // 2], weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)  # GPT-2 124M
    model = GPT(config).eval()
    idx = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    logger.info(
        "GPT-2 124M shape (%.1fM params), fp32 CPU, %d threads: %d-token prompt, %d new tokens, batch 1",
        model.get_num_params() / 1e6, torch.get_num_threads(), args.prompt_tokens, args.new_tokens,
    )
    for use_cache in (True, False):  # warm-up: first-call allocations and kernel selection
        time_generate(model, idx, 4, use_cache=use_cache)

    cached, t_cached = time_generate(model, idx, args.new_tokens, use_cache=True)
    uncached, t_uncached = time_generate(model, idx, args.new_tokens, use_cache=False)
    same = torch.equal(cached, uncached)

    logger.info("%-10s %10s %12s %10s", "", "tokens/s", "ms/token", "total s")
    for name, t in (("uncached", t_uncached), ("cached", t_cached)):
        logger.info("%-10s %10.1f %12.1f %10.1f", name, args.new_tokens / t, 1000 * t / args.new_tokens, t)
    floor, weight_bytes = weights_floor(model)
    logger.info("%-10s %10s %12.1f %10s   (every weight read once: %.0f MB at %.1f GB/s)", "floor", "", 1000 * floor,
                "", weight_bytes / 1e6, weight_bytes / floor / 1e9)
    logger.info("speedup: %.1fx; identical tokens: %s; cached step %.2fx the weights-read floor", t_uncached / t_cached,
                same, t_cached / args.new_tokens / floor)
    if not same:
        raise SystemExit("cached and uncached generation produced different tokens")


if __name__ == "__main__":
    main()
