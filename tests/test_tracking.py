"""The null-object tracker and its plain-file siblings."""

import json
import math

import torch

from nanogpt.tracking import JsonlTracker, MultiTracker, NullTracker, Tracker


def test_every_tracker_satisfies_the_protocol(tmp_path):
    for t in (NullTracker(), JsonlTracker(tmp_path / "m.jsonl"), MultiTracker(NullTracker())):
        assert isinstance(t, Tracker)


def test_null_tracker_accepts_everything():
    t = NullTracker()
    t.log_params({"a": 1})
    t.set_tags({"b": "x"})
    t.log_metrics({"loss": 1.0}, step=3)
    t.log_artifact("/nonexistent")
    t.log_text("hi", "a.txt")
    t.close()


def test_jsonl_tracker_writes_one_line_per_call(tmp_path):
    t = JsonlTracker(tmp_path / "run" / "metrics.jsonl")
    t.log_metrics({"loss": 2.5, "lr": torch.tensor(1e-3)}, step=0)
    t.log_metrics({"val_loss": math.nan, "grad_norm": math.inf}, step=10)
    t.log_params({"model.n_layer": 4, "run.name": None})
    t.set_tags({"world_size": 2})
    t.log_text("sample", "samples/step_000010.txt")
    (tmp_path / "art.txt").write_text("x")
    t.log_artifact(str(tmp_path / "art.txt"), "files")
    t.close()
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 0, "loss": 2.5, "lr": lines[0]["lr"]}, {"step": 10, "val_loss": None, "grad_norm": None}]
    assert math.isclose(lines[0]["lr"], 1e-3, rel_tol=1e-6)
    assert json.loads((tmp_path / "run" / "params.json").read_text()) == {"model.n_layer": 4, "run.name": None}
    assert json.loads((tmp_path / "run" / "tags.json").read_text()) == {"world_size": 2}
    assert (tmp_path / "run" / "samples" / "step_000010.txt").read_text() == "sample"
    assert (tmp_path / "run" / "files" / "art.txt").read_text() == "x"


def test_multi_tracker_forwards_to_each(tmp_path):
    a, b = JsonlTracker(tmp_path / "a" / "m.jsonl"), JsonlTracker(tmp_path / "b" / "m.jsonl")
    MultiTracker(a, NullTracker(), b).log_metrics({"loss": 1.0}, step=1)
    assert a.read() == b.read() == [{"step": 1, "loss": 1.0}]
