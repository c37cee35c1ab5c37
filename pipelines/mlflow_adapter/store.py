"""The local MLflow store (sqlite) of a run directory, and how a new one starts: as a copy of an empty store that
MLflow already migrated, kept in the user's cache directory per MLflow version.

    db = sqlite_path(tracking_uri)     # the database file of a sqlite:/// store, None for other stores
    seed_sqlite_store(tracking_uri)    # before the first MlflowClient of a store that may not exist yet

MLflow creates a new sqlite store by running every schema migration since its first release: about 4 s of one core
here, on the driver's way to `fit()` (the job's run is opened before the workers start) in every new run.out_dir.
A copy of the migrated, empty database is the same file MLflow would have written before it adds its default
experiment, which it then adds itself (with this store's artifact root): opening the job's run took 1.7 s instead of
4.1 (3 alternating runs each, import of mlflow aside). The copy appears whole or not at all, and never replaces a
store that exists; where anything of this fails, MLflow creates its tables in an empty file instead.

The store holds every run's params, metrics and tags, and the registry: it is the owner's alone, mode 0600 (sqlite
gives its journal the same mode), in a directory of mode 0700 when this module creates it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIR_NAME = "nanogpt-ray"


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
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables  # MLflow 3.17; private, MLflow is pinned

    cache_dir.mkdir(parents=True, exist_ok=True)
    building = template.with_name(f".{template.name}.{uuid.uuid4().hex}")
    engine = sqlalchemy.create_engine(f"sqlite:///{building}")
    try:
        _initialize_tables(engine)  # what MLflow's store runs on a database without its tables
        os.replace(building, template)  # whole or not at all; a concurrent builder's equal file may win
    finally:
        engine.dispose()
        building.unlink(missing_ok=True)
    return template


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
