"""The end of a job on the driver: its checkpoints into MLflow, the best one registered. Through the job's tracker
(its run, its outage policy), after everything logged before.

    version = register_checkpoint(tracker, best_dir, "nanogpt-shakespeare")   # models:/nanogpt-shakespeare/<version>
    log_final_checkpoint(tracker, latest_dir)                                 # the run's checkpoints/final

The best checkpoint is logged once: its files go straight into an MLflow 3 LoggedModel of the run
(`checkpoint-best`, READY, listed among the run's outputs), and the model version is created from that logged model
(source `models:/<model_id>`). Nothing is copied to the run's artifacts first, so nothing is downloaded and uploaded
again (a GPT-2 124M checkpoint is half a gigabyte). `runs:/<run id>/checkpoints/best` still names it
(checkpoint_uris.py). What is registered: safetensors weights, config, tokenizer, manifest and state; no pickled
optimizer state, no records; an FSDP checkpoint unsharded (nanogpt.checkpoint.format.consolidate_checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from nanogpt.checkpoint.files import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCALER_FILE,
    CheckpointError,
    is_sharded_checkpoint,
    read_state,
)
from pipelines.mlflow_adapter.checkpoint_uris import FINAL_CHECKPOINT_PATH, LOGGED_MODEL_NAME
from pipelines.mlflow_adapter.store import sanitize_model_name, sqlite_path
from pipelines.mlflow_adapter.tracker import MlflowTracker
from pipelines.mlflow_adapter.tracking_uri_swap import process_tracking_uri
from pipelines.ray_adapter.run_records import RECORDS_DIR

log = logging.getLogger(__name__)

# The registered model is weights + config + tokenizer: no pickled optimizer state (optimizer.pt is torch.save), nor
# the run's records that a checkpoint in object storage carries.
FILES_NOT_REGISTERED = (OPTIMIZER_FILE, SCALER_FILE, RECORDS_DIR)


def register_checkpoint(tracker: MlflowTracker, checkpoint_dir: str | os.PathLike,
                        model_name: str | None = None) -> str | None:
    """Log `checkpoint_dir` as the run's logged model `checkpoint-best` and register it as a new version of
    `model_name` (default `<experiment>-<run name>`); returns the version, or None (with a warning) when it cannot.
    Load it back with `resolve_checkpoint_uri(f"models:/{name}/{version}")`."""
    src = Path(checkpoint_dir)
    if not _holds_weights(src):
        log.warning("not registering checkpoint %s in MLflow: no model.safetensors in it", src)
        return None

    def register(client: Any, run_id: str) -> str:
        name = sanitize_model_name(model_name or f"{tracker.experiment}-{tracker.run_name}")
        return _log_and_register(client, tracker.tracking_uri, run_id, src, name)

    return tracker.call(f"register checkpoint {src}", register, last_try=True)


def log_final_checkpoint(tracker: MlflowTracker, checkpoint_dir: str | os.PathLike) -> None:
    """The job's last checkpoint, optimizer state included (what continuing the run needs), as the run's artifacts
    `checkpoints/final`; a sharded (FSDP) one unsharded."""
    src = Path(checkpoint_dir)
    if not _holds_weights(src):
        log.warning("not logging checkpoint %s to MLflow: no model.safetensors in it", src)
        return

    def send(client: Any, run_id: str) -> None:
        with staged_checkpoint(src, with_optimizer=True) as staged:
            client.log_artifacts(run_id, str(staged), FINAL_CHECKPOINT_PATH)

    tracker.call(f"log checkpoint {src} as final", send)


@contextlib.contextmanager
def staged_checkpoint(src: Path, with_optimizer: bool) -> Iterator[Path]:
    """A temporary directory with the checkpoint's files as MLflow gets them: hard links of `src`'s files (less the
    optimizer state and records unless `with_optimizer`), or a sharded checkpoint consolidated."""
    with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-") as tmp:
        staged = Path(tmp) / "checkpoint"
        if _is_sharded(src):
            # imports torch, which only a sharded checkpoint needs here
            from nanogpt.checkpoint.format import consolidate_checkpoint

            consolidate_checkpoint(src, staged, with_optimizer=with_optimizer)
        else:
            _link_tree(src, staged, skip=() if with_optimizer else FILES_NOT_REGISTERED)
        yield staged


def _log_and_register(client: Any, tracking_uri: str, run_id: str, checkpoint: Path, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="nanoGPT checkpoints: model.safetensors + config")
    except MlflowException as e:
        if "ALREADY_EXISTS" not in str(e.error_code):
            raise
    run = client.get_run(run_id)
    tags = {"run_name": run.info.run_name or ""}
    state = _read_state(checkpoint)
    if state:
        tags.update({"step": str(state.get("step")), "best_val_loss": str(state.get("best_val_loss"))})
    model_id = _log_model(client, run, checkpoint, tags, state)
    # Not mlflow.register_model: it wants an MLmodel file; a checkpoint is safetensors + config. As MLflow 3
    # links them: source models:/<model_id> (the version page links the logged model, which links the run).
    version = str(_create_model_version(client, tracking_uri, name, run_id, model_id, tags).version)
    _link_model_version(client, model_id, name, version)
    client.set_tag(run_id, "registered_model", f"models:/{name}/{version}")
    log.info("MLflow: registered checkpoint %s of run %s as models:/%s/%s (logged model %s)", checkpoint, run_id,
             name, version, model_id)
    return version


def _log_model(client: Any, run: Any, checkpoint: Path, tags: Mapping[str, str], state: Mapping[str, Any]) -> str:
    """The checkpoint as an MLflow 3 LoggedModel of the run: its files uploaded into the model's artifacts, READY,
    listed among the run's outputs at the checkpoint's step (the runs table's Models column)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    step = state.get("step") if isinstance(state.get("step"), int) else 0
    params = {k: str(v) for k, v in state.items() if k in ("step", "best_val_loss")}
    model = client.create_logged_model(
        run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run.info.run_id, tags=dict(tags),
        params=params or None, model_type="nanogpt-checkpoint",
    )
    try:
        with staged_checkpoint(checkpoint, with_optimizer=False) as staged:
            client.log_model_artifacts(model.model_id, str(staged))
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    except Exception:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run.info.run_id, [LoggedModelOutput(model.model_id, step)])
    return model.model_id


def _create_model_version(client: Any, tracking_uri: str, name: str, run_id: str, model_id: str,
                          tags: Mapping[str, str]) -> Any:
    source = f"models:/{model_id}"
    if sqlite_path(tracking_uri) is None and not tracking_uri.startswith("file:"):
        return client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)
    # A local registry store resolves models:/<model_id> through the process-wide tracking URI, not this client's
    with process_tracking_uri(tracking_uri):
        return client.create_model_version(name, source=source, run_id=run_id, tags=tags, model_id=model_id)


def _link_model_version(client: Any, model_id: str, name: str, version: str) -> None:
    """The logged model's `mlflow.modelVersions` tag (what mlflow.register_model and a server write): the
    Models column and the logged model page show the registered version."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model = client.get_logged_model(model_id)
    try:
        linked = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    except ValueError:
        linked = []
    if (name, version) not in [(e.get("name"), str(e.get("version"))) for e in linked]:  # a server wrote it
        entry = {"name": name, "version": int(version)}  # as a server writes it
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})


def _holds_weights(checkpoint: Path) -> bool:
    return (checkpoint / MODEL_FILE).is_file() or _is_sharded(checkpoint)


def _is_sharded(checkpoint: Path) -> bool:
    try:
        return is_sharded_checkpoint(checkpoint)
    except CheckpointError:
        return False


def _link_tree(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Hard-link (copy across devices) `src`'s files into `dst`, leaving out the names in `skip`."""
    skip = set(skip)
    for file in src.rglob("*"):
        rel = file.relative_to(src)
        if rel.parts[0] in skip or not file.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)


def _read_state(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's state.json, {} when there is none or it is unreadable (a tag is then left out)."""
    try:
        return read_state(checkpoint)
    except CheckpointError:
        return {}
