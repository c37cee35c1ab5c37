"""Stop the Ray processes of a local instance when the driver that started them dies without shutting Ray down
(`kill -9`, the OOM killer). Ray's own clean-up takes over a minute, with its ports open meanwhile (bench/NOTES.md).

    python pipelines/ray_adapter/watchdog.py <driver pid>        # started by pipelines/ray_adapter/session.py, never by hand

It keeps a list of the driver's descendants (GCS, raylet, agents, workers), refreshed every 2 s, and when
the driver is gone it terminates whichever of them are still running (SIGKILL after 3 s). A normal exit of the
driver (ray.shutdown) leaves nothing for it to do. Only processes that were the driver's descendants are touched;
psutil checks that a pid was not reused before signalling it.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil


def watch(driver_pid: int, interval_s: float = 0.5, rescan_s: float = 2.0) -> list[psutil.Process]:
    """Wait for the driver to die (checked every `interval_s`); return its last known descendants (this watchdog
    excluded). Listing them reads every process of the machine (bench/NOTES.md: its CPU cost), so that is done every
    `rescan_s` only: the workers Ray starts in between exit anyway when their raylet is stopped."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    family: list[psutil.Process] = []
    scanned = -float("inf")
    while True:
        try:
            if driver.status() == psutil.STATUS_ZOMBIE:
                return family
            if time.monotonic() - scanned >= rescan_s:
                family = [p for p in driver.children(recursive=True) if p.pid != os.getpid()]
                scanned = time.monotonic()
        except psutil.NoSuchProcess:
            return family
        time.sleep(interval_s)


def stop(processes: list[psutil.Process], grace_s: float = 3.0) -> None:
    for p in processes:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the driver's terminal is the driver's to handle
    stop(watch(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
