"""The output directory of pipelines/prepare.py: one writer at a time, and no file touched that prepare did not write.
`ShardDir` is its implementation of the shard-output interface (nanogpt/data/shard_output.py).

    with lock_shard_dir(out):     # ShardError naming the holder (pid, host, start) when another run holds it
        check_owned(out)          # ShardError when `out` holds someone else's files and no manifest
        ...                       # read the manifest, remove the old shards, write the new ones

The lock is `fcntl.flock` on `<out>/.prepare.lock`: the kernel drops it when its holder exits, killed or not, so it
never outlives a process. The file holds the holder's pid, host and start time for the error message of the next
run; a dot file whose name matches no shard, it does not make the directory look prepared. flock works across
the processes of one machine and over NFS v4 (Linux emulates it with POSIX locks there).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import numpy as np

from nanogpt.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    SHARD_NAME,
    TEMP_MARKER,
    Manifest,
    ShardError,
    ShardInfo,
    fsync_dir,
    verify,
    write_error,
    write_manifest,
    write_shard,
)

LOCK_NAME = ".prepare.lock"


@dataclass(frozen=True)
class ShardDir:
    """prepare's output in a directory (local, or a filesystem every node mounts): flock-ed, each shard written in
    place by the task that makes it (temporary name, fsync, rename), an existing output checked by sha256."""

    location: str
    verified_by: ClassVar[str] = "sha256"

    def lock(self) -> AbstractContextManager:
        return lock_shard_dir(self.location)

    def check_owned(self) -> None:
        check_owned(self.location)

    def has_manifest(self) -> bool:
        return (Path(self.location) / MANIFEST_NAME).exists()

    def check_shards(self, manifest: Manifest) -> Manifest:
        """Every shard of the output as its manifest lists it, hashed (a damaged one is a rebuild, not a no-op)."""
        return verify(self.location, check_hashes=True)

    def remove_output(self) -> None:
        """The manifest first (the output stops looking complete), then shards and stray temporary files."""
        directory = Path(self.location)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / MANIFEST_NAME
        if manifest.exists():
            _remove(manifest)
            fsync_dir(directory)
        for path in directory.iterdir():
            if SHARD_NAME.match(path.name) or (TEMP_MARKER in path.name and path.name.startswith(".")):
                _remove(path)

    def write_shard(self, name: str, tokens: Sequence[np.ndarray], vocab_size: int) -> ShardInfo:
        return write_shard(Path(self.location) / name, tokens, vocab_size)

    def write_manifest(self, manifest: Manifest) -> None:
        write_manifest(self.location, manifest)


@contextmanager
def lock_shard_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of `directory` (created if missing) for the `with` block; yields the lock file.

    Fails at once, without waiting, when another process holds it. On exit the lock file is removed, and so is the
    directory when this call created it and nothing else was written into it.
    """
    directory = Path(directory)
    created = _make_dir(directory)
    path = directory / LOCK_NAME
    fd = _acquire(path)
    try:
        _write_holder(path, fd)
        yield path
    finally:
        path.unlink(missing_ok=True)  # before the release: see _acquire for why a waiter still gets a valid lock
        os.close(fd)
        if created and not any(directory.iterdir()):
            directory.rmdir()


def describe_holder(text: str) -> str:
    """Who holds a lock, in words, from what its holder wrote into the lock file."""
    try:
        info = json.loads(text or "{}")
    except ValueError:
        info = None
    if not isinstance(info, dict):
        return "holder unknown"
    if not info:
        return "holder unknown: it is still starting"
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started_at')}"


def check_owned(directory: str | os.PathLike) -> None:
    """Raise ShardError unless `directory` is prepare's to rewrite: missing, empty, holding a manifest of ours, or
    holding only files prepare writes (shards, temporary files and the lock of a run that was killed)."""
    directory = Path(directory)
    if not directory.is_dir() or _has_own_manifest(directory):
        return
    foreign = sorted(p.name for p in directory.iterdir() if not is_own_file(p.name))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ShardError(
            directory, f"holds files that prepare did not write ({listed}) and no {MANIFEST_NAME}: not a shard "
            "directory; choose a new or empty --out (prepare only ever removes its own train_*.bin / val_*.bin)"
        )


def is_own_file(name: str) -> bool:
    """A name prepare writes into its output directory (the manifest aside)."""
    return bool(SHARD_NAME.match(name)) or (name.startswith(".") and TEMP_MARKER in name) or name == LOCK_NAME


def _has_own_manifest(directory: Path) -> bool:
    """manifest.json exists and says it is ours (any version): another tool's manifest.json is someone's file."""
    try:
        return json.loads((directory / MANIFEST_NAME).read_text()).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _make_dir(directory: Path) -> bool:
    """Create `directory` (and its parents) if missing; True when this call created it."""
    if directory.is_dir():
        return False
    try:
        directory.mkdir(parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise ShardError(directory, "exists and is not a directory") from None
        return False  # another process created it meanwhile
    except OSError as e:
        raise write_error(Path(e.filename or directory), e, "cannot create the directory") from None
    return True


def _acquire(path: Path) -> int:
    """An fd of `path` holding its exclusive flock. A holder removes the file before releasing it: whoever locked
    the removed file's inode meanwhile sees that the path now names another file (or none), and tries again."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(path, e, "cannot create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = describe_holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise write_error(path, e, "cannot lock") from None
            raise ShardError(
                path.parent, f"locked by another prepare ({holder}; lock file {path}): wait for it to finish, or "
                "stop it (the lock goes with its process)"
            ) from None
        if _names_file(path, fd):
            return fd
        os.close(fd)


def _names_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _write_holder(path: Path, fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
    except OSError as e:
        raise write_error(path, e) from None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise write_error(path, e, "cannot remove") from None
