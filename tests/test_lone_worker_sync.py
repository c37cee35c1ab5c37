"""pipelines/ray_adapter/lean/lone_worker_sync.py on a real Ray local cluster: a LoneSync answers Ray Train's calls as its
synchronization actor would for a group of one worker, refuses a larger group, and the block leaves Ray's classes
as it found them."""

from __future__ import annotations

import pytest
import ray
from ray.train.v2._internal.execution.worker_group import state, worker_group

from pipelines.ray_adapter.lean.lone_worker_sync import LoneSync, lone_worker_sync


def test_a_lone_sync_answers_as_the_actor_would_for_one_worker(ray_local):
    sync = LoneSync()
    ref = sync.broadcast_from_rank_zero.remote(world_rank=0, world_size=1, data={"dir": "checkpoint_000010"},
                                               caller_method_name="ray.train.report", collective_seq=3,
                                               relaxable=True)
    assert ray.get(ref) == {"dir": "checkpoint_000010"}
    assert ray.get(sync.reset.remote()) is None
    assert ray.get(sync.set_required_ranks.remote([0])) is True


def test_a_lone_sync_refuses_a_group_of_two(ray_local):
    with pytest.raises(RuntimeError, match="ray.train.collective.barrier: LoneSync serves a group of one worker, not 2"):
        LoneSync().broadcast_from_rank_zero.remote(world_rank=1, world_size=2, data=None,
                                                   caller_method_name="ray.train.collective.barrier")


def test_the_block_swaps_rays_synchronization_actor_and_puts_it_back(ray_local):
    actor_class, shutdown = worker_group.SynchronizationActor, state._shutdown_sync_actor
    with lone_worker_sync():
        sync = worker_group.SynchronizationActor.options(label_selector={}).remote(timeout_s=60, warn_interval_s=5)
        assert isinstance(sync, LoneSync)
        state._shutdown_sync_actor(sync)  # Ray's would raise: ray.kill takes only actor handles
    assert (worker_group.SynchronizationActor, state._shutdown_sync_actor) == (actor_class, shutdown)


def test_the_block_puts_rays_classes_back_after_an_error(ray_local):
    actor_class, shutdown = worker_group.SynchronizationActor, state._shutdown_sync_actor
    with pytest.raises(KeyboardInterrupt), lone_worker_sync():
        raise KeyboardInterrupt
    assert (worker_group.SynchronizationActor, state._shutdown_sync_actor) == (actor_class, shutdown)
