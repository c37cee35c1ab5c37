"""A node's shared copy of a checkpoint in object storage (nanogpt/checkpoint/node_copy.py), against a real S3 API on
127.0.0.1: the ranks of a node that resume together download it once and no rank rewrites files another reads
(Ray's Checkpoint.as_directory did: a late rank downloaded again over a copy being read)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.checkpoint.node_copy import READER_MARK, node_copy
from nanogpt.data import storage
from nanogpt.data.storage import StorageError

pytest_plugins = ("tests.s3_server",)
REPO = Path(__file__).resolve().parents[1]
FILES = {"model.safetensors": os.urandom(300_000), "optimizer.pt": os.urandom(500_000), "state.json": b"{}"}

HOLD = """
import sys
from nanogpt.checkpoint.node_copy import node_copy
with node_copy(sys.argv[1], sys.argv[2]) as d:
    print(d, flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def checkpoint_uri(s3) -> str:
    uri = s3.bucket_uri("runs/r1/checkpoint_000020")
    for name, data in FILES.items():
        storage.write_bytes(storage.join(uri, name), data)
    return uri


def _snapshot(d: str) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(d).iterdir()}


def test_readers_of_one_node_share_one_copy_and_the_last_removes_it(checkpoint_uri, tmp_path):
    root = tmp_path / "copies"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, checkpoint_uri, str(root)], text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        held = holder.stdout.readline().strip()
        before = _snapshot(held)
        with node_copy(checkpoint_uri, root) as d:
            assert d == held and _snapshot(d) == before  # read as it is, not downloaded again over the reader
            assert {n: (Path(d) / n).read_bytes() for n in FILES} == FILES
            holder.communicate("\n", timeout=60)  # the other reader leaves first: the copy stays for this one
            assert holder.returncode == 0 and Path(d).is_dir()
    finally:
        holder.kill()
    assert not Path(held).exists()  # the last reader removed it
    assert not list(root.glob(f"*{READER_MARK}*"))


def test_a_copy_left_by_a_killed_reader_is_downloaded_again(checkpoint_uri, tmp_path):
    root = tmp_path / "copies"
    with node_copy(checkpoint_uri, root) as d:
        stale = Path(d)
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"cut short")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    Path(f"{stale}{READER_MARK}{dead.stdout.strip()}").touch()  # its reader was killed before it could leave

    with node_copy(checkpoint_uri, root) as d:
        assert (Path(d) / "optimizer.pt").read_bytes() == FILES["optimizer.pt"]
    assert not stale.exists() and not list(root.glob(f"*{READER_MARK}*"))


def test_a_uri_without_files_is_an_error_naming_it(s3, tmp_path):
    empty = s3.bucket_uri("runs/r1/checkpoint_000099")
    with pytest.raises(StorageError, match=f"{empty}: holds no files"):
        with node_copy(empty, tmp_path):
            pass
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]  # no copy, nothing half-made


def test_copies_and_their_locks_live_in_the_users_cache(checkpoint_uri, tmp_path, monkeypatch):
    """Not in /tmp, where any user of the machine can plant a copy or hold the lock."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with node_copy(checkpoint_uri) as d:
        copy = Path(d)
        assert copy.parent == tmp_path / "cache" / "nanogpt-ray" / "checkpoints"
        assert (copy.parent / f"{copy.name}.lock").is_file()
        assert (copy / "state.json").read_bytes() == FILES["state.json"]
        assert copy.parent.stat().st_mode & 0o077 == 0  # the user's alone
