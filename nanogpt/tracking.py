"""Experiment tracking behind one small interface, so the training loop never asks "is tracking on?".

The loop calls a `Tracker`; what stands behind it is chosen by the caller (nanochat's null-object logger):

    tracker = NullTracker()                                   # nothing recorded
    tracker = JsonlTracker("out/run/metrics.jsonl")           # one JSON line per log_metrics call, files beside it
    tracker = MultiTracker(JsonlTracker(path), mlflow_tracker) # both (the MLflow one lives in pipelines/)

Only plain Python and the standard library here: MLflow is adapted in `pipelines/`, never imported by `nanogpt/`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    def log_params(self, params: dict) -> None: ...

    def set_tags(self, tags: dict) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def close(self, status: str = "FINISHED") -> None:
        """End the run: FINISHED, or FAILED when training raised."""
        ...


class NullTracker:
    """Records nothing."""

    def log_params(self, params: dict) -> None:
        pass

    def set_tags(self, tags: dict) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


PARAMS_FILE, TAGS_FILE = "params.json", "tags.json"


class JsonlTracker:
    """Appends `{"step": step, **metrics}` to a JSON-lines file, one line per `log_metrics` call (flushed, so a
    crashed run keeps what it logged). Params and tags go to `params.json` / `tags.json`, texts and artifacts
    into the same directory. Non-finite floats are written as null (JSON has no NaN)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.dir = self.path.parent
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def log_params(self, params: dict) -> None:
        self._merge_json(self.dir / PARAMS_FILE, params)

    def set_tags(self, tags: dict) -> None:
        self._merge_json(self.dir / TAGS_FILE, tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._file.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        dest = self.dir / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        src = Path(path)
        if src.is_dir():
            shutil.copytree(src, dest / src.name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest / src.name)

    def log_text(self, text: str, artifact_file: str) -> None:
        dest = self.dir / artifact_file
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)

    def close(self, status: str = "FINISHED") -> None:
        self._file.close()

    def read(self) -> list[dict]:
        """Every line logged so far (handy in tests)."""
        self._file.flush()
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    @staticmethod
    def _merge_json(path: Path, values: dict) -> None:
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update({str(k): _plain(v) for k, v in values.items()})
        path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")


class MultiTracker:
    """Forwards every call to each of `trackers`, in order."""

    def __init__(self, *trackers: Tracker) -> None:
        self.trackers = trackers

    def log_params(self, params: dict) -> None:
        for t in self.trackers:
            t.log_params(params)

    def set_tags(self, tags: dict) -> None:
        for t in self.trackers:
            t.set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        for t in self.trackers:
            t.log_artifact(path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        for t in self.trackers:
            t.log_text(text, artifact_file)

    def close(self, status: str = "FINISHED") -> None:
        for t in self.trackers:
            t.close(status)


def _plain(value: object) -> object:
    """JSON-safe: numpy/torch scalars to Python numbers, NaN/inf to None; anything else unchanged or str()."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
