"""Faults injected into a real Ray Train run through the loop's `on_step` hooks (pipelines.pretrain(on_step=...)):
the production code knows nothing of them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nanogpt.data import storage


@dataclass
class KillRankAt:
    """SIGKILL the worker of rank `rank` after update `step`, like an OOM kill or a lost node, once: it creates
    `marker` first, so the restarted worker group runs through.

    Ray Train's controller collects reports (and so registers checkpoints) at its health-check poll, every 2 s
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a worker dying sooner after a report restarts from the checkpoint before.
    Real failures come minutes after a checkpoint. Given the run's `snapshot` (Ray's checkpoint_manager_snapshot.json)
    the worker dies once it lists `checkpoint` as the latest; else `delay_s` after the update, which lets one poll
    pass (and rank 0's tracker send what it logged)."""

    step: int
    marker: str
    rank: int = 1
    delay_s: float = 3.0
    snapshot: str | None = None
    checkpoint: str | None = None

    def __call__(self, step: int, metrics: dict) -> None:
        import ray.train

        if step != self.step or ray.train.get_context().get_world_rank() != self.rank:
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        if self.snapshot is not None:
            wait_for_latest(self.snapshot, self.checkpoint)
        else:
            time.sleep(self.delay_s)
        marker.write_text(f"killed rank {self.rank} (pid {os.getpid()}) after update {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class KillProcessAt:
    """SIGKILL the process that trains (a one-worker sweep trial's Tune actor) after update `step`, like an OOM
    kill, once: it creates `marker` first, so the restarted trial runs through. That actor writes its checkpoints
    itself, whole before it reports them, so no delay is needed."""

    step: int
    marker: str

    def __call__(self, step: int, metrics: dict) -> None:
        marker = Path(self.marker)
        if step != self.step or marker.exists():
            return
        marker.write_text(f"killed pid {os.getpid()} after update {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class HoldAt:
    """Every rank stops after update `step` and waits for the file `release` (at most `timeout_s`), once: a
    restarted group finds `release` and runs through. Rank r first writes `<held_dir>/held.rank<r>` with the id of
    its Ray node, so the test knows where each rank is and that all of them are past `step` (and so past the
    checkpoints before it) when it pulls a node out from under them."""

    step: int
    held_dir: str
    release: str
    timeout_s: float = 120.0

    def __call__(self, step: int, metrics: dict) -> None:
        import ray
        import ray.train

        if step != self.step or Path(self.release).exists():
            return
        rank = ray.train.get_context().get_world_rank()
        Path(self.held_dir, f"held.rank{rank}").write_text(ray.get_runtime_context().get_node_id())
        deadline = time.monotonic() + self.timeout_s
        while not Path(self.release).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: nobody released {self.release} in {self.timeout_s} s")
            time.sleep(0.2)


@dataclass
class NodeAt:
    """Rank r writes the id of its Ray node to `<out_dir>/step<step>.rank<r>` after update `step` (the last
    time wins): where the ranks ran after a restart."""

    step: int
    out_dir: str

    def __call__(self, step: int, metrics: dict) -> None:
        import ray
        import ray.train

        if step == self.step:
            rank = ray.train.get_context().get_world_rank()
            Path(self.out_dir, f"step{step}.rank{rank}").write_text(ray.get_runtime_context().get_node_id())


@dataclass
class CopySnapshotAt:
    """Rank 0, after update `step`, waits until Ray Train's snapshot of the run (`snapshot`) lists `checkpoint`
    as its latest (the controller records a checkpoint at its next poll) and copies it to `dest`, once. Put back
    after the run, it is the snapshot a driver killed at that moment leaves, while the later checkpoints still
    landed in storage."""

    step: int
    snapshot: str
    dest: str
    checkpoint: str
    timeout_s: float = 60.0

    def __call__(self, step: int, metrics: dict) -> None:
        import ray.train

        if step != self.step or ray.train.get_context().get_world_rank() != 0 or Path(self.dest).exists():
            return
        Path(self.dest).write_text(wait_for_latest(self.snapshot, self.checkpoint, self.timeout_s))


def ray_train_health_check_env(interval_s: float | None = None) -> dict[str, str]:
    """{RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: `interval_s`, or Ray's default}, named by Ray Train's own constants, so
    that a renamed variable or a new default is followed. Ray Train's controller takes a worker's report off a
    one-slot queue once per health check; the driver's value reaches its controller and workers."""
    from ray.train.v2._internal.constants import (
        DEFAULT_HEALTH_CHECK_INTERVAL_S,
        HEALTH_CHECK_INTERVAL_S_ENV_VAR,
    )

    return {HEALTH_CHECK_INTERVAL_S_ENV_VAR: str(DEFAULT_HEALTH_CHECK_INTERVAL_S if interval_s is None else interval_s)}


@contextlib.contextmanager
def ray_train_default_timings() -> Iterator[None]:
    """Ray Train's default health-check interval for the runs started meanwhile from this process: the session
    instance polls faster (tests/conftest.py, PROMPT_REPORT_INTERVAL_S), and a fault rehearsed here must be noticed
    the way Ray notices it by default."""
    import pytest

    with pytest.MonkeyPatch.context() as env:
        for key, value in ray_train_health_check_env().items():
            env.setenv(key, value)
        yield


def wait_for_latest(snapshot: str | Path, checkpoint: str | None, timeout_s: float = 60.0) -> str:
    """Wait until Ray Train's snapshot of a run (a path or an object-store URI) lists `checkpoint` (a directory name; None: any) as its latest, as
    the controller writes it when it registers a reported checkpoint (at its poll of the workers, every 2 s); the
    snapshot's text. From then on a restarted worker group is handed that checkpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            text = storage.read_bytes(str(snapshot)).decode()
            latest = json.loads(text)["latest_checkpoint_result"]["checkpoint_dir_name"]
        except (storage.StorageError, ValueError, KeyError, TypeError):  # not written yet, or being written
            latest = None
        if latest is not None and checkpoint in (None, latest):
            return text
        time.sleep(0.2)
    raise TimeoutError(f"{snapshot} did not list {checkpoint or 'a checkpoint'} as its latest within {timeout_s} s")


def ctrl_c_when(command: subprocess.Popen, ready, timeout_s: float, what: str) -> str:
    """Wait until `ready()` (the command started with start_new_session=True, stderr piped), then send SIGINT to its
    process group as a terminal's Ctrl-C does; return its stderr once it exits. It is killed if anything fails."""
    try:
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert command.poll() is None and time.monotonic() < deadline, f"{what} did not happen"
            time.sleep(0.2)
        os.killpg(command.pid, signal.SIGINT)
        return command.communicate(timeout=300)[1]
    finally:
        if command.poll() is None:
            os.killpg(command.pid, signal.SIGKILL)
