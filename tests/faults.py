"""Faults injected into a real Ray Train run through the loop's `on_step` hooks (pipelines.pretrain(on_step=...)):
the production code knows nothing of them."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class KillRankAt:
    """SIGKILL the worker of rank `rank` `delay_s` after update `step`, like an OOM kill or a lost node, once:
    it creates `marker` first, so the restarted worker group runs through.

    Ray Train's controller collects reports (and so registers checkpoints) at its health-check poll, every 2 s
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a worker dying sooner after a report restarts from the checkpoint before.
    Real failures come minutes after a checkpoint; the default delay lets one poll pass, as they would."""

    step: int
    marker: str
    rank: int = 1
    delay_s: float = 3.0

    def __call__(self, step: int, metrics: dict) -> None:
        import ray.train

        if step != self.step or ray.train.get_context().get_world_rank() != self.rank:
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        time.sleep(self.delay_s)
        marker.write_text(f"killed rank {self.rank} (pid {os.getpid()}) after update {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)
