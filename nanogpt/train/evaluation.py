"""The one evaluation: mean loss (and bits per byte) of a model over a split's fixed eval windows.

Used by the training loop at every eval (each rank takes its share of the windows, the sums are all-reduced) and
by pipelines/evaluate.py on one process, so a checkpoint evaluated with its run's settings gets the val loss the
run reported at that step.

    result = evaluate_windows(model, windows, num_windows=240, batch_size=12, precision=Precision("cpu", torch.float32))
    result.loss, result.bits_per_byte
    report = evaluate_split(model, tokenizer, "data/shakespeare_char", "val", eval_iters=200, batch_size=12,
                            precision=precision)    # checks the shards (hashes too) and the tokenizer first

Bits per byte are exact for the evaluated tokens: the total loss in bits over the UTF-8 bytes of exactly the
target tokens scored, byte lengths taken token by token (GPT-2 tokens may hold part of a character, so decoding
windows to text would miscount).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanogpt.config import ConfigError
from nanogpt.data import shards
from nanogpt.data.windows import TokenWindows, to_device
from nanogpt.metrics import bits_per_byte, perplexity
from nanogpt.tokenizers import Tokenizer, token_byte_lengths
from nanogpt.train.devices import Precision
from nanogpt.train.parallel import SingleProcess, Strategy


@dataclass(frozen=True)
class WindowLoss:
    loss: float
    """Mean cross-entropy in nats per target token, over every rank's windows."""
    num_windows: int
    num_tokens: int
    num_bytes: int
    """UTF-8 bytes of the target tokens scored; 0 when no byte lengths were given."""

    @property
    def bits_per_byte(self) -> float | None:
        if not self.num_bytes or not math.isfinite(self.loss):
            return None
        return bits_per_byte(self.loss, self.num_tokens, self.num_bytes)


@torch.no_grad()
def evaluate_windows(
    model: torch.nn.Module,
    windows: TokenWindows,
    num_windows: int,
    batch_size: int,
    precision: Precision,
    strategy: Strategy | None = None,
    byte_lengths: np.ndarray | None = None,
) -> WindowLoss:
    """This rank's share of `num_windows` fixed windows (batches.TokenWindows.eval_batches), summed and
    all-reduced. `model` must not be the DDP wrapper: ranks may run different numbers of batches. Under FSDP
    (strategy.collective_forward) a rank with fewer batches runs forwards of one dummy window until every rank has
    run as many as rank 0: their losses are not counted.
    `byte_lengths[token]`: UTF-8 length of each token id, for bits per byte (tokenizers.token_byte_lengths)."""
    strategy = strategy or SingleProcess()
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=precision.device)  # loss sum, windows, target bytes
    num_batches = 0
    for x, y in windows.eval_batches(num_windows, batch_size, strategy.rank, strategy.world_size):
        if byte_lengths is not None:
            totals[2] += float(byte_lengths[y].sum())
        xt, yt = to_device(x, y, precision.device)
        with precision.autocast():
            _, loss = model(xt, yt)
        # the loss is a mean over the batch's B*T targets, all windows T long: B * loss sums the windows'
        totals[0] += loss.double() * xt.size(0)
        totals[1] += xt.size(0)
        num_batches += 1
    if strategy.collective_forward:
        # a full batch with targets: the forward a compiled model has a graph for already
        dummy = torch.zeros((batch_size, windows.block_size), dtype=torch.long, device=precision.device)
        for _ in range(windows.eval_batch_count(num_windows, batch_size, strategy.world_size) - num_batches):
            with precision.autocast():
                model(dummy, dummy)  # the all-gathers the other ranks wait for; nothing counted
    strategy.all_reduce_sum(totals)
    model.train(was_training)
    loss_sum, count, num_bytes = totals.tolist()
    return WindowLoss(loss=loss_sum / count, num_windows=int(count), num_tokens=int(count) * windows.block_size,
                      num_bytes=int(num_bytes))


@dataclass
class EvalReport:
    """What pipelines/evaluate.py prints: a split's loss, perplexity and bits per byte, and what they cover."""

    split: str
    loss: float
    """Mean cross-entropy in nats per target token."""
    perplexity: float
    bits_per_byte: float | None
    num_windows: int
    num_tokens: int
    num_bytes: int
    block_size: int
    seconds: float


def evaluate_split(model: torch.nn.Module, tokenizer: Tokenizer, data_dir: str, split: str, *, eval_iters: int,
                   batch_size: int, precision: Precision) -> EvalReport:
    """The loss of `model` over the split's eval_iters * batch_size fixed windows, in one process. The shards are
    verified (hashes included) and must be of the model's tokenizer."""
    start = time.perf_counter()
    manifest = shards.verify(data_dir)
    if manifest.tokenizer != tokenizer.to_dict():
        raise ConfigError(
            f"{data_dir} was tokenized with {manifest.tokenizer.get('name')} ({manifest.vocab_size} tokens) but the "
            f"model's tokenizer is {tokenizer.name} ({tokenizer.vocab_size} tokens): its token ids mean other text"
        )
    if split not in manifest.splits:
        raise shards.ShardError(Path(data_dir) / shards.MANIFEST_NAME, f"has no {split!r} split")
    block_size = model.config.block_size
    windows = TokenWindows(shards.load_split(data_dir, split), block_size)
    result = evaluate_windows(model, windows, eval_iters * batch_size, batch_size, precision,
                              byte_lengths=token_byte_lengths(tokenizer))
    return EvalReport(split=split, loss=result.loss, perplexity=perplexity(result.loss),
                      bits_per_byte=result.bits_per_byte, num_windows=result.num_windows,
                      num_tokens=result.num_tokens, num_bytes=result.num_bytes, block_size=block_size,
                      seconds=time.perf_counter() - start)
