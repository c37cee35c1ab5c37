"""Connect to Ray the way every entry point here does: an existing cluster if there is one, else a local one.

`ray.init()` with no address uses RAY_ADDRESS (set by `ray job submit`), then the cluster that `ray start` left on
this machine, and only then starts a local instance. Usage stats stay off; token auth stays as Ray sets it.
"""

from __future__ import annotations

import logging
import os
import socket

import ray

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process; a no-op when it already is (inside a job, a test, a Tune trial).
    `address="local"` always starts a new local instance, with its dashboard on a free port of 127.0.0.1."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs = {}
    if address == "local" and "RAY_API_SERVER_ADDRESS" not in os.environ:
        # Ray Train's PlacementGroupCleaner asks the State API (the dashboard) whether a controller is dead, to free
        # the workers of a sweep trial Tune stopped. Without an address it scans the machine for Ray instances and
        # gives up when there are several: say which one (every Ray process started here inherits the variable).
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    ray.init(address=address, num_cpus=num_cpus, log_to_driver=True, **kwargs)
    resources = ray.cluster_resources()
    log.info("Ray ready: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
