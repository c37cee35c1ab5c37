"""The trainers of pipelines/ray_adapter/lean/trainer.py are Ray's TorchTrainer less exactly the default callbacks they
name: Ray Data's datasets callback always, and the placement-group cleaner where the controller runs in the driver (a
job's own local instance without the State API), where a fixed-size worker group also sends no resource requests to
an autoscaler. A lone worker that replicates the model gets no torch process group, and neither the driver that
builds its trainer nor the controller that unpickles it imports torch."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

from pipelines.ray_adapter.end_on_user_error import EndRunOnUserError
from pipelines.ray_adapter.lean import trainer as lean_trainer
from pipelines.ray_adapter.lean.controller import FixedScalingWithoutRequests, TorchConfigWithoutProcessGroup
from pipelines.ray_adapter.lean.trainer import (
    ControllerHereTrainer,
    ControllerInDriverTrainer,
    TrainerWithoutDatasets,
    backend_config,
    trainer_class,
)
from tests.pretrain_runs import DEBUG_ARGS, PRESET_DIR

REPO = Path(__file__).resolve().parents[1]


def _callback_types(cls: type) -> list[type]:
    return [type(cb) for cb in cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))._create_default_callbacks()]


@pytest.mark.parametrize("controller, left_out", [
    ("actor", {DatasetsCallback}),
    ("here", {DatasetsCallback}),
    ("driver", {DatasetsCallback, PlacementGroupCleanerCallback}),
])
def test_the_trainer_leaves_out_only_the_callbacks_it_names(controller, left_out):
    ray_default = _callback_types(TorchTrainer)
    assert left_out <= set(ray_default)  # Ray still adds them: leaving them out still means something
    assert _callback_types(trainer_class(controller)) == [t for t in ray_default if t not in left_out]


def test_the_cleaner_stays_where_the_state_api_is_served():
    assert trainer_class("actor") is TrainerWithoutDatasets
    assert trainer_class("here") is ControllerHereTrainer  # watches the actor it runs in: a sweep trial's
    assert trainer_class("driver") is ControllerInDriverTrainer


def test_the_controller_runs_in_the_driver_of_its_own_instance_or_in_the_actor_that_calls_fit(ray_local):
    """A job's own instance without the State API: the driver; a caller that is an actor (a sweep trial): there;
    any other caller (a driver on a cluster, a task): an actor of its own, as Ray does."""
    import ray

    from pipelines.ray_adapter.trainer import controller_place

    @ray.remote(num_cpus=0)
    class Caller:
        def place(self) -> str:
            return controller_place(False)

    @ray.remote(num_cpus=0)
    def task_place() -> str:
        return controller_place(False)

    assert (controller_place(True), controller_place(False)) == ("driver", "actor")
    caller = Caller.remote()
    assert ray.get([caller.place.remote(), task_place.remote()]) == ["here", "actor"]
    ray.kill(caller)


def test_a_trainer_without_the_datasets_callback_refuses_datasets(ray_local):
    import ray.data  # a Dataset needs Ray up: the session's cluster, not one started here by ray.data itself

    with pytest.raises(ValueError, match="takes no datasets"):
        TrainerWithoutDatasets(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                           datasets={"train": ray.data.range(3)})


def test_a_fixed_worker_group_on_a_local_instance_asks_no_autoscaler(monkeypatch):
    config = ScalingConfig(num_workers=2)
    policy = FixedScalingWithoutRequests(config)
    policy.after_controller_start(train_run_context=None)  # Ray's policy starts the coordinator's client here
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2
    assert policy._coordinator_client is None
    # the private instance's trainer hands the controller that policy in place of Ray's
    monkeypatch.setattr(lean_trainer, "run_in_driver", lambda **kwargs: kwargs)
    trainer = ControllerInDriverTrainer(lambda: None, scaling_config=config)
    passed = trainer._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(config))
    assert type(passed["scaling_policy"]) is FixedScalingWithoutRequests
    assert passed["scaling_policy"].scaling_config is config


@pytest.mark.parametrize("num_workers, parallel, use_gpu, expected", [
    (1, "ddp", False, TorchConfigWithoutProcessGroup()),
    (1, "ddp", True, TorchConfigWithoutProcessGroup()),
    (2, "ddp", False, TorchConfig(backend="gloo")),
    (2, "ddp", True, TorchConfig(backend="nccl")),
    (1, "fsdp", True, TorchConfig(backend="nccl")),  # FSDP shards over a device mesh, even of one rank
    (4, "fsdp", False, TorchConfig(backend="gloo")),
])
def test_only_a_lone_ddp_worker_goes_without_a_process_group(num_workers, parallel, use_gpu, expected):
    assert backend_config(num_workers, parallel, use_gpu) == expected


def _write_process_group(out_dir: str) -> None:
    import ray.train
    import torch.distributed as dist

    rank = ray.train.get_context().get_world_rank()
    Path(out_dir, f"rank{rank}").write_text(str(dist.get_world_size()) if dist.is_initialized() else "none")


@pytest.mark.slow
@pytest.mark.parametrize("num_workers, seen", [(1, {"none"}), (2, {"2"})])
def test_the_workers_have_a_process_group_only_when_they_use_it(ray_local, tmp_path, num_workers, seen):
    out = tmp_path / "seen"
    out.mkdir()
    TrainerWithoutDatasets(
        _write_process_group, train_loop_config=str(out), backend_config=backend_config(num_workers, "ddp", False),
        scaling_config=ScalingConfig(num_workers=num_workers),
        run_config=RunConfig(name=f"pg{num_workers}", storage_path=str(tmp_path / "runs")),
    ).fit()
    assert {p.read_text() for p in out.iterdir()} == seen
    assert len(list(out.iterdir())) == num_workers


def test_what_the_controller_unpickles_imports_no_torch():
    """Ray Train's controller starts about 3 s sooner here without torch: the scaling policy and a lone worker's
    backend config come from a module that does not import it (Ray's TorchConfig does)."""
    script = "import pickle, sys\npickle.loads(sys.stdin.buffer.read())\nprint('torch' in sys.modules)"

    def imports_torch(*objects) -> str:
        done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(objects), capture_output=True,
                              cwd=REPO, check=True)
        return done.stdout.decode().strip()

    config = backend_config(1, "ddp", False)
    assert imports_torch(FixedScalingWithoutRequests(ScalingConfig(num_workers=1)), config, config.train_func_context,
                         EndRunOnUserError()) == "False"
    assert imports_torch(TorchConfig()) == "True"  # Ray's own config would: the check above can fail


_BUILD_IN_A_FRESH_DRIVER = """
import sys
from nanogpt.config import load_config
from pipelines.ray_adapter.runs import plan_run
from pipelines.ray_adapter.trainer import build_trainer

config = load_config("debug", sys.argv[2:], search_dirs=[sys.argv[1]])
build_trainer(config, plan_run(config))
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("num_workers, imports_torch", [("1", "False"), ("2", "True")])
def test_the_driver_of_a_lone_worker_imports_no_torch(tmp_path, num_workers, imports_torch):
    """The main job's driver leaves torch to its worker: about 3 s of one core sooner to the workers' start.
    Two workers need Ray's TorchConfig, which imports it: the check can fail."""
    args = [*DEBUG_ARGS, f"--run.out_dir={tmp_path}", f"--run.num_workers={num_workers}", "--run.lean=on"]
    done = subprocess.run([sys.executable, "-c", _BUILD_IN_A_FRESH_DRIVER, str(PRESET_DIR), *args],
                          capture_output=True, cwd=REPO, check=True)
    assert done.stdout.decode().strip() == imports_torch
