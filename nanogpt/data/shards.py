"""Token shards on disk: llm.c's `.bin` layout, a manifest that lists them, and checks that catch damage.

A shard is a 1024-byte header of 256 little-endian int32 followed by the tokens:

    header[0] = magic    20240520 for uint16 tokens | 20240801 for uint32 tokens
    header[1] = version  1                          | 7
    header[2] = number of tokens; the rest is zeros

so shards written here feed llm.c / modded-nanogpt loaders, and their published pre-tokenized FineWeb shards
(`fineweb_train_000001.bin`, ...) are read by `read_shard`, and by `load_split` from a directory without a manifest.
Tokens are uint16 when the vocabulary fits (GPT-2's 50257 does) and uint32 otherwise; a token that does not fit
the dtype or the vocabulary is an error, never a silent wrap (nanoGPT's headerless uint16 files would wrap).

A prepared directory holds `train_000000.bin, ..., val_000000.bin, ...` and `manifest.json`, written last. Every
file is written to a temporary name (`.<name>.tmp-...`, never matching a shard name), fsynced and renamed, so a
directory whose manifest is present and verifies is complete; a shard's bytes skip the page cache where the file
system allows (nanogpt/data/direct_write.py). Damage (a missing, truncated, extended or altered
shard, a bad header) raises `ShardError` naming the file and the reason; checks raise, never `assert` (which
`python -O` strips). So does a failed write (a full disk, a read-only file system): `No space left on device`
alone would not say where.

    info = write_shard("out/train_000000.bin", tokens, vocab_size=50257)
    tokens = read_shard("out/train_000000.bin")     # np.memmap after checking the header and the file size
    manifest = verify("out")                         # every listed shard: header, size, count, sha256
    shards = load_split("out", "train")              # [np.memmap, ...] after a cheap verify (no hashing)
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanogpt.data import storage
from nanogpt.data.direct_write import write_chunks

log = logging.getLogger(__name__)

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) per token dtype, as llm.c's dev/data/data_common.py writes them.
FORMATS: dict[str, tuple[int, int]] = {"uint16": (20240520, 1), "uint32": (20240801, 7)}
DTYPE_BY_MAGIC = {magic: np.dtype(name) for name, (magic, _) in FORMATS.items()}
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nanogpt-ray/token-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
SHARD_NAME = re.compile(r"^(train|val)_(\d{6})\.bin$")
TEMP_MARKER = ".tmp-"  # in every temporary file name: `.<final name>.tmp-<pid>-<random>`


class ShardError(Exception):
    """A shard or manifest that is missing, damaged or inconsistent. `.file` and `.reason` say which and why."""

    def __init__(self, file: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason

    def __reduce__(self):  # keep (file, reason) when the error crosses a process boundary (Ray tasks)
        return (type(self), (self.file, self.reason))


# ------------------------------------------------------------------------------------------ one shard file


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every token id fits (ids < 65536), uint32 beyond."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    if vocab_size <= 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name inside the shard directory, e.g. train_000000.bin."""
    num_tokens: int
    sha256: str
    """Of the whole file, header included (`sha256sum train_000000.bin` prints the same)."""


def write_shard(
    path: str | os.PathLike, tokens: np.ndarray | Sequence[np.ndarray], vocab_size: int, direct: bool = True
) -> ShardInfo:
    """Write tokens (one array, or pieces written back to back) as an llm.c shard, atomically.

    Every piece is range-checked against the vocabulary before it is cast, so an id that would wrap is an error.
    `direct`: past the page cache where the file system allows; False for a file read back at once (an upload's
    local copy), which the cache then serves.
    """
    path = Path(path)
    pieces = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
    dtype = dtype_for_vocab(vocab_size)
    magic, version = FORMATS[dtype.name]
    num_tokens = 0
    for piece in pieces:
        if piece.ndim != 1:
            raise ShardError(path, f"tokens must be one-dimensional, got shape {piece.shape}")
        if piece.size and piece.dtype.kind not in "iu":
            raise ShardError(path, f"tokens must be integers, got {piece.dtype}")
        if piece.size and (int(piece.min()) < 0 or int(piece.max()) >= vocab_size):
            bad = int(piece.max()) if int(piece.max()) >= vocab_size else int(piece.min())
            raise ShardError(path, f"token id {bad} is outside the vocabulary [0, {vocab_size}) ({dtype.name} shard)")
        num_tokens += piece.size
    if num_tokens >= 2**31:
        raise ShardError(path, f"{num_tokens} tokens do not fit the int32 header count; use a smaller shard_size")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (magic, version, num_tokens)
    # ascontiguousarray copies only a piece not already so (char-level's int64 chunks): those copies, all alive at
    # once for the two threads below, cost up to one shard's size more
    little = dtype.newbyteorder("<")
    chunks = [memoryview(c).cast("B") for c in (header, *(np.ascontiguousarray(p, dtype=little) for p in pieces))]
    with ThreadPoolExecutor(1) as hasher:  # hashing and writing both release the GIL: a 105 MB shard 0.10 -> 0.06 s
        digest = hasher.submit(_sha256, chunks)
        with atomic_write(path) as f:
            write_chunks(f, chunks, direct)
        return ShardInfo(name=path.name, num_tokens=num_tokens, sha256=digest.result())


def _sha256(chunks: Sequence[memoryview]) -> str:
    sha = hashlib.sha256()
    for chunk in chunks:
        sha.update(chunk)
    return sha.hexdigest()


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """(token dtype, token count) after checking magic, version and that the file size matches the count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise ShardError(path, "missing") from None
    except OSError as e:
        raise ShardError(path, f"cannot be read ({e.strerror or e})") from None
    if len(raw) < HEADER_BYTES:
        raise ShardError(path, f"truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens = (int(x) for x in header[:3])
    if magic not in DTYPE_BY_MAGIC:
        expected = " or ".join(str(m) for m in DTYPE_BY_MAGIC)
        raise ShardError(path, f"bad magic number {magic} (expected {expected}): not an llm.c token shard")
    dtype = DTYPE_BY_MAGIC[magic]
    if version != FORMATS[dtype.name][1]:
        raise ShardError(path, f"unsupported version {version} for magic {magic} (expected {FORMATS[dtype.name][1]})")
    if num_tokens < 0:
        raise ShardError(path, f"negative token count {num_tokens} in the header")
    expected_size = HEADER_BYTES + num_tokens * dtype.itemsize
    if size < expected_size:
        raise ShardError(
            path, f"truncated: the header promises {num_tokens} {dtype.name} tokens ({expected_size} bytes), the file has {size}"
        )
    if size > expected_size:
        raise ShardError(
            path, f"extended: {size - expected_size} bytes beyond the {num_tokens} tokens the header promises"
        )
    return dtype, num_tokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The tokens of one shard as a read-only np.memmap (an llm.c/modded-nanogpt shard works too)."""
    dtype, num_tokens = read_header(path)
    if num_tokens == 0:
        return np.empty(0, dtype=dtype)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            sha.update(chunk)
    return sha.hexdigest()


def shard_file_bytes(info: ShardInfo, dtype: str) -> int:
    """The size of a shard file: the header and `info.num_tokens` tokens of `dtype` (uint16 | uint32)."""
    return HEADER_BYTES + info.num_tokens * np.dtype(dtype).itemsize


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


class atomic_write:
    """`with atomic_write(path) as f:` writes a temporary file beside `path`, fsyncs it and renames it into place;
    on an exception the temporary file is removed and `path` is left as it was. An OSError on the way (a full disk,
    a read-only file system, no permission) comes out as a ShardError naming `path`."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb") -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.mode = mode

    def __enter__(self):
        try:
            self.file = open(self.tmp, self.mode)
        except OSError as e:
            raise write_error(self.path, e) from None
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        error = exc if isinstance(exc, OSError) else None
        try:
            if exc_type is None:
                self._commit()
        except OSError as e:
            error = e
        finally:
            self._discard()
        if error is not None:
            raise write_error(self.path, error) from None

    def _commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def _discard(self) -> None:
        """Close (a no-op after _commit) and remove the temporary file, if it is still there."""
        try:
            self.file.close()
        except OSError:
            pass  # flushing the rest of a failed write failed too: the file is removed anyway
        self.tmp.unlink(missing_ok=True)


WRITE_ERROR_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "no permission to write there",
    errno.EPERM: "no permission to write there",
}


def write_error(path: str | os.PathLike, e: OSError, action: str = "cannot write") -> ShardError:
    """A ShardError naming the file a write failed on, with the system's reason and what it means."""
    reason = e.strerror or str(e)
    hint = WRITE_ERROR_HINTS.get(e.errno)
    return ShardError(path, f"{action}: {reason}" + (f" ({hint})" if hint else ""))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------ the manifest


@dataclass(frozen=True)
class SplitInfo:
    shards: list[ShardInfo]
    num_tokens: int
    num_documents: int = 0
    """Documents (or document pieces, when the tail split cuts one) whose tokens are in this split."""


@dataclass(frozen=True)
class Manifest:
    tokenizer: dict[str, Any]
    """tokenizer.to_dict(): name, vocab_size, and the ordered characters for char-level."""
    vocab_size: int
    dtype: str
    """uint16 | uint32, as the shard headers say."""
    splits: dict[str, SplitInfo]
    split_rule: dict[str, Any]
    """{"split": "tail" | "random", "val_fraction": ..., "seed": ...}"""
    input_fingerprint: str
    settings_fingerprint: str
    inputs: dict[str, Any] = field(default_factory=dict)
    """What was read: the input spec, its kind, the number of files."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The pipeline settings that settings_fingerprint hashes."""
    shard_size: int = 0
    num_documents: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    """Counts and timings of the run that wrote it: skipped documents, replaced characters, seconds, tokens/s."""
    created_at: str = ""
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    def num_tokens(self, split: str) -> int:
        return self.splits[split].num_tokens if split in self.splits else 0

    def shard_names(self) -> list[str]:
        return [s.name for split in self.splits.values() for s in split.shards]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        d = dict(d)
        if d.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"version {d.get('version')!r} is not supported (expected {MANIFEST_VERSION})")
        d["splits"] = {
            name: SplitInfo(
                shards=[ShardInfo(**s) for s in split["shards"]],
                num_tokens=split["num_tokens"],
                num_documents=split.get("num_documents", 0),
            )
            for name, split in d["splits"].items()
        }
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Write manifest.json atomically: the last file of a prepared directory, the mark that it is complete."""
    path = Path(directory) / MANIFEST_NAME
    with atomic_write(path, "w") as f:
        f.write(manifest.to_json())
    return path


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """The manifest of a shard directory, or of a URI prefix in object storage (s3://bucket/shards)."""
    text = manifest_text(directory)
    try:
        return Manifest.from_json(text)
    except (ValueError, TypeError, KeyError) as e:
        raise ShardError(_manifest_path(directory), f"invalid manifest ({type(e).__name__}: {e})") from None


def manifest_text(directory: str | os.PathLike) -> str:
    """manifest.json's text, read from a directory or a URI; ShardError naming it when it is missing."""
    path = _manifest_path(directory)
    missing = "missing: not a prepared shard directory, or its preparation did not finish"
    if storage.is_uri(path):
        try:
            if not storage.exists(path):
                raise ShardError(path, missing)
            return storage.read_bytes(path).decode()
        except storage.StorageError as e:
            raise store_error(e) from None
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ShardError(path, missing) from None


def store_error(e: storage.StorageError) -> ShardError:
    """An object store that failed on a shard or a manifest: the ShardError naming it, with what to check."""
    return ShardError(e.uri, f"{e.reason}; {storage.REACH_HINT}")


def _manifest_path(directory: str | os.PathLike) -> str:
    return storage.join(str(directory), MANIFEST_NAME)


def verify(directory: str | os.PathLike, check_hashes: bool = True) -> Manifest:
    """Check a prepared directory against its manifest and return the manifest.

    Every listed shard must exist with a valid header, the manifest's dtype and token count and a matching size;
    with check_hashes its sha256 must match too (reads every byte). A shard-named file the manifest does not list
    is an error (a stale file from another run); temporary files of an interrupted write are never shards.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    listed = set()
    for split_name, split in manifest.splits.items():
        total = 0
        for info in split.shards:
            path = directory / info.name
            listed.add(info.name)
            dtype, num_tokens = read_header(path)
            if dtype.name != manifest.dtype:
                raise ShardError(path, f"holds {dtype.name} tokens but the manifest says {manifest.dtype}")
            if num_tokens != info.num_tokens:
                raise ShardError(path, f"holds {num_tokens} tokens but the manifest lists {info.num_tokens}")
            if check_hashes:
                digest = sha256_file(path)
                if digest != info.sha256:
                    raise ShardError(path, f"corrupted: sha256 {digest[:16]}... differs from the manifest's {info.sha256[:16]}...")
            total += num_tokens
        if total != split.num_tokens:
            raise ShardError(directory / MANIFEST_NAME, f"{split_name} shards hold {total} tokens, the manifest says {split.num_tokens}")
    for path in sorted(directory.iterdir()):
        if SHARD_NAME.match(path.name) and path.name not in listed:
            raise ShardError(path, f"not listed in {MANIFEST_NAME}: a stale shard from another preparation")
        if TEMP_MARKER in path.name:
            log.warning("%s: temporary file of an interrupted write (ignored; safe to delete)", path)
    return manifest


def load_split(directory: str | os.PathLike, split: str) -> list[np.ndarray]:
    """The shards of one split, in order, as memmaps, after verify(check_hashes=False).

    A directory without manifest.json but with llm.c-style shards (`*{split}_*.bin`, e.g. modded-nanogpt's
    fineweb_val_000000.bin) is read by name order with header checks only: there is no manifest to hash against.
    """
    directory = Path(directory)
    if not (directory / MANIFEST_NAME).exists():
        paths = sorted(p for p in directory.glob(f"*{split}_*.bin") if TEMP_MARKER not in p.name)
        if paths:
            log.warning("%s has no %s: reading %d %s shards by name, headers checked, no hashes",
                        directory, MANIFEST_NAME, len(paths), split)
            return [read_shard(p) for p in paths]
    manifest = verify(directory, check_hashes=False)
    if split not in manifest.splits:
        raise ShardError(directory / MANIFEST_NAME, f"has no {split!r} split (splits: {', '.join(manifest.splits)})")
    return [read_shard(directory / s.name) for s in manifest.splits[split].shards]


# ------------------------------------------------------------------------------------------ shard planning


def plan_shards(piece_sizes: Iterable[int], shard_size: int) -> list[list[tuple[int, int, int]]]:
    """Cut a stream made of pieces (their token counts, in order) into shards of `shard_size` tokens.

    Returns, per shard, the (piece index, start, stop) token ranges that fill it in order; only the last shard
    may be shorter. An empty stream gives no shards.
    """
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    shards: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = shard_size
    for index, size in enumerate(piece_sizes):
        start = 0
        while start < size:
            take = min(room, size - start)
            current.append((index, start, start + take))
            start += take
            room -= take
            if room == 0:
                shards.append(current)
                current, room = [], shard_size
    if current:
        shards.append(current)
    return shards
