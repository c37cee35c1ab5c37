"""Where files live: a local path or a URI (s3://bucket/key, gs://...). The one place that tells them apart, and
the one place that reads and writes objects (through pyarrow's filesystems, imported only for URIs).

    is_uri("s3://bucket/runs")              # True
    join("s3://bucket/runs", "r1")          # "s3://bucket/runs/r1"
    exists("gs://bucket/runs/r1/state.json")
    write_bytes("s3://bucket/shards/manifest.json", text.encode())   # one PUT: the object is all there or absent
    download("s3://bucket/shards/train_000000.bin", "/cache/.train_000000.bin.tmp", hasher)

S3 endpoints and credentials come from the environment as for every AWS tool (AWS_ENDPOINT_URL, AWS_REGION,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or the instance's role); nothing is stored in files here. An object
store that cannot be reached, or a missing object, raises StorageError naming the URI.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 24
REACH_HINT = "check the URI, that the store is reachable and its credentials (AWS_* variables, the node's role)"


class StorageError(OSError):
    """Reading or writing a URI failed: the message names the URI and the store's reason."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def __reduce__(self):  # keep (uri, reason) across a process boundary (Ray tasks)
        return (type(self), (self.uri, self.reason))


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for `scheme://...` (object storage, file://); False for a filesystem path."""
    return path is not None and "://" in str(path)


def resolve_local(path: str | os.PathLike) -> str:
    """An absolute local path (`~` expanded, symlinks resolved); a URI as is."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_uri(base) else os.path.join(base, name)


def exists(path: str) -> bool:
    """A local path, or an object-store URI (through pyarrow's filesystems: s3, gs, hdfs)."""
    if not is_uri(path):
        return os.path.exists(path)
    return size(path) is not None


def size(uri: str) -> int | None:
    """The size in bytes of the object at `uri`; None when there is none."""
    fs, key = _filesystem(uri)
    info = _call(uri, "cannot read", fs.get_file_info, key)
    import pyarrow.fs

    if info.type == pyarrow.fs.FileType.NotFound:
        return None
    return info.size if info.type == pyarrow.fs.FileType.File else 0


def list_names(prefix: str) -> list[str]:
    """Names of the objects directly under the `prefix/` "directory", sorted ([] when there are none)."""
    import pyarrow.fs

    fs, key = _filesystem(prefix)
    selector = pyarrow.fs.FileSelector(key.rstrip("/"), allow_not_found=True, recursive=False)
    infos = _call(prefix, "cannot list", fs.get_file_info, selector)
    return sorted(os.path.basename(i.path) for i in infos if i.type == pyarrow.fs.FileType.File)


def list_entries(prefix: str) -> list[str]:
    """Names directly under the `prefix/` "directory", objects and directories (common prefixes) alike, sorted."""
    import pyarrow.fs

    fs, key = _filesystem(prefix)
    selector = pyarrow.fs.FileSelector(key.rstrip("/"), allow_not_found=True, recursive=False)
    return sorted(os.path.basename(i.path) for i in _call(prefix, "cannot list", fs.get_file_info, selector))


def read_bytes(uri: str) -> bytes:
    """The whole file at a local path, or the whole object at a URI; StorageError naming it when it cannot be read."""
    if not is_uri(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise StorageError(uri, "cannot read: no such file") from None
        except OSError as e:
            raise StorageError(uri, f"cannot read: {e.strerror or e}") from None
    fs, key = _filesystem(uri)
    with _call(uri, "cannot read", fs.open_input_stream, key) as f:
        return _call(uri, "cannot read", f.read)


def write_bytes(uri: str, data: bytes) -> None:
    """One object, written whole: object stores make it visible only when the upload completes."""
    fs, key = _filesystem(uri)
    with _call(uri, "cannot write", fs.open_output_stream, key) as f:
        _call(uri, "cannot write", f.write, data)


def upload(local_path: str | os.PathLike, uri: str) -> None:
    """Copy a local file to `uri` in chunks (a multipart upload on S3: the object appears when it completes)."""
    fs, key = _filesystem(uri)
    with open(local_path, "rb") as src, _call(uri, "cannot write", fs.open_output_stream, key) as dst:
        while chunk := src.read(CHUNK_BYTES):
            _call(uri, "cannot write", dst.write, chunk)


def download(uri: str, local_path: str | os.PathLike, hasher: Any = None) -> int:
    """Copy the object at `uri` into the local file `local_path`, feeding `hasher` (hashlib) on the way; the bytes
    copied. An OSError writing locally (a full disk) propagates as is: the caller names the file."""
    fs, key = _filesystem(uri)
    copied = 0
    with _call(uri, "cannot read", fs.open_input_stream, key) as src, open(local_path, "wb") as dst:
        while chunk := _call(uri, "cannot read", src.read, CHUNK_BYTES):
            if hasher is not None:
                hasher.update(chunk)
            dst.write(chunk)
            copied += len(chunk)
    return copied


def remove(uri: str) -> None:
    """Delete the object at `uri`; a missing one is fine."""
    if size(uri) is None:
        return
    fs, key = _filesystem(uri)
    _call(uri, "cannot delete", fs.delete_file, key)


@contextmanager
def node_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive flock on the local file `path` (created), waited for: how the processes of one node agree on
    who downloads a shared copy. The kernel drops it when its holder exits, killed or not. An OSError creating the
    file propagates: the caller names what the lock guards."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _filesystem(uri: str):
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise StorageError(uri, f"not a usable storage URI ({e})") from None


def _call(uri: str, action: str, fn, *args):
    try:
        return fn(*args)
    except FileNotFoundError:
        raise StorageError(uri, f"{action}: no such object") from None
    except (OSError, ValueError) as e:
        raise StorageError(uri, f"{action}: {e}") from None
