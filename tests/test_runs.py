"""Run planning and the choice of the checkpoint to resume from, with real checkpoint directories on disk (no Ray
needed): what happens when run storage failed or a checkpoint's copy was cut short."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nanogpt.config import Config, ConfigError
from pipelines.ray_adapter.runs import (
    RAY_SNAPSHOT,
    check_run_name,
    newer_checkpoint,
    plan_run,
    plan_trial_run,
    unique_name,
)
from pipelines.ray_adapter.trainer import committed_or_newest
from tests.test_checkpoint import save, trained_model


def resume_config(out: Path, name: str = "r1") -> Config:
    return Config.from_dict({"model": {"init_from": "resume"}, "run": {"out_dir": str(out), "name": name},
                             "data": {"dir": str(out / "data")}})


@pytest.fixture
def run_with_checkpoints(tmp_path) -> Path:
    """A run directory holding checkpoints 10 and 20 and no Ray snapshot (storage failed before Ray wrote one)."""
    run_dir = tmp_path / "runs" / "r1"
    model, optimizer = trained_model(1)
    for step in (10, 20):
        save(run_dir / f"checkpoint_{step:06d}", model, optimizer, step=step)
    return run_dir


def test_a_run_without_ray_snapshot_continues_from_its_newest_checkpoint(run_with_checkpoints, tmp_path):
    plan = plan_run(resume_config(tmp_path / "runs"))
    assert plan.continues_run and plan.resume_from == str(run_with_checkpoints / "checkpoint_000020")


def test_a_continued_run_starts_from_its_newest_complete_checkpoint_not_rays_latest(run_with_checkpoints, tmp_path):
    # Ray's snapshot lists 10 and 20; 30 landed complete after it (the driver was killed before Ray recorded it),
    # and 40 was cut short
    (run_with_checkpoints / RAY_SNAPSHOT).write_text("{}")
    model, optimizer = trained_model(1)
    save(run_with_checkpoints / "checkpoint_000030", model, optimizer, step=30)
    cut = save(run_with_checkpoints / "checkpoint_000040", model, optimizer, step=40)
    (cut / "optimizer.pt").write_bytes(b"")
    plan = plan_run(resume_config(tmp_path / "runs"))
    assert plan.continues_run and plan.resume_from == str(run_with_checkpoints / "checkpoint_000030")
    # each worker starts from the newer of the plan's and the one Ray hands it
    ray_latest = str(run_with_checkpoints / "checkpoint_000020")
    assert newer_checkpoint(ray_latest, plan.resume_from) == plan.resume_from


@pytest.mark.parametrize("reported, planned, expected", [
    (None, None, None),
    (None, "/r/checkpoint_000030", "/r/checkpoint_000030"),          # a fresh fit: the plan's
    ("/r/checkpoint_000020", "/r/checkpoint_000030", "/r/checkpoint_000030"),  # Ray's snapshot lagged the disk
    ("/r/checkpoint_000050", "/r/checkpoint_000030", "/r/checkpoint_000050"),  # a worker-group restart after 50
    ("/r/checkpoint_000030", "/r/checkpoint_000030", "/r/checkpoint_000030"),
    ("s3://b/r/checkpoint_000040/", "/src/checkpoint_000030", "s3://b/r/checkpoint_000040/"),
    ("/r/checkpoint_000010", "/exports/whole", "/r/checkpoint_000010"),  # a branch's source has no step in its name
    (None, "/exports/whole", "/exports/whole"),
])
def test_newer_checkpoint(reported, planned, expected):
    assert newer_checkpoint(reported, planned) == expected


@pytest.mark.parametrize("name, ok", [
    ("r1", True), ("debug-20261206-171700-0a1b2c3d", True), ("lr=3e-4_bs+12", True), ("v1.2", True),
    ("résumé", False), ("run 1", False), ("a/b", False), (".hidden", False), ("-rf", False), ("..", False),
    ("", False), ("名前", False),
])
def test_run_names_are_plain_ascii(tmp_path, name, ok):
    config = resume_config(tmp_path / "runs", name).replace(model__init_from="scratch")
    if ok:
        assert plan_run(config).name == name
    else:
        with pytest.raises(ConfigError, match=r"run\.name=.* may hold only ASCII letters, digits and \. _ - \+ ="):
            plan_run(config)
    assert not (tmp_path / "runs").exists()  # nothing created either way


def test_a_name_made_from_a_preset_file_is_plain_ascii(tmp_path):
    name = unique_name("my résumé", str(tmp_path))
    assert name.startswith("my_r_sum_-") and name.isascii()
    check_run_name(name, "run.name")


def test_nothing_to_resume_names_the_way_out(tmp_path):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no complete checkpoint; start from a checkpoint with --run.resume_from"):
        plan_run(resume_config(tmp_path / "runs"))


def test_a_cut_short_checkpoint_gives_way_to_the_newest_committed_one(run_with_checkpoints, caplog):
    cut = run_with_checkpoints / "checkpoint_000030"
    shutil.copytree(run_with_checkpoints / "checkpoint_000020", cut)
    (cut / "optimizer.pt").write_bytes(b"")  # the disk filled up during the upload
    assert committed_or_newest(str(cut), str(run_with_checkpoints)) == str(run_with_checkpoints / "checkpoint_000020")
    assert "optimizer.pt: 0 bytes" in caplog.text
    good = str(run_with_checkpoints / "checkpoint_000020")
    assert committed_or_newest(good, str(run_with_checkpoints)) == good


def test_run_names_do_not_collide_within_a_second(tmp_path):
    names = {unique_name("debug", str(tmp_path)) for _ in range(50)}
    assert len(names) == 50 and all(n.startswith("debug-") for n in names)


def test_a_run_refused_before_its_first_step_does_not_hold_its_name(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    for name, text in ((".validate_storage_marker", ""), ("params.json", "{}"), ("tags.json", "{}"),
                       ("metrics.jsonl", "")):  # what a run that failed before step 0 leaves (a damaged shard)
        (run_dir / name).write_text(text)
    config = Config.from_dict({"run": {"out_dir": str(tmp_path / "runs"), "name": "r1"},
                               "data": {"dir": str(tmp_path / "data")}})
    plan = plan_run(config)  # a new run, under the same name
    assert plan.run_dir == str(run_dir) and not plan.continues_run
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "loss": 4.17}\n')  # a logged step: a run's history
    with pytest.raises(ConfigError, match="already exists"):
        plan_run(config)
    (run_dir / "metrics.jsonl").write_text("")
    (run_dir / "checkpoint_000010").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        plan_run(config)


def test_a_sweep_trial_continues_from_its_newest_complete_checkpoint_with_or_without_ray_snapshot(
        run_with_checkpoints, tmp_path):
    """A one-worker trial trains in its Tune actor and writes no Ray snapshot; run again (Tune restarted it, or the
    sweep was resumed), it continues from its newest complete checkpoint, as a TorchTrainer's trial does."""
    config = Config.from_dict({"run": {"out_dir": str(tmp_path / "runs"), "name": "r1"}})
    shutil.copytree(run_with_checkpoints / "checkpoint_000020", run_with_checkpoints / "checkpoint_000030")
    (run_with_checkpoints / "checkpoint_000030" / "state.json").unlink()  # cut short: not complete
    plan = plan_trial_run(config)
    assert plan.continues_run and plan.resume_from == str(run_with_checkpoints / "checkpoint_000020")
    fresh = plan_trial_run(config.replace(run__name="r2"))
    assert not fresh.continues_run and fresh.resume_from is None
