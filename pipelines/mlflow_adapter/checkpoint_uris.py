"""Any checkpoint address as a local directory, for the commands that read checkpoints (sample, evaluate, the
end of pretrain):

    with local_checkpoint_dir("models:/nanogpt/3", tracking_uri="http://127.0.0.1:5000") as ckpt_dir: ...

- a local path: itself;
- an MLflow `models:/<name>/<version>` (or `@alias`, `/latest`) or `runs:/<run id>/checkpoints/best` URI: downloaded
  from the tracking store (`tracking_uri`, else MLFLOW_TRACKING_URI, else pretrain's default local store);
- an object-store URI (s3://, gs://): the node's shared copy (nanogpt/checkpoint/node_copy.py: one download for the
  ranks of a node that read it at once).
Downloads live until the block ends.

A run's best checkpoint is its logged model `checkpoint-best` (pipelines/mlflow_adapter/registry.py logs its files
there, once); `runs:/<run id>/checkpoints/best` names it, as it named the run's artifacts of that path before.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nanogpt.checkpoint.files import CheckpointError
from nanogpt.checkpoint.node_copy import node_copy
from nanogpt.data.storage import is_uri
from pipelines.mlflow_adapter.store import sqlite_path, tracking_uri_for

MLFLOW_SCHEMES = ("models:/", "runs:/")
BEST_CHECKPOINT_PATH = "checkpoints/best"  # runs:/<run id>/checkpoints/best: the run's best checkpoint
FINAL_CHECKPOINT_PATH = "checkpoints/final"  # the run's artifacts: its last checkpoint, optimizer state included
LOGGED_MODEL_NAME = "checkpoint-best"  # the logged model that holds a run's best checkpoint


@contextlib.contextmanager
def local_checkpoint_dir(path: str, tracking_uri: str | None = None) -> Iterator[str]:
    if path.startswith(MLFLOW_SCHEMES):
        with tempfile.TemporaryDirectory(prefix="nanogpt-ckpt-") as tmp:
            try:
                local = resolve_checkpoint_uri(path, tmp, tracking_uri=tracking_uri_for(tracking_uri))
            except FileNotFoundError as e:
                raise CheckpointError(str(e)) from None
            yield local
        return
    if not is_uri(path):
        yield path
        return
    with node_copy(path) as d:
        yield d


def resolve_checkpoint_uri(uri: str, dst: str | os.PathLike | None = None, tracking_uri: str | None = None) -> str:
    """A local checkpoint directory for `uri`:
    - a local path (or file://): itself;
    - `models:/<name>/<version>`, `models:/<name>@<alias>`, `models:/<name>/latest`, `runs:/<run_id>/<path>`,
      or an artifact-store URI (s3://, mlflow-artifacts:/...): downloaded into `dst` (default: a new temp dir).
    `tracking_uri` (default: tracking_uri_for(None)) is also the registry URI. A sqlite store that does not exist
    is an error: reading a checkpoint never creates a store (a mistyped path would otherwise give an empty one)."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file"):
        path = Path(urllib.parse.urlparse(uri).path if scheme else uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {uri} does not exist")
        return str(path.resolve())
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.mlflow_adapter.breaker import short_error

    tracking_uri = tracking_uri_for(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise FileNotFoundError(f"checkpoint {uri}: there is no MLflow store at {tracking_uri} ({db} does not exist); "
                                "pass --tracking-uri with the store pretrain.py used")
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="nanogpt-ckpt-"))
    try:
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        source = uri
        if scheme == "models":  # resolved here: MLflow's own resolution reads the global registry URI
            source = _model_version_source(uri, client)
        elif scheme == "runs":
            source = _best_checkpoint_source(uri, client)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
    except MlflowException as e:
        raise FileNotFoundError(f"checkpoint {uri} could not be resolved at {tracking_uri}: {short_error(e)}") from e
    if not Path(local).exists() or (Path(local).is_dir() and not any(Path(local).iterdir())):
        raise FileNotFoundError(f"checkpoint {uri} at {tracking_uri} has no files")
    return str(Path(local).resolve())


def _model_version_source(uri: str, client: Any) -> str:
    """`models:/<name>/<version>`, `models:/<name>/latest` or `models:/<name>@<alias>`, each optionally followed by
    `/<path>`: the artifact URI of that model version's files."""
    from mlflow.exceptions import MlflowException

    parts = uri.removeprefix("models:/").strip("/").split("/")
    if "@" in parts[0]:
        name, alias = parts[0].split("@", 1)
        version, rest = client.get_model_version_by_alias(name, alias).version, parts[1:]
    elif len(parts) >= 2 and (parts[1].isdigit() or parts[1] == "latest"):
        name, version, rest = parts[0], parts[1], parts[2:]
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MlflowException(f"registered model {name!r} has no versions", error_code="RESOURCE_DOES_NOT_EXIST")
            version = str(max(int(v.version) for v in versions))
    else:
        raise MlflowException.invalid_parameter_value(
            f"{uri}: expected models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>"
        )
    source = client.get_model_version_download_uri(name, str(version))
    return "/".join([source.rstrip("/"), *rest])


def _best_checkpoint_source(uri: str, client: Any) -> str:
    """`runs:/<run_id>/checkpoints/best[/<path>]`: the files of the run's newest logged model `checkpoint-best`,
    unless the run's own artifacts hold that path (a run logged before the best checkpoint became a logged model).
    Any other runs:/ URI is itself."""
    run_id, _, path = uri.removeprefix("runs:/").strip("/").partition("/")
    if path != BEST_CHECKPOINT_PATH and not path.startswith(BEST_CHECKPOINT_PATH + "/"):
        return uri
    if client.list_artifacts(run_id, BEST_CHECKPOINT_PATH):
        return uri
    model = best_logged_model(client, run_id)
    if model is None:
        return uri  # MLflow's download then says what is missing
    rest = path.removeprefix(BEST_CHECKPOINT_PATH).strip("/")
    return "/".join(p for p in (model.artifact_location.rstrip("/"), rest) if p)


def best_logged_model(client: Any, run_id: str) -> Any:
    """The newest READY logged model `checkpoint-best` of run `run_id` (a run continued by later jobs has one per
    job), or None."""
    experiment_id = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(
        [experiment_id], filter_string=f"name = '{LOGGED_MODEL_NAME}' AND source_run_id = '{run_id}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
    )
    return next((m for m in models if str(m.status) == "READY"), None)
