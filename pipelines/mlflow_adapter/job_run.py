"""The training job's MLflow run, owned by the driver: opened (or found again) before `fit()`, written to by rank 0
of the workers with the run id the driver hands them, and finished by the driver after `fit()` (best and final
checkpoints logged, the best registered, the loss curve drawn, the status set).

    run_id = open_job_run(config, plan)               # None only when the store is unreachable right now
    trainer = build_trainer(config, plan, tracking_run_id=run_id)
    tracking = finish_job_run(config, plan, run_id, best_checkpoint, latest_checkpoint)

The run carries the tag `nanogpt.run_dir` = the run directory: `init_from=resume` of a run finds its MLflow run by
it, and so does a driver whose workers had to create the run themselves (the store was down when the job began).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from nanogpt.config import Config
from pipelines.mlflow_adapter.checkpoint_uris import local_checkpoint_dir
from pipelines.mlflow_adapter.registry import log_final_checkpoint, register_checkpoint
from pipelines.mlflow_adapter.run_tags import manifest_dict, standard_tags
from pipelines.mlflow_adapter.store import sanitize_model_name
from pipelines.mlflow_adapter.tracker import MlflowTracker
from pipelines.ray_adapter.runs import RunPlan

log = logging.getLogger(__name__)

RUN_DIR_TAG = "nanogpt.run_dir"
PARENT_RUN_TAG = "mlflow.parentRunId"  # nests a run under another in the UI (a sweep's trials under the sweep)


def make_mlflow_tracker(
    config: Config,
    *,
    run_id: str | None = None,
    world_size: int = 1,
    device: Any = "cpu",
    manifest: Any = None,
    entry_point: str | None = None,
    **kwargs: Any,
) -> MlflowTracker:
    """The tracker of a training job, started: run `run_id` continued (None: a new run), the flattened config as
    params, `standard_tags` as tags, the resolved config and the dataset manifest as artifacts.

    Returns at once: importing mlflow, a new sqlite store's migrations and the run's creation happen on the
    tracker's thread while the worker loads the data and builds the model."""
    tracker = MlflowTracker.from_config(config, **kwargs)
    tracker.start(run_id, wait=False)
    tracker.log_params(config.to_flat())
    tracker.set_tags(standard_tags(config, world_size, device, manifest, entry_point))
    tracker.log_text(config.to_yaml(), "config.yaml")
    manifest_data = manifest_dict(manifest)
    if manifest_data is not None:
        tracker.log_text(json.dumps(manifest_data, indent=2, sort_keys=True, default=str) + "\n", "data/manifest.json")
        source = manifest if isinstance(manifest, (str, os.PathLike)) else config.data.dir
        tracker.log_dataset(manifest_data, source)
    return tracker


def job_tracker(config: Config, run_dir: str, **kwargs) -> MlflowTracker:
    """An unstarted tracker for the job of `run_dir` (a new run gets the run-dir tag when it is created)."""
    return MlflowTracker.from_config(config, run_tags={RUN_DIR_TAG: run_dir}, **kwargs)


# Rank 0 sends its metric points every 5 s, not at each log line (MlflowTracker's metrics_interval_s, bench/NOTES.md)
WORKER_METRICS_INTERVAL_S = 5.0


def start_worker_tracker(config: Config, run_dir: str, run_id: str | None) -> MlflowTracker:
    """Rank 0's tracker: the job's run `run_id`, opened by the driver, which also ends it and alone sets its status
    (None: the store was down when the job began; the tracker creates the run, tagged with `run_dir`, when the store
    answers)."""
    tracker = job_tracker(config, run_dir, owns_run=False, revive_run=False,
                          metrics_interval_s=WORKER_METRICS_INTERVAL_S)
    tracker.start(run_id, wait=False)
    return tracker


def open_job_run(config: Config, plan: RunPlan, parent_run_id: str | None = None) -> str | None:
    """Create the job's run, or continue the run of plan.run_dir when the job continues it, with the config as
    params, the standard tags, the config and the dataset manifest. Returns its id (None: store unreachable).
    With `parent_run_id` (a sweep's trial) the run is nested under that run, and found again by its run
    directory even before its first checkpoint (a trial restarted early would otherwise get a second run)."""
    run_id = find_job_run(config, plan.run_dir) if plan.continues_run or parent_run_id else None
    tags = {RUN_DIR_TAG: plan.run_dir}
    if parent_run_id:
        tags[PARENT_RUN_TAG] = parent_run_id
    device = "cuda" if config.run.use_gpu else "cpu"
    tracker = make_mlflow_tracker(config, run_id=run_id, world_size=config.run.num_workers, device=device,
                                  manifest=config.data.dir, run_tags=tags, system_metrics=False, owns_run=False)
    tracker.close()  # sends what is queued; the run stays open for the workers (owns_run=False)
    if tracker.run_id is None:
        log.warning("MLflow at %s is unreachable: rank 0 will create the job's run when it answers",
                    tracker.tracking_uri)
    return tracker.run_id


def discard_job_run(config: Config, run_id: str | None) -> None:
    """Delete a run the job opened but never used (the job failed before its workers started)."""
    if run_id is None:
        return
    try:
        MlflowTracker.from_config(config).client.delete_run(run_id)
    except Exception as e:  # tracking failures are warnings
        log.warning("could not delete MLflow run %s of a job that did not start: %s", run_id, e)


def find_job_run(config: Config, run_dir: str) -> str | None:
    """The id of the MLflow run tagged with `run_dir` in the job's experiment (the newest), or None."""
    return job_tracker(config, run_dir, system_metrics=False).find_run(RUN_DIR_TAG, run_dir)


def finish_job_run(config: Config, plan: RunPlan, run_id: str | None, best_checkpoint: str | None,
                   latest_checkpoint: str | None, status: str = "FINISHED") -> dict[str, str] | None:
    """After fit(): register the best checkpoint as a new version of run.registered_model (its files logged once, as
    the run's logged model), log the final checkpoint, draw the loss curve and end the run with `status`. Tracking
    failures are warnings."""
    run_id = run_id or find_job_run(config, plan.run_dir)
    if run_id is None:
        log.warning("no MLflow run was created for this job (the store stayed unreachable): checkpoints not logged")
        return None
    model_name = sanitize_model_name(config.run.registered_model or config.run.experiment)
    tracker = job_tracker(config, plan.run_dir, system_metrics=False)
    tracker.start(run_id)
    version = None
    if best_checkpoint is not None:
        with local_checkpoint_dir(best_checkpoint) as best:
            version = register_checkpoint(tracker, best, model_name)
    if latest_checkpoint is not None:
        with local_checkpoint_dir(latest_checkpoint) as latest:
            log_final_checkpoint(tracker, latest)
    tracker.close(status)
    info = {"tracking_uri": tracker.tracking_uri, "run_id": run_id}
    if version is not None:
        info["model_uri"] = f"models:/{model_name}/{version}"
    return info
