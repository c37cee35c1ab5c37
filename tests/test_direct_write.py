"""Shard bytes written past the page cache (nanogpt/data/direct_write.py): the same file whatever the path taken."""

from __future__ import annotations

import errno
import fcntl
import os
import sys

import numpy as np
import pytest

from nanogpt.data import direct_write
from nanogpt.data.direct_write import ALIGN, STAGING_BYTES, write_chunks
from nanogpt.data.shards import read_shard, write_shard

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT is Linux's")
SIZES = [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, STAGING_BYTES - 1, STAGING_BYTES, STAGING_BYTES + ALIGN + 3,
         2 * STAGING_BYTES + 17]


def chunks_of(total: int, seed: int = 0) -> list[memoryview]:
    """`total` random bytes in three unaligned chunks (the first is a shard header's 1024 bytes, or less)."""
    data = np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8)
    cuts = sorted({0, min(1024, total), total // 2 + 1 if total > 2 else total, total})
    return [memoryview(data[a:b]) for a, b in zip(cuts, cuts[1:])]


def written(path, chunks: list[memoryview]) -> bytes:
    with open(path, "wb") as f:
        write_chunks(f, chunks)
    return path.read_bytes()


@pytest.mark.parametrize("total", SIZES)
def test_the_file_holds_the_chunks_back_to_back_and_nothing_more(tmp_path, total):
    chunks = chunks_of(total)
    assert written(tmp_path / "shard.bin", chunks) == b"".join(bytes(c) for c in chunks)


@linux_only
def test_the_direct_path_is_taken_here_and_the_flag_is_off_afterwards(tmp_path):
    with open(tmp_path / "shard.bin", "wb") as f:
        assert direct_write._set_direct(f.fileno(), True)  # the file system under tmp_path takes O_DIRECT
        direct_write._set_direct(f.fileno(), False)
        chunks = chunks_of(ALIGN + 5)
        write_chunks(f, chunks)
        assert not fcntl.fcntl(f.fileno(), fcntl.F_GETFL) & os.O_DIRECT
        f.write(b"tail")  # the file object still writes, buffered, right after the direct part (not after its padding)
    assert (tmp_path / "shard.bin").read_bytes() == b"".join(bytes(c) for c in chunks) + b"tail"


def test_without_o_direct_the_file_is_written_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)  # macOS has no such flag
    chunks = chunks_of(STAGING_BYTES + 3)
    assert written(tmp_path / "shard.bin", chunks) == b"".join(bytes(c) for c in chunks)


@linux_only
def test_a_file_system_that_takes_the_flag_but_not_the_io_gets_the_file_through_the_cache(tmp_path, monkeypatch):
    """Some network and FUSE file systems accept O_DIRECT and fail the write with EINVAL: start again, buffered."""
    real_write = os.write

    def einval_on_second_direct_write(fd, data, calls=[]):  # noqa: B006 (counts calls)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_write.os, "write", einval_on_second_direct_write)
    chunks = chunks_of(2 * STAGING_BYTES + 17)  # the first direct write lands, the second fails
    assert written(tmp_path / "shard.bin", chunks) == b"".join(bytes(c) for c in chunks)


@linux_only
def test_any_other_error_of_a_direct_write_is_raised(tmp_path, monkeypatch):
    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_write.os, "write", enospc)
    with pytest.raises(OSError) as raised:
        written(tmp_path / "shard.bin", chunks_of(10))
    assert raised.value.errno == errno.ENOSPC


def test_a_shard_through_the_cache_or_past_it_is_the_same_file(tmp_path):
    """ShardPrefix writes its local copy through the cache (the upload reads it back at once); any other past it."""
    tokens = [np.arange(70_000) % 50257, np.arange(3) + 7]
    (tmp_path / "past").mkdir(), (tmp_path / "through").mkdir()
    past = write_shard(tmp_path / "past" / "train_000000.bin", tokens, 50257)
    through = write_shard(tmp_path / "through" / "train_000000.bin", tokens, 50257, direct=False)
    assert past == through
    assert (tmp_path / "past" / past.name).read_bytes() == (tmp_path / "through" / through.name).read_bytes()
    assert read_shard(tmp_path / "past" / past.name).tolist() == np.concatenate(tokens).tolist()
