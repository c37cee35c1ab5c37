"""The loss-curve PNG a finished run carries (`plots/loss_curve.png`): every `*loss*` metric against step, from the
run's full history (attempts before a restart included), drawn on matplotlib's Agg canvas (no pyplot state, no
display).

    log_loss_curve(client, run_id, title="shakespeare")
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOSS_CURVE_FILE = "plots/loss_curve.png"


def log_loss_curve(client: Any, run_id: str, title: str, artifact_file: str = LOSS_CURVE_FILE) -> None:
    """Draw the run's loss metrics and log the PNG as `artifact_file`; nothing when the run has none."""
    keys = sorted(k for k in client.get_run(run_id).data.metrics if "loss" in k and not k.startswith("system/"))
    if not keys:
        return
    curves = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
    with tempfile.TemporaryDirectory(prefix="mlflow-plot-") as tmp:
        png = Path(tmp) / Path(artifact_file).name
        plot_loss_curves(curves, png, title=title)
        folder = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(png), None if folder == "." else folder)


def plot_loss_curves(curves: Mapping[str, Iterable[tuple[int, float]]], png: str | os.PathLike, title: str = "") -> None:
    """Loss against step, one line per metric, to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in curves.items():
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="o" if len(points) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(png, format="png")
