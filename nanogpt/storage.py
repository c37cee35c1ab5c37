"""Where files live: a local path or a URI (s3://bucket/key, gs://...). The one place that tells them apart.

    is_uri("s3://bucket/runs")              # True
    join("s3://bucket/runs", "r1")          # "s3://bucket/runs/r1"
    exists("gs://bucket/runs/r1/state.json")
"""

from __future__ import annotations

import os
from pathlib import Path


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
    import pyarrow.fs  # only for URIs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    return fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound
