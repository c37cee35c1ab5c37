"""The `Reporter` of a plain process (nanogpt/train/loop.py's `train` outside Ray: a script, mp.spawn, torchrun):
it keeps a run's checkpoints in a local directory (the latest few and the best), so that the loop runs and resumes
without Ray.

    result = train(cfg, "data/shakespeare_char", TrainContext(), LocalReporter("out/run", cfg.run.num_to_keep))
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch.distributed as dist

from nanogpt.checkpoint.files import METRICS_FILE, checkpoint_dirs

log = logging.getLogger(__name__)


class LocalReporter:
    """The `Reporter` of a plain process: each reported checkpoint is moved to out_dir/checkpoint_<step:06d>
    (copied under a temporary name and renamed when the source is on another filesystem), with the reported
    metrics beside it in metrics.json. Kept: the latest `num_to_keep` (None: all) and the best by val_loss among
    checkpoints evaluated at their own step. Every report's metrics are appended to `history`.

    Several processes on one machine (torch.distributed initialized: mp.spawn, torchrun) each report, at the same
    steps: the ranks' parts of a checkpoint (every rank's shards under FSDP, rank 0's whole checkpoint under DDP)
    are moved into one directory, and rank 0 puts it in place once every rank is done (a collective); no rank returns
    before it is in place."""

    def __init__(self, out_dir: str | os.PathLike, num_to_keep: int | None = None) -> None:
        if num_to_keep is not None and num_to_keep < 1:
            raise ValueError(f"num_to_keep must be >= 1 or None, got {num_to_keep}")
        self.out_dir = Path(out_dir)
        self.num_to_keep = num_to_keep
        self.history: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        step = int(metrics["step"])
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            self._put_in_place(step, metrics, checkpoint_dir)
            return
        merged = self._merge_parts(step, checkpoint_dir)  # rank 0's; None on the others
        try:
            self._put_in_place(step, metrics, merged)
        finally:
            dist.barrier()  # no rank goes on (to resume from it, to read the latest) before it is in place

    def _put_in_place(self, step: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dest = self.out_dir / f"checkpoint_{step:06d}"
        staging = self.out_dir / f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            try:
                os.rename(checkpoint_dir, staging)  # same filesystem: instant
            except OSError:
                shutil.copytree(checkpoint_dir, staging)
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            (staging / METRICS_FILE).write_text(json.dumps({k: _json_number(v) for k, v in metrics.items()}) + "\n")
            if dest.exists():  # a rerun reaching the same step: the new checkpoint wins
                trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(dest, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("saved checkpoint %s", dest)
        self._prune()

    def _merge_parts(self, step: int, part: str | None) -> str | None:
        """Collective: every rank moves its part (if any) into one directory; rank 0 gets it (None if empty)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        token = [uuid.uuid4().hex[:8]]
        dist.broadcast_object_list(token, src=0)  # one fresh directory name for all ranks
        merged = self.out_dir / f".checkpoint_{step:06d}.parts-{token[0]}"
        if part is not None:
            _move_files(Path(part), merged)
        dist.barrier()  # every part is in
        if dist.get_rank() != 0:
            return None
        return str(merged) if merged.exists() else None

    def _prune(self) -> None:
        if self.num_to_keep is None:
            return
        found = checkpoint_dirs(self.out_dir)
        keep = {p for _, p in found[-self.num_to_keep:]}
        scored = [(m["val_loss"], s, p) for s, p in found if (m := _read_metrics(p)) is not None
                  and m.get("val_loss") is not None and m.get("val_loss_step", s) == s]
        if scored:
            keep.add(min(scored)[2])
        for _, p in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _move_files(src: Path, dest: Path) -> None:
    """Every file under src to the same relative path under dest (folders merged), then src removed."""
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(file), str(target))  # a rename on one filesystem, a copy across
    shutil.rmtree(src, ignore_errors=True)


def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _json_number(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

