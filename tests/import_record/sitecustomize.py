"""Loaded at start-up by every Python process whose PYTHONPATH names this directory (tests/test_job_submit.py puts it
on a `ray start` head, whose job drivers and workers inherit it). Appends `<pid> <module>` to the file that
NANOGPT_IMPORT_RECORD names for each import, in that process, of the project's Ray trainer module (the driver and
every Ray Train worker import it) or of a module of the lean wing (none should, on a cluster)."""

from __future__ import annotations

import os
import sys

WATCHED = ("pipelines.ray_adapter.trainer", "pipelines.ray_adapter.lean")


class ImportRecorder:
    """A finder that finds nothing: it only writes down what is being imported, and lets the import go on."""

    def __init__(self, record: str) -> None:
        self.record = record

    def find_spec(self, name, path=None, target=None):
        if any(name == w or name.startswith(w + ".") for w in WATCHED):
            with open(self.record, "a") as f:
                f.write(f"{os.getpid()} {name}\n")
        return None


if os.environ.get("NANOGPT_IMPORT_RECORD"):
    sys.meta_path.insert(0, ImportRecorder(os.environ["NANOGPT_IMPORT_RECORD"]))
