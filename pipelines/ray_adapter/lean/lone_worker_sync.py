"""A lone worker's collectives without Ray Train's synchronization actor.

Ray Train starts a SynchronizationActor beside every worker group: its workers meet there at each checkpoint report
(to agree on the checkpoint's directory) and at `ray.train.collective` calls. For a group of one worker there is no
one to meet, yet the actor is one more Ray process: started between `fit()` and the worker's first line, and then
waking every 10 ms while the worker trains (its core worker's signal check), each wake-up taking a core from the
worker's compute threads on a small machine (figures: bench/NOTES.md).

    with lone_worker_sync():          # around a run whose worker group is one worker, in the process that starts it
        asyncio.run(controller.run())

Within the block, a worker group started in this process gets a LoneSync instead of the actor: its methods answer
at once with what a group of one would get (the rank 0 worker's own data), through the object store as the actor's
would. Ray's group shutdown skips it (`ray.kill` takes only actor handles).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.train.v2._internal.execution.worker_group import state as _state
from ray.train.v2._internal.execution.worker_group import worker_group as _worker_group


class LoneSync:
    """What Ray Train calls on its SynchronizationActor (`.method.remote(...)`, an ObjectRef back), for a group of
    one worker."""

    class _Method:
        def __init__(self, answer) -> None:
            self._answer = answer

        def remote(self, *args: Any, **kwargs: Any) -> ray.ObjectRef:
            return ray.put(self._answer(*args, **kwargs))

    @staticmethod
    def _broadcast(world_rank: int, world_size: int, data: Any, caller_method_name: str, **_: Any) -> Any:
        if world_size != 1:
            raise RuntimeError(f"{caller_method_name}: LoneSync serves a group of one worker, not {world_size}")
        return data

    broadcast_from_rank_zero = _Method(_broadcast)
    reset = _Method(lambda: None)  # unblocks workers waiting at a barrier: a lone worker never waits there
    set_required_ranks = _Method(lambda ranks: True)


class LoneSyncActorClass:
    """Stands in for the SynchronizationActor class: `.options(...).remote(...)` makes a LoneSync."""

    def options(self, **_: Any) -> LoneSyncActorClass:
        return self

    def remote(self, **_: Any) -> LoneSync:
        return LoneSync()


def _shutdown_sync(shutdown_actor):
    def shutdown(sync_actor) -> None:
        if not isinstance(sync_actor, LoneSync):
            shutdown_actor(sync_actor)
    return shutdown


@contextmanager
def lone_worker_sync() -> Iterator[None]:
    """Worker groups started in this process within the block use a LoneSync (their group must be one worker)."""
    actor_class, shutdown_actor = _worker_group.SynchronizationActor, _state._shutdown_sync_actor
    _worker_group.SynchronizationActor = LoneSyncActorClass()
    _state._shutdown_sync_actor = _shutdown_sync(shutdown_actor)
    try:
        yield
    finally:
        _worker_group.SynchronizationActor, _state._shutdown_sync_actor = actor_class, shutdown_actor
