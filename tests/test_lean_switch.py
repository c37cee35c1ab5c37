"""run.lean picks the trainer: Ray's public TorchTrainer wherever the wing is off (run.lean=off, or auto on a Ray this
process did not start: a cluster, a sweep trial), the wing's under the Ray release it was written for; under another
release the wing says so in one line and the job takes the public path, never an ImportError. Fresh drivers in
subprocesses: what a driver imports is the point. And the workers' quiet logs need no private import."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.config import ConfigError, load_config
from pipelines.ray_adapter import lean_switch
from tests.pretrain_runs import DEBUG_ARGS, PRESET_DIR

REPO = Path(__file__).resolve().parents[1]

_BUILD_IN_A_FRESH_DRIVER = """
import json, logging, sys
import ray
if sys.argv[2] != "same":
    ray.__version__ = sys.argv[2]  # a Ray release the wing was not written for
from nanogpt.config import load_config
from pipelines.ray_adapter.runs import plan_run
from pipelines.ray_adapter.trainer import build_trainer

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
config = load_config("debug", sys.argv[3:], search_dirs=[sys.argv[1]])
trainers = [build_trainer(config, plan_run(config)) for _ in range(2)]
print(json.dumps({"classes": [f"{type(t).__module__}.{type(t).__name__}" for t in trainers],
                  "wing": sorted(m for m in sys.modules if (m + ".").startswith("pipelines.ray_adapter.lean."))}))
"""


def _build(tmp_path: Path, lean: str, version: str = "same") -> tuple[dict, str]:
    args = [*DEBUG_ARGS, f"--run.out_dir={tmp_path}", "--run.num_workers=1", f"--run.lean={lean}"]
    done = subprocess.run([sys.executable, "-c", _BUILD_IN_A_FRESH_DRIVER, str(PRESET_DIR), version, *args],
                          capture_output=True, text=True, cwd=REPO, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


STOCK = "ray.train.v2.torch.torch_trainer.TorchTrainer"


@pytest.mark.parametrize("lean, classes, wing", [
    ("off", [STOCK] * 2, []),
    ("auto", [STOCK] * 2, []),  # this process started no Ray: as a job on a cluster, or a sweep trial
    ("on", ["pipelines.ray_adapter.lean.trainer.TrainerWithoutDatasets"] * 2,
     ["pipelines.ray_adapter.lean", "pipelines.ray_adapter.lean.controller", "pipelines.ray_adapter.lean.driver_controller",
      "pipelines.ray_adapter.lean.lone_worker_sync", "pipelines.ray_adapter.lean.trainer"]),
])
def test_the_public_trainer_unless_the_wing_applies(tmp_path, lean, classes, wing):
    built, _ = _build(tmp_path, lean)
    assert built == {"classes": classes, "wing": wing}


def test_under_another_ray_release_the_wing_says_so_once_and_the_job_takes_the_public_path(tmp_path):
    built, stderr = _build(tmp_path, "on", version="2.61.0")
    assert built == {"classes": [STOCK] * 2, "wing": ["pipelines.ray_adapter.lean"]}  # its guard, no more
    said = [line for line in stderr.splitlines() if "lean path off" in line]
    assert said == ["WARNING lean path off: written for Ray 2.60.0, found 2.61.0; using Ray's public API"]


@pytest.mark.parametrize("setting, own_instance, applies", [
    ("off", True, False), ("off", False, False),
    ("auto", True, True), ("auto", False, False),
    ("on", True, True), ("on", False, True),
])
def test_the_switch(setting, own_instance, applies):
    assert lean_switch.wing_on(setting, own_instance) is applies


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("on", "on"), ("off", "off"), ("true", "on"),
                                             ("false", "off")])
def test_run_lean_reads_a_bare_on_and_off(value, expected):
    assert load_config("debug", [f"--run.lean={value}"], search_dirs=[PRESET_DIR]).run.lean == expected


def test_a_bad_run_lean_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"run\.lean must be one of auto, on, off; got 'fast'"):
        load_config("debug", ["--run.lean=fast"], search_dirs=[PRESET_DIR])


def _record(logger: str, level: int, message: str) -> logging.LogRecord:
    return logging.getLogger(logger).makeRecord(logger, level, __file__, 1, message, (), None)


def test_the_public_paths_worker_logs_leave_out_rays_report_lines_and_its_traceback_of_a_user_error():
    """What quiet_ray_train_logs filters on every handler of `ray.train` (tests/test_job_submit.py sees the lines
    gone from a real job's logs); Ray's report line comes from a logger named by its file path."""
    from ray.train.v2._internal.execution import context

    from nanogpt.data.shards import ShardError
    from pipelines.ray_adapter.trainer import QuietTrainLogs

    quiet = QuietTrainLogs()
    report = _record(context.__file__, logging.INFO, "Reporting training result 3: TrainingReport(...) from rank 0")
    assert quiet.filter(report) is False
    assert quiet.filter(_record("ray.train.v2._internal.util", logging.ERROR, "Error in training function:")) is True
    try:
        raise ShardError("/data/val_000000.bin", "corrupted")
    except ShardError:
        assert quiet.filter(_record("ray.train.v2._internal.util", logging.ERROR, "Error in training function:")) \
            is False
        assert quiet.filter(_record("nanogpt.train.loop", logging.ERROR, "rank 0 failed")) is True  # ours stay
    try:
        raise RuntimeError("a bug")
    except RuntimeError:  # not a config or data error: Ray's traceback is the one that helps
        assert quiet.filter(_record("ray.train.v2._internal.util", logging.ERROR, "Error in training function:")) \
            is True


@pytest.mark.slow
def test_an_elastic_job_takes_rays_public_trainer_with_its_worker_range(ray_local, tmp_path):
    """On the session's own local Ray, run.lean=auto gives a fixed job the wing; an elastic one the stock trainer."""
    from ray.train.torch import TorchTrainer

    from pipelines.ray_adapter.runs import plan_run
    from pipelines.ray_adapter.trainer import build_trainer

    args = [*DEBUG_ARGS, f"--run.out_dir={tmp_path}", "--run.num_workers=3", "--train.gradient_accumulation_steps=4"]
    elastic = load_config("debug", [*args, "--run.min_workers=2", "--run.max_failures=-1", "--run.resize_interval_s=5"],
                          search_dirs=[PRESET_DIR])
    trainer = build_trainer(elastic, plan_run(elastic))
    assert type(trainer) is TorchTrainer
    scaling = trainer.scaling_config
    assert scaling.num_workers == (2, 3) and scaling.elasticity_enabled
    assert scaling.elastic_resize_monitor_interval_s == 5
    fixed = load_config("debug", args, search_dirs=[PRESET_DIR])
    trainer = build_trainer(fixed, plan_run(fixed))
    assert type(trainer) is not TorchTrainer and trainer.scaling_config.num_workers == 3


def test_an_elastic_jobs_fit_waits_its_own_group_start_timeout_and_a_users_variable_wins(monkeypatch):
    """Ray Train reads RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S in the driver when fit() starts its controller: during
    an elastic job's fit() it is run.group_start_timeout_s, and gone after it; a fixed job and a variable the user
    set are left alone."""
    from pipelines.ray_adapter.trainer import GROUP_START_TIMEOUT_ENV, group_start_timeout

    elastic = ["--run.num_workers=3", "--run.min_workers=2", "--run.max_failures=-1", "--train.gradient_accumulation_steps=4"]
    monkeypatch.delenv(GROUP_START_TIMEOUT_ENV, raising=False)
    seen = {}
    for name, args in {"elastic": elastic, "elastic 7.5": [*elastic, "--run.group_start_timeout_s=7.5"],
                       "fixed": elastic[:1]}.items():
        with group_start_timeout(load_config("debug", args, search_dirs=[PRESET_DIR])):
            seen[name] = os.environ.get(GROUP_START_TIMEOUT_ENV)
        assert GROUP_START_TIMEOUT_ENV not in os.environ
    assert seen == {"elastic": "20.0", "elastic 7.5": "7.5", "fixed": None}
    monkeypatch.setenv(GROUP_START_TIMEOUT_ENV, "90")
    with group_start_timeout(load_config("debug", elastic, search_dirs=[PRESET_DIR])):
        assert os.environ[GROUP_START_TIMEOUT_ENV] == "90"
    assert os.environ[GROUP_START_TIMEOUT_ENV] == "90"
