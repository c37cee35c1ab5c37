"""Token shards: llm.c's header, the uint16/uint32 switch, atomic writes, the manifest, and every kind of damage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from nanogpt.data.shards import (
    HEADER_BYTES,
    MANIFEST_NAME,
    Manifest,
    ShardError,
    SplitInfo,
    dtype_for_vocab,
    load_manifest,
    load_split,
    plan_shards,
    read_header,
    read_shard,
    verify,
    write_error,
    write_manifest,
    write_shard,
)
from tests.conftest import fill


def header_of(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype="<i4", count=256)


def test_uint16_shard_has_llmc_header(tmp_path):
    tokens = np.array([0, 1, 50256, 42, 65535 - 15279], dtype=np.int64)
    info = write_shard(tmp_path / "train_000000.bin", tokens, vocab_size=50257)
    header = header_of(tmp_path / "train_000000.bin")
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert (tmp_path / "train_000000.bin").stat().st_size == HEADER_BYTES + 5 * 2
    out = read_shard(tmp_path / "train_000000.bin")
    assert isinstance(out, np.memmap) and out.dtype == np.uint16
    assert out.tolist() == tokens.tolist()
    assert (info.name, info.num_tokens) == ("train_000000.bin", 5)
    import hashlib

    assert info.sha256 == hashlib.sha256((tmp_path / "train_000000.bin").read_bytes()).hexdigest()


def test_vocab_over_65536_switches_to_uint32(tmp_path):
    assert dtype_for_vocab(65536) == np.uint16  # ids 0..65535 still fit
    assert dtype_for_vocab(65537) == np.uint32
    vocab = 128_256  # a Llama-3-sized vocabulary
    tokens = np.array([0, 65535, 65536, 100_000, vocab - 1], dtype=np.int64)
    write_shard(tmp_path / "s.bin", tokens, vocab_size=vocab)
    assert list(header_of(tmp_path / "s.bin")[:3]) == [20240801, 7, 5]
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 5 * 4
    out = read_shard(tmp_path / "s.bin")
    assert out.dtype == np.uint32 and out.tolist() == tokens.tolist()


@pytest.mark.parametrize(("vocab", "bad"), [(50257, 50257), (65536, 65536), (70_000, 70_000), (100, -1)])
def test_out_of_range_tokens_never_wrap(tmp_path, vocab, bad):
    path = tmp_path / "s.bin"
    with pytest.raises(ShardError, match=rf"s\.bin: token id {bad} is outside the vocabulary"):
        write_shard(path, np.array([1, bad, 2], dtype=np.int64), vocab_size=vocab)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary file


def test_pieces_are_written_back_to_back(tmp_path):
    pieces = [np.arange(3), np.array([], dtype=np.int64), np.arange(10, 14)]
    info = write_shard(tmp_path / "s.bin", pieces, vocab_size=100)
    assert info.num_tokens == 7
    assert read_shard(tmp_path / "s.bin").tolist() == [0, 1, 2, 10, 11, 12, 13]


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "s.bin", np.array([], dtype=np.uint16), vocab_size=65)
    assert read_shard(tmp_path / "s.bin").size == 0


def test_reads_an_llmc_shard_without_manifest(tmp_path):
    """Bytes laid out exactly as llm.c's dev/data/data_common.py write_datafile does it."""
    toks = np.arange(1000, 1100, dtype=np.uint16)
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(toks)
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"):
        with open(tmp_path / name, "wb") as f:
            f.write(header.tobytes())
            f.write(toks.tobytes())
    assert read_shard(tmp_path / "fineweb_val_000000.bin").tolist() == toks.tolist()
    train = load_split(tmp_path, "train")
    assert len(train) == 2 and all(s.tolist() == toks.tolist() for s in train)


def test_plan_shards_table():
    assert plan_shards([], 4) == []
    assert plan_shards([0, 0], 4) == []
    assert plan_shards([3], 4) == [[(0, 0, 3)]]
    assert plan_shards([4], 4) == [[(0, 0, 4)]]
    assert plan_shards([3, 0, 6], 4) == [[(0, 0, 3), (2, 0, 1)], [(2, 1, 5)], [(2, 5, 6)]]
    assert plan_shards([10], 3) == [[(0, 0, 3)], [(0, 3, 6)], [(0, 6, 9)], [(0, 9, 10)]]
    with pytest.raises(ValueError):
        plan_shards([1], 0)


# ------------------------------------------------------------------------------------------ a prepared directory


@pytest.fixture
def prepared(tmp_path) -> Path:
    """A small prepared directory written with the library alone: two train shards, one val shard."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, sizes in (("train", [1000, 500]), ("val", [300])):
        infos = [write_shard(tmp_path / f"{split}_{i:06d}.bin", rng.integers(0, 65, n), 65) for i, n in enumerate(sizes)]
        splits[split] = SplitInfo(shards=infos, num_tokens=sum(sizes), num_documents=1)
    manifest = Manifest(
        tokenizer={"name": "char", "vocab_size": 65, "chars": [chr(32 + i) for i in range(65)]},
        vocab_size=65, dtype="uint16", splits=splits,
        split_rule={"split": "tail", "val_fraction": 0.1, "seed": 2357},
        input_fingerprint="in", settings_fingerprint="set", shard_size=1000, num_documents=1,
    )
    write_manifest(tmp_path, manifest)
    return tmp_path


def test_manifest_round_trip(prepared):
    m = verify(prepared)
    assert Manifest.from_json(m.to_json()) == m
    assert m.num_tokens("train") == 1500 and m.num_tokens("val") == 300
    assert m.shard_names() == ["train_000000.bin", "train_000001.bin", "val_000000.bin"]
    assert [s.size for s in load_split(prepared, "train")] == [1000, 500]
    on_disk = json.loads((prepared / MANIFEST_NAME).read_text())
    assert on_disk["splits"]["train"]["shards"][1]["num_tokens"] == 500


def test_truncated_shard(prepared):
    path = prepared / "train_000001.bin"
    os.truncate(path, path.stat().st_size - 2)
    with pytest.raises(ShardError, match=r"train_000001\.bin: truncated: the header promises 500 uint16 tokens"):
        verify(prepared, check_hashes=False)
    with pytest.raises(ShardError, match="train_000001.bin: truncated"):
        load_split(prepared, "train")
    os.truncate(path, 100)
    with pytest.raises(ShardError, match="train_000001.bin: truncated: 100 bytes, shorter than the 1024-byte header"):
        read_shard(path)


def test_extended_shard(prepared):
    with open(prepared / "val_000000.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ShardError, match=r"val_000000\.bin: extended: 2 bytes beyond the 300 tokens"):
        verify(prepared, check_hashes=False)


def test_corrupted_bytes_fail_the_hash(prepared):
    path = prepared / "train_000000.bin"
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    verify(prepared, check_hashes=False)  # header and size still fine: only the hash can tell
    with pytest.raises(ShardError, match=r"train_000000\.bin: corrupted: sha256 .* differs from the manifest's"):
        verify(prepared)


def test_missing_shard(prepared):
    (prepared / "val_000000.bin").unlink()
    with pytest.raises(ShardError, match=r"val_000000\.bin: missing"):
        verify(prepared, check_hashes=False)


def test_bad_magic(prepared):
    path = prepared / "train_000000.bin"
    data = bytearray(path.read_bytes())
    data[0:4] = np.array([12345], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train_000000\.bin: bad magic number 12345"):
        read_shard(path)
    with pytest.raises(ShardError, match=r"train_000000\.bin: bad magic number"):
        verify(prepared)


def test_bad_version(prepared):
    path = prepared / "train_000000.bin"
    data = bytearray(path.read_bytes())
    data[4:8] = np.array([7], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="unsupported version 7 for magic 20240520"):
        read_header(path)


def test_count_mismatch_with_manifest(prepared):
    write_shard(prepared / "val_000000.bin", np.zeros(299, dtype=np.int64), 65)  # valid shard, wrong size
    with pytest.raises(ShardError, match=r"val_000000\.bin: holds 299 tokens but the manifest lists 300"):
        verify(prepared, check_hashes=False)


def test_stale_shard_and_temp_files(prepared, caplog):
    (prepared / ".train_000002.bin.tmp-123-abcd").write_bytes(b"half")
    verify(prepared)  # a temporary file of an interrupted write is never taken for a shard
    assert "temporary file" in caplog.text
    write_shard(prepared / "train_000002.bin", np.zeros(3, dtype=np.int64), 65)
    with pytest.raises(ShardError, match=r"train_000002\.bin: not listed in manifest\.json"):
        verify(prepared, check_hashes=False)


def test_missing_and_invalid_manifest(prepared):
    text = (prepared / MANIFEST_NAME).read_text()
    (prepared / MANIFEST_NAME).write_text(text[: len(text) // 2])
    with pytest.raises(ShardError, match=r"manifest\.json: invalid manifest"):
        load_manifest(prepared)
    (prepared / MANIFEST_NAME).unlink()
    with pytest.raises(ShardError, match=r"manifest\.json: missing"):
        verify(prepared)
    with pytest.raises(ShardError, match=r"manifest\.json: missing"):
        load_split(prepared / "nonexistent", "train")


def test_manifest_write_is_atomic(prepared):
    write_manifest(prepared, load_manifest(prepared))
    assert sorted(p.name for p in prepared.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------------------ failed writes


def test_write_error_names_the_file_and_the_reason(tmp_path):
    with open("/dev/full", "wb", buffering=0) as full, pytest.raises(OSError) as raised:
        full.write(b"tokens")  # the kernel's real ENOSPC, no root needed
    err = write_error(tmp_path / "train_000000.bin", raised.value)
    assert str(err) == f"{tmp_path}/train_000000.bin: cannot write: No space left on device (the disk is full)"


def test_full_disk_names_the_shard_and_leaves_no_temp_file(tiny_fs):
    with pytest.raises(ShardError, match=r"/train_000000\.bin: cannot write: No space left on device"):
        write_shard(tiny_fs / "train_000000.bin", np.zeros(100_000, dtype=np.int64), 65)  # 200 KB > 64 KiB
    assert os.listdir(tiny_fs) == []


def test_full_disk_names_the_manifest(prepared, tiny_fs):
    fill(tiny_fs)
    with pytest.raises(ShardError, match=r"/manifest\.json: cannot write: No space left on device"):
        write_manifest(tiny_fs, load_manifest(prepared))
    assert os.listdir(tiny_fs) == ["filler"]


def test_read_only_file_system_names_the_shard(read_only_fs):
    with pytest.raises(ShardError, match=r"/val_000000\.bin: cannot write: Read-only file system"):
        write_shard(read_only_fs / "val_000000.bin", np.zeros(3, dtype=np.int64), 65)
