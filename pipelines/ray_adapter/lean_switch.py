"""run.lean, resolved in the process that asks: whether the private speed-ups of pipelines/ray_adapter/lean/ apply.

    auto   only for a local Ray instance this process started (the main job's own ray.init): every job on a cluster
           (`ray start`, `ray job submit`, KubeRay) and every sweep trial uses Ray's public API only
    on     wherever they can apply (a test, a benchmark; on a cluster the trainer's pieces that need no own instance)
    off    never

Either way only under the Ray release the wing was written for (pipelines/ray_adapter/lean/__init__.py). This module
imports nothing of the wing unless it applies: "off", or "auto" on a cluster, never loads a module of it.
"""

from __future__ import annotations


def wing_on(setting: str, own_instance: bool) -> bool:
    """Whether the wing applies under run.lean=`setting`, where `own_instance` says whether this process started
    the local Ray instance it uses (or is about to)."""
    if setting == "off" or (setting == "auto" and not own_instance):
        return False
    from pipelines.ray_adapter import lean

    return lean.usable()
