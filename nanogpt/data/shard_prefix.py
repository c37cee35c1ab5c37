"""pipelines/prepare.py's output at a URI prefix (`--out s3://bucket/shards`, any pyarrow URI): what shard_dir.py
does for a directory, done with objects. `ShardPrefix` is its implementation of the shard-output interface
(nanogpt/data/shard_output.py).

    check_owned("s3://bucket/shards")          # ShardError when the prefix holds objects prepare did not write
    remove_output("s3://bucket/shards")        # manifest first (the output stops looking complete), then shards
    upload_shard("/tmp/x/train_000000.bin", "s3://bucket/shards/train_000000.bin")
    write_manifest("s3://bucket/shards", manifest)                   # last

As atomic as an object store allows: each shard is one object that appears only when its upload completes (no
half-written shard is ever visible under its name), and manifest.json is removed first and written last, so a
prefix whose manifest is there is complete. Object stores have no lock: two prepares into one prefix at the same
time are not prevented; run one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from nanogpt.data.shard_dir import is_own_file
from nanogpt.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SHARD_NAME,
    Manifest,
    ShardError,
    ShardInfo,
    shard_file_bytes,
    store_error,
    write_shard,
)
from nanogpt.data.storage import (
    StorageError,
    join,
    list_names,
    read_bytes,
    remove,
    size,
    upload,
    write_bytes,
)


@dataclass(frozen=True)
class ShardPrefix:
    """prepare's output at a URI prefix: no lock (object stores have none), each shard written on the task's node and
    uploaded as one object, an existing output checked by the size of each shard (hashing would download them all;
    each training node hashes its download)."""

    location: str
    verified_by: ClassVar[str] = "size"

    def lock(self) -> AbstractContextManager:
        return contextlib.nullcontext()

    def check_owned(self) -> None:
        check_owned(self.location)

    def has_manifest(self) -> bool:
        return manifest_exists(self.location)

    def check_shards(self, manifest: Manifest) -> Manifest:
        check_sizes(self.location, manifest)
        return manifest

    def remove_output(self) -> None:
        remove_output(self.location)

    def write_shard(self, name: str, tokens: Sequence[np.ndarray], vocab_size: int) -> ShardInfo:
        with tempfile.TemporaryDirectory(prefix="nanogpt-shard-") as tmp:  # on the task's node; one shard at a time
            local = os.path.join(tmp, name)
            info = write_shard(local, tokens, vocab_size, direct=False)  # read back at once by the upload
            upload_shard(local, join(self.location, name))  # one object, visible when its upload completes
        return info

    def write_manifest(self, manifest: Manifest) -> None:
        write_manifest(self.location, manifest)


def check_owned(prefix: str) -> None:
    """Raise ShardError unless the prefix is prepare's to rewrite: empty, holding a manifest of ours, or holding
    only shards."""
    names = _listed(prefix)
    if MANIFEST_NAME in names and _is_own_manifest(join(prefix, MANIFEST_NAME)):
        return
    foreign = [n for n in names if not is_own_file(n)]
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ShardError(prefix, f"holds objects that prepare did not write ({listed}) and no {MANIFEST_NAME}: "
                         "choose a new or empty --out prefix (prepare only ever removes its own shards)")


def manifest_exists(prefix: str) -> bool:
    uri = join(prefix, MANIFEST_NAME)
    return _store(size, uri) is not None


def remove_output(prefix: str) -> None:
    """Remove the manifest first, then every shard-named object."""
    _store(remove, join(prefix, MANIFEST_NAME))
    for name in _listed(prefix):
        if SHARD_NAME.match(name):
            _store(remove, join(prefix, name))


def upload_shard(local_path: str | os.PathLike, uri: str) -> None:
    _store(upload, local_path, uri)


def write_manifest(prefix: str, manifest: Manifest) -> str:
    uri = join(prefix, MANIFEST_NAME)
    _store(write_bytes, uri, manifest.to_json().encode())
    return uri


def check_sizes(prefix: str, manifest: Manifest) -> None:
    """Every shard the manifest lists is an object of the size its token count gives (hashes are checked by each
    node as it downloads: nanogpt/data/shard_cache.py)."""
    for split in manifest.splits.values():
        for info in split.shards:
            uri = join(prefix, info.name)
            expected = shard_file_bytes(info, manifest.dtype)
            found = _store(size, uri)
            if found != expected:
                raise ShardError(uri, "missing" if found is None else f"{found} bytes, expected {expected}")


def _is_own_manifest(uri: str) -> bool:
    try:
        return json.loads(_store(read_bytes, uri)).get("format") == MANIFEST_FORMAT
    except (ValueError, AttributeError):
        return False


def _listed(prefix: str) -> list[str]:
    return _store(list_names, prefix)


def _store(fn, *args):
    """fn(*args), a store's failure raised as the ShardError naming the object."""
    try:
        return fn(*args)
    except StorageError as e:
        raise store_error(e) from None
