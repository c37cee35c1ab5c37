"""pipelines/pretrain.py on a real Ray local cluster (the session's `ray_local`), CPU + gloo, real shards on disk.

What is checked: a 2-worker run learns; a worker SIGKILLed mid-run under FailureConfig(max_failures=1) gives
bit-identical per-step losses to the uninterrupted run; that killed run is one MLflow run, its artifacts and its
registered model whole (on the session's MLflow server); a run resumed on 2 workers after 1 keeps tokens per step
and continues at the right step; a run whose Ray snapshot lags its checkpoints resumes from the newest complete one;
a worker's config error ends the run at once under max_failures=-1; bad configs and data fail before any trainer
starts, leaving no run directory (those that need no Ray: tests/test_pretrain_checks.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nanogpt.config import ConfigError
from pipelines import sample
from pipelines.pretrain import main, pretrain
from pipelines.ray_adapter.runs import RAY_SNAPSHOT, plan_run
from tests.conftest import PNG_MAGIC
from tests.pretrain_runs import (
    KILL_STEP,
    TOKENS_PER_STEP,
    KilledRun,
    char_shards,
    debug_config,
    debug_run,
    eval_records,
    killed_midrun,
    metric_history,
    records,
    resume_from_a_stale_snapshot,
    shared_root,
    step_losses,
    the_only_run,
)

pytest_plugins = ("tests.mlflow_server",)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def shards(ray_local, root, shakespeare_path) -> Path:
    return char_shards(root, shakespeare_path)


@pytest.fixture(scope="module")
def reference(ray_local, root, shards):
    return debug_run(root, shards)


def test_two_worker_run_learns_and_keeps_the_best_checkpoint(reference):
    run_dir = Path(reference.plan.run_dir)
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(30))
    assert losses[29] < losses[0] - 0.3, losses  # 4.86 -> ~3.9 on the debug preset
    evals = eval_records(run_dir)
    assert sorted(evals) == [0, 10, 20, 30]
    assert evals[30]["val_loss"] < evals[0]["val_loss"]
    # Ray kept the best by val_loss (here also the latest); its path and loss are what pretrain reports
    assert reference.best_step == 30 and reference.best_checkpoint == str(run_dir / "checkpoint_000030")
    assert reference.best_val_loss == pytest.approx(evals[30]["val_loss"], abs=1e-12)
    assert (run_dir / RAY_SNAPSHOT).is_file()
    state = json.loads((run_dir / "checkpoint_000030" / "state.json").read_text())
    assert state["step"] == 30 and state["world_size"] == 2 and state["tokens_seen"] == 30 * TOKENS_PER_STEP
    assert reference.summary["world_size"] == 2 and reference.summary["step"] == 30


KILLED_EXPERIMENT = "killed-midrun"


@pytest.fixture(scope="module")
def killed(ray_local, root, shards, mlflow_server) -> KilledRun:
    """The fault scenario, tracked to an MLflow server as a user's job is: what Ray Train's restart does to the
    numbers and what it does to the MLflow run are checked on the one run (neither changes the other's)."""
    return killed_midrun(shards, root / "runs", "killed", "--run.tracker=mlflow", f"--run.experiment={KILLED_EXPERIMENT}",
                         f"--run.tracking_uri={mlflow_server.uri}", "--train.sample_tokens=16",
                         "--run.registered_model=shakespeare-debug")


def test_worker_killed_midrun_resumes_bit_exactly(killed, reference):
    assert killed.marker.is_file(), "the fault hook did not fire"
    run_dir = Path(killed.outcome.plan.run_dir)
    # the restarted group resumed from checkpoint_000010 (not from scratch), so only updates 10..12 were logged twice
    logged = [r["step"] for r in records(run_dir) if "loss" in r]
    assert [logged.count(step) for step in (5, 9, 10, KILL_STEP - 1, KILL_STEP + 1, 19)] == [1, 1, 2, 2, 1, 1]
    reference_losses = step_losses(reference.plan.run_dir)
    # bit-equal, every one of the 20 updates (the reference's first 20: same schedule, lr_decay_iters=30)
    assert step_losses(run_dir) == {s: reference_losses[s] for s in range(20)}
    ours, theirs = eval_records(run_dir), eval_records(reference.plan.run_dir)
    assert {s: r["val_loss"] for s, r in ours.items()} == {s: theirs[s]["val_loss"] for s in (0, 10, 20)}
    assert killed.outcome.best_val_loss == min(theirs[s]["val_loss"] for s in (10, 20))  # of its checkpoints


def test_the_killed_run_is_one_mlflow_run_with_its_artifacts_and_registered_model(killed, mlflow_server, tmp_path,
                                                                                  capsys):
    """Rank 1 SIGKILLed and restarted by Ray: still exactly one MLflow run, with the config as params, every step's
    metrics, the artifacts, and the best checkpoint in the Model Registry."""
    assert killed.marker.is_file(), "the fault hook did not fire"
    outcome = killed.outcome
    client = MlflowClient(mlflow_server.uri)
    run = the_only_run(client, KILLED_EXPERIMENT)
    assert outcome.tracking["run_id"] == run.info.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "killed"

    params = run.data.params
    assert params["model.n_layer"] == "2" and params["train.max_iters"] == "20" and params["run.num_workers"] == "2"
    assert params["train.gradient_accumulation_steps"] == "2" and params["optim.learning_rate"] == "0.001"
    assert {"world_size", "version.torch", "version.ray", "version.mlflow", "device.type",
            "data.fingerprint"} <= set(run.data.tags)
    assert run.data.tags["world_size"] == "2"

    # every update's loss is logged; the updates redone after the restart (10..12) logged again with equal values
    loss = metric_history(client, run.info.run_id, "loss")
    assert sorted(loss) == list(range(20))
    assert all(len(set(values)) == 1 for values in loss.values())
    assert [len(loss[step]) for step in (9, 10, KILL_STEP, KILL_STEP + 1)] == [1, 2, 2, 1]  # from checkpoint_000010
    jsonl = {r["step"]: r["loss"] for r in records(outcome.plan.run_dir) if "loss" in r}
    assert {step: values[-1] for step, values in loss.items()} == pytest.approx(jsonl, rel=1e-6)
    val = metric_history(client, run.info.run_id, "val_loss")
    assert {0, 10, 20} <= set(val)
    assert val[20][-1] == pytest.approx(outcome.summary["val_loss"], rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s", "step_time_ms", "val_perplexity"} <= set(run.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "checkpoints", "plots", "samples"} <= artifacts
    [best_model] = [o.model_id for o in run.outputs.model_outputs]  # the best checkpoint: the run's logged model
    best = {Path(a.path).name for a in client.list_logged_model_artifacts(best_model)}
    final = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints/final")}
    assert {"model.safetensors", "config.yaml", "tokenizer.json", "state.json"} <= best
    assert "optimizer.pt" not in best and "optimizer.pt" in final  # the registered model holds no pickles
    samples = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"step_000000.txt", "step_000010.txt", "step_000020.txt"} <= samples
    png = Path(client.download_artifacts(run.info.run_id, "plots/loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == PNG_MAGIC

    assert outcome.tracking["model_uri"] == "models:/shakespeare-debug/1"
    version = client.get_model_version("shakespeare-debug", "1")
    assert version.run_id == run.info.run_id and version.source.startswith("models:/m-")  # its LoggedModel
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id and [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    # what the UI shows: the dataset input (logged once, by the driver), the source, the experiment's kind
    [dataset] = [i.dataset for i in run.inputs.dataset_inputs]
    assert dataset.digest == run.data.tags["data.fingerprint"] and dataset.source_type == "local"
    assert run.data.tags["mlflow.source.type"] == "PROJECT"
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    # and the registered model samples through pipelines/sample.py
    capsys.readouterr()
    argv = ["--checkpoint", "models:/shakespeare-debug/1", "--tracking-uri", mlflow_server.uri,
            "--num_samples", "2", "--max_new_tokens", "24", "--start", "ROMEO:"]
    assert sample.main(argv) == 0
    texts = [t.strip("\n") for t in capsys.readouterr().out.split(sample.SEPARATOR) if t.strip()]
    assert len(texts) == 2 and all(t.startswith("ROMEO:") and len(t) == len("ROMEO:") + 24 for t in texts)




def test_resume_starts_from_the_newest_complete_checkpoint_when_rays_snapshot_lags(root, shards, killed, reference):
    stale, run_dir = killed.stale_snapshot, Path(killed.outcome.plan.run_dir)
    assert "checkpoint_000020" not in stale.read_text() and (run_dir / "checkpoint_000020").is_dir()
    resumed, added = resume_from_a_stale_snapshot(shards, killed, "stale")
    assert resumed.summary["start_step"] == 20 and resumed.summary["step"] == 30  # not 10, the snapshot's latest
    logged = [r["step"] for r in added if "loss" in r]
    assert logged == list(range(20, 30)), "an update was trained twice (or never)"
    reference_losses = step_losses(reference.plan.run_dir)
    assert {r["step"]: r["loss"] for r in added if "loss" in r} == {s: reference_losses[s] for s in range(20, 30)}


@pytest.fixture(scope="module")
def branch(ray_local, root, shards, reference):
    """A new run on 1 worker from the 2-worker reference's checkpoint_000020, to update 25."""
    source = Path(reference.plan.run_dir) / "checkpoint_000020"
    assert source.is_dir()  # kept: among the 2 best by val_loss
    return source, pretrain(debug_config(shards, root / "runs", "branch", "--run.num_workers=1", "--train.max_iters=25",
                                         "--model.init_from=resume", f"--run.resume_from={source}"))


def test_new_run_from_another_runs_checkpoint(branch, reference):
    source, outcome = branch
    assert not outcome.plan.continues_run and outcome.plan.resume_from == str(source)
    assert outcome.summary["start_step"] == 20 and outcome.summary["step"] == 25
    losses, reference_losses = step_losses(outcome.plan.run_dir), step_losses(reference.plan.run_dir)
    assert sorted(losses) == list(range(20, 25))
    assert all(losses[s] == pytest.approx(reference_losses[s], rel=1e-4) for s in losses)
    assert sorted(p.name for p in Path(outcome.plan.run_dir).glob("checkpoint_0*")) == ["checkpoint_000025"]


def test_resume_on_more_workers_keeps_tokens_per_step(root, shards, branch, reference):
    """The 1-worker branch (a copy of it) continued on 2 workers."""
    first = branch[1]
    assert first.summary["world_size"] == 1 and first.summary["step"] == 25
    run_dir = root / "runs" / "grow"
    shutil.copytree(first.plan.run_dir, run_dir)
    second = pretrain(debug_config(shards, root / "runs", "grow", "--run.num_workers=2", "--model.init_from=resume",
                                   "--run.num_to_keep=null"))
    assert second.plan.continues_run and second.plan.run_dir == str(run_dir)
    assert second.summary["start_step"] == 25 and second.summary["step"] == 30 and second.summary["world_size"] == 2
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(20, 30))
    evals = eval_records(run_dir)
    assert sorted(evals) == [25, 30]
    assert all(r["tokens"] == s * TOKENS_PER_STEP for s, r in evals.items())
    for step, world_size in ((25, 1), (30, 2)):
        state = json.loads((run_dir / f"checkpoint_{step:06d}" / "state.json").read_text())
        assert state["world_size"] == world_size and state["tokens_seen"] == step * TOKENS_PER_STEP
    # Same global batches on 1 or 2 workers: the losses follow the 2-worker reference up to float rounding
    reference_losses = step_losses(reference.plan.run_dir)
    for step in range(20, 30):
        assert losses[step] == pytest.approx(reference_losses[step], rel=1e-4), step


def test_a_workers_config_error_ends_the_run_without_a_retry(ray_local, root, shards):
    # Only the worker can know its devices (its node may be another machine): it finds no MPS, a ConfigError.
    # Retried, it would fail twice more and end in a WorkerGroupError (with -1: restart forever, as it did).
    config = debug_config(shards, root / "runs", "no-mps", "--train.device=mps", "--run.max_failures=2")
    with pytest.raises(ConfigError, match=r"^train\.device=mps but MPS is not available"):
        pretrain(config)


# ------------------------------------------------------------------------------------------ errors before step 0


def _corrupt(shards: Path, dest: Path) -> Path:
    shutil.copytree(shards, dest)
    val = dest / "val_000000.bin"
    data = bytearray(val.read_bytes())
    data[5000] ^= 0xFF
    val.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize(
    "case, extra, expected",
    [
        ("unknown key", ["--train.max_iter=5"], "unknown config key 'train.max_iter'; did you mean 'train.max_iters'"),
        ("more workers than micro-batches", ["--run.num_workers=3"],
         "run.num_workers=3: at 3 workers the 2 micro-batches per optimizer step (train.gradient_accumulation_steps=2)"),
        ("missing shards", ["--data.input=null"], "manifest.json: missing"),
        ("corrupted shards", [], "val_000000.bin: corrupted"),
        ("resume without a run", ["--model.init_from=resume"], "nothing to resume"),
        ("resume_from without resume", ["--run.resume_from=/nowhere"], "only read with model.init_from=resume"),
        ("block_size past the shards", ["--model.block_size=100000000"],
         "model.block_size=100000000 needs windows of 100000001 tokens, but the longest"),
        ("resources never there", ["--run.cpus_per_worker=64"], "this local Ray instance cannot grow"),
        ("out_dir under a file", ["--run.out_dir={tmp}/a_file/runs"], "a_file is a file"),
        ("nan learning rate", ["--optim.learning_rate=nan", "--optim.decay_lr=false"], "must be a finite number"),
        ("partial shards", ["--data.input=tinyshakespeare"], "is not empty (an interrupted prepare?)"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, shards, caplog, case, extra, expected):
    data_dir = tmp_path / "empty"
    data_dir.mkdir()
    if case == "corrupted shards":
        data_dir = _corrupt(shards, tmp_path / "damaged")
    elif case == "partial shards":  # a killed prepare of the user's own corpus left these, and no manifest
        shutil.copy(shards / "train_000000.bin", data_dir / "train_000000.bin")
    elif case != "missing shards":
        data_dir = shards
    out = tmp_path / "runs"
    (tmp_path / "a_file").write_text("")
    extra = [e.format(tmp=tmp_path) for e in extra]
    argv = ["--config", "debug", f"--run.out_dir={out}", "--run.name=bad", f"--data.dir={data_dir}", *extra]
    assert main(argv) == 2
    assert expected in caplog.text
    assert not (out / "bad").exists(), "a run directory was created"
    if (out / "mlflow.db").exists():  # the run opened while Ray started (the shards were there): deleted again
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_existing_run_is_never_silently_resumed(tmp_path):
    (tmp_path / "runs" / "r1" / "checkpoint_000010").mkdir(parents=True)
    config = debug_config(tmp_path, tmp_path / "runs", "r1")
    with pytest.raises(ConfigError, match="already exists .* continue it with --model.init_from=resume"):
        plan_run(config)


def test_run_names_and_explicit_resume_checks(tmp_path, shards, reference):
    config = debug_config(shards, tmp_path / "runs", "x").replace(run__name=None)
    plan = plan_run(config, "debug")
    assert plan.name.startswith("debug-") and plan.run_dir == str(tmp_path / "runs" / plan.name)
    ckpt = reference.best_checkpoint
    new = plan_run(debug_config(shards, tmp_path / "runs", "y", "--model.init_from=resume",
                                f"--run.resume_from={ckpt}"))
    assert new.resume_from == ckpt and not new.continues_run
    with pytest.raises(ConfigError, match="already exists"):  # resume_from into an existing run: ambiguous
        plan_run(debug_config(shards, Path(reference.plan.storage_path), "ref", "--model.init_from=resume",
                              f"--run.resume_from={ckpt}"))
    assert math.isfinite(reference.best_val_loss)
