"""A new local MLflow store starts as a copy of a migrated empty one (pipelines/mlflow_adapter/store.py): real MLflow, real
sqlite files. The copy is the store MLflow would have made (same tables, same schema revision, MLflow adds its
default experiment the same way), it never replaces a store that exists, where the copy cannot be made MLflow
makes the store itself, and either way the store is its owner's alone."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.mlflow_adapter.store import CACHE_DIR_NAME, seed_sqlite_store


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / CACHE_DIR_NAME


def _schema(db: Path) -> tuple[list, list]:
    """Every table and index with its definition, and the schema revision. A definition's lines are compared as a
    set: MLflow's migrations write a table's CHECK constraints in no fixed order."""
    with sqlite3.connect(db) as conn:
        objects = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    lines = [(kind, name, sorted(line.strip().rstrip(",") for line in (sql or "").splitlines()))
             for kind, name, sql in objects]
    return lines, revision


def _uri(db: Path) -> str:
    return f"sqlite:///{db}"


@pytest.fixture
def usual_umask():
    """The usual umask (022: files 0644), whatever this process was started with."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_seeded_store_is_the_store_mlflow_makes(tmp_path, cache):
    made, seeded = tmp_path / "made" / "mlflow.db", tmp_path / "seeded" / "mlflow.db"
    made.parent.mkdir()
    seeded.parent.mkdir()
    MlflowClient(_uri(made)).search_experiments()  # MLflow creates and migrates it
    seed_sqlite_store(_uri(seeded))
    assert seeded.is_file() and [p.name for p in seeded.parent.iterdir()] == ["mlflow.db"]  # nothing partial left
    assert _schema(seeded) == _schema(made)
    client = MlflowClient(_uri(seeded))
    assert [e.name for e in client.search_experiments()] == ["Default"]  # added by MLflow on first use
    run = client.create_run(client.create_experiment("x", artifact_location=str(tmp_path / "art")))
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.5]
    assert len(list(cache.iterdir())) == 1  # the cached empty store, built once


def test_an_existing_store_is_never_replaced(tmp_path, cache):
    db = tmp_path / "mlflow.db"
    client = MlflowClient(_uri(db))
    experiment = client.create_experiment("kept")
    before = db.read_bytes()
    seed_sqlite_store(_uri(db))
    assert db.read_bytes() == before
    assert MlflowClient(_uri(db)).get_experiment(experiment).name == "kept"


@pytest.mark.parametrize("why", ["cache unusable", "unknown MLflow"])
def test_without_a_usable_cache_mlflow_makes_the_store_itself(tmp_path, monkeypatch, usual_umask, why):
    """The cache directory cannot be made, or MLflow is a release whose private table builder this project does not
    know (store.TABLE_BUILDER_MAJORS)."""
    from pipelines.mlflow_adapter import store

    cache_home = tmp_path / ("not-a-dir" if why == "cache unusable" else "cache")
    if why == "cache unusable":
        cache_home.write_text("a file where the cache directory would go")
    else:
        monkeypatch.setattr(store, "TABLE_BUILDER_MAJORS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))
    db = tmp_path / "run" / "mlflow.db"
    db.parent.mkdir()
    seed_sqlite_store(_uri(db))
    assert list(db.parent.iterdir()) == [db] and db.stat().st_size == 0  # an empty file, the owner's alone
    assert [e.name for e in MlflowClient(_uri(db)).search_experiments()] == ["Default"]
    assert _mode(db) == 0o600
    assert cache_home.is_file() or not (cache_home / CACHE_DIR_NAME).exists()  # no cached store built


def test_a_new_store_and_the_directory_made_for_it_are_the_owners_alone(tmp_path, cache, usual_umask):
    db = tmp_path / "out" / "mlflow.db"  # run.out_dir does not exist yet
    seed_sqlite_store(_uri(db))
    assert (_mode(db), _mode(db.parent)) == (0o600, 0o700)
    client = MlflowClient(_uri(db))
    run = client.create_run(client.create_experiment("x", artifact_location=str(tmp_path / "art")))
    client.log_metric(run.info.run_id, "loss", 1.5, step=3)
    assert {p.name: _mode(p) for p in db.parent.iterdir()} == {"mlflow.db": 0o600}  # sqlite's journal went with it


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "file:///tmp/mlruns", "databricks"])
def test_only_sqlite_stores_are_seeded(uri, cache):
    seed_sqlite_store(uri)
    assert not cache.exists()
