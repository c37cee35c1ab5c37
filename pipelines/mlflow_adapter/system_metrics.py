"""MLflow's system metrics for a run: CPU, memory, disk and network (psutil) and NVIDIA GPUs (pynvml), logged as
`system/...` metrics by MLflow's own sampling thread through its own client. Never fatal: where psutil is missing,
or the monitor cannot start, the run goes on without them.

    monitor = start_system_metrics(run_id, tracking_uri, interval_s=10.0, resume=False)   # None: off
    stop_system_metrics(monitor)
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

log = logging.getLogger(__name__)


def start_system_metrics(run_id: str, tracking_uri: str, interval_s: float, resume: bool) -> Any:
    """A started mlflow SystemMetricsMonitor for `run_id`, or None (with one info line) where it cannot run."""
    if importlib.util.find_spec("psutil") is None:  # Ray processes see Ray's vendored psutil
        log.info("MLflow system metrics are off: psutil is not installed (pip install psutil; pynvml for GPUs)")
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=resume,
                                       tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as e:
        log.info("MLflow system metrics are off: %s", e)
        return None


def stop_system_metrics(monitor: Any) -> None:
    try:
        monitor.finish()
    except Exception as e:
        log.debug("stopping MLflow system metrics: %s", e)


def monitor_alive(monitor: Any) -> bool:
    """Whether the monitor's sampling thread still runs: it stops at its first failed call to the store."""
    thread = getattr(monitor, "_process", None)
    return thread is not None and thread.is_alive()
