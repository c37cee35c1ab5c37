"""Where this user's caches live: $XDG_CACHE_HOME/nanogpt-ray, else ~/.cache/nanogpt-ray (the XDG base-directory
default). Per user, unlike /tmp, where any user of the machine can plant a file or a lock for another to trust.

    user_cache_dir() / "checkpoints"      # nanogpt/checkpoint/node_copy.py: a node's copies of checkpoints in a store
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_NAME = "nanogpt-ray"


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / CACHE_DIR_NAME
