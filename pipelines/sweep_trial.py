"""One trial of a sweep: the Ray Train V2 driver function that Ray Tune runs per sampled configuration.

    tuner = Tuner(tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 0.01}), ...)

The trial builds its config (pipelines/sweep_spec.py), plans its run as `<sweep dir>/trials/trial-<trial id>`
(a name that stays the same when Tune restarts the trial or a resumed sweep runs it again, so the TorchTrainer
continues its own checkpoints), opens its MLflow run nested under the sweep's, and fits the same TorchTrainer as
pipelines/pretrain.py (build_trainer) with a TuneReportCallback. Worker failures are Ray Train's to handle
(run.max_failures), exactly as in pretrain.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nanogpt.config import Config
from nanogpt.train import OnStep
from pipelines.sweep_spec import SweepSpec, trial_config

TRIALS_DIR = "trials"  # in the sweep directory: one Ray Train run per trial


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
    """The Tune trainable. Reports reach Tune through TuneReportCallback: it forwards rank 0's metrics only, which
    is enough here because the loop all-reduces val_loss over every rank before reporting it (nanogpt/train.py),
    so rank 0's val_loss is the whole model's on the whole fixed eval set, the same number on every rank."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.pretrain import fit
    from pipelines.runs import plan_trial_run

    name = trial_run_name(ray.tune.get_context().get_trial_id())
    config = trial_config(setup.spec, setup.base, trial_params(tune_config, setup.spec))
    config = config.replace(run__name=name, run__out_dir=setup.trials_dir)
    plan = plan_trial_run(config)
    run_id = None
    if config.run.tracker == "mlflow":
        from pipelines.job_tracking import open_job_run

        run_id = open_job_run(config, plan, parent_run_id=setup.parent_run_id)
    # the trial's own MLflow run ends here (FINISHED, or FAILED when Train gives up); the sweep driver marks the
    # runs of trials its scheduler stopped, and logs and registers the best trial's checkpoint
    fit(config, plan, run_id, setup.on_step, callbacks=[TuneReportCallback()], log_checkpoints=False)
