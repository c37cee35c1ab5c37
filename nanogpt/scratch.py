"""A process's scratch directories on its node (a checkpoint written just before it is reported, rank 0's local
copy of the run's records), and their reclaiming once that process is gone.

A process that dies holding one never reaches its cleanup: a worker killed while it waits in its report (a trial
that Tune stops, a preempted rank, the fault rehearsals) leaves a whole checkpoint behind in the node's temporary
directory, and on a long-lived GPU node a sweep's stopped trials add up to gigabytes. So each directory carries its
process's id (and the pid namespace it is counted in) in its name, and every new one first removes those of its
kind whose process no longer exists.

    from nanogpt.scratch import scratch_dir
    staging = scratch_dir("staging")   # <tmp>/nanogpt-staging-<namespace>-<pid>-<random>
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = ("staging", "records")
"""The kinds of scratch directory, each its own name prefix: a reclaim only looks at its own kind's."""


def scratch_dir(kind: str) -> Path:
    """A new, empty directory of `kind` for this process, in the system's temporary directory; removes the
    directories of that kind left by processes that no longer exist."""
    if kind not in KINDS:
        raise ValueError(f"unknown scratch directory kind {kind!r}; one of {KINDS}")
    root = Path(tempfile.gettempdir())
    namespace = pid_namespace()
    reclaim(root, kind, namespace)
    return Path(tempfile.mkdtemp(prefix=f"nanogpt-{kind}-{namespace}-{os.getpid()}-", dir=root))


def reclaim(root: Path, kind: str, namespace: str) -> list[Path]:
    """Remove `root`'s directories of `kind` made in `namespace` by a process that is gone; returns them. A process
    id counted in another pid namespace (a container beside this one, sharing the directory) says nothing here:
    those are left alone, as is a directory whose process id was reused by a live process."""
    pattern = re.compile(rf"nanogpt-{re.escape(kind)}-{re.escape(namespace)}-(\d+)-")
    removed = []
    for path in root.glob(f"nanogpt-{kind}-{namespace}-*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d %s director%s left in %s by processes that have ended", len(removed), kind,
                 "y" if len(removed) == 1 else "ies", root)
    return removed


def pid_namespace() -> str:
    """The pid namespace this process counts ids in (Linux: its inode), else the host name: only ids counted in
    the same one can be checked."""
    try:
        return re.sub(r"\D", "", os.readlink("/proc/self/ns/pid")) or socket.gethostname()
    except OSError:
        return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
