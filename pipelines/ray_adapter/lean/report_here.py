"""A sweep trial's reports to Tune from a Ray Train controller that runs in the trial's own actor (the wing's
ControllerHereTrainer).

Ray's TuneReportCallback carries each report to Tune through a queue actor (ray.util.queue), since Ray's controller
runs in an actor of its own: one more process per trial, which the trial's actor asks for results over and over
while the trial trains. With the controller in the trial's actor the report is in Tune's own process already, and
Tune's public `ray.tune.report` takes it there, as TuneReportCallback's queue would hand it on.

    callbacks = [ReportToTuneHere()]    # instead of TuneReportCallback(), only where the controller runs here
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY


class ReportToTuneHere(UserCallback):
    """TuneReportCallback's report (rank 0's metrics, plus the checkpoint's path) by ray.tune.report in this
    process."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import ray.tune

        report = metrics[0].copy()
        if checkpoint:
            report[CHECKPOINT_PATH_KEY] = checkpoint.path
        ray.tune.report(report)
