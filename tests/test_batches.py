"""Training windows are a pure function of (seed, step, global micro-batch); eval windows are a fixed partition.

`make_char_shards` (also used by test_train.py and test_checkpoint.py) writes a real prepared directory, llm.c
shards and a manifest, through nanogpt.data.shards, from a few KB of generated text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nanogpt.data import shards
from nanogpt.data.windows import BatchError, TokenWindows, rank_share, to_device
from nanogpt.tokenizers import CharTokenizer
from nanogpt.train.batch_geometry import rank_micro_batches

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
         "boxing matches of sphinx and black quartz").split()


def tiny_text(num_chars: int = 6000, seed: int = 0) -> str:
    """Word salad with some structure (a char model learns it quickly), the same for the same seed."""
    rng = np.random.default_rng(seed)
    lines, n = [], 0
    while n < num_chars:
        line = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=rng.integers(4, 10))).capitalize() + "."
        lines.append(line)
        n += len(line) + 1
    return "\n".join(lines)[:num_chars]


def make_char_shards(
    directory: str | Path, text: str | None = None, val_fraction: float = 0.1, train_shard_size: int | None = None
) -> Path:
    """A prepared char-level directory: the last val_fraction of the text is val (nanoGPT's split),
    the train tokens cut into shards of train_shard_size (one shard when None)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = tiny_text() if text is None else text
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text), dtype=np.int64)
    n_val = int(len(ids) * val_fraction)
    pieces = {"train": ids[: len(ids) - n_val], "val": ids[len(ids) - n_val :]}
    splits = {}
    for split, tokens in pieces.items():
        size = train_shard_size if (split == "train" and train_shard_size) else len(tokens)
        infos = [
            shards.write_shard(directory / shards.shard_name(split, i), tokens[start : start + size], tok.vocab_size)
            for i, start in enumerate(range(0, len(tokens), size))
        ]
        splits[split] = shards.SplitInfo(shards=infos, num_tokens=len(tokens), num_documents=1)
    manifest = shards.Manifest(
        tokenizer=tok.to_dict(), vocab_size=tok.vocab_size, dtype=shards.dtype_for_vocab(tok.vocab_size).name,
        splits=splits, split_rule={"split": "tail", "val_fraction": val_fraction, "seed": 0},
        input_fingerprint="test", settings_fingerprint="test",
    )
    shards.write_manifest(directory, manifest)
    return directory


def shard_arrays(lengths: list[int]) -> list[np.ndarray]:
    """Shards whose tokens encode (shard index, position): token = 1000 * shard + position."""
    return [np.arange(n, dtype=np.uint32) + 1000 * k for k, n in enumerate(lengths)]


def window_set(windows: TokenWindows, seed: int, step: int, gs, batch_size: int) -> list[tuple[int, ...]]:
    rows = []
    for g in gs:
        x, _ = windows.train_batch(seed, step, g, batch_size)
        rows += [tuple(r) for r in x.tolist()]
    return sorted(rows)


def test_train_windows_are_deterministic_in_seed_step_g():
    w = TokenWindows(shard_arrays([300, 200, 500]), block_size=16)
    a = w.train_batch(seed=1, step=5, g=2, batch_size=8)
    b = TokenWindows(shard_arrays([300, 200, 500]), block_size=16).train_batch(seed=1, step=5, g=2, batch_size=8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert a[0].dtype == np.int64 and a[0].shape == (8, 16)


@pytest.mark.parametrize("other", [dict(step=6), dict(g=3), dict(seed=2)])
def test_different_step_g_or_seed_give_different_windows(other):
    w = TokenWindows(shard_arrays([300, 200, 500]), block_size=16)
    base = dict(seed=1, step=5, g=2)
    x1, _ = w.train_batch(batch_size=8, **base)
    x2, _ = w.train_batch(batch_size=8, **{**base, **other})
    assert not np.array_equal(x1, x2)


def test_y_is_x_shifted_by_one():
    w = TokenWindows(shard_arrays([300, 200, 500]), block_size=16)
    x, y = w.train_batch(seed=0, step=0, g=0, batch_size=32)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(y[:, -1], x[:, -1] + 1)  # consecutive tokens of one shard


def test_windows_never_cross_a_shard_boundary():
    w = TokenWindows(shard_arrays([40, 17, 3, 90]), block_size=16)  # the 3-token shard holds no window
    for step in range(50):
        x, y = w.train_batch(seed=7, step=step, g=0, batch_size=16)
        full = np.concatenate([x, y[:, -1:]], axis=1)  # the T+1 tokens of each window
        assert (full // 1000 == full[:, :1] // 1000).all(), "a window mixes two shards"
        assert (np.diff(full, axis=1) == 1).all()
        assert ((full // 1000) != 2).all(), "the too-short shard was sampled"
    # every window start of every shard is reachable, the last one included: starts 0..len-T-1
    assert w.counts.tolist() == [24, 1, 0, 74]
    shard, offset = w.locate(np.arange(w.num_windows))
    assert offset[shard == 1].tolist() == [0] and offset[shard == 3].max() == 73


def test_shards_are_sampled_in_proportion_to_their_windows():
    w = TokenWindows(shard_arrays([1016, 116]), block_size=16)  # 1000 and 100 windows
    picks = np.concatenate([w.locate(w.train_positions(0, s, 0, 64))[0] for s in range(200)])
    assert np.mean(picks == 1) == pytest.approx(100 / 1100, abs=0.02)


def test_a_step_sees_the_same_windows_on_any_number_of_workers_even_or_uneven():
    w = TokenWindows(shard_arrays([300, 200, 500]), block_size=8)
    grad_accum, batch_size = 8, 4
    per_world = []
    for world_size in (1, 2, 3, 4, 5, 8):
        gs = [g for rank in range(world_size) for g in rank_micro_batches(grad_accum, world_size, rank)]
        assert gs == list(range(grad_accum))  # in order, each once
        per_world.append(window_set(w, seed=3, step=11, gs=gs, batch_size=batch_size))
    assert all(windows == per_world[0] for windows in per_world)


def test_eval_windows_are_fixed_evenly_spaced_and_partitioned_across_ranks():
    w = TokenWindows(shard_arrays([300, 200, 500]), block_size=8)
    num = 30
    positions = w.eval_positions(num)
    assert np.array_equal(positions, w.eval_positions(num))
    assert np.array_equal(positions, (np.arange(num) * w.num_windows) // num)
    assert len(set(positions.tolist())) == num and positions[0] == 0

    def rows(rank, world_size, batch_size=4):
        return [tuple(r) for x, _ in w.eval_batches(num, batch_size, rank, world_size) for r in x.tolist()]

    single = rows(0, 1)
    assert single == rows(0, 1) and len(single) == num  # identical across calls
    for world_size in (2, 3, 4):
        shares = [rows(r, world_size) for r in range(world_size)]
        assert sorted(sum(shares, [])) == sorted(single)  # a partition: nothing lost, nothing twice
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for r in range(3):
        assert set(rank_share(positions, r, 3)).isdisjoint(rank_share(positions, (r + 1) % 3, 3))


def test_more_eval_windows_than_the_split_holds_repeat_them():
    w = TokenWindows(shard_arrays([20]), block_size=8)  # 12 windows
    assert len(w.eval_positions(30)) == 30 and set(w.eval_positions(30).tolist()) == set(range(12))


def test_no_window_fits_is_a_clear_error():
    with pytest.raises(BatchError, match="block_size"):
        TokenWindows(shard_arrays([8, 5]), block_size=8)


def test_real_shards_on_disk_feed_the_windows(tmp_path):
    d = make_char_shards(tmp_path / "data", train_shard_size=1000)
    train = shards.load_split(d, "train")
    assert len(train) > 2 and train[0].dtype == np.uint16
    w = TokenWindows(train, block_size=32)
    x, y = w.train_batch(seed=0, step=0, g=0, batch_size=4)
    xt, yt = to_device(x, y, "cpu")
    assert xt.dtype == yt.dtype and str(xt.dtype) == "torch.int64" and tuple(xt.shape) == (4, 32)
    shard, offset = w.locate(w.train_positions(0, 0, 0, 4))
    for row, k, o in zip(x, shard, offset):
        assert np.array_equal(row, np.asarray(train[k][o : o + 32], dtype=np.int64))
