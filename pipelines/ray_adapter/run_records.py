"""Rank 0's JSON records (metrics.jsonl, params.json, tags.json) of a run that lives in object storage: written in a
private local directory, put into every checkpoint rank 0 reports, and copied into the run's directory when rank 0
closes.

    records = LocalRecords.fetch(run_dir, resume_from)   # its local_dir holds what the run has logged so far
    records.add_to_checkpoint(checkpoint_dir)            # before the checkpoint is reported (Ray uploads it whole)
    tracker = MultiTracker(JsonlTracker(...), records.upload_at_close())   # closing uploads the closed files
    records.upload()                                     # the same, by hand

Why in each checkpoint: a lost node takes rank 0's local files with it, and rank 0 copies them to the run's
directory only when it stops. The copy in a checkpoint is exactly what was logged before that checkpoint was
written, so a rank 0 restarted from it logs every later step once more, and each step ends up in the history
once: no step lost, none twice. Without a checkpoint that carries records (a fresh run, or a checkpoint from
before this layout), rank 0 starts from the copy in the run's directory, so a continued run appends to its history.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

from nanogpt.data.storage import StorageError, download, exists, is_uri, join, upload
from nanogpt.scratch import scratch_dir
from nanogpt.tracking import PARAMS_FILE, TAGS_FILE, NullTracker, Tracker
from pipelines.ray_adapter.runs import METRICS_FILE

log = logging.getLogger(__name__)

RECORD_FILES = (METRICS_FILE, PARAMS_FILE, TAGS_FILE)
RECORDS_DIR = "records"  # inside a checkpoint: rank 0's records as they stood when the checkpoint was written


class LocalRecords:
    """The local copy of a run's records. Failures to reach the store are warnings: the checkpoints and MLflow hold
    what matters."""

    def __init__(self, run_dir: str, local_dir: str) -> None:
        self.run_dir = run_dir
        self.local_dir = local_dir

    @classmethod
    def fetch(cls, run_dir: str, resume_from: str | None) -> LocalRecords:
        """Download the records this rank 0 continues (those of the checkpoint `resume_from`, else those of the
        run's directory) into a new directory of this process's own: never the files of a rank 0 that died on this
        machine before."""
        records = cls(run_dir, str(scratch_dir("records")))
        source = records._source(resume_from)
        for name in RECORD_FILES:
            _fetch(join(source, name), os.path.join(records.local_dir, name))
        return records

    def _source(self, resume_from: str | None) -> str:
        """The records of the checkpoint this rank 0 resumes from, else those of the run's directory."""
        if resume_from is not None:
            in_checkpoint = join(resume_from, RECORDS_DIR)
            try:
                if exists(join(in_checkpoint, METRICS_FILE)):
                    return in_checkpoint
            except StorageError as e:
                log.warning("could not look for the records in %s: %s", resume_from, e)
        return self.run_dir

    def add_to_checkpoint(self, checkpoint_dir: str) -> None:
        """Copy the records, as they are now, into `<checkpoint_dir>/records/` (a local directory about to be
        reported)."""
        target = os.path.join(checkpoint_dir, RECORDS_DIR)
        os.makedirs(target, exist_ok=True)
        for name in RECORD_FILES:
            local = os.path.join(self.local_dir, name)
            if os.path.exists(local):
                shutil.copyfile(local, os.path.join(target, name))

    def upload(self) -> None:
        """Copy the records into the run's directory; the local directory goes once they are all there."""
        uploaded = True
        for name in RECORD_FILES:
            local = os.path.join(self.local_dir, name)
            try:
                if os.path.exists(local):
                    upload(local, join(self.run_dir, name))
            except StorageError as e:
                uploaded = False
                log.warning("could not copy %s to %s (it stays in %s): %s", name, self.run_dir, self.local_dir, e)
        if uploaded:
            shutil.rmtree(self.local_dir, ignore_errors=True)

    def upload_at_close(self) -> Tracker:
        """A tracker that records nothing and uploads the records when it is closed: listed after the JSON tracker
        in rank 0's MultiTracker, it copies the closed files."""
        return _UploadAtClose(self)


class _UploadAtClose(NullTracker):
    def __init__(self, records: LocalRecords) -> None:
        self.records = records

    def close(self, status: str = "FINISHED") -> None:
        self.records.upload()


def _fetch(source: str, local: str) -> None:
    """Copy the record file `source` (a URI or a local path) to `local` when it exists; a warning when it cannot."""
    try:
        if not exists(source):
            return
        if is_uri(source):
            download(source, local)
        else:
            shutil.copyfile(source, local)
    except (StorageError, OSError) as e:  # nothing half-copied stays: the run's history would end mid-line
        log.warning("could not fetch %s: %s", source, e)
        with contextlib.suppress(FileNotFoundError):
            os.remove(local)
