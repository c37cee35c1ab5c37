"""A large file written past the page cache (O_DIRECT) where the file system allows it, else the usual way.

A shard is written once and read later, often by other processes on other nodes. Through the page cache, each
4 KiB of it costs a page allocation, which on a VM can be most of the write (bench/NOTES.md: a 105 MB shard took
0.27 s buffered, 0.06 s direct, fsync included), and the written shards evict what the cache held. O_DIRECT needs
the buffer's address, the file offset and the length aligned to the device's block: an aligned staging buffer
takes any bytes, the last block is padded, and the file is truncated back to its length. Where the flag is refused
(macOS, some network and FUSE file systems, tmpfs on older kernels), the file is written through the cache.

    with open(tmp, "wb") as f:
        write_chunks(f, [header, tokens])      # bytes-like chunks, back to back from offset 0
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence
from typing import BinaryIO

ALIGN = 4096
"""A multiple of every device's logical block size (512 or 4096 bytes): what O_DIRECT aligns to."""
STAGING_BYTES = 4 << 20
"""Bytes per direct write: large enough that a write's fixed cost is small, small enough to allocate per file."""


def write_chunks(file: BinaryIO, chunks: Sequence[memoryview], direct: bool = True) -> None:
    """Write `chunks` back to back into the empty `file`: past the page cache where its file system allows, unless
    not `direct` (a file read back at once, which the cache then serves)."""
    fd = file.fileno()
    if direct and _set_direct(fd, True):
        try:
            length = _write_staged(fd, chunks)
            os.ftruncate(fd, length)
            os.lseek(fd, length, os.SEEK_SET)  # the position was past the padding: a later write continues the file
            return
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: the file system took the flag but not the I/O; anything else is real
                raise
        finally:
            _set_direct(fd, False)
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
    for chunk in chunks:
        file.write(chunk)


def _write_staged(fd: int, chunks: Sequence[memoryview]) -> int:
    """Copy the chunks through an aligned buffer into direct writes; the number of bytes they hold."""
    # Anonymous memory is page-aligned. Not closed by hand: a slice in flight when a write fails still refers to it.
    view, used, total = memoryview(mmap.mmap(-1, STAGING_BYTES)), 0, 0
    for chunk in chunks:
        chunk = memoryview(chunk).cast("B")
        while chunk:
            n = min(len(chunk), STAGING_BYTES - used)
            view[used:used + n], chunk, used = chunk[:n], chunk[n:], used + n
            if used == STAGING_BYTES:
                _write_all(fd, view)
                total, used = total + used, 0
    if used:
        _write_all(fd, view[:-(-used // ALIGN) * ALIGN])  # the last block padded; truncated back after
    return total + used


def _write_all(fd: int, view: memoryview) -> None:
    written = 0
    while written < len(view):  # a short write that left the rest unaligned fails the next with EINVAL
        written += os.write(fd, view[written:])


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False where the platform or the file system refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    import fcntl  # POSIX only; this module is imported on every platform

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return True
