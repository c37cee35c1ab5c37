"""Which sweep trials train in their Tune actor, and what that actor (and the trial) reserves and retries (pipelines/sweep/run.py,
pipelines/sweep/trial_here.py). No Ray cluster: the sweeps themselves run in tests/test_tune.py."""

from __future__ import annotations

import pytest

from nanogpt.config import Config
from pipelines.sweep.run import DRIVER_RESOURCES, trial_actor_resources, trial_cpus, trial_retries
from pipelines.sweep.trial_here import trains_here


def config(**run) -> Config:
    return Config.from_dict({"run": run})


@pytest.mark.parametrize("run, here", [
    ({"num_workers": 1}, True),
    ({"num_workers": 2}, False),
    ({"num_workers": 2, "min_workers": 1, "max_failures": -1}, False),  # elastic: refused for sweeps anyway
])
def test_only_a_fixed_one_worker_trial_trains_in_its_actor(run, here):
    assert trains_here(config(**run)) is here


def test_the_trial_actor_reserves_its_workers_share_only_when_it_trains():
    assert trial_actor_resources(config(num_workers=1, cpus_per_worker=0.5)) == {"cpu": 0.5}
    assert trial_actor_resources(config(num_workers=1, cpus_per_worker=4, use_gpu=True, gpus_per_worker=1)) == \
        {"cpu": 4, "gpu": 1}
    assert trial_actor_resources(config(num_workers=2, cpus_per_worker=4, use_gpu=True)) == DRIVER_RESOURCES


def test_a_trial_holds_its_workers_cpus_and_a_trainer_trial_its_drivers_sliver_too():
    assert trial_cpus(config(num_workers=1, cpus_per_worker=0.95)) == 0.95  # two fit on 2 CPUs
    assert trial_cpus(config(num_workers=2, cpus_per_worker=0.95)) == pytest.approx(1.9 + DRIVER_RESOURCES["cpu"])


def test_tune_retries_a_trial_only_where_ray_train_does_not():
    assert trial_retries(config(num_workers=1, max_failures=3)) == 3
    assert trial_retries(config(num_workers=1, max_failures=-1)) == -1
    assert trial_retries(config(num_workers=2, max_failures=3)) == 0  # its TorchTrainer restarts its workers
