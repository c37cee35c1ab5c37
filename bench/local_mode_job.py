"""The main job (pipelines/pretrain.py) with its TorchTrainer in Ray Train's local mode, `ScalingConfig(num_workers=0)`:
the training function runs in this driver process, with no worker actor, no controller and no synchronization actor.
A benchmark arm of bench/bench_main_job.py, not a way to train: local mode restarts nothing after a failure, and its
`ray.train.report` only remembers the last checkpoint, which it neither copies into the run directory nor keeps
(the loop deletes its temporary directory after the report). The job therefore ends with no checkpoint to log.

    python bench/local_mode_job.py --config shakespeare_char_cpu --train.max_iters=300 --data.dir=DIR --run.out_dir=DIR

Takes pipelines/pretrain.py's arguments; run.lean is off (Ray's public API only).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from anywhere

from pipelines import pretrain  # noqa: E402  (imports no ray: init_ray comes first, as in the real job)
from pipelines.ray_adapter import trainer as ray_trainer  # noqa: E402


class LocalModeTrainer:
    """Ray's TorchTrainer in local mode, whose Result names no checkpoint: the one it remembers is gone."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def fit(self):
        return dataclasses.replace(self.trainer.fit(), checkpoint=None, best_checkpoints=[])


def local_mode_trainer(config, plan, *, tracking_run_id: str | None = None, on_step: Sequence[Any] = (),
                       callbacks: Sequence[Any] = ()) -> LocalModeTrainer:
    """What ray_adapter.trainer.build_trainer builds, but with no workers: Ray Train's local mode."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    return LocalModeTrainer(TorchTrainer(
        ray_trainer.train_loop_per_worker,
        train_loop_config=ray_trainer.worker_config(config, plan, tracking_run_id, on_step),
        scaling_config=ScalingConfig(num_workers=0),
        run_config=ray_trainer.run_config(config, plan, callbacks),
    ))


if __name__ == "__main__":
    ray_trainer.build_trainer = local_mode_trainer  # pretrain.fit() looks it up when it builds the trainer
    sys.exit(pretrain.main([*sys.argv[1:], "--run.lean=off"]))
