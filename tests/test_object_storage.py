"""Shards in object storage, against a real S3 API on 127.0.0.1 (moto's server): the store operations, prepare's
output at a prefix (nanogpt/data/shard_prefix.py), and a node's verified local copy (nanogpt/data/shard_cache.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt.config import Config, ConfigError
from nanogpt.data import shard_prefix, storage
from nanogpt.data.corpus import resolve_input
from nanogpt.data.shard_cache import fetch_shards, local_shards
from nanogpt.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    SplitInfo,
    load_manifest,
    load_split,
    write_shard,
)
from pipelines.ray_adapter.runs import plan_run
from tests.mlflow_server import free_port

pytest_plugins = ("tests.s3_server",)
REPO = Path(__file__).resolve().parents[1]


def make_shards(directory: Path, sizes=(3000, 2000, 500)) -> Manifest:
    """Local shards (two train, one val) of random tokens and their manifest, written as prepare writes them."""
    rng = np.random.default_rng(0)
    infos = [write_shard(directory / name, rng.integers(0, 50257, n), 50257)
             for name, n in zip(("train_000000.bin", "train_000001.bin", "val_000000.bin"), sizes)]
    splits = {"train": SplitInfo(infos[:2], sizes[0] + sizes[1]), "val": SplitInfo(infos[2:], sizes[2])}
    return Manifest(tokenizer={"name": "gpt2", "vocab_size": 50257}, vocab_size=50257, dtype="uint16",
                    splits=splits, split_rule={}, input_fingerprint="i", settings_fingerprint="s")


def publish(local: Path, manifest: Manifest, uri: str) -> None:
    for name in manifest.shard_names():
        shard_prefix.upload_shard(local / name, storage.join(uri, name))
    shard_prefix.write_manifest(uri, manifest)


@pytest.fixture
def published(s3, tmp_path):
    """(uri, manifest, local source dir) of three shards in a new bucket."""
    src = tmp_path / "src"
    src.mkdir()
    manifest = make_shards(src)
    uri = s3.bucket_uri("data/shards")
    publish(src, manifest, uri)
    return uri, manifest, src


def test_store_operations_round_trip(s3, tmp_path):
    uri = s3.bucket_uri("p")
    storage.write_bytes(storage.join(uri, "a.txt"), b"hello")
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    storage.upload(tmp_path / "big.bin", storage.join(uri, "b.bin"))
    assert storage.list_names(uri) == ["a.txt", "b.bin"]
    assert storage.read_bytes(storage.join(uri, "a.txt")) == b"hello"
    assert storage.size(storage.join(uri, "b.bin")) == 3 << 20 and storage.exists(storage.join(uri, "a.txt"))
    sha = hashlib.sha256()
    assert storage.download(storage.join(uri, "b.bin"), tmp_path / "back.bin", sha) == 3 << 20
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert sha.hexdigest() == hashlib.sha256((tmp_path / "big.bin").read_bytes()).hexdigest()
    storage.remove(storage.join(uri, "a.txt"))
    storage.remove(storage.join(uri, "a.txt"))  # a missing object is fine
    assert storage.list_names(uri) == ["b.bin"] and storage.size(storage.join(uri, "a.txt")) is None
    with pytest.raises(storage.StorageError, match="no such object") as e:
        storage.read_bytes(storage.join(uri, "missing.txt"))
    assert e.value.uri.endswith("/p/missing.txt")


def test_a_corpus_in_the_store_is_listed_in_order_and_read_like_a_local_one(s3, tmp_path):
    uri = s3.bucket_uri("corpus")
    for name in ("b.txt", "a.jsonl", "sub/c.txt", "skip.bin"):
        storage.write_bytes(storage.join(uri, name), name.encode())
    expected = [storage.join(uri, n) for n in ("a.jsonl", "b.txt", "sub/c.txt")]  # corpus files only, sorted
    assert [f.path for f in resolve_input(uri).files] == expected
    assert [f.path for f in resolve_input(storage.join(uri, "*.txt")).files] == [storage.join(uri, "b.txt")]
    assert [f.path for f in resolve_input(storage.join(uri, "**/*.txt")).files] == expected[1:]  # as on disk
    assert [f.size for f in resolve_input(uri).files] == [7, 5, 9]
    (tmp_path / "b.txt").write_bytes(b"b.txt")
    assert storage.read_bytes(expected[1]) == storage.read_bytes(str(tmp_path / "b.txt"))  # the tasks' one reader
    with pytest.raises(storage.StorageError, match="cannot read: no such file") as e:
        storage.read_bytes(str(tmp_path / "gone.txt"))
    assert e.value.uri == str(tmp_path / "gone.txt")


def test_a_node_copy_is_downloaded_once_verified_and_reused(published, tmp_path):
    uri, manifest, src = published
    assert load_manifest(uri) == manifest  # the manifest is read straight from the store by the driver
    first = fetch_shards(uri, tmp_path / "cache")
    assert first.downloaded == 3 and Path(first.dir).parent == tmp_path / "cache"
    for name in manifest.shard_names():
        assert (Path(first.dir) / name).read_bytes() == (src / name).read_bytes()
    assert (Path(first.dir) / MANIFEST_NAME).read_text() == manifest.to_json()
    assert [len(s) for s in load_split(first.dir, "train")] == [3000, 2000]
    again = fetch_shards(uri + "/", tmp_path / "cache")  # the same prefix: the same copy, nothing downloaded
    assert (again.dir, again.downloaded) == (first.dir, 0)
    assert local_shards(str(src)) == str(src)  # a local data.dir is used as it is


def test_a_changed_preparation_fetches_only_the_shards_that_differ(published, tmp_path):
    uri, manifest, src = published
    fetch_shards(uri, tmp_path / "cache")
    rng = np.random.default_rng(1)
    new_val = write_shard(src / "val_000000.bin", rng.integers(0, 50257, 700), 50257)
    changed = dataclasses.replace(manifest, splits={**manifest.splits, "val": SplitInfo([new_val], 700)})
    publish(src, changed, uri)
    again = fetch_shards(uri, tmp_path / "cache")
    assert again.downloaded == 1
    assert len(load_split(again.dir, "val")[0]) == 700


def test_a_shard_damaged_in_the_store_is_an_error_naming_it_and_nothing_of_it_is_kept(published, tmp_path):
    uri, manifest, src = published
    damaged = bytearray((src / "train_000001.bin").read_bytes())
    damaged[-1] ^= 0xFF  # same size, same header: only the hash can tell
    storage.write_bytes(storage.join(uri, "train_000001.bin"), bytes(damaged))
    with pytest.raises(ShardError, match="damaged in the store: sha256") as e:
        fetch_shards(uri, tmp_path / "cache")
    assert e.value.file == storage.join(uri, "train_000001.bin")
    assert f"prepare the data again with --force (pipelines/prepare.py --out {uri} --force," in str(e.value)
    copy = next(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert sorted(p.name for p in copy.iterdir()) == ["train_000000.bin"]  # no manifest: not complete


def test_an_unreachable_store_is_an_error_naming_the_manifest(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for key, value in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ShardError, match="store is reachable") as e:
        fetch_shards("s3://nowhere/shards", tmp_path / "cache")
    assert e.value.file == "s3://nowhere/shards/manifest.json"


def test_a_cache_that_would_fill_the_disk_is_an_error_before_any_download(published, tiny_fs):
    uri, _, _ = published
    expected = r"needs 14.1 kB for 3 shards of s3://.* has .* free \(keeping 67.1 MB spare\).* --data.cache_dir"
    with pytest.raises(ShardError, match=expected) as e:
        fetch_shards(uri, tiny_fs)
    assert e.value.file.startswith(str(tiny_fs))
    assert not any(p.name.endswith(".bin") for p in tiny_fs.rglob("*"))


FETCH = """
import sys
from nanogpt.data.shard_cache import fetch_shards
print(fetch_shards(sys.argv[1], sys.argv[2]).downloaded)
"""


def test_workers_of_one_node_download_once(published, tmp_path):
    uri, _, _ = published
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", FETCH, uri, str(tmp_path / "cache")], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    counts = sorted(int(p.communicate(timeout=120)[0]) for p in procs)
    assert counts == [0, 0, 3]


def test_a_run_refused_before_its_first_step_in_a_bucket_does_not_hold_its_name(s3):
    runs = s3.bucket_uri("runs")
    for name in (".validate_storage_marker", "params.json", "metrics.jsonl"):  # rank 0 uploads its records anyway
        storage.write_bytes(storage.join(runs, f"r1/{name}"), b"{}" if name == "params.json" else b"")
    config = Config.from_dict({"run": {"out_dir": runs, "name": "r1"}, "data": {"dir": storage.join(runs, "data")}})
    assert plan_run(config).run_dir == storage.join(runs, "r1")
    storage.write_bytes(storage.join(runs, "r1/checkpoint_000010/state.json"), b"{}")  # a checkpoint: a run
    with pytest.raises(ConfigError, match="already exists"):
        plan_run(config)


def test_prepare_output_at_a_prefix(published, s3):
    uri, manifest, _ = published
    shard_prefix.check_owned(uri)  # ours: it has our manifest
    shard_prefix.check_sizes(uri, manifest)
    storage.write_bytes(storage.join(uri, "train_000000.bin"), b"short")
    with pytest.raises(ShardError, match="5 bytes, expected 7024"):
        shard_prefix.check_sizes(uri, manifest)
    shard_prefix.remove_output(uri)
    assert storage.list_names(uri) == []
    foreign = s3.bucket_uri("someone")
    storage.write_bytes(storage.join(foreign, "notes.txt"), b"mine")
    with pytest.raises(ShardError, match=r"objects that prepare did not write \(notes.txt\)"):
        shard_prefix.check_owned(foreign)
