"""Which MLflow store a command uses, and how a new local one (sqlite) starts: as a copy of an empty store that MLflow
already migrated, kept in the user's cache directory per MLflow version.

    uri = resolve_tracking_uri(config)   # run.tracking_uri, else MLFLOW_TRACKING_URI, else <run.out_dir>/mlflow.db
    db = sqlite_path(uri)                # the database file of a sqlite:/// store, None for other stores
    seed_sqlite_store(uri)               # before the first MlflowClient of a store that may not exist yet

Why a copy: MLflow creates a new sqlite store by running every schema migration since its first release, seconds of
one core on the driver's way to `fit()` in every new run.out_dir (figures in bench/NOTES.md). The copy is the same
file MLflow would have written before it adds its default experiment, which it then adds itself (with this store's
artifact root). It appears whole or not at all, and never replaces a store that exists; where anything of this
fails, MLflow creates its tables in an empty file instead.

The store holds every run's params, metrics and tags, and the registry: it is the owner's alone, mode 0600 (sqlite
gives its journal the same mode), in a directory of mode 0700 when this module creates it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from nanogpt.config import Config, RunConfig
from nanogpt.data.storage import is_uri

log = logging.getLogger(__name__)

CACHE_DIR_NAME = "nanogpt-ray"


def default_tracking_uri(out_dir: str | os.PathLike) -> str:
    """The local store for a run directory: `sqlite:///<abs out_dir>/mlflow.db` (no server needed)."""
    if is_uri(out_dir):  # s3://, gs://: sqlite cannot live there
        local = Path.cwd()
        log.warning("run.out_dir=%s is not a local path: the MLflow store goes to %s/mlflow.db "
                    "(set run.tracking_uri to use a server)", out_dir, local)
    else:
        local = Path(out_dir).expanduser().resolve()
    return f"sqlite:///{local / 'mlflow.db'}"


def tracking_uri_for(explicit: str | None, out_dir: str | os.PathLike | None = None) -> str:
    """The one rule for which store a command uses: `explicit` (run.tracking_uri, --tracking-uri), else
    MLFLOW_TRACKING_URI, else the local sqlite store of `out_dir` (default: run.out_dir's default, where pretrain
    puts it)."""
    if explicit:
        return explicit
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out_dir or RunConfig().out_dir)


def resolve_tracking_uri(config: Config) -> str:
    """The training job's store (tracking_uri_for its run section). Resolve this on the driver and pass it to
    workers in the config: workers have another cwd, and maybe another environment."""
    return tracking_uri_for(config.run.tracking_uri, config.run.out_dir)


def sanitize_model_name(name: str) -> str:
    """A registered-model name (and a folder name): letters, digits, `_ . -`; anything else becomes `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "nanogpt"


def local_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite database, not in the cwd (MLflow's default);
    None for a server, which chooses its own."""
    db = sqlite_path(tracking_uri)
    return None if db is None else (db.parent / "mlartifacts" / sanitize_model_name(experiment)).as_uri()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` store (sqlite:////abs or sqlite:///rel), None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///")).resolve()


def seed_sqlite_store(tracking_uri: str) -> None:
    """Start the sqlite store of `tracking_uri`, when it does not exist yet, as a copy of the migrated empty store
    in $XDG_CACHE_HOME/nanogpt-ray (default ~/.cache/nanogpt-ray), which is built on first use."""
    db = sqlite_path(tracking_uri)
    if db is None or db.exists():
        return
    try:
        db.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as MLflow does for a sqlite store, but private
        _place_new(_migrated_empty_store(_cache_dir()), db)
    except Exception as e:  # the cache unwritable, a full disk, an MLflow that changed: MLflow does it itself
        log.debug("no copy of a migrated store for %s: %s", db, e)
        _create_private_empty(db)


def _create_private_empty(db: Path) -> None:
    """An empty file of mode 0600 at `db` unless something is there: MLflow creates its tables in it (a new sqlite
    database is an empty file), and the store keeps the mode."""
    with contextlib.suppress(OSError):  # FileExistsError: a store appeared; anything else: MLflow reports it
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / CACHE_DIR_NAME


def _migrated_empty_store(cache_dir: Path) -> Path:
    """The cached empty store of this MLflow version, migrated by MLflow (its tables, no experiment yet)."""
    import importlib.metadata

    template = cache_dir / f"mlflow-{importlib.metadata.version('mlflow')}-empty.db"
    if template.is_file():
        return template
    initialize_tables = _private_table_builder()
    if initialize_tables is None:
        raise LookupError(f"no known table builder in MLflow {importlib.metadata.version('mlflow')}")
    import sqlalchemy

    cache_dir.mkdir(parents=True, exist_ok=True)
    building = template.with_name(f".{template.name}.{uuid.uuid4().hex}")
    engine = sqlalchemy.create_engine(f"sqlite:///{building}")
    try:
        initialize_tables(engine)  # what MLflow's store runs on a database without its tables
        os.replace(building, template)  # whole or not at all; a concurrent builder's equal file may win
    finally:
        engine.dispose()
        building.unlink(missing_ok=True)
    return template


TABLE_BUILDER_MAJORS = (3,)
"""MLflow majors whose private `mlflow.store.db.utils._initialize_tables` builds a store's tables (written against
3.17); under any other, or where the name is gone, MLflow migrates each new store itself."""


def _private_table_builder():
    """MLflow's private table builder where this module may use it, else None: the one private MLflow name here."""
    import mlflow

    if int(mlflow.__version__.split(".")[0]) not in TABLE_BUILDER_MAJORS:
        return None
    from mlflow.store.db import utils

    return getattr(utils, "_initialize_tables", None)


def _place_new(source: Path, db: Path) -> None:
    """Copy `source` to `db` unless `db` exists by then: the copy is linked in under its final name only once
    complete, and a store another process created meanwhile stays."""
    partial = db.with_name(f".{db.name}.{uuid.uuid4().hex}")
    shutil.copyfile(source, partial)
    try:
        partial.chmod(0o600)  # before it gets its name: the store is private from the start
        os.link(partial, db)
    except FileExistsError:
        pass
    finally:
        partial.unlink()
