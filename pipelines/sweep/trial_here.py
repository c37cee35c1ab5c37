"""A one-worker trial trains in its own Tune actor: the loop as a plain process (nanogpt/train/loop.py), its
checkpoints kept by nanogpt/train/local_reporter.py in the trial's run directory, each report handed to Tune.

    if trains_here(config):
        summary = fit_here(config, plan, run_id, on_step)

A TorchTrainer inside the trial (pipelines/sweep/trial.py's other path) would start a worker process for that one
rank, with Ray Train's import and a placement group of its own, while the trial's actor, which holds the trial's
resources, waits for it: per trial, seconds of a core that a lone job started by hand does not pay twice
(bench/NOTES.md). Tune's own examples train a one-process trial in its function. What Ray Train gave such a trial
is kept: its checkpoints continue when the trial runs again (Tune's FailureConfig takes run.max_failures, see
pipelines/sweep/run.py, or a resumed sweep), its metrics go to metrics.jsonl and its MLflow run, and every eval and
checkpoint is reported to Tune. Trials of several workers, or elastic ones, keep their TorchTrainer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from nanogpt.checkpoint.files import CheckpointError
from nanogpt.config import Config
from nanogpt.data.shard_cache import local_shards
from nanogpt.train.local_reporter import LocalReporter
from nanogpt.train.loop import OnStep, TrainContext, train
from pipelines.ray_adapter.runs import RunPlan

log = logging.getLogger(__name__)


def trains_here(config: Config) -> bool:
    """Whether a trial of `config` trains in its Tune actor: one worker, a fixed group."""
    return config.run.num_workers == 1 and not config.run.elastic


class TuneReporter(LocalReporter):
    """LocalReporter (the checkpoint put in place in the run directory, the latest `num_to_keep` and the best
    kept), then the report to Tune: Tune's scheduler may end the trial at this report, its checkpoint already
    complete."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.tune

        super().report(metrics, checkpoint_dir)
        ray.tune.report(dict(metrics))


def fit_here(config: Config, plan: RunPlan, run_id: str | None, on_step: Sequence[OnStep] = ()) -> dict[str, Any]:
    """Train the trial in this process, continuing from its newest complete checkpoint if it has one, and end its
    MLflow run as pipelines/pretrain.py's fit() ends a TorchTrainer's (FAILED when training raised); the same
    summary as a Ray Train run's rank 0 (pipelines/ray_adapter/trainer.py)."""
    from pipelines.pretrain import end_job_run
    from pipelines.ray_adapter.trainer import all_of, make_worker_tracker, run_summary

    resume_from = plan.resume_from  # the trial's newest complete checkpoint (plan_trial_run)
    if resume_from is None and config.model.init_from == "resume":
        raise CheckpointError(f"model.init_from=resume but trial run {plan.run_dir} has no complete checkpoint")
    if resume_from:
        log.info("trial %s continues from %s", plan.name, resume_from)
    tracker = make_worker_tracker(config, 0, plan.run_dir, run_id, None)
    try:
        # the driver verified the shards before any trial started, as it does for a Ray Train run
        result = train(config, local_shards(config.data.dir, config.data.cache_dir), TrainContext(shards_hashed=True),
                       TuneReporter(plan.run_dir, config.run.num_to_keep), tracker=tracker, resume_from=resume_from,
                       on_step=all_of(on_step))
    except BaseException:
        tracker.close(status="FAILED")
        end_job_run(config, plan, run_id, "FAILED")
        raise
    tracker.close()
    end_job_run(config, plan, run_id, "FINISHED")
    return run_summary(result, world_size=1)
