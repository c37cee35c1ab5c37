"""A trial's durable record (pipelines/sweep/outcome.py): who may replace whose, and what it points at. No Ray; the
end-to-end case (a driver killed right after a trial ends) is tests/test_tune.py."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.sweep.outcome import (
    OUTCOME_FILE,
    TrialOutcome,
    best_checkpoint_until,
    read_outcome,
    reports_of,
    write_outcome,
)
from pipelines.sweep.report import FINISHED, STOPPED


def outcome(status: str, step: int = 40) -> TrialOutcome:
    return TrialOutcome("t1", status, {"optim.learning_rate": 0.01}, step, step * 512, 2.4, 2.5, None)


def test_the_trials_record_replaces_the_drivers_never_the_reverse(tmp_path):
    run_dir = str(tmp_path / "trial-t1")  # not there yet: a trial stopped before it started
    assert read_outcome(run_dir) is None
    assert write_outcome(run_dir, outcome(STOPPED, 10), replace=False)  # the driver: ASHA stopped it
    assert write_outcome(run_dir, outcome(FINISHED))  # the trial was finishing: it did finish
    assert not write_outcome(run_dir, outcome(STOPPED, 10), replace=False)
    assert read_outcome(run_dir) == outcome(FINISHED)
    assert sorted(p.name for p in Path(run_dir).iterdir()) == [OUTCOME_FILE]  # no temporary file left
    Path(run_dir, OUTCOME_FILE).write_text('{"trial_id": "t1"')  # damaged: as if there were none
    assert read_outcome(run_dir) is None


def committed_checkpoint(run_dir: Path, step: int, val_loss: float) -> None:
    """A checkpoint directory as the loop commits it: state.json (the commit record) listing its files' sizes."""
    ckpt = run_dir / f"checkpoint_{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    state = {"step": step, "sizes": {"model.safetensors": 7}, "extra": {"val_loss": val_loss, "val_loss_step": step}}
    (ckpt / "state.json").write_text(json.dumps(state))


def test_best_checkpoint_and_reports_stop_where_the_trial_ended(tmp_path):
    """A stopped trial's workers may save and log past the scheduler's decision: neither counts."""
    for step, val_loss in [(10, 3.0), (20, 2.5), (30, 2.7), (40, 2.4)]:
        committed_checkpoint(tmp_path, step, val_loss)
    (tmp_path / "checkpoint_000050").mkdir()  # an interrupted save: no state.json
    assert best_checkpoint_until(str(tmp_path), 30) == "checkpoint_000020"
    assert best_checkpoint_until(str(tmp_path), 50) == "checkpoint_000040"
    assert best_checkpoint_until(str(tmp_path), 5) is None
    with open(tmp_path / "metrics.jsonl", "w") as f:  # a training line and an eval line every 10 steps
        for s in range(0, 50, 10):
            f.write(json.dumps({"step": s, "loss": 3.0}) + "\n")
            f.write(json.dumps({"step": s, "val_loss": 4.0 - s / 20, "tokens": s * 512, "best_val_loss": 1.0}) + "\n")
        f.write('{"step": 4')  # cut short by a kill
    stopped = outcome(STOPPED, 20)
    reports = reports_of(stopped, str(tmp_path))
    assert [r["step"] for r in reports] == [0, 10, 20] and reports[1]["val_loss"] == 3.5
    assert reports[-1] == {"step": 20, "tokens": 20 * 512, "val_loss": 2.5, "best_val_loss": 2.4}


def test_tunes_results_map_to_trials_by_id_not_by_directory_name(tmp_path):
    """A trial that Tune creates again on a resume (the driver was killed before Tune's snapshot listed it) gets a
    suffixed directory (`trial-<id>_692d`) because its old one is there: it is still that trial, one row."""
    import yaml
    from ray.tune import Result

    from pipelines.sweep.plan import plan_sweep
    from pipelines.sweep.run import trial_rows

    sweep_yaml = tmp_path / "sweep.yaml"
    sweep_yaml.write_text(yaml.safe_dump({"base": "debug", "search": {"optim.learning_rate": {"values": [0.01]}}}))
    sweep = plan_sweep(str(sweep_yaml), [], [f"--data.dir={tmp_path / 'data'}", f"--run.out_dir={tmp_path / 'out'}",
                                             "--run.tracker=none"], "s")
    trial_dir = Path(sweep.trials_dir, "trial-t1")
    write_outcome(str(trial_dir), outcome(FINISHED))
    again = Result(metrics={"trial_id": "t1", "step": 40, "config": {"optim.learning_rate": 0.01}}, checkpoint=None, error=None,
                   path=str(Path(sweep.sweep_dir, "trial-t1_692d")))
    rows = trial_rows(sweep, [again])
    assert [(r.trial_id, r.status, r.step) for r in rows] == [("t1", FINISHED, 40)]
    assert sorted(p.name for p in Path(sweep.trials_dir).iterdir()) == ["trial-t1"]
