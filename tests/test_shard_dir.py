"""prepare's output directory: an exclusive lock that names its holder and dies with it, and the rule that prepare
rewrites only a directory of its own. Real processes hold the lock; nothing is mocked."""

from __future__ import annotations

import json
import signal
import socket

import numpy as np
import pytest

from nanogpt.data.shard_dir import LOCK_NAME, check_owned, lock_shard_dir
from nanogpt.data.shards import ShardError, load_split, write_shard
from tests.conftest import hold_lock


def test_second_locker_fails_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        pattern = rf"{out}: locked by another prepare \(pid {holder.pid} on host {socket.gethostname()}, started 2"
        with pytest.raises(ShardError, match=pattern), lock_shard_dir(out):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_NAME).exists()  # a killed holder leaves its file, not its lock
    with lock_shard_dir(out) as lock:
        assert json.loads(lock.read_text())["pid"] != holder.pid
    assert list(out.iterdir()) == []


def test_the_lock_file_does_not_make_a_shard_directory(tmp_path):
    out = tmp_path / "new" / "out"
    with lock_shard_dir(out):
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
        check_owned(out)
        with pytest.raises(ShardError, match=r"manifest\.json: missing"):
            load_split(out, "train")
    assert not out.exists()  # created by the lock, and left empty: removed with it
    (tmp_path / "kept").mkdir()
    with lock_shard_dir(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").is_dir()


def test_read_only_output_is_an_error_naming_it(read_only_fs):
    with pytest.raises(ShardError, match=rf"{read_only_fs}/out: cannot create the directory: Read-only file system"):
        with lock_shard_dir(read_only_fs / "out"):
            pass


def test_prepare_rewrites_only_its_own_files(tmp_path):
    check_owned(tmp_path / "missing")
    check_owned(tmp_path)  # empty
    # What a killed prepare leaves: shards, a temporary file, its lock file. All prepare's.
    write_shard(tmp_path / "train_000003.bin", np.zeros(4, dtype=np.int64), 65)
    (tmp_path / ".train_000004.bin.tmp-77-0badc0de").write_bytes(b"half")
    (tmp_path / LOCK_NAME).write_text("{}")
    check_owned(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "fineweb_train_000001.bin").write_bytes(b"llm.c")
    with pytest.raises(ShardError, match=rf"{tmp_path}: holds files that prepare did not write "
                                         r"\(fineweb_train_000001\.bin, notes\.txt\) and no manifest\.json"):
        check_owned(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "another-tool"}')  # not ours: still someone's directory
    with pytest.raises(ShardError, match=r"\(fineweb_train_000001\.bin, manifest\.json, notes\.txt\)"):
        check_owned(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "nanogpt-ray/token-shards"}')  # ours: a README may live here
    check_owned(tmp_path)
