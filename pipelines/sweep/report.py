"""What a finished sweep shows: a table of its trials, the same as CSV, a plot of the final val loss against the
learning rate (one line per batch size), and the best trial as a ready-to-run pretrain.py command line.

Plain functions of `TrialRow`s (built by pipelines/sweep/run.py from the trials' records): no Ray, no MLflow.
"""

from __future__ import annotations

import csv
import io
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanogpt.config import Config, load_config

FINISHED, STOPPED, FAILED = "finished", "stopped early", "failed"
MLFLOW_STATUS = {FINISHED: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED"}
LR_KEY, BATCH_KEY = "optim.learning_rate", "train.batch_size"
NOT_IN_COMMANDS = ("run.name",)  # pretrain.py picks a fresh name
RETRAIN_SUFFIX = "-retrain"  # the registered model of the best trial's command: <the sweep's model>-retrain


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    """The swept keys' values, then the keys the sweep derived from them (accumulation, max_iters)."""
    tokens_per_step: int
    best_val_loss: float | None
    final_val_loss: float | None
    tokens: int
    step: int
    max_iters: int
    status: str
    """finished | stopped early | failed"""
    run_dir: str = ""
    best_checkpoint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def trial_status(errored: bool, step: int, max_iters: int) -> str:
    """A trial that made all its updates finished; one that did not and did not fail was stopped by the scheduler
    (or by the sweep's time budget)."""
    if errored:
        return FAILED
    return FINISHED if step >= max_iters else STOPPED


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The trial with the lowest best val loss that has a checkpoint (ties: the one with more tokens)."""
    scored = [r for r in rows if r.best_val_loss is not None and math.isfinite(r.best_val_loss) and r.best_checkpoint]
    return min(scored, key=lambda r: (r.best_val_loss, -r.tokens), default=None)


def columns(rows: Sequence[TrialRow]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r.params))
    return ["trial", *keys, "tokens_per_step", "best_val_loss", "final_val_loss", "tokens", "step", "status"]


def _values(row: TrialRow, keys: Sequence[str]) -> list[Any]:
    fixed = {"trial": row.trial_id, "tokens_per_step": row.tokens_per_step, "best_val_loss": row.best_val_loss,
             "final_val_loss": row.final_val_loss, "tokens": row.tokens, "step": row.step, "status": row.status}
    return [fixed[k] if k in fixed else row.params.get(k) for k in keys]


def results_csv(rows: Sequence[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = columns(rows)
    writer.writerow(keys)
    for row in rows:
        writer.writerow(["" if v is None else v for v in _values(row, keys)])
    return out.getvalue()


def results_table(rows: Sequence[TrialRow]) -> str:
    """The trials as aligned text, best first."""
    keys = columns(rows)
    order = sorted(rows, key=lambda r: (r.best_val_loss is None, r.best_val_loss or 0.0))
    cells = [keys] + [[_cell(v) for v in _values(r, keys)] for r in order]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 else f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def plot_loss_vs_lr(rows: Sequence[TrialRow], png: str | Path, title: str = "") -> None:
    """Final val loss against the learning rate (log axis), one line per batch size; trials the scheduler stopped
    are open markers at the loss they had reached. Agg canvas: no display, no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups: dict[Any, list[TrialRow]] = {}
    for row in rows:
        if row.final_val_loss is not None and LR_KEY in row.params:
            groups.setdefault(row.params.get(BATCH_KEY), []).append(row)
    for batch, members in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        members.sort(key=lambda r: r.params[LR_KEY])
        label = f"batch_size {batch}" if batch is not None else "val loss"
        line = ax.plot([r.params[LR_KEY] for r in members], [r.final_val_loss for r in members], label=label,
                       marker="o")[0]
        stopped = [r for r in members if r.status != FINISHED]
        ax.scatter([r.params[LR_KEY] for r in stopped], [r.final_val_loss for r in stopped], s=90,
                   facecolors="white", edgecolors=line.get_color(), zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final val loss (open: stopped early)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    if groups:
        ax.legend()
    fig.savefig(png, format="png")


def retrain_config(trial: Config, preset: str, search_dirs: Sequence[str | Path]) -> Config:
    """The best trial's config as a job of its own: the preset's resources per worker (a trial's were cut to leave
    room for the trials' drivers: 0.95 CPU is one torch thread where the preset's 2 give two), and a registered
    model of its own, `<the sweep's>-retrain`, so that the job does not become the latest version of the model the
    sweep registered its best trial's checkpoint as."""
    run = load_config(preset, search_dirs=search_dirs).run
    sweep_model = trial.run.registered_model or trial.run.experiment
    return trial.replace(run__cpus_per_worker=run.cpus_per_worker, run__gpus_per_worker=run.gpus_per_worker,
                         run__registered_model=f"{sweep_model}{RETRAIN_SUFFIX}")


def pretrain_command(preset: str, config: Config, search_dirs: Sequence[str | Path]) -> str:
    """`python pipelines/pretrain.py --config <preset> --key=value ...`: every key where `config` differs from the
    preset, so the command trains exactly `config` (under a new run name)."""
    reference = load_config(preset, search_dirs=search_dirs).to_flat()
    args = ["python", "pipelines/pretrain.py", "--config", preset]
    for key, value in config.to_flat().items():
        if key not in NOT_IN_COMMANDS and reference.get(key) != value:
            args.append(f"--{key}={_arg(value)}")
    return shlex.join(args)


def _arg(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)
