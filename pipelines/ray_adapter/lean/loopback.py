"""Loopback for a local instance started by a process that imported ray before it decided to start one (a notebook,
a test session, pipelines/prepare.py, which imports ray at its top).

Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ray is imported, into the constant that makes a new node's
address 127.0.0.1 (and so every server of the instance bind to loopback). pipelines/ray_adapter/session.py sets the
variable before the import where it can; after the import only the constant itself can still be set, and that
constant is private. Security, not speed: session.py uses this whatever run.lean says, under the Ray release the wing
was written for (under another one it refuses to start the instance).
"""

from __future__ import annotations

from ray._private import ray_constants


def read_loopback_setting_again() -> None:
    """Make this process's Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (set by session.py) as its import would have."""
    import os

    ray_constants.ENABLE_RAY_CLUSTER = os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] != "0"
