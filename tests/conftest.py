"""Shared fixtures: one real Ray local cluster per test session, and the shared corpus and tiktoken cache.

The corpus and the tiktoken cache come from the environment, never from a hard-coded path:
    NANOGPT_TINYSHAKESPEARE=/path/to/input.txt TIKTOKEN_CACHE_DIR=/path/to/tiktoken_cache pytest
Tests that need them are skipped (with the reason) when the variables are unset.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
"""The first 8 bytes of every PNG file: a loss-curve plot is a real image."""
# Ray Train's controller takes a worker's report off a one-slot queue once per health check, every 2 s by default:
# a worker that reports again sooner waits for it. The debug runs here report every 10 updates, a fraction of a
# second apart, so at Ray's default each report after the first waits up to 2 s, a third of a short run (measured:
# bench/NOTES.md, "The test suite's time"). The session instance's controllers (through its raylet's environment,
# which Tune trials inherit too) poll every PROMPT_REPORT_INTERVAL_S seconds. Runs whose subject is how Ray Train
# notices a dead worker put Ray's default back (tests/faults.py, ray_train_default_timings); the rehearsals' clusters
# never see this.
PROMPT_REPORT_INTERVAL_S = 0.25


# `make test` runs the suite on two pytest-xdist workers, a module at a time each (--dist loadfile), so a module's
# servers and shared runs start once: much of an end-to-end test is waiting on Ray's timeouts, polls and process
# start-ups, which the other worker fills. Modules go out longest first (figures: `--durations`), so both workers
# end together; those not listed follow in collection order. (Not --dist loadgroup: under pytest 9.2 xdist 3.8's
# group suffix never reaches the node id, and every test becomes a unit of its own.)
LONGEST_FIRST = ["test_cluster_rehearsal.py", "test_tune.py", "test_object_storage_e2e.py", "test_pretrain_mlflow.py",
                 "test_pretrain.py", "test_pretrain_fsdp.py", "test_job_submit.py", "test_mlflow_tracking.py",
                 "test_lean_trainer.py", "test_ray_exposure.py", "test_driver_controller.py"]


def pytest_collection_modifyitems(config, items):
    """The longest modules first (a stable sort: the order within a module is kept)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# Modules that use the same memoized run of tests/pretrain_runs.py (`debug_run`, the uninterrupted reference) go to
# one xdist worker as one unit, so that run is trained once: a worker's memo is its own.
SHARED_RUN_UNITS = {name: "debug_run" for name in (
    "test_cluster_rehearsal.py", "test_pretrain.py", "test_pretrain_fsdp.py", "test_sample_evaluate.py")}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with SHARED_RUN_UNITS' modules as one unit (xdist's own scheduler otherwise)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return SHARED_RUN_UNITS.get(Path(module).name, module)

    return SharedRunScheduling(config, log)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray local cluster shared by the whole session (ray.init costs ~7 s and ~1.4 GB)."""
    import ray

    # Unix socket paths are limited to 107 bytes: a pytest tmp_path is too deep for Ray's temp dir.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    # The dashboard serves Ray's State API, which Ray Train's PlacementGroupCleaner asks whether a controller is
    # dead: without it, the workers' placement groups of sweep trials stopped early are never removed. The cleaner
    # finds the API by RAY_API_SERVER_ADDRESS (inherited by every Ray process started here), else by scanning the
    # machine, which fails while other Ray instances run beside this one.
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    with _instance_env():
        ray.init(address="local", num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, _temp_dir=temp_dir, log_to_driver=True)
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _instance_env():
    """The session instance's processes (its raylet, and every worker it starts) get the environment of a local
    instance the project starts (pipelines/ray_adapter/session.py): no preemption-watcher actor beside each Ray
    Train run, no metrics export, workers at nice 0. Only while Ray starts: tests of that environment start their
    own instance, and must see what the project sets, not what this process had. (Not the loopback switch, read
    when ray is imported: the rehearsals' clusters inherit this process's environment.) Also Ray Train's health
    check every PROMPT_REPORT_INTERVAL_S."""
    from pipelines.ray_adapter.session import LOCAL_INSTANCE_ENV
    from tests.faults import ray_train_health_check_env

    wanted = {**{k: v for k, v in LOCAL_INSTANCE_ENV.items() if k != LOOPBACK_SWITCH},
              **ray_train_health_check_env(PROMPT_REPORT_INTERVAL_S)}
    with pytest.MonkeyPatch.context() as env:
        for key, value in wanted.items():
            if key not in os.environ:  # a variable the user set wins
                env.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    path = os.environ.get("NANOGPT_TINYSHAKESPEARE")
    if not path:
        pytest.skip("NANOGPT_TINYSHAKESPEARE is not set (path to Tiny Shakespeare's input.txt)")
    if not Path(path).is_file():
        pytest.fail(f"NANOGPT_TINYSHAKESPEARE={path} is not a file")
    return Path(path)


@pytest.fixture(scope="session")
def tiktoken_cache() -> Path:
    path = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not path:
        pytest.skip("TIKTOKEN_CACHE_DIR is not set (a pre-seeded tiktoken cache with the GPT-2 files)")
    return Path(path)


def mount_tmpfs(path: Path, options: str) -> None:
    """Mount a real tmpfs on `path` (a full disk, a read-only file system); skip the test where mounting needs
    rights this machine does not give (not root, or a container without CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")


@pytest.fixture
def tiny_fs(tmp_path):
    """A directory on a real 64 KiB tmpfs, unmounted after the test."""
    path = tmp_path / "tiny"
    mount_tmpfs(path, "size=64k")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def read_only_fs(tmp_path):
    """A directory on a real read-only tmpfs (EROFS on any write, root included), unmounted after the test."""
    path = tmp_path / "ro"
    mount_tmpfs(path, "size=64k,ro")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> None:
    """Write a filler file until the file system is full (ENOSPC)."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


HOLD_LOCK = """
import sys, time
from nanogpt.data.shard_dir import lock_shard_dir
with lock_shard_dir(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(300)
"""


def hold_lock(directory: Path) -> subprocess.Popen:
    """Another process holding `directory`'s prepare lock (this checkout's code), returned once it holds it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True,
                            env=env)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise RuntimeError(f"the lock holder did not start (said {line!r}, exit {proc.wait()})")
    return proc
