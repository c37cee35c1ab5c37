"""Shared fixtures: one real Ray local cluster per test session, and the shared corpus and tiktoken cache.

The corpus and the tiktoken cache come from the environment, never from a hard-coded path:
    NANOGPT_TINYSHAKESPEARE=/path/to/input.txt TIKTOKEN_CACHE_DIR=/path/to/tiktoken_cache pytest
Tests that need them are skipped (with the reason) when the variables are unset.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray local cluster shared by the whole session (ray.init costs ~7 s and ~1.4 GB)."""
    import ray

    # Unix socket paths are limited to 107 bytes: a pytest tmp_path is too deep for Ray's temp dir.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    # The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner asks whether a controller is
    # dead: without it, the workers' placement groups of sweep trials stopped early are never removed. The cleaner
    # finds the API by RAY_API_SERVER_ADDRESS (inherited by every Ray process started here), else by scanning the
    # machine, which fails while other Ray instances run beside this one.
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _temp_dir=temp_dir, log_to_driver=True)
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    path = os.environ.get("NANOGPT_TINYSHAKESPEARE")
    if not path:
        pytest.skip("NANOGPT_TINYSHAKESPEARE is not set (path to Tiny Shakespeare's input.txt)")
    if not Path(path).is_file():
        pytest.fail(f"NANOGPT_TINYSHAKESPEARE={path} is not a file")
    return Path(path)


@pytest.fixture(scope="session")
def tiktoken_cache() -> Path:
    path = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not path:
        pytest.skip("TIKTOKEN_CACHE_DIR is not set (a pre-seeded tiktoken cache with the GPT-2 files)")
    return Path(path)
