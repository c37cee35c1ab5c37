"""A node's local copy of a checkpoint kept in object storage, shared by the processes that read it at once:

    with node_copy("s3://bucket/runs/r1/checkpoint_000020") as local_dir:
        checkpoint = load_checkpoint(local_dir)

- The copies live in this user's cache, `$XDG_CACHE_HOME/nanogpt-ray/checkpoints` (default
  `~/.cache/nanogpt-ray/checkpoints`), not in /tmp: another user of the machine could plant a copy or a lock there.
- One download per node: the ranks of a node that resume together enter under an flock on `<copy>.lock`; the
  first downloads into `<copy>.partial-<pid>` and renames it to `<copy>` when every file is there; the others find
  the copy and read the same files. Nothing rewrites a copy that a live process reads.
- Each reader leaves a marker `<copy>.reader-<pid>` while it reads; the last to leave removes the copy. A reader
  that was killed leaves its marker behind: markers of processes that no longer run do not count, and a copy with
  no live reader is downloaded again rather than trusted.
- A store that cannot be reached, or a URI that holds no files, is a StorageError naming the URI.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nanogpt.data.storage import StorageError, download, join, list_names, node_lock
from nanogpt.user_cache import user_cache_dir

READER_MARK = ".reader-"


@contextmanager
def node_copy(uri: str, root: str | os.PathLike | None = None) -> Iterator[str]:
    """The checkpoint directory at `uri` as a local directory, for the block (see the module docstring)."""
    root = Path(root or user_cache_dir() / "checkpoints")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    copy = root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    lock, reader = copy.with_name(copy.name + ".lock"), copy.with_name(f"{copy.name}{READER_MARK}{os.getpid()}")
    with node_lock(lock):
        if not (copy.is_dir() and _live_readers(copy)):
            shutil.rmtree(copy, ignore_errors=True)
            _download(uri, copy)
        reader.touch()
    try:
        yield str(copy)
    finally:
        with node_lock(lock):
            reader.unlink(missing_ok=True)
            if not _live_readers(copy):
                shutil.rmtree(copy, ignore_errors=True)


def _download(uri: str, copy: Path) -> None:
    staging = copy.with_name(f"{copy.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        names = list_names(uri)
        if not names:
            raise StorageError(uri, "holds no files (is it a checkpoint directory?)")
        for name in names:
            download(join(uri, name), staging / name)
        staging.rename(copy)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _live_readers(copy: Path) -> list[Path]:
    """The copy's reader markers whose process still runs; the others are removed."""
    live = []
    for marker in copy.parent.glob(f"{copy.name}{READER_MARK}*"):
        if _running(int(marker.name.rsplit("-", 1)[1])):
            live.append(marker)
        else:
            marker.unlink(missing_ok=True)
    return live


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
