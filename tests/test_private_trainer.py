"""The trainer of a job on its own local Ray instance (no dashboard, so no State API) is Ray's TorchTrainer less
the placement-group cleaner, which needs that API; a sweep's instance serves the API and keeps the cleaner."""

from __future__ import annotations

from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from pipelines.private_trainer import PrivateInstanceTorchTrainer
from pipelines.trainer import _trainer_class


def _callback_types(trainer_class: type) -> list[type]:
    trainer = trainer_class(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    return [type(cb) for cb in trainer._create_default_callbacks()]


def test_private_instance_trainer_leaves_out_the_placement_group_cleaner_and_nothing_else():
    ray_default = _callback_types(TorchTrainer)
    assert PlacementGroupCleanerCallback in ray_default  # Ray still adds it: leaving it out still means something
    assert _callback_types(PrivateInstanceTorchTrainer) == [
        t for t in ray_default if t is not PlacementGroupCleanerCallback]


def test_the_cleaner_stays_where_the_state_api_is_served():
    assert _trainer_class(state_api=True) is TorchTrainer
    assert _trainer_class(state_api=False) is PrivateInstanceTorchTrainer
