"""The TorchTrainer for a Ray instance the driver started for itself without the dashboard
(pipelines/ray_session.py, `serves_state_api()` False): Ray Train's placement-group cleaner left out.

The cleaner is one more actor process. Every second it asks the dashboard's State API whether the Train controller
is still alive, so that it can free the worker placement group of a controller that died while the cluster lives
on (Tune stopping a trial). Such an instance dies with its driver (the watchdog stops it after a `kill -9`), so
nothing outlives the controller, and with no dashboard to ask, the cleaner would warn every second.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import (  # Ray 2.60; private, Ray is pinned
    PlacementGroupCleanerCallback,
)


class PrivateInstanceTorchTrainer(TorchTrainer):
    """TorchTrainer with Ray Train's default callbacks, less the placement-group cleaner."""

    def _create_default_callbacks(self) -> list:
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, PlacementGroupCleanerCallback)]
