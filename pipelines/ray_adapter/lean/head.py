"""A job's own local Ray instance without the head processes it cannot use, which ray.init has no switch for: the
autoscaler's monitor (it watches for nodes to add to an instance that cannot grow, and serves Prometheus metrics to
anyone on this machine) and, unless the dashboard is asked for, Ray's API server (with include_dashboard=False it
serves only usage stats, which are off, yet ray.init waits for it). Figures: bench/NOTES.md.

    with head_without_extras(dashboard=False):
        ray.init(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ray._private.node import Node


@contextlib.contextmanager
def head_without_extras(dashboard: bool) -> Iterator[None]:
    """While the block starts a local instance, its head starts no monitor, and no API server unless `dashboard`."""
    kept = Node.start_api_server, Node.start_monitor
    Node.start_monitor = _not_started
    if not dashboard:
        Node.start_api_server = _not_started
    try:
        yield
    finally:
        Node.start_api_server, Node.start_monitor = kept


def _not_started(node, **kwargs) -> None:
    pass
