"""A trial's outcome, made durable the moment the trial ends: `<sweep dir>/trials/trial-<id>/outcome.json`.

Tune saves its experiment state at most every TUNE_GLOBAL_CHECKPOINT_S (adaptive, ten seconds or more), so a sweep driver killed right after a trial ended leaves that
trial RUNNING in the saved state, and `Tuner.restore` runs it again. This record is what a resumed trial, and the
sweep's results, trust instead:

    write_outcome(run_dir, outcome)                  # the trial itself, as its last act: it finished
    write_outcome(run_dir, outcome, replace=False)   # the driver, when its scheduler stops a trial (or it fails)
    outcome = read_outcome(run_dir)                  # a trial run again: report this again, train nothing

A trial the scheduler stops is ended mid-run and writes nothing, so the driver's Tune callback records it at the
moment of the decision. The trial's own record replaces the driver's (a trial stopped while it was finishing did
finish); the driver's never replaces the trial's. Written atomically: a record is whole or absent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from nanogpt.checkpoint.files import CheckpointError, checkpoint_dirs, read_state
from nanogpt.data.shards import fsync_dir
from pipelines.ray_adapter.runs import METRICS_FILE

log = logging.getLogger(__name__)

OUTCOME_FILE = "outcome.json"


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    status: str
    """finished | stopped early | failed (pipelines/sweep/report.py)"""
    params: dict[str, Any]
    """The trial's swept values, by config key."""
    step: int
    """Optimizer updates the trial made (for a stopped trial: at the scheduler's decision)."""
    tokens: int
    best_val_loss: float | None
    final_val_loss: float | None
    best_checkpoint: str | None
    """The name of the checkpoint directory (in the trial's run directory) with the lowest val loss up to `step`:
    a name, so that a copied or renamed sweep finds its own."""


def read_outcome(run_dir: str) -> TrialOutcome | None:
    """The trial's record; None when it has none (a damaged one is treated as none, with a warning: the trial then
    continues from its checkpoints, as it would have without records)."""
    path = os.path.join(run_dir, OUTCOME_FILE)
    try:
        with open(path) as f:
            return TrialOutcome(**json.load(f))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("%s is unreadable (%s): ignored", path, e)
        return None


def write_outcome(run_dir: str, outcome: TrialOutcome, replace: bool = True) -> bool:
    """Write the record whole (temporary file, fsync, rename); with replace=False only if the trial has none yet
    (a hard link fails on an existing name: no check-then-write race). Returns whether this record was written. A
    record that cannot be written (a full disk) is a warning, not a failed trial: without it, a resume continues
    the trial from its checkpoints, as before records existed."""
    try:
        return _write(run_dir, outcome, replace)
    except OSError as e:
        log.warning("could not record how trial %s ended in %s: %s", outcome.trial_id, run_dir, e)
        return False


def _write(run_dir: str, outcome: TrialOutcome, replace: bool) -> bool:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, OUTCOME_FILE)
    fd, tmp = tempfile.mkstemp(prefix=f".{OUTCOME_FILE}.", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(outcome), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(run_dir)
    return True


def outcome_of(trial_id: str, status: str, params: Mapping[str, Any], metrics: Mapping[str, Any],
               run_dir: str) -> TrialOutcome:
    """The record of a trial that ended with `metrics` (its last report: step, tokens, val_loss, best_val_loss);
    its best checkpoint is looked up in its run directory, up to that step."""
    step = int(metrics.get("step") or 0)
    return TrialOutcome(trial_id=trial_id, status=status, params=dict(params), step=step,
                        tokens=int(metrics.get("tokens") or 0), best_val_loss=_finite(metrics.get("best_val_loss")),
                        final_val_loss=_finite(metrics.get("val_loss")),
                        best_checkpoint=best_checkpoint_until(run_dir, step))


def best_checkpoint_until(run_dir: str, step: int) -> str | None:
    """The name of the committed checkpoint of `run_dir` at or before `step` with the lowest val loss (the latest
    of equals). Later ones are left out: a stopped trial's workers may save one more before they are ended."""
    scored = []
    for ckpt_step, path in checkpoint_dirs(run_dir):
        if ckpt_step > step:
            continue
        try:
            val_loss = _finite((read_state(path).get("extra") or {}).get("val_loss"))
        except CheckpointError:
            continue
        if val_loss is not None:
            scored.append((val_loss, -ckpt_step, path.name))
    return min(scored)[2] if scored else None


def reports_of(outcome: TrialOutcome, run_dir: str) -> list[dict[str, Any]]:
    """What the trial reported up to its end, again: one report per eval in its metrics.jsonl up to the recorded
    step (a scheduler restored by Tune has forgotten them), the recorded outcome last. Reports need a val loss
    (Tune's metric); a trial that never evaluated has none to give."""
    reports = []
    for record in _eval_records(run_dir):
        if record["step"] < outcome.step:
            reports.append({k: record[k] for k in ("step", "tokens", "val_loss", "best_val_loss") if k in record})
    if outcome.final_val_loss is not None:
        reports.append({"step": outcome.step, "tokens": outcome.tokens, "val_loss": outcome.final_val_loss,
                        "best_val_loss": outcome.best_val_loss})
    return reports


def _eval_records(run_dir: str) -> list[dict[str, Any]]:
    """The eval lines of metrics.jsonl by step (a step logged twice after a restart: the last line wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    try:
        with open(os.path.join(run_dir, METRICS_FILE)) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if isinstance(record, dict) and _finite(record.get("val_loss")) is not None:
                    by_step[int(record["step"])] = record
    except FileNotFoundError:
        return []
    return [by_step[s] for s in sorted(by_step)]


def _finite(value: Any) -> float | None:
    """A float for JSON (which has no inf or NaN), None for anything else."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
