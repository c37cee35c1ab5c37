"""Connect to Ray the way every entry point here does: an existing cluster if there is one, else a local one.

`ray.init()` with no address uses RAY_ADDRESS (set by `ray job submit`), then the cluster that `ray start` left on
this machine, and only then starts a local instance. Usage stats stay off; token auth stays as Ray sets it.
"""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when it already is (inside a job, a test, a Tune trial)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, num_cpus=num_cpus, log_to_driver=True)
    resources = ray.cluster_resources()
    log.info("Ray ready: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))
