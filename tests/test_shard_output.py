"""prepare's two outputs behind one interface (nanogpt/data/shard_output.py): a directory and an S3 prefix (a real S3
API on 127.0.0.1, moto's server) go through the same steps with the same outcome, and prepare itself never asks
which one it has."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from nanogpt.data import storage
from nanogpt.data.shard_dir import ShardDir
from nanogpt.data.shard_output import ShardOutput, shard_output
from nanogpt.data.shard_prefix import ShardPrefix
from nanogpt.data.shards import Manifest, ShardError, SplitInfo, load_manifest, write_shard

pytest_plugins = ("tests.s3_server",)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["directory", "s3 prefix"])
def location(request, tmp_path) -> str:
    if request.param == "directory":
        (tmp_path / "out").mkdir()
        return str(tmp_path / "out")
    return request.getfixturevalue("s3").bucket_uri("shards/out")


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50257, n)


def manifest_of(infos) -> Manifest:
    splits = {"train": SplitInfo(infos[:1], infos[0].num_tokens), "val": SplitInfo(infos[1:], infos[1].num_tokens)}
    return Manifest(tokenizer={"name": "gpt2", "vocab_size": 50257}, vocab_size=50257, dtype="uint16", splits=splits,
                    split_rule={}, input_fingerprint="i", settings_fingerprint="s")


def test_both_outputs_take_prepares_steps_alike(location, tmp_path):
    output = shard_output(location)
    assert isinstance(output, ShardOutput) and output.location == location
    assert pickle.loads(pickle.dumps(output)) == output  # a Ray task takes it as an argument
    reference = [write_shard(tmp_path / n, tokens(300 + i, i), 50257) for i, n in enumerate(("r0.bin", "r1.bin"))]
    with output.lock():
        output.check_owned()  # new: prepare's to write
        assert not output.has_manifest()
        output.remove_output()  # nothing to remove: fine
        infos = [output.write_shard(name, [tokens(300 + i, i)], 50257)
                 for i, name in enumerate(("train_000000.bin", "val_000000.bin"))]
        assert [i.sha256 for i in infos] == [r.sha256 for r in reference]  # the same bytes either way
        assert not output.has_manifest()  # shards alone do not make a complete output
        output.write_manifest(manifest_of(infos))
    assert output.has_manifest() and load_manifest(location) == manifest_of(infos)
    assert output.check_shards(load_manifest(location)) == manifest_of(infos)
    output.check_owned()  # ours now: it holds our manifest

    storage.write_bytes(storage.join(location, "val_000000.bin"), b"short")  # damaged since
    with pytest.raises(ShardError, match="val_000000.bin"):
        output.check_shards(load_manifest(location))
    output.remove_output()
    assert not output.has_manifest()
    assert storage.list_names(location) == []


def test_someone_elses_files_are_left_alone(location):
    storage.write_bytes(storage.join(location, "notes.txt"), b"mine")
    with pytest.raises(ShardError, match="notes.txt"):
        shard_output(location).check_owned()


def test_the_output_is_chosen_once_and_prepare_never_asks_which():
    assert type(shard_output("data/out")) is ShardDir and type(shard_output("s3://b/out")) is ShardPrefix
    assert shard_output("data/out").verified_by == "sha256" and shard_output("s3://b/out").verified_by == "size"
    prepare_job = [ROOT / "pipelines" / "prepare.py", *sorted((ROOT / "pipelines" / "data_prep").glob("*.py"))]
    branches = [f"{p.relative_to(ROOT)}:{n}" for p in prepare_job
                for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\bis_uri\(", line)]
    assert branches == []
