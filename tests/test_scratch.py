"""Scratch directories (nanogpt/scratch.py): a process's own are named for it, and those of a process that died
holding them (a worker killed in its report) are removed by the next one made on the node; nothing else is."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from nanogpt.scratch import pid_namespace, scratch_dir


@pytest.fixture
def tmp_root(tmp_path, monkeypatch):
    """The system's temporary directory, as tempfile sees it, moved to this test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def left_behind(root, kind: str, namespace: str, pid: int):
    path = root / f"nanogpt-{kind}-{namespace}-{pid}-abc123"
    (path / "checkpoint_000010").mkdir(parents=True)
    (path / "checkpoint_000010" / "model.safetensors").write_bytes(b"weights")
    return path


def test_a_dead_processs_directory_goes_and_everything_else_stays(tmp_root):
    namespace, dead = pid_namespace(), ended_pid()
    gone = left_behind(tmp_root, "staging", namespace, dead)
    live = left_behind(tmp_root, "staging", namespace, os.getpid())
    other_kind = left_behind(tmp_root, "records", namespace, dead)  # reclaimed only when a records dir is made
    other_namespace = left_behind(tmp_root, "staging", "4026530000", dead)  # its ids are not ours to check
    unrelated = tmp_root / "nanogpt-staging-notes"
    unrelated.mkdir()

    made = scratch_dir("staging")
    assert made.is_dir() and list(made.iterdir()) == [] and made.parent == tmp_root
    assert made.name.startswith(f"nanogpt-staging-{namespace}-{os.getpid()}-")
    assert not gone.exists()
    assert all(p.is_dir() for p in (live, other_kind, other_namespace, unrelated))

    records = scratch_dir("records")
    assert not other_kind.exists() and records.is_dir() and made.is_dir()  # its own kind's reclaim, not ours


def test_an_unknown_kind_is_an_error_naming_it(tmp_root):
    with pytest.raises(ValueError, match="unknown scratch directory kind 'ckpt'; one of"):
        scratch_dir("ckpt")
    assert list(tmp_root.iterdir()) == []
