"""Connect to Ray the way every entry point here does: an existing cluster if there is one, else a local one.

    init_ray(address, num_cpus, lean=config.run.lean)   # before anything else of the job imports ray

`ray.init()` with no address uses RAY_ADDRESS (set by `ray job submit`), then the cluster that `ray start` left on
this machine, and only then starts a local instance. Usage stats stay off; token auth stays on. A cluster we connect
to keeps the settings of whoever started it.

A local instance started here is private to this machine: every port on 127.0.0.1, Ray's metrics export off, the
token file readable by its owner only, and a watchdog (pipelines/ray_adapter/watchdog.py) that stops its processes if
the driver dies without shutting Ray down (`kill -9`). It starts none of the processes a job on one machine has no
use for that Ray has a public switch for (LOCAL_INSTANCE_ENV), and its workers run at nice 0. Ray reads the loopback
and token settings when `ray` is imported: so this module decides before it imports ray, and the entry points import
ray only through init_ray.

With the lean wing (run.lean, pipelines/ray_adapter/lean_switch.py) a training job's own instance also runs without
the dashboard, the autoscaler's monitor and Ray's API server (pipelines/ray_adapter/lean/head.py), and its trainer
without what needs them. Without the wing it runs the dashboard, whose State API Ray Train's placement-group cleaner
asks every second; a sweep's instance always does (it frees the workers of the trials Tune stops).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

# Environment for the processes of a local instance (the raylet, the Train controller and workers inherit the
# driver's environment). setdefault: a variable the user set wins.
LOCAL_INSTANCE_ENV = {
    # Ray starts workers at nice 15 so that its daemons win on a busy node. Here the worker IS the job: whenever
    # anything else on the machine wants CPU a nice-15 worker gets a small fraction of a core, and its two OpenMP
    # threads then wait on each other at every barrier. `ray job submit` also runs its jobs at 0.
    "RAY_worker_niceness": "0",
    # Ray Train's preemption watcher: one more actor process that watches for cloud spot-node preemption, which a
    # single local machine does not have.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Ray prestarts one idle worker per CPU for the driver's job. Ray Train never uses them (its controller and
    # workers get fresh processes for their runtime env); Ray Data tasks start their workers on demand instead.
    "RAY_prestart_worker_first_driver": "0",
    # Ray binds its servers to the node address (all interfaces for the C++ ones) unless that address is loopback,
    # which it is where Ray disables clusters (macOS/Windows): the same here, so nothing listens off this machine.
    # Read when ray is imported, in this process (before its import: init_ray) and in every Ray process it starts.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Ray's metrics export (read by the raylet): off, so the dashboard agent starts no Prometheus endpoint, which
    # would answer anyone on this machine without the token. Nothing scrapes a job's own instance.
    "RAY_enable_metrics_collection": "0",
}
# Token auth for the instance, as Ray turns it on for a new local instance anyway, but without its warning that it
# did. Read when ray is imported: set only where init_ray comes first (after the import, Ray turns it on itself).
TOKEN_AUTH_ENV = {"RAY_AUTH_MODE": "token"}
TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # Ray's default token location (token auth is on by default)
LOOPBACK = ("127.0.0.1", "::1")

_without_state_api = False  # set once this process has started a local instance with no dashboard


def init_ray(address: str | None = None, num_cpus: int | None = None, *, state_api: bool = False,
             lean: str = "auto") -> None:
    """Initialise Ray once per process; a no-op when it already is (inside a job, a test, a Tune trial).
    `state_api`: a local instance started here runs the dashboard. `lean`: run.lean (see the module docstring)."""
    global _without_state_api
    if ray_is_up():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = starts_local_instance(address)
    if local:
        _prepare_local_instance()
    from pipelines.ray_adapter.lean_switch import wing_on

    wing = local and wing_on(lean, own_instance=True)
    dashboard = state_api or not wing  # Ray's stock trainer asks the State API (its placement-group cleaner)
    import ray

    if local:
        _keep_on_loopback()
    with _lean_head(dashboard) if wing else contextlib.nullcontext():
        # WARNING, not INFO, for the driver's `ray` loggers: no "Started a local Ray instance" and Ray Train driver
        # chatter on a nanoGPT user's console; the workers' own output (log_to_driver) is unaffected.
        ray.init(address="local" if local else address, num_cpus=num_cpus, log_to_driver=True,
                 logging_level=logging.WARNING, **(_dashboard_args(dashboard) if local else {}))
    _without_state_api = local and not dashboard
    if local:
        _restrict_token_file()
        _start_watchdog()
    resources = ray.cluster_resources()
    log.info("Ray ready: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))


def ray_is_up() -> bool:
    """Whether this process is connected to Ray, without importing ray (its import reads settings init_ray sets)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def serves_state_api() -> bool:
    """False when the Ray this process uses is a local instance it started without the dashboard."""
    return not _without_state_api


def started_local_instance() -> bool:
    """Whether the Ray this process is connected to is a local instance that this process started (here, or by a
    plain ray.init), which can never grow: its GCS server is one of this process's children."""
    if not ray_is_up():
        return False
    import ray

    port = int(ray.get_runtime_context().gcs_address.rsplit(":", 1)[1])
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("inet")):
                return True
    return False


def starts_local_instance(address: str | None) -> bool:
    """Whether init_ray(address) starts a new local instance rather than connect to a running one, by Ray's
    documented rule (RAY_ADDRESS, then the cluster `ray start` recorded on this machine, else local), decided
    without importing ray."""
    if address in (None, "auto") and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address is not None:  # "auto" connects to whatever runs here (or fails); "ray://..." is a Ray Client
        return address == "local"
    return not _recorded_cluster().exists()


def _recorded_cluster() -> Path:
    """Where `ray start` records its cluster's address for ray.init() on this machine (Ray's temp dir)."""
    system_temp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux")
                                                   else None) or "/tmp"
    return Path(system_temp) / "ray" / "ray_current_cluster"


def _prepare_local_instance() -> None:
    """Set the local instance's environment, before ray is imported where it is not yet."""
    ray_imported = "ray" in sys.modules
    for key, value in {**LOCAL_INSTANCE_ENV, **({} if ray_imported else TOKEN_AUTH_ENV)}.items():
        os.environ.setdefault(key, value)
    _restrict_token_file()


def _keep_on_loopback() -> None:
    """The new node's address is loopback: Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it was imported. Where
    ray was imported before init_ray set it (a notebook, a test, prepare.py), the wing's loopback piece under the Ray
    release it was written for (pipelines/ray_adapter/lean/loopback.py); under another one, no instance at all."""
    import ray.util

    if ray.util.get_node_ip_address() in LOOPBACK or os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0":
        return
    from pipelines.ray_adapter import lean

    if not lean.usable():
        raise RuntimeError("a local Ray instance started now would listen on every interface: ray was imported "
                           "before pipelines.ray_adapter.session.init_ray; call init_ray first, or export "
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Python starts")
    from pipelines.ray_adapter.lean.loopback import read_loopback_setting_again

    read_loopback_setting_again()


def _lean_head(dashboard: bool):
    from pipelines.ray_adapter.lean.head import head_without_extras

    return head_without_extras(dashboard)


def _dashboard_args(dashboard: bool) -> dict:
    """ray.init's dashboard arguments for a local instance. Ray Train's PlacementGroupCleaner asks the State API
    (the dashboard) whether a controller is dead, to free its workers. Without RAY_API_SERVER_ADDRESS it scans the
    machine for Ray instances and gives up when there are several (other users' jobs, a test's cluster): name ours.
    Every Ray process started here inherits the variable."""
    if not dashboard:
        return {"include_dashboard": False}
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
