"""A node's local copy of token shards kept in object storage (`data.dir=s3://bucket/prefix`, any pyarrow URI).

    cached = fetch_shards("s3://bucket/shakespeare", "~/.cache/nanogpt-ray/shards")
    shards.load_split(cached.dir, "train")     # memory-mapped local files, as for a local data.dir

The copy lives in `<cache_root>/<16 hex digits of sha256(uri)>/`: the shards, then `manifest.json`, written last
(the same rule as pipelines/prepare.py: a directory whose manifest is there is complete).
- One download per node: every worker calls `fetch_shards`; an flock on `<copy>.lock` lets the first one download
  while the others wait, then find the copy complete.
- Reuse: the next run, or a restarted worker, finds the cached manifest equal to the store's and every shard with
  its header and size; nothing is downloaded. When the store's manifest changed (the data were prepared again),
  only the shards whose sha256 differ are fetched.
- Each shard is hashed as it downloads and must match the manifest's sha256: a damaged object is an error naming
  its URI and the command that rebuilds it (prepare --force), and nothing of it is kept. A store that cannot be
  reached is an error naming the URI.
- The disk is checked before the first byte: a copy that would not fit is an error naming the cache directory,
  the bytes it needs and the bytes free (before step 0, never a crash mid-run).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nanogpt.data.shards import (
    MANIFEST_NAME,
    TEMP_MARKER,
    Manifest,
    ShardError,
    ShardInfo,
    atomic_write,
    manifest_text,
    read_header,
    sha256_file,
    shard_file_bytes,
    verify,
    write_error,
)
from nanogpt.data.storage import StorageError, download, is_uri, join, node_lock

log = logging.getLogger(__name__)

DEFAULT_CACHE_ROOT = "~/.cache/nanogpt-ray/shards"
SPACE_MARGIN_BYTES = 64 << 20
"""Left free beside the copy: a disk filled to the last byte breaks the checkpoints written next."""


@dataclass(frozen=True)
class CachedShards:
    dir: str
    """The local directory to read: shards and manifest.json."""
    downloaded: int
    """Shards this call downloaded (0: the copy was complete, made by an earlier run or another worker)."""


def fetch_shards(uri: str, cache_root: str | os.PathLike | None = None) -> CachedShards:
    """The local copy of the shards at `uri`, downloaded where missing or different (see the module docstring)."""
    root = Path(cache_root or DEFAULT_CACHE_ROOT).expanduser()
    copy = root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    lock = copy.with_name(copy.name + ".lock")
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock.touch()
    except OSError as e:
        raise write_error(root, e, "cannot create the shard cache") from None
    with node_lock(lock):
        text, manifest = _remote_manifest(uri)
        if _is_complete(copy, text):
            return CachedShards(str(copy), 0)
        downloaded = _fill(uri, copy, manifest, text)
    return CachedShards(str(copy), downloaded)


def local_shards(data_dir: str, cache_root: str | os.PathLike | None = None) -> str:
    """`data_dir` itself when it is a local path; for a URI, this node's verified copy (fetched if needed)."""
    return fetch_shards(data_dir, cache_root).dir if is_uri(data_dir) else data_dir


def _remote_manifest(uri: str) -> tuple[str, Manifest]:
    """The store's manifest.json, its text and parsed: ShardError naming it when it cannot be read or is invalid."""
    text = manifest_text(uri)
    try:
        return text, Manifest.from_json(text)
    except (ValueError, TypeError, KeyError) as e:
        raise ShardError(join(uri, MANIFEST_NAME), f"invalid manifest ({type(e).__name__}: {e})") from None


def _is_complete(copy: Path, text: str) -> bool:
    """The copy holds this manifest and every shard it lists, with headers and sizes that match."""
    try:
        if (copy / MANIFEST_NAME).read_text() != text:
            return False
        verify(copy, check_hashes=False)
        return True
    except (OSError, ShardError):
        return False


def _fill(uri: str, copy: Path, manifest: Manifest, text: str) -> int:
    """Make `copy` hold `manifest`'s shards (downloading those missing or different), then write the manifest."""
    start = time.perf_counter()
    copy.mkdir(exist_ok=True)
    (copy / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until the manifest is written back, last
    wanted = {s.name: s for split in manifest.splits.values() for s in split.shards}
    for path in copy.iterdir():  # our own directory: shards of an older preparation, a killed download's leftovers
        if path.name not in wanted or TEMP_MARKER in path.name:
            path.unlink()
    missing = [s for s in wanted.values() if not _holds(copy / s.name, s)]
    _check_space(copy, uri, [shard_file_bytes(s, manifest.dtype) for s in missing])
    for info in missing:
        _download_shard(uri, info, copy / info.name)
    with atomic_write(copy / MANIFEST_NAME, "w") as f:
        f.write(text)
    verify(copy, check_hashes=False)
    total = sum(shard_file_bytes(s, manifest.dtype) for s in missing)
    log.info("fetched %d of %d shards (%.1f MB) from %s into %s in %.1f s", len(missing), len(wanted), total / 1e6,
             uri, copy, time.perf_counter() - start)
    return len(missing)


def _holds(path: Path, info: ShardInfo) -> bool:
    """A local shard with the manifest's sha256 (a shard of the same name may be another preparation's)."""
    try:
        read_header(path)
        return sha256_file(path) == info.sha256
    except (OSError, ShardError):
        return False


def _check_space(copy: Path, uri: str, sizes: list[int]) -> None:
    need, free = sum(sizes), shutil.disk_usage(copy).free
    if sizes and need + SPACE_MARGIN_BYTES > free:
        raise ShardError(copy, f"the shard cache needs {_bytes(need)} for {len(sizes)} shards of {uri} but its disk "
                         f"has {_bytes(free)} free (keeping {_bytes(SPACE_MARGIN_BYTES)} spare): free space, or point "
                         "--data.cache_dir at a larger disk")


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} bytes"


def _download_shard(prefix: str, info: ShardInfo, path: Path) -> None:
    """Download to a temporary name, check the sha256, then rename: a shard in the copy is always a whole one."""
    uri = join(prefix, info.name)
    tmp = path.with_name(f".{path.name}{TEMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    sha = hashlib.sha256()
    try:
        download(uri, tmp, sha)
        if sha.hexdigest() != info.sha256:
            # prepare's up-to-date check of an object store compares sizes only (hashing would download it all)
            raise ShardError(uri, f"damaged in the store: sha256 {sha.hexdigest()[:16]}... differs from the "
                             f"manifest's {info.sha256[:16]}... (or a prepare is rewriting the prefix right now); "
                             f"prepare the data again with --force (pipelines/prepare.py --out {prefix} --force, "
                             "with the input and settings its manifest.json records): without --force prepare "
                             "checks only sizes in object storage and finds the shards up to date")
        os.replace(tmp, path)
    except StorageError as e:
        raise ShardError(uri, f"cannot be downloaded ({e})") from None
    except OSError as e:  # writing the local copy: a full disk, no permission
        raise write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
