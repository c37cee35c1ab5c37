"""One trial of a sweep: the function that Ray Tune runs per sampled configuration.

    tuner = Tuner(tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_actor_resources(base)), ...)

The trial builds its config (pipelines/sweep/spec.py), plans its run as `<sweep dir>/trials/trial-<trial id>`
(a name that stays the same when Tune restarts the trial or a resumed sweep runs it again, so it continues its own
checkpoints), and opens its MLflow run nested under the sweep's. A one-worker trial then trains right here, in its
Tune actor (pipelines/sweep/trial_here.py; Tune retries its failures, run.max_failures). A trial of several workers
fits the same TorchTrainer as pipelines/pretrain.py (build_trainer) with a callback that reports to Tune
(tune_reports); its worker failures are Ray Train's to handle, exactly as in pretrain.py. run.lean=auto comes
resolved by the sweep's driver (pipelines/sweep/run.py: the lean wing on a local instance it started, whose trainer
runs Ray Train's controller in this trial's actor; Ray's public API on a cluster). The trial's last act is its
record, `outcome.json` in its run directory (pipelines/sweep/outcome.py): a trial run again after it ended reports
that record again and trains nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nanogpt.config import Config
from nanogpt.train.loop import OnStep
from pipelines.sweep.outcome import (
    OUTCOME_FILE,
    TrialOutcome,
    outcome_of,
    read_outcome,
    reports_of,
    write_outcome,
)
from pipelines.sweep.report import FAILED, trial_status
from pipelines.sweep.spec import SweepSpec, base_tokens_per_step, trial_config


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the sweep driver (pickled once into the object store)."""

    spec: SweepSpec
    base: Config
    """The base config, resolved by the driver (absolute data.dir, tracking URI)."""
    trials_dir: str
    """Ray Train's storage_path for the trials' runs."""
    parent_run_id: str | None
    """The sweep's MLflow run; None with run.tracker=none or while the store is unreachable."""
    on_step: tuple[OnStep, ...] = ()
    """Hooks run on every worker after each update (benchmarks, tests' faults)."""


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def trial_params(tune_config: Mapping[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """The swept values of a Tune trial's config, by config key."""
    return {key: tune_config[key] for key in spec.keys if key in tune_config}


def run_trial(tune_config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable. Reports reach Tune through tune_reports' callback: it forwards rank 0's metrics only, which
    is enough here because the loop all-reduces val_loss over every rank before reporting it (nanogpt/train/loop.py),
    so rank 0's val_loss is the whole model's on the whole fixed eval set, the same number on every rank.

    A trial that has a record (pipelines/sweep/outcome.py) ended before: Tune runs it again because the driver died
    before Tune saved that. It reports its outcome again and trains nothing. Otherwise it trains, and records that
    it finished as its last act."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = os.path.join(setup.trials_dir, trial_run_name(trial_id))
    recorded = read_outcome(run_dir)
    if recorded is not None:
        report_again(recorded, run_dir)
        return
    params = trial_params(tune_config, setup.spec)
    config = trial_config(setup.spec, setup.base, params)
    summary = _fit(config.replace(run__name=trial_run_name(trial_id), run__out_dir=setup.trials_dir), setup)
    step = int(summary.get("step") or 0)
    metrics = {**summary, "step": step, "tokens": step * base_tokens_per_step(config)}
    outcome = outcome_of(trial_id, trial_status(False, step, config.train.max_iters), params, metrics, run_dir)
    write_outcome(run_dir, outcome)
    if summary.get("start_step", 0) >= step:  # continued at its end (its record was lost): it reported nothing
        report_again(outcome, run_dir)


def report_again(outcome: TrialOutcome, run_dir: str) -> None:
    """Report a trial that ended before to Tune again (its scheduler and searcher learn it anew) and train nothing;
    a trial that failed fails again (a resumed sweep does not retry failed trials)."""
    import ray.tune

    if outcome.status == FAILED:
        raise RuntimeError(f"{run_dir}: this trial failed before the sweep was resumed ({OUTCOME_FILE}); failed "
                           "trials are not retried")
    for metrics in reports_of(outcome, run_dir):
        ray.tune.report(metrics)


def _fit(config: Config, setup: TrialSetup) -> dict[str, Any]:
    """Train the trial (continuing its own run, if it has one): in this actor when it is one worker
    (pipelines/sweep/trial_here.py), else by its TorchTrainer; rank 0's summary (step, start_step, best_val_loss,
    val_loss)."""
    from pipelines.pretrain import fit
    from pipelines.ray_adapter.runs import plan_trial_run
    from pipelines.sweep.trial_here import fit_here, trains_here

    plan = plan_trial_run(config)
    run_id = None
    if config.run.tracker == "mlflow":
        from pipelines.mlflow_adapter.job_run import open_job_run

        run_id = open_job_run(config, plan, parent_run_id=setup.parent_run_id)
    # the trial's own MLflow run ends here (FINISHED, or FAILED when training fails); the sweep driver marks the
    # runs of trials its scheduler stopped, and logs and registers the best trial's checkpoint
    if trains_here(config):
        return fit_here(config, plan, run_id, setup.on_step)
    outcome = fit(config, plan, run_id, setup.on_step, callbacks=[tune_reports(config)], log_checkpoints=False)
    return outcome.summary


def tune_reports(config: Config):
    """The Ray Train callback that hands the trial's reports to Tune: ray.tune.report in this actor where the lean
    wing runs the controller here (pipelines/ray_adapter/lean/report_here.py), else Ray's TuneReportCallback, through
    its queue actor."""
    from pipelines.ray_adapter.trainer import wing_controller

    if wing_controller(config) == "here":
        from pipelines.ray_adapter.lean.report_here import ReportToTuneHere

        return ReportToTuneHere()
    from ray.tune.integration.ray_train import TuneReportCallback

    return TuneReportCallback()
