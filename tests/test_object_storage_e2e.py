"""Shards and runs in object storage, end to end, against a real S3 API on 127.0.0.1:
prepare --input s3:// --out s3:// -> pretrain --data.dir=s3:// --run.out_dir=s3:// -> resume -> sample and evaluate on an s3://
checkpoint. prepare and pretrain run as commands, each its own process with its own local Ray instance, which finds
the store the way a cluster's nodes do: AWS_ENDPOINT_URL and credentials in the environment (the session's
`ray_local` was started without them). sample and evaluate start no Ray: they run in this process, which has the
store's environment as a node has.

The shards are prepared once for the module (`prepared`); the damaged-shard test works on a copy of its own."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.data import storage
from nanogpt.data.shards import MANIFEST_NAME, load_manifest
from pipelines import evaluate, sample
from pipelines import prepare as prepare_cli

pytestmark = pytest.mark.slow
pytest_plugins = ("tests.s3_server",)
REPO = Path(__file__).resolve().parents[1]
RUN_ARGS = ["--config", "debug", "--run.num_workers=2", "--train.eval_interval=10", "--optim.lr_decay_iters=30",
            "--num-cpus", "2"]


def run(script: str, *args: str, env: dict[str, str], expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / script), *args], env=env, cwd=env["HOME"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, f"{script} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def prepare_args(corpus: str, out: str) -> list[str]:
    return ["--input", corpus, "--tokenizer", "char", "--out", out]


@pytest.fixture(scope="module")
def corpus_uri(s3_server, shakespeare_path) -> str:
    """Tiny Shakespeare as two objects under a prefix of a bucket of its own: prepare's input, read by its tasks."""
    corpus = s3_server.bucket_uri("corpus")
    text = shakespeare_path.read_bytes()
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_server.env.items():
            env.setenv(key, value)
        for i, part in enumerate((text[: len(text) // 2], text[len(text) // 2:])):
            storage.write_bytes(storage.join(corpus, f"part_{i}.txt"), part)
    return corpus


@pytest.fixture(scope="module")
def prepared(s3_server, corpus_uri, tmp_path_factory) -> str:
    """The corpus in the store as char-level shards in a bucket of their own, through prepare's command line, once."""
    home = tmp_path_factory.mktemp("prepare_home")
    shards = s3_server.bucket_uri("shards")
    run("prepare.py", *prepare_args(corpus_uri, shards), env={**os.environ, **s3_server.env, "HOME": str(home)})
    return shards


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A HOME of the test's own: the default shard cache (~/.cache/nanogpt-ray/shards) of the commands started
    with it, and of sample and evaluate in this process, lands there."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    return path


def test_prepare_pretrain_resume_sample_evaluate_in_s3(prepared, corpus_uri, s3, home, shakespeare_path, tmp_path,
                                                       capsys):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    shards, runs = prepared, s3.bucket_uri("runs")
    manifest = load_manifest(shards)
    assert storage.list_names(shards) == sorted([*manifest.shard_names(), "manifest.json"])
    text = shakespeare_path.read_text()  # every character of both objects, one token each: all was read
    assert manifest.inputs["spec"] == corpus_uri and manifest.inputs["num_files"] == 2
    assert manifest.num_tokens("train") + manifest.num_tokens("val") == len(text)
    assert manifest.num_tokens("val") == len(text) - int(len(text) * 0.9)  # the tail split, across the two objects

    first = run("pretrain.py", *RUN_ARGS, f"--data.dir={shards}", f"--run.out_dir={runs}", "--run.name=r1",
                "--train.max_iters=20", env=env)
    logs = first.stdout + first.stderr
    assert len(re.findall(r"fetched 2 of 2 shards .* from " + re.escape(shards), logs)) == 1  # one node, one download
    assert "registered models:/nanogpt/" in first.stdout  # the best checkpoint, read back from the bucket
    run_dir = storage.join(runs, "r1")
    assert {"checkpoint_000010", "checkpoint_000020"} <= set(_dirs(run_dir))

    # MLflow is the first run's subject (the registered model above), not the resume's
    second = run("pretrain.py", *RUN_ARGS, f"--data.dir={shards}", f"--run.out_dir={runs}", "--run.name=r1",
                 "--model.init_from=resume", "--train.max_iters=30", "--run.tracker=none", env=env)
    logs = second.stdout + second.stderr
    assert "fetched" not in logs  # the node's copy is reused
    assert re.search(r"iter 20\b", logs) and re.search(r"iter 29\b", logs) and not re.search(r"iter 19\b", logs)
    assert "checkpoint_000030" in _dirs(run_dir)
    history = [json.loads(line) for line in storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).splitlines()]
    assert sorted(r["step"] for r in history if "loss" in r) == list(range(30))  # the first run's, then the second's
    assert json.loads(storage.read_bytes(storage.join(run_dir, "params.json")))["train.max_iters"] == 30

    checkpoint = storage.join(run_dir, "checkpoint_000030")
    capsys.readouterr()
    assert sample.main(["--checkpoint", checkpoint, "--max_new_tokens", "40", "--num_samples", "1"]) == 0
    assert len(capsys.readouterr().out.strip()) >= 20
    assert evaluate.main(["--checkpoint", checkpoint, "--data-dir", shards, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["split"] == "val" and 0 < result["loss"] < 4.5


def test_a_damaged_shard_object_is_one_line_and_exit_2_and_prepare_force_repairs_it(
        prepared, corpus_uri, s3, home, caplog):
    env = dict(os.environ)
    shards, runs = s3.bucket_uri("shards"), s3.bucket_uri("runs")
    _copy_objects(prepared, shards)  # the module's shards, as prepare left them, in a bucket of this test's own
    shard = storage.join(shards, "train_000000.bin")
    damaged = bytearray(storage.read_bytes(shard))
    damaged[-1] ^= 0xFF  # same size, same header: only the hash a node computes as it downloads can tell
    storage.write_bytes(shard, bytes(damaged))

    train = [*RUN_ARGS, f"--data.dir={shards}", f"--run.out_dir={runs}", "--run.name=r1", "--train.max_iters=10",
             "--run.tracker=none"]
    for _ in range(2):  # the same --run.name again: refused for the shard again, not for the name
        failed = run("pretrain.py", *train, env=env, expect=2)
        output = failed.stdout + failed.stderr
        errors = [line for line in output.splitlines() if " ERROR " in line or "Error" in line]
        assert len(errors) == 1 and "Traceback" not in output, output[-6000:]
        assert f"{shard}: damaged in the store: sha256" in errors[0]
        assert f"prepare the data again with --force (pipelines/prepare.py --out {shards} --force," in errors[0]
    prepare = prepare_args(corpus_uri, shards)
    with caplog.at_level(logging.INFO):
        assert prepare_cli.main(prepare) == 0  # no Ray: the up-to-date check is the driver's
    assert "is up to date" in caplog.text  # sizes only: hence --force
    run("prepare.py", *prepare, "--force", env=env)
    trained = run("pretrain.py", *train, env=env)  # the advice worked, under the same name
    assert re.search(r"iter 9\b", trained.stdout + trained.stderr)


def test_an_unreachable_data_store_fails_before_ray_starts(s3, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens on 9
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / "pretrain.py"), "--config", "debug",
                             "--data.dir=s3://nowhere/shards", f"--run.out_dir={tmp_path / 'runs'}"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "s3://nowhere/shards/manifest.json" in result.stderr and "store is reachable" in result.stderr
    assert "Ray ready" not in result.stderr  # reported before Ray starts


def _copy_objects(source: str, dest: str) -> None:
    """Every object under `source` to `dest`, the manifest last (as prepare writes them)."""
    for name in sorted(storage.list_names(source), key=lambda name: name == MANIFEST_NAME):
        storage.write_bytes(storage.join(dest, name), storage.read_bytes(storage.join(source, name)))


def _dirs(uri: str) -> list[str]:
    import pyarrow.fs

    fs, key = pyarrow.fs.FileSystem.from_uri(uri)
    return [os.path.basename(i.path) for i in fs.get_file_info(pyarrow.fs.FileSelector(key))
            if i.type == pyarrow.fs.FileType.Directory]
