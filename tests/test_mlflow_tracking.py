"""MlflowTracker against real MLflow: the local sqlite store (no server), a real `mlflow server`, and that server
dying mid-run. No mocks.

    .venv/bin/python -m pytest tests/test_mlflow_tracking.py            # ~1 min, most of it server start-ups
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from nanogpt.config import Config
from pipelines.mlflow_adapter import tracking_uri_swap
from pipelines.mlflow_adapter.checkpoint_uris import resolve_checkpoint_uri
from pipelines.mlflow_adapter.job_run import finish_job_run, make_mlflow_tracker, open_job_run
from pipelines.mlflow_adapter.registry import log_final_checkpoint, register_checkpoint
from pipelines.mlflow_adapter.run_tags import manifest_fingerprint
from pipelines.mlflow_adapter.tracker import MlflowTracker
from pipelines.mlflow_adapter.tracking_uri_swap import process_tracking_uri
from pipelines.ray_adapter.runs import RunPlan
from tests.conftest import PNG_MAGIC

pytest_plugins = ("tests.mlflow_server",)

TRAIN = [(0, 4.17), (1, 3.9021), (2, 3.5), (3, 3.125), (4, 2.875)]  # (step, loss)
VAL = [(2, 3.61), (4, 2.99)]


def make_config(out_dir: Path, name: str, experiment: str, tracking_uri: str | None = None, **changes) -> Config:
    changes.setdefault("data__dir", str(out_dir.parent / "data" / "shakespeare_char"))
    return Config().replace(run__out_dir=str(out_dir), run__name=name, run__experiment=experiment,
                            run__tracking_uri=tracking_uri, **changes)


def fake_checkpoint(path: Path, config: Config, step: int, val_loss: float) -> Path:
    """The files of a nanogpt checkpoint directory, with tiny tensors."""
    path.mkdir(parents=True)
    save_file({"transformer.wte.weight": torch.randn(8, 4), "lm_head.bias": torch.arange(8.0)},
              str(path / "model.safetensors"))
    torch.save({"state": {}, "param_groups": []}, path / "optimizer.pt")
    (path / "config.yaml").write_text(config.to_yaml())
    (path / "tokenizer.json").write_text(json.dumps({"name": "char", "vocab_size": 8}))
    (path / "manifest.json").write_text(json.dumps({"vocab_size": 8}))
    (path / "state.json").write_text(json.dumps({"step": step, "best_val_loss": val_loss, "extra": {}}))
    return path


def log_losses(tracker: MlflowTracker, train=TRAIN, val=VAL) -> None:
    val = dict(val)
    for step, loss in train:
        metrics = {"train/loss": loss, "lr": 1e-3 * (step + 1)}
        if step in val:
            metrics["val/loss"] = val[step]
        tracker.log_metrics(metrics, step=step)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every file under `path`, recursively."""
    found = set()
    for info in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return found


def check_round_trip(client: MlflowClient, tracker: MlflowTracker, config: Config, checkpoint: Path,
                     version: str | None, tmp_path: Path) -> None:
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert history(client, run.info.run_id, "train/loss") == TRAIN
    assert history(client, run.info.run_id, "val/loss") == VAL
    assert run.data.params == {k: str(v) for k, v in config.to_flat().items()}
    tags = run.data.tags
    assert tags["world_size"] == "2" and tags["device.type"] == "cpu"
    assert tags["version.torch"] == torch.__version__ and tags["version.mlflow"] and tags["version.ray"]
    assert len(tags["data.fingerprint"]) == 16
    assert len(tags.get("git.commit", "0" * 40)) == 40  # present whenever the tests run in a git checkout

    files = artifact_paths(client, run.info.run_id)
    assert {"config.yaml", "data/manifest.json", "samples/step_000002.txt", "plots/loss_curve.png",
            "checkpoints/final/model.safetensors", "checkpoints/final/optimizer.pt"} <= files
    # the best checkpoint is the run's logged model (below), not also a copy in the run's artifacts: stored once
    assert not [f for f in files if f.startswith("checkpoints/best/")]
    got = Path(client.download_artifacts(run.info.run_id, "samples/step_000002.txt", str(tmp_path / "dl")))
    assert got.read_text() == "ROMEO: sample at step 2"
    png = Path(client.download_artifacts(run.info.run_id, "plots/loss_curve.png", str(tmp_path / "dl")))
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000

    assert version == "1"
    name = f"{config.run.experiment}-{config.run.name}"
    mv = client.get_model_version(name, version)
    assert mv.run_id == run.info.run_id
    # MLflow 3's links: version -> logged model (source models:/<model_id>) -> run (source_run_id, run outputs),
    # and the logged model's mlflow.modelVersions tag back to the version (the runs table's Models column)
    assert mv.source.startswith("models:/m-")
    model = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert model.source_run_id == run.info.run_id and model.experiment_id == run.info.experiment_id
    assert str(model.status) == "READY" and model.name == "checkpoint-best"
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": name, "version": 1}]  # once, as a server writes it
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 4)]
    model_files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert {"model.safetensors", "config.yaml", "state.json"} <= model_files and "optimizer.pt" not in model_files
    assert mv.tags["step"] == "4" and mv.tags["best_val_loss"] == "2.99"
    assert run.data.tags["registered_model"] == f"models:/{name}/1"
    check_ui_tags(client, run)

    original = (checkpoint / "model.safetensors").read_bytes()
    for i, uri in enumerate([f"models:/{name}/1", f"models:/{name}/latest", f"runs:/{run.info.run_id}/checkpoints/best"]):
        local = Path(resolve_checkpoint_uri(uri, dst=tmp_path / f"resolved{i}", tracking_uri=tracker.tracking_uri))
        assert (local / "model.safetensors").read_bytes() == original, uri
        assert (local / "state.json").is_file() and not (local / "optimizer.pt").exists()


MANIFEST = {"vocab_size": 8, "dtype": "uint16", "tokenizer": {"name": "char", "vocab_size": 8, "chars": "abcdefgh"},
            "splits": {"train": {"shards": [{"name": "train_000000.bin"}], "num_tokens": 900, "num_documents": 3},
                       "val": {"shards": [{"name": "val_000000.bin"}], "num_tokens": 100, "num_documents": 1}},
            "input_fingerprint": "in", "settings_fingerprint": "set", "stats": {"s": 1}}


def check_ui_tags(client: MlflowClient, run) -> None:
    """What MLflow 3.17's UI reads: the experiment's kind, the run's dataset input, its Project-style source."""
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.experiment.primaryMetric.name"] == "val_loss"  # its chart first
    [dataset_input] = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.digest == manifest_fingerprint(MANIFEST) == run.data.tags["data.fingerprint"]
    assert dataset.name == "shakespeare_char" and dataset.source_type == "local"
    assert json.loads(dataset.source)["uri"].endswith("/data/shakespeare_char")
    assert json.loads(dataset.profile)["num_tokens"] == {"train": 900, "val": 100}
    schema = json.loads(dataset.schema)
    assert schema["vocab_size"] == 8 and schema["tokenizer"] == {"name": "char", "vocab_size": 8}
    assert schema["mlflow_colspec"][0]["name"] == "token"
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]
    tags = run.data.tags
    assert tags["mlflow.source.type"] == "PROJECT" and tags["mlflow.source.name"]
    assert tags["mlflow.project.entryPoint"] == "pipelines/pretrain.py"
    assert tags.get("mlflow.source.git.commit") == tags.get("git.commit")


def run_training_like_job(config: Config, checkpoint: Path, **tracker_kwargs) -> tuple[MlflowTracker, str | None]:
    tracker = make_mlflow_tracker(config, world_size=2, device="cpu", manifest=MANIFEST,
                                  entry_point="pipelines/pretrain.py", **tracker_kwargs)
    log_losses(tracker)
    tracker.log_text("ROMEO: sample at step 2", "samples/step_000002.txt")
    version = register_checkpoint(tracker, checkpoint)
    log_final_checkpoint(tracker, checkpoint)
    if tracker.system_metrics:  # a real job runs for minutes: give the sampler the time for its first point
        wait_for_system_metrics(tracker)
    tracker.close()
    return tracker, version


def wait_for_system_metrics(tracker: MlflowTracker, timeout_s: float = 30.0) -> None:
    client, deadline = MlflowClient(tracker.tracking_uri), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(k.startswith("system/") for k in client.get_run(tracker.run_id).data.metrics):
            return
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------- local store


def test_local_store_round_trip_without_server(tmp_path, monkeypatch):
    import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path, as in every Ray worker)

    out = tmp_path / "out"
    # the store named in the config, while the environment names someone else's: registering must keep both as set
    config = make_config(out, "shakespeare", "local-exp", tracking_uri=f"sqlite:///{out.resolve()}/mlflow.db")
    checkpoint = fake_checkpoint(tmp_path / "checkpoint_000004", config, step=4, val_loss=2.99)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    tracker, version = run_training_like_job(config, checkpoint, system_metrics_interval_s=0.3)
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9" == mlflow.get_tracking_uri()

    assert tracker.tracking_uri == f"sqlite:///{out.resolve()}/mlflow.db"
    assert (out / "mlflow.db").is_file()
    assert list((out / "mlartifacts" / "local-exp").glob(f"{tracker.run_id}/artifacts/checkpoints/final/*"))
    assert list((out / "mlartifacts" / "local-exp").glob("models/*/artifacts/model.safetensors"))  # the best
    client = MlflowClient(tracker.tracking_uri)
    check_round_trip(client, tracker, config, checkpoint, version, tmp_path)
    metrics = client.get_run(tracker.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)


@pytest.mark.parametrize("way", ["private global", "public fallback"])
def test_the_process_tracking_uri_is_put_back_and_the_variable_left_as_it_was(way, tmp_path, monkeypatch):
    if way == "public fallback":  # an MLflow whose private global is unknown
        monkeypatch.setattr(tracking_uri_swap, "private_holder", lambda: None)
    else:
        assert tracking_uri_swap.private_holder() is not None  # this MLflow is one it knows
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    before = mlflow.get_tracking_uri()
    store = f"sqlite:///{tmp_path}/elsewhere.db"
    with process_tracking_uri(store):
        assert mlflow.get_tracking_uri() == store
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ
    with pytest.raises(RuntimeError, match="in the block"), process_tracking_uri(store):
        raise RuntimeError("in the block")
    assert mlflow.get_tracking_uri() == before and "MLFLOW_TRACKING_URI" not in os.environ
    mlflow.set_tracking_uri(None)  # unset again for the tests after this one in this process


def test_local_resume_keeps_one_run_and_tags_changed_params(tmp_path):
    config = make_config(tmp_path / "out", "resumed", "resume-exp")
    (tmp_path / "out").mkdir()
    client = MlflowClient(f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db")
    # made before the kind tag existed
    old_experiment = client.create_experiment("resume-exp", artifact_location=(tmp_path / "art").as_uri())
    first = make_mlflow_tracker(config, system_metrics=False, manifest=MANIFEST)
    log_losses(first, train=TRAIN[:3], val=VAL[:1])  # then the worker "dies": no close()

    resumed = config.replace(model__init_from="resume")
    second = make_mlflow_tracker(resumed, run_id=first.run_id, system_metrics=False, manifest=MANIFEST)
    assert second.run_id == first.run_id
    log_losses(second, train=TRAIN[3:], val=VAL[1:])
    second.close()

    assert second.tracking_uri == client.tracking_uri
    run = client.get_run(first.run_id)
    assert run.info.experiment_id == old_experiment
    assert client.get_experiment(old_experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(old_experiment).tags["mlflow.experiment.primaryMetric.name"] == "val_loss"
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [manifest_fingerprint(MANIFEST)]  # once
    assert history(client, run.info.run_id, "train/loss") == TRAIN
    assert run.data.params["model.init_from"] == "scratch"  # MLflow params are immutable: first value kept
    assert run.data.tags["param_changed.model.init_from"] == "resume"
    assert run.data.tags["model.init_from"] == "resume"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def _wait_for(condition, timeout: float) -> float:
    """Seconds until condition() held (polling); fails after `timeout`."""
    t0 = time.monotonic()
    while not condition():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_metric_points_wait_for_the_interval_then_go_out_without_a_further_call(tmp_path):
    config = make_config(tmp_path / "out", "batched", "batched-exp")
    tracker = make_mlflow_tracker(config, system_metrics=False, metrics_interval_s=1.0)
    client = MlflowClient(tracker.tracking_uri)
    run_id = tracker.run_id  # waits for the run's start
    started = time.monotonic()
    for step in range(3):
        tracker.log_metrics({"train/loss": 5.0 - step}, step=step)
    assert tracker.num_buffered_points == 3 and history(client, run_id, "train/loss") == []
    _wait_for(lambda: len(history(client, run_id, "train/loss")) == 3, timeout=10)
    assert time.monotonic() - started >= 1.0 and tracker.num_buffered_points == 0

    tracker.log_metrics({"train/loss": 1.5}, step=3)
    tracker.log_text("a sample", "samples/step_000003.txt")  # any other call takes the waiting points along first
    assert tracker.num_buffered_points == 0
    assert history(client, run_id, "train/loss") == [(0, 5.0), (1, 4.0), (2, 3.0), (3, 1.5)]
    tracker.log_metrics({"train/loss": 1.25}, step=4)
    tracker.close()  # and close sends what waits
    assert history(client, run_id, "train/loss")[-1] == (4, 1.25)


def test_metric_points_go_out_at_once_by_default(tmp_path):
    tracker = make_mlflow_tracker(make_config(tmp_path / "out", "at-once", "at-once-exp"), system_metrics=False)
    tracker.log_metrics({"train/loss": 2.0}, step=0)
    assert tracker.num_buffered_points == 0
    assert history(MlflowClient(tracker.tracking_uri), tracker.run_id, "train/loss") == [(0, 2.0)]
    tracker.close()


def test_unknown_run_id_starts_a_new_run_and_bad_uris_name_themselves(tmp_path):
    config = make_config(tmp_path / "out", "fresh", "exp")
    tracker = make_mlflow_tracker(config, run_id="0123456789abcdef0123456789abcdef", system_metrics=False)
    assert tracker.run_id and tracker.run_id != "0123456789abcdef0123456789abcdef"
    tracker.close()
    assert resolve_checkpoint_uri(str(tmp_path)) == str(tmp_path.resolve())
    with pytest.raises(FileNotFoundError, match="no/such/dir"):
        resolve_checkpoint_uri(str(tmp_path / "no/such/dir"))
    with pytest.raises(FileNotFoundError, match="models:/missing/1"):
        resolve_checkpoint_uri("models:/missing/1", dst=tmp_path / "x", tracking_uri=tracker.tracking_uri)


# ------------------------------------------------------------------------------------------ real server


@pytest.mark.slow
def test_server_round_trip_resume_and_alias(mlflow_server, tmp_path):
    config = make_config(tmp_path / "out", "gpt-tiny", "server-exp", tracking_uri=mlflow_server.uri)
    checkpoint = fake_checkpoint(tmp_path / "checkpoint_000004", config, step=4, val_loss=2.99)
    tracker, version = run_training_like_job(config, checkpoint, system_metrics=False)
    client = MlflowClient(mlflow_server.uri)
    check_round_trip(client, tracker, config, checkpoint, version, tmp_path)
    assert not (tmp_path / "out" / "mlflow.db").exists()  # everything went to the server

    # init_from=resume: the run id comes back from the checkpoint and the same run goes on
    later = [(5, 2.75), (6, 2.5)]
    resumed = make_mlflow_tracker(config, run_id=tracker.run_id, system_metrics=False)
    log_losses(resumed, train=later, val=[])
    resumed.close()
    assert history(client, tracker.run_id, "train/loss") == TRAIN + later
    assert len(client.search_runs([client.get_experiment_by_name("server-exp").experiment_id])) == 1
    assert client.get_run(tracker.run_id).info.status == "FINISHED"

    client.set_registered_model_alias("server-exp-gpt-tiny", "champion", version)
    local = resolve_checkpoint_uri("models:/server-exp-gpt-tiny@champion", dst=tmp_path / "alias",
                                   tracking_uri=mlflow_server.uri)
    assert (Path(local) / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_server_dying_mid_run_never_stalls_training_and_buffered_metrics_arrive(mlflow_server, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="pipelines.mlflow_adapter.tracker")
    config = make_config(tmp_path / "out", "outage", "outage-exp", tracking_uri=mlflow_server.uri)
    tracker = make_mlflow_tracker(config, system_metrics=False, retry_interval_s=1.0)
    for step in range(3):
        tracker.log_metrics({"train/loss": 5.0 - step}, step=step)
    assert tracker.flush()  # log_metrics returns before its points are sent: these three are in before the outage

    mlflow_server.kill()
    durations = []
    for step in range(3, 23):
        t0 = time.monotonic()
        tracker.log_metrics({"train/loss": 5.0 - step / 10}, step=step)
        if step == 10:
            tracker.log_text("sample during the outage", "samples/step_000010.txt")
        durations.append(time.monotonic() - t0)
        time.sleep(0.1)  # a training step: the breaker re-probes the dead server every second
    assert max(durations) < 2.0, durations
    assert sum(durations) < 5.0, durations
    assert not tracker.reachable and tracker.num_buffered_points == 20
    outage_warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_warnings) == 1, [r.getMessage() for r in caplog.records]

    mlflow_server.start()  # same port, same database
    time.sleep(1.1)  # past the breaker's retry time
    tracker.log_metrics({"train/loss": 0.5}, step=23)
    assert tracker.reachable and tracker.num_buffered_points == 0
    tracker.close()

    client = MlflowClient(mlflow_server.uri)
    steps = [s for s, _ in history(client, tracker.run_id, "train/loss")]
    assert steps == list(range(24))
    assert "samples/step_000010.txt" in artifact_paths(client, tracker.run_id, "samples")
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_points_that_wait_out_an_outage_go_out_when_the_store_is_back_without_a_further_call(mlflow_server,
                                                                                              tmp_path):
    config = make_config(tmp_path / "out", "waiting", "waiting-exp", tracking_uri=mlflow_server.uri)
    tracker = make_mlflow_tracker(config, system_metrics=False, retry_interval_s=1.0, metrics_interval_s=0.5)
    run_id = tracker.run_id
    mlflow_server.kill()
    for step in range(5):
        tracker.log_metrics({"train/loss": 5.0 - step}, step=step)
        time.sleep(0.2)
    _wait_for(lambda: not tracker.reachable, timeout=10)  # the tracker's own retries found the store gone
    mlflow_server.start()  # same port, same database
    client = MlflowClient(mlflow_server.uri)
    _wait_for(lambda: len(history(client, run_id, "train/loss")) == 5, timeout=30)
    assert tracker.reachable and tracker.num_buffered_points == 0
    tracker.close()


def requests_for(log_text: str, file_name: str) -> list[str]:
    """The HTTP methods of the access-log lines (uvicorn's: `"PUT /path HTTP/1.1" 200`) whose path ends in `file_name`."""
    methods = []
    for line in log_text.splitlines():
        _, _, request = line.partition('"')
        method, _, rest = request.partition(" ")
        path = rest.split(" HTTP/", 1)[0].split("?", 1)[0]
        if path.endswith("/" + file_name):
            methods.append(method)
    return methods


@pytest.mark.slow
def test_registering_the_best_checkpoint_sends_its_weights_once(mlflow_server, tmp_path):
    """The driver's end of a job against a real server: the best checkpoint's weights go up once, as the logged model
    that is registered, are never downloaded again, and the server's artifact store holds them once."""
    config = make_config(tmp_path / "out", "once", "once-exp", tracking_uri=mlflow_server.uri)
    checkpoint = fake_checkpoint(tmp_path / "checkpoint_000004", config, step=4, val_loss=2.99)
    weights = (checkpoint / "model.safetensors").read_bytes()
    plan = RunPlan(name="once", storage_path=str(tmp_path / "out"), run_dir=str(tmp_path / "out" / "once"),
                   resume_from=None, continues_run=False)
    run_id = open_job_run(config, plan)
    logged_before = len(mlflow_server.log_path.read_text())
    info = finish_job_run(config, plan, run_id, best_checkpoint=str(checkpoint), latest_checkpoint=None)
    assert info is not None and info["model_uri"] == "models:/once-exp/1"

    assert requests_for(mlflow_server.log_path.read_text()[logged_before:], "model.safetensors") == ["PUT"]
    stored = [p for p in mlflow_server.artifacts.rglob("model.safetensors") if p.read_bytes() == weights]
    assert len(stored) == 1, stored
    local = resolve_checkpoint_uri(info["model_uri"], dst=tmp_path / "got", tracking_uri=mlflow_server.uri)
    assert (Path(local) / "model.safetensors").read_bytes() == weights
