"""Batches of token windows, cut from memory-mapped token shards as a pure function of where the loop is.

A window is `block_size + 1` consecutive tokens of one shard: x = tokens[i : i+T], y = tokens[i+1 : i+1+T]. Windows
never cross a shard boundary (two shards' tokens are not consecutive text).

Training windows (nanoGPT's `get_batch`, made deterministic): micro-batch `g` of optimizer step `step` is drawn by
`np.random.default_rng([seed, step, g])`, uniformly over every window of every shard (so a shard is picked in
proportion to its window count). `g` is the GLOBAL micro-batch index in [0, gradient_accumulation_steps); each rank
runs a consecutive block of them (nanogpt/train/batch_geometry.py, rank_micro_batches): an optimizer step sees the same windows whatever the number of workers, and a
resumed run sees exactly the windows the uninterrupted run would have, with no iterator state to checkpoint.

Evaluation windows are fixed: `num_windows` window starts evenly spaced over all the windows of a split, split
across ranks as a partition (rank r takes windows r, r + world_size, ...). The loss summed over them, all-reduced,
is the same whatever the world size, and the same at every eval (unlike nanoGPT's random eval batches).

    windows = TokenWindows(shards.load_split(data_dir, "train"), block_size=64)
    x, y = windows.train_batch(seed=1337, step=10, g=3, batch_size=12)          # (12, 64) int64 each
    for x, y in windows.eval_batches(num_windows=240, batch_size=12, rank=0, world_size=2): ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


class BatchError(ValueError):
    """The token shards cannot provide the windows asked for (e.g. every shard shorter than a window)."""


class TokenWindows:
    """Every (block_size + 1)-token window of a list of token arrays (memmaps), addressed by one global index."""

    def __init__(self, shards: Sequence[np.ndarray], block_size: int) -> None:
        if block_size <= 0:
            raise BatchError(f"block_size must be positive, got {block_size}")
        self.shards = list(shards)
        self.block_size = block_size
        # shard k has len - block_size window starts: i in [0, len - T - 1], so that y's last token i + T exists
        self.counts = np.array([max(len(s) - block_size, 0) for s in self.shards], dtype=np.int64)
        self.ends = np.cumsum(self.counts)  # global index p lies in shard k when ends[k-1] <= p < ends[k]
        self.num_windows = int(self.ends[-1]) if len(self.ends) else 0
        if self.num_windows == 0:
            lengths = [len(s) for s in self.shards]
            raise BatchError(
                f"no window of block_size + 1 = {block_size + 1} tokens fits in the shards (token counts {lengths}); "
                "use a smaller model.block_size or more data"
            )

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global window indices -> (shard index, start offset in that shard)."""
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.searchsorted(self.ends, positions, side="right")
        offset = positions - (self.ends[shard] - self.counts[shard])
        return shard, offset

    def read(self, shard: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The windows at (shard, offset) -> x, y as (B, T) int64 arrays, y shifted one token right of x."""
        T = self.block_size
        buf = np.stack([self.shards[k][o : o + T + 1] for k, o in zip(shard.tolist(), offset.tolist())])
        buf = buf.astype(np.int64)  # (B, T+1); uint16/uint32 on disk
        return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])

    def train_positions(self, seed: int, step: int, g: int, batch_size: int) -> np.ndarray:
        """The global window indices of micro-batch g of optimizer step `step`: a pure function of the three."""
        rng = np.random.default_rng([seed % 2**63, step, g])  # SeedSequence wants non-negative entropy
        return rng.integers(0, self.num_windows, size=batch_size, dtype=np.int64)

    def train_batch(self, seed: int, step: int, g: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return self.read(*self.locate(self.train_positions(seed, step, g, batch_size)))

    def eval_positions(self, num_windows: int) -> np.ndarray:
        """`num_windows` window indices evenly spaced over the whole split (repeats when it has fewer windows)."""
        return (np.arange(num_windows, dtype=np.int64) * self.num_windows) // num_windows

    def eval_batches(
        self, num_windows: int, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This rank's share of the fixed eval windows, in batches of at most `batch_size`."""
        mine = rank_share(self.eval_positions(num_windows), rank, world_size)
        for i in range(0, len(mine), batch_size):
            yield self.read(*self.locate(mine[i : i + batch_size]))


    def eval_batch_count(self, num_windows: int, batch_size: int, world_size: int = 1) -> int:
        """The most eval batches any rank runs (rank 0's: its share is the largest), for ranks that must all run
        the same number of forward passes (FSDP)."""
        return -(-len(rank_share(np.arange(num_windows), 0, world_size)) // batch_size)


def rank_share(positions: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s part of a partition of `positions`: every world_size-th one, starting at `rank`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return positions[rank::world_size]


def to_device(x: np.ndarray, y: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """numpy int64 (B, T) -> torch on `device`; on CUDA through pinned memory with a non-blocking copy (nanoGPT)."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    if torch.device(device).type == "cuda":
        return xt.pin_memory().to(device, non_blocking=True), yt.pin_memory().to(device, non_blocking=True)
    return xt.to(device), yt.to(device)
