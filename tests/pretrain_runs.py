"""Ray Train runs shared between test modules (each costs 20-40 s on 2 cores): memoized for the whole session.

tests/test_pretrain.py and tests/test_sample_evaluate.py both use `debug_run`: whichever runs first trains it, the
other reuses it (pytest imports this module once per session). `killed_midrun` and `resume_from_a_stale_snapshot`:
the fault scenarios tests/test_pretrain.py and tests/test_pretrain_fsdp.py run, each on its own parallelism.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from nanogpt.config import Config, DataConfig, load_config
from pipelines.pretrain import PRESET_DIR, PretrainOutcome, pretrain
from pipelines.ray_adapter.runs import RAY_SNAPSHOT
from tests.faults import CopySnapshotAt, KillRankAt, ray_train_default_timings

# The debug preset, 30 updates with an eval and a checkpoint every 10; 2 micro-batches per step, so 1 or 2 workers.
# MLflow is off here (tests/test_pretrain_mlflow.py covers it): each new sqlite store costs ~7 s of migrations.
DEBUG_ARGS = ["--train.max_iters=30", "--train.eval_interval=10", "--optim.lr_decay_iters=30", "--run.tracker=none"]
TOKENS_PER_STEP = 8 * 32 * 2  # batch_size * block_size * gradient_accumulation_steps of the debug preset
KILL_STEP = 12  # killed_midrun's fault: after update 12, so the restart redoes 10, 11, 12

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


@dataclass
class KilledRun:
    outcome: PretrainOutcome
    marker: Path
    """Written by the fault hook just before it killed the worker."""
    stale_snapshot: Path
    """Ray's snapshot of the run while it listed checkpoint_000010 as its latest."""


def killed_midrun(shards: Path, out_dir: Path, name: str, *overrides: str) -> KilledRun:
    """A run of 20 updates on 2 workers (checkpoints 10 and 20, both kept) whose rank 1 is SIGKILLed after update
    12, once Ray recorded checkpoint_000010 (run.max_failures=1: Ray restarts the group from it, which redoes
    updates 10..12). Before that, after update 11, rank 0 copied Ray's snapshot, then listing checkpoint_000010 as
    its latest: what a driver killed at that moment leaves (resume_from_a_stale_snapshot)."""
    run_dir, marker, stale = out_dir / name, out_dir / f"{name}.killed", out_dir / f"{name}-{RAY_SNAPSHOT}"
    snapshot = str(run_dir / RAY_SNAPSHOT)
    config = debug_config(shards, out_dir, name, "--run.num_workers=2", "--run.max_failures=1",
                          "--train.max_iters=20", "--run.num_to_keep=null", *overrides)
    with ray_train_default_timings():  # the fault is the subject: Ray notices the dead worker at its own pace
        outcome = pretrain(config, on_step=[
            CopySnapshotAt(step=11, snapshot=snapshot, dest=str(stale), checkpoint="checkpoint_000010"),
            KillRankAt(step=KILL_STEP, marker=str(marker), snapshot=snapshot, checkpoint="checkpoint_000010"),
        ])
    return KilledRun(outcome, marker, stale)


def resume_from_a_stale_snapshot(shards: Path, killed: KilledRun, name: str,
                                 *overrides: str) -> tuple[PretrainOutcome, list[dict]]:
    """The killed run copied to `name` with Ray's snapshot put back to the stale one (it lists checkpoint_000010,
    while checkpoint_000020 landed), then continued to 30 updates: its outcome, and the records it added to
    metrics.jsonl."""
    source = Path(killed.outcome.plan.run_dir)
    run_dir = source.parent / name
    shutil.copytree(source, run_dir)
    shutil.copy(killed.stale_snapshot, run_dir / RAY_SNAPSHOT)
    num_records = len(records(run_dir))
    outcome = pretrain(debug_config(shards, source.parent, name, "--run.num_workers=2", "--run.num_to_keep=null",
                                    "--model.init_from=resume", *overrides))
    return outcome, records(run_dir)[num_records:]


def records(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def step_losses(run_dir: str | Path) -> dict[int, float]:
    """{step: training loss} from metrics.jsonl; a step logged twice (after a restart): the last line wins."""
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def eval_records(run_dir: str | Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(run_dir) if "val_loss" in r}


def the_only_run(client, experiment: str):
    """The one MLflow run of `experiment` (an MlflowClient's), failing with the names of all when there are more."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"expected exactly one MLflow run, got {[r.info.run_name for r in runs]}"
    return runs[0]


def metric_history(client, run_id: str, key: str) -> dict[int, list[float]]:
    """{step: every value logged at it, in order}: a step logged again after a restart has two."""
    points: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, key):
        points.setdefault(m.step, []).append(m.value)
    return points
