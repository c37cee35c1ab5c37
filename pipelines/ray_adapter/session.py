"""Connect to Ray the way every entry point here does: an existing cluster if there is one, else a local one.

`ray.init()` with no address uses RAY_ADDRESS (set by `ray job submit`), then the cluster that `ray start` left on
this machine, and only then starts a local instance. Usage stats stay off; token auth stays on.

A local instance started here is set up for one training job on a small machine (measured on 2 cores with
bench/bench_main_job.py): its workers run at nice 0, and it starts no processes the job cannot use (Ray Train's
preemption watcher, idle prestarted workers, the autoscaler's monitor; for a training job's own instance also Ray's
API server). A cluster we connect to keeps the settings of whoever started it. It is private to this machine: every
port on 127.0.0.1 (GCS, raylet, workers, agents, dashboard), no Prometheus endpoint of its own that answers without
the token (Ray's metrics export is off: nothing scrapes a job's own instance), the token file readable by its owner
only, and a watchdog (pipelines/ray_adapter/watchdog.py) that stops its processes if the driver dies without shutting Ray
down (`kill -9`).

The dashboard (Ray's State API) runs in a local instance only when asked (`state_api=True`, the sweep driver): Ray
Train's placement-group cleaner asks it every second whether a controller is alive, to free the workers of a trial
Tune stopped while the instance lives on. A training job's own instance dies with its driver, so it needs neither;
they cost its worker about 4% of a core while it trains, and 4 CPU-s while it starts (the dashboard's dozen
processes). Its trainer also leaves out the cleaner and the autoscaling coordinator, which serve a cluster that
outlives a run or grows (pipelines/ray_adapter/lean/trainer.py, chosen by `serves_state_api`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import ray

log = logging.getLogger(__name__)

# Environment for the processes of a local instance (the raylet, the Train controller and workers inherit the
# driver's environment). setdefault: a variable the user set wins.
LOCAL_INSTANCE_ENV = {
    # Ray starts workers at nice 15 so that its daemons win on a busy node. Here the worker IS the job: whenever
    # anything else on the machine wants CPU (another user's tests, our own driver and daemons) a nice-15 worker gets
    # a small fraction of a core (CFS weight 36 against 1024 at nice 0), and its two OpenMP threads then wait
    # on each other at every barrier. `ray job submit` also runs its jobs at 0.
    "RAY_worker_niceness": "0",
    # Ray Train's preemption watcher: one more actor process (about 2 CPU-s to start on these cores, then a poll every
    # 5 s) that watches for cloud spot-node preemption, which a single local machine does not have.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray prestarts one idle worker per CPU for the driver's job (about 0.9 CPU-s each, while the Train controller
    # starts). Ray Train never uses them: its controller and workers run with their own runtime env (env_vars), so
    # each gets a fresh process anyway. Ray Data tasks (pipelines/prepare.py) start their workers on demand instead.
    "RAY_prestart_worker_first_driver": "0",
    # Ray binds its servers to the node IP (all interfaces for the C++ ones) unless that IP is loopback, which it
    # is only where Ray disables clusters (macOS/Windows): do the same here, so nothing listens off this machine.
    # Read by ray_constants at import time in every Ray process this driver starts (they inherit the variable).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray's metrics export (RayConfig enable_metrics_collection, read by the raylet): off, the dashboard agent then
    # starts no Prometheus endpoint, which would answer anyone on this machine without the token. Nothing scrapes a
    # job's own instance, which lives as long as the job.
    "RAY_enable_metrics_collection": "0",
}
TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # Ray's default token location (token auth is on by default)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


_without_state_api = False  # set once this process has started a local instance with no dashboard


def init_ray(address: str | None = None, num_cpus: int | None = None, *, state_api: bool = False) -> None:
    """Initialise Ray once per process; a no-op when it already is (inside a job, a test, a Tune trial).
    `state_api`: a local instance started here runs the dashboard (see the module docstring)."""
    global _without_state_api
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = starts_local_instance(address)
    dashboard = _prepare_local_instance(state_api) if local else {}
    _without_state_api = local and not state_api
    # WARNING, not INFO, for the driver's `ray` loggers: no "Started a local Ray instance" and Ray Train driver
    # chatter on a nanoGPT user's console; the workers' own output (log_to_driver) is unaffected.
    with _head_without_extras(state_api) if local else contextlib.nullcontext():
        ray.init(address=address, num_cpus=num_cpus, log_to_driver=True, logging_level=logging.WARNING, **dashboard)
    if local:
        _restrict_token_file()
        _start_watchdog()
    resources = ray.cluster_resources()
    log.info("Ray ready: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))


def serves_state_api() -> bool:
    """False when the Ray this process uses is a local instance it started without the dashboard."""
    return not _without_state_api


def _prepare_local_instance(state_api: bool) -> dict:
    """Set the local instance's environment; return ray.init's dashboard arguments."""
    for key, value in LOCAL_INSTANCE_ENV.items():
        os.environ.setdefault(key, value)
    # this process imported ray already: its own copy of the constant decides the driver's node IP
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"
    _restrict_token_file()
    # Token auth stays on (Ray's default for a new local instance); its warning saying so on every start goes.
    # (Setting RAY_AUTH_MODE=token instead does not work once ray is imported: the driver keeps "disabled".)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _DropMessage("Token authentication is enabled for this Ray cluster"))
    return _dashboard_on_free_port() if state_api else {"include_dashboard": False}


@contextlib.contextmanager
def _head_without_extras(state_api: bool):
    """While the block starts a local instance: without the Python processes Ray starts on every head node and
    ray.init has no switch for. The autoscaler's monitor (monitor.py) watches for nodes to add to a cluster that
    cannot grow, and serves Prometheus metrics to anyone on this machine. Unless `state_api` asks for the dashboard,
    the API server (dashboard.py) goes too: with include_dashboard=False it serves only usage stats, which are off,
    and ray.init waits until it is up (about 2 s here). Together they take about 2.7 CPU-s while the instance starts,
    then wake about 40 times a second. ray.init here: 3.6 s without them against 6.5 s with (3 alternating runs)."""
    node = ray._private.node.Node  # Ray 2.60; private, Ray is pinned
    kept = node.start_api_server, node.start_monitor
    node.start_monitor = _not_started
    if not state_api:
        node.start_api_server = _not_started
    try:
        yield
    finally:
        node.start_api_server, node.start_monitor = kept


def _not_started(node, **kwargs) -> None:
    pass


def _dashboard_on_free_port() -> dict:
    """Ray Train's PlacementGroupCleaner asks the State API (the dashboard) whether a controller is dead, to free
    the workers of a sweep trial Tune stopped. Without RAY_API_SERVER_ADDRESS it scans the machine for Ray instances
    and gives up when there are several (other users' jobs, a test's cluster): name ours. Every Ray process started
    here inherits the variable."""
    if "RAY_API_SERVER_ADDRESS" in os.environ:
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def _restrict_token_file() -> None:
    """Ray writes ~/.ray/auth_token world-readable (0644); whoever reads it can run code on this Ray."""
    if TOKEN_FILE.parent.is_dir():
        TOKEN_FILE.parent.chmod(0o700)
    if TOKEN_FILE.is_file():
        TOKEN_FILE.chmod(0o600)


def _start_watchdog() -> None:
    """A process outside this one's session (a Ctrl-C in the terminal is the driver's), watching this pid."""
    watchdog = Path(__file__).with_name("watchdog.py")
    subprocess.Popen([sys.executable, str(watchdog), str(os.getpid())], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def starts_local_instance(address: str | None) -> bool:
    """Whether `ray.init(address)` will start a new local instance rather than connect to a running one (Ray's own
    rule: RAY_ADDRESS, then the cluster `ray start` recorded on this machine, else local)."""
    if address is not None and address.startswith("ray://"):
        return False
    from ray._private.services import canonicalize_bootstrap_address  # Ray 2.60; private API, Ray is pinned

    try:
        return canonicalize_bootstrap_address(address) is None
    except Exception:  # a bad address or "auto" with nothing running: ray.init reports it
        return False
