"""MLflow's process-wide tracking URI, pointed at one store for a while, then put back.

A local (sqlite or file) registry resolves a `models:/<model_id>` source through the process-wide tracking URI, not
through the client that asks (MLflow 3.17, SqlAlchemyStore.create_model_version), so registering into the local store
a config names must point it there meanwhile.

Putting it back exactly needs MLflow's private module global (`mlflow.tracking._tracking_service.utils._tracking_uri`):
the public mlflow.set_tracking_uri cannot unset it, and writes MLFLOW_TRACKING_URI into the environment. So this is
the one module that touches it, on MLflow versions where it is known (PRIVATE_GLOBAL_MAJORS) and present; elsewhere
the public fallback sets the URI back explicitly to what it resolved to, and puts the variable back as it was.

    with process_tracking_uri("sqlite:////runs/mlflow.db"):
        client.create_model_version(...)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from types import ModuleType

PRIVATE_GLOBAL_MAJORS = (3,)
"""MLflow majors whose tracking_service.utils keeps the process-wide URI in `_tracking_uri` (None: unset)."""
_ENV = "MLFLOW_TRACKING_URI"
_LOCK = threading.Lock()  # one store at a time: the URI is the whole process's


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's default store is `uri` inside the block; after it, as it was."""
    holder = private_holder()
    with _LOCK:
        swap = _swap_private(holder, uri) if holder is not None else _swap_public(uri)
        with swap:
            yield


def private_holder() -> ModuleType | None:
    """The module that holds MLflow's process-wide URI, where this MLflow is one whose holder is known; else None."""
    import mlflow

    if int(mlflow.__version__.split(".")[0]) not in PRIVATE_GLOBAL_MAJORS:
        return None
    try:
        from mlflow.tracking._tracking_service import utils
    except ImportError:
        return None
    return utils if hasattr(utils, "_tracking_uri") else None


@contextlib.contextmanager
def _swap_private(holder: ModuleType, uri: str) -> Iterator[None]:
    """Exactly as it was after, unset included; the environment untouched."""
    before = holder._tracking_uri
    holder._tracking_uri = uri
    try:
        yield
    finally:
        holder._tracking_uri = before


@contextlib.contextmanager
def _swap_public(uri: str) -> Iterator[None]:
    """After: set explicitly to the value it resolved to (public mlflow has no unset); the variable as it was."""
    import mlflow

    before, env_before = mlflow.get_tracking_uri(), os.environ.get(_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env_before is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = env_before
