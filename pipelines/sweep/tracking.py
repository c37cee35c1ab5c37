"""A sweep in MLflow: one parent run per sweep, owned by the sweep driver, and one child run per trial (opened by
the trial, nested under the parent by the tag mlflow.parentRunId, see pipelines/sweep/trial.py).

    parent = open_sweep_run(config, sweep_dir, name, spec_yaml)       # found again by its sweep dir on resume
    mark_trial_run(config, trial_run_dir, "KILLED", early_stopped=True)   # a trial the scheduler stopped
    finish_sweep_run(config, parent, sweep_dir, table_csv, plot_png, best)

The parent holds the sweep file (sweep.yaml), the base config, a results table (results.csv), a plot of the final
val loss against the learning rate (plots/val_loss_vs_lr.png), the best trial's numbers and its pretrain.py
command line; the best trial's best checkpoint is logged to its own run and registered.
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow.tracking import MlflowClient

from nanogpt.config import Config
from pipelines.mlflow_adapter.checkpoint_uris import local_checkpoint_dir
from pipelines.mlflow_adapter.job_run import PARENT_RUN_TAG, find_job_run
from pipelines.mlflow_adapter.registry import register_checkpoint
from pipelines.mlflow_adapter.store import resolve_tracking_uri, sanitize_model_name
from pipelines.mlflow_adapter.tracker import MlflowTracker

log = logging.getLogger(__name__)

SWEEP_DIR_TAG = "nanogpt.sweep_dir"
EARLY_STOPPED_TAG = "sweep.early_stopped"


def sweep_tracker(config: Config, sweep_dir: str, name: str | None = None, **kwargs: Any) -> MlflowTracker:
    return MlflowTracker.from_config(config, run_name=name, run_tags={SWEEP_DIR_TAG: sweep_dir, "sweep": "parent"},
                                     system_metrics=False, **kwargs)


def open_sweep_run(config: Config, sweep_dir: str, name: str, spec_yaml: str, params: dict[str, Any]) -> str | None:
    """Create the sweep's parent run, or find it again by its sweep directory (a resumed sweep); returns its id
    (None: the store is unreachable now, and the trials' runs are then not nested)."""
    tracker = sweep_tracker(config, sweep_dir, name)
    run_id = tracker.find_run(SWEEP_DIR_TAG, sweep_dir)
    tracker.start(run_id)
    tracker.log_params(params)
    tracker.log_text(spec_yaml, "sweep.yaml")
    tracker.log_text(config.to_yaml(), "base_config.yaml")
    tracker.flush()
    if tracker.run_id is None:
        log.warning("MLflow at %s is unreachable: the sweep has no parent run, trials log flat runs",
                    tracker.tracking_uri)
    return tracker.run_id


def mark_trial_run(config: Config, run_dir: str, status: str, early_stopped: bool) -> None:
    """Tag a trial's run sweep.early_stopped=true|false and end it with `status` (KILLED for a trial the scheduler
    stopped: its process was ended mid-run, so nothing else ends its run). A trial that never opened a run is
    left alone. Raises MlflowException when the store is unreachable: the caller decides."""
    run_id = find_job_run(config, run_dir)
    if run_id is None:
        return
    client = MlflowClient(resolve_tracking_uri(config))
    client.set_tag(run_id, EARLY_STOPPED_TAG, str(early_stopped).lower())
    if client.get_run(run_id).info.status != status:
        client.set_terminated(run_id, status)


def kill_running_children(config: Config, parent_run_id: str) -> None:
    """End the sweep's trial runs that are still RUNNING as KILLED: the sweep was interrupted, and processes stopped
    mid-run end nothing themselves. Raises MlflowException when the store is unreachable: the caller decides."""
    client = MlflowClient(resolve_tracking_uri(config))
    experiment = client.get_experiment_by_name(config.run.experiment)
    if experiment is None:
        return
    running = client.search_runs([experiment.experiment_id],
                                 f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for run in running:
        client.set_terminated(run.info.run_id, "KILLED")


def register_best_trial(config: Config, run_dir: str, checkpoint: str, status: str) -> str | None:
    """Register the best trial's best checkpoint as a new version of run.registered_model (default: the
    experiment's name), logged once as its run's logged model; returns models:/<name>/<version> or None."""
    run_id = find_job_run(config, run_dir)
    if run_id is None:
        log.warning("the best trial has no MLflow run: its checkpoint %s was not registered", checkpoint)
        return None
    name = sanitize_model_name(config.run.registered_model or config.run.experiment)
    tracker = MlflowTracker.from_config(config, system_metrics=False)
    tracker.start(run_id)
    with local_checkpoint_dir(checkpoint) as ckpt_dir:
        version = register_checkpoint(tracker, ckpt_dir, name)
    tracker.close(status)
    return f"models:/{name}/{version}" if version else None


def finish_sweep_run(config: Config, run_id: str | None, sweep_dir: str, files: dict[str, str],
                     metrics: dict[str, float], tags: dict[str, str], status: str = "FINISHED") -> None:
    """Log the results (`files`: artifact path -> local file), the best trial's numbers and tags, and end the
    parent run with `status`."""
    if run_id is None:
        run_id = sweep_tracker(config, sweep_dir).find_run(SWEEP_DIR_TAG, sweep_dir)
    if run_id is None:
        log.warning("the sweep has no MLflow run (the store stayed unreachable): results not logged")
        return
    tracker = sweep_tracker(config, sweep_dir)
    tracker.start(run_id)
    for artifact_path, local in files.items():
        folder = artifact_path.rpartition("/")[0]
        tracker.log_artifact(local, folder or None)
    tracker.log_metrics(metrics, step=0)
    tracker.set_tags(tags)
    tracker.close(status)
