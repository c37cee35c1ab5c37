"""Ray Train runs shared between test modules (each costs 20-40 s on 2 cores): memoized for the whole session.

tests/test_pretrain.py and tests/test_sample_evaluate.py both use `debug_run`: whichever runs first trains it, the
other reuses it (pytest imports this module once per session).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nanogpt.config import Config, DataConfig, load_config
from pipelines.pretrain import PRESET_DIR, PretrainOutcome, pretrain
from pipelines.ray_adapter.runs import RAY_SNAPSHOT
from tests.faults import CopySnapshotAt

# The debug preset, 30 updates with an eval and a checkpoint every 10; 2 micro-batches per step, so 1 or 2 workers.
# MLflow is off here (tests/test_pretrain_mlflow.py covers it): each new sqlite store costs ~7 s of migrations.
DEBUG_ARGS = ["--train.max_iters=30", "--train.eval_interval=10", "--optim.lr_decay_iters=30", "--run.tracker=none"]
TOKENS_PER_STEP = 8 * 32 * 2  # batch_size * block_size * gradient_accumulation_steps of the debug preset

_memo: dict[str, object] = {}


def shared_root(tmp_path_factory) -> Path:
    """One directory per session for the shared shards and runs."""
    root = tmp_path_factory.getbasetemp() / "pretrain_runs"
    root.mkdir(exist_ok=True)
    return root


def char_shards(root: Path, corpus: Path) -> Path:
    """Tiny Shakespeare as char-level shards (pipelines/prepare.py on the session's Ray), once per session."""
    if "shards" not in _memo:
        from pipelines.prepare import prepare

        out = root / "shakespeare_char"
        prepare(DataConfig(input=str(corpus), tokenizer="char", val_fraction=0.1), out)
        _memo["shards"] = out
    return _memo["shards"]


def debug_config(shards: Path, out_dir: Path, name: str, *overrides: str) -> Config:
    return load_config("debug", [*DEBUG_ARGS, f"--data.dir={shards}", f"--run.out_dir={out_dir}",
                                 f"--run.name={name}", *overrides], search_dirs=[PRESET_DIR])


def debug_run(root: Path, shards: Path) -> PretrainOutcome:
    """The reference run: the debug preset on 2 workers, 30 updates, uninterrupted."""
    if "debug_run" not in _memo:
        _memo["debug_run"] = pretrain(debug_config(shards, root / "runs", "ref", "--run.num_workers=2"))
    return _memo["debug_run"]


def resume_after_a_stale_snapshot(shards: Path, out_dir: Path, name: str, *overrides: str) -> PretrainOutcome:
    """A run of 40 updates (checkpoints 10, 20, 30, 40, all kept) whose Ray snapshot is then put back to the one that
    listed checkpoint_000020 as its latest: what a driver killed then leaves while 30 and 40 still land. Then the
    run is continued to 50; its outcome."""
    run_dir = out_dir / name
    stale = out_dir / f"{name}-{RAY_SNAPSHOT}"
    common = ["--run.num_to_keep=null", "--optim.lr_decay_iters=50", *overrides]
    pretrain(debug_config(shards, out_dir, name, "--train.max_iters=40", *common),
             on_step=[CopySnapshotAt(step=25, snapshot=str(run_dir / RAY_SNAPSHOT), dest=str(stale),
                                     checkpoint="checkpoint_000020")])
    assert "checkpoint_000030" not in stale.read_text() and (run_dir / "checkpoint_000040").is_dir()
    shutil.copy(stale, run_dir / RAY_SNAPSHOT)
    return pretrain(debug_config(shards, out_dir, name, "--model.init_from=resume", "--train.max_iters=50", *common))


def records(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def step_losses(run_dir: str | Path) -> dict[int, float]:
    """{step: training loss} from metrics.jsonl; a step logged twice (after a restart): the last line wins."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def eval_records(run_dir: str | Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "val_loss" in r}
