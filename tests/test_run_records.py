"""Rank 0's records of a run in object storage (pipelines/ray_adapter/run_records.py) against a real S3 API (moto's server on
127.0.0.1), without Ray: each checkpoint carries them, and a rank 0 whose node was lost (its local files gone, never
closed) continues from the copy in the checkpoint it resumes from, so that every step is in the history once.
tests/test_cluster_rehearsal.py loses rank 0's node in a real multi-node run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nanogpt.data import storage
from nanogpt.tracking import JsonlTracker, MultiTracker
from pipelines.ray_adapter.run_records import RECORDS_DIR, LocalRecords

pytest_plugins = ("tests.s3_server",)


def _tracker(records: LocalRecords) -> MultiTracker:
    """Rank 0's, as pipelines/ray_adapter/trainer.py makes it (the JSON lines in the records' directory, the records last)."""
    return MultiTracker(JsonlTracker(os.path.join(records.local_dir, "metrics.jsonl")), records.upload_at_close())


def _log_updates(tracker: MultiTracker, steps: range) -> None:
    for step in steps:
        tracker.log_metrics({"loss": 10.0 - step / 10}, step)


def _checkpoint(records: LocalRecords, run_dir: str, step: int, tmp_path: Path) -> str:
    """What RayReporter and Ray do at a checkpoint: the records go into the local checkpoint directory, which is then
    uploaded whole. Returns the checkpoint's URI."""
    local = tmp_path / f"checkpoint_{step:06d}"
    local.mkdir()
    (local / "state.json").write_text(json.dumps({"step": step}))
    records.add_to_checkpoint(str(local))
    uri = storage.join(run_dir, local.name)
    for file in local.rglob("*"):
        if file.is_file():
            storage.upload(file, storage.join(uri, file.relative_to(local).as_posix()))
    return uri


def _stored(run_dir: str, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(storage.join(run_dir, name)).splitlines()]


def test_a_restarted_rank0_continues_from_the_checkpoints_records_with_every_step_once(s3, tmp_path):
    run_dir = s3.bucket_uri("runs/r")
    first = LocalRecords.fetch(run_dir, None)
    tracker = _tracker(first)
    tracker.log_params({"optim.learning_rate": 1e-3})
    _log_updates(tracker, range(0, 10))
    tracker.log_metrics({"val_loss": 2.5}, 10)  # the eval at step 10 comes before the checkpoint at 10
    checkpoint = _checkpoint(first, run_dir, 10, tmp_path)
    _log_updates(tracker, range(10, 15))
    shutil.rmtree(first.local_dir)  # rank 0's node is lost: its files go with it, and it never closes

    second = LocalRecords.fetch(run_dir, checkpoint)
    assert second.local_dir != first.local_dir
    tracker = _tracker(second)
    _log_updates(tracker, range(10, 20))  # the restarted group makes update 10 next
    tracker.close()

    history = _stored(run_dir)
    assert [r["step"] for r in history if "loss" in r] == list(range(20))
    assert [r["step"] for r in history if "val_loss" in r] == [10]
    assert json.loads(storage.read_bytes(storage.join(run_dir, "params.json"))) == {"optim.learning_rate": 1e-3}
    # the checkpoint holds what was logged before it was written
    in_checkpoint = storage.join(checkpoint, RECORDS_DIR)
    assert [r["step"] for r in _stored(in_checkpoint)] == [*range(10), 10]
    assert not os.path.exists(second.local_dir)  # removed once the run's directory has the records


def test_without_records_in_the_checkpoint_a_continued_run_appends_to_the_stored_history(s3, tmp_path):
    run_dir = s3.bucket_uri("runs/r")
    first = LocalRecords.fetch(run_dir, None)
    tracker = _tracker(first)
    _log_updates(tracker, range(0, 5))
    tracker.close()
    old_checkpoint = storage.join(run_dir, "checkpoint_000005")  # a checkpoint from before records were kept in it
    storage.write_bytes(storage.join(old_checkpoint, "state.json"), b'{"step": 5}')

    tracker = _tracker(LocalRecords.fetch(run_dir, old_checkpoint))
    _log_updates(tracker, range(5, 8))
    tracker.close()
    assert [r["step"] for r in _stored(run_dir)] == list(range(8))
