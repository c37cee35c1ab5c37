"""MLflow in the main job, end to end: pipelines/pretrain.py on a real Ray local cluster logging to a real
`mlflow server` on 127.0.0.1 (or the default local sqlite store), read back with MlflowClient. No mocks. (A run
whose worker Ray restarts is one MLflow run: tests/test_pretrain.py, on its fault scenario's run.)

    NANOGPT_TINYSHAKESPEARE=... .venv/bin/python -m pytest tests/test_pretrain_mlflow.py     # ~2 min on 2 cores
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.pretrain import pretrain
from tests.faults import ctrl_c_when
from tests.local_cluster import unless_ended
from tests.mlflow_server import MlflowServer
from tests.pretrain_runs import char_shards, debug_config, metric_history, records, shared_root, the_only_run

pytest_plugins = ("tests.mlflow_server",)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory, shakespeare_path) -> Path:
    return char_shards(shared_root(tmp_path_factory), shakespeare_path)


def tracked_config(shards: Path, out: Path, name: str, experiment: str, *overrides: str):
    return debug_config(shards, out, name, "--run.tracker=mlflow", f"--run.experiment={experiment}", *overrides)


def test_local_store_with_no_server_and_resume_appends(shards, tmp_path, monkeypatch):
    """No tracking URI anywhere: the run goes to <out_dir>/mlflow.db. Resuming it (init_from=resume) continues the
    same MLflow run, whose id travels in the checkpoint."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs"
    short = ["--run.num_workers=1", "--train.eval_interval=5", "--optim.lr_decay_iters=10"]
    first = pretrain(tracked_config(shards, out, "local", "e2e-local", *short, "--train.max_iters=5"))
    db = out / "mlflow.db"
    assert db.is_file() and first.tracking["tracking_uri"] == f"sqlite:///{db}"
    second = pretrain(tracked_config(shards, out, "local", "e2e-local", *short, "--train.max_iters=10",
                                     "--model.init_from=resume"))
    assert second.tracking["run_id"] == first.tracking["run_id"]

    client = MlflowClient(f"sqlite:///{db}")
    run = the_only_run(client, "e2e-local")
    assert sorted(metric_history(client, run.info.run_id, "loss")) == list(range(10))
    assert {5, 10} <= set(metric_history(client, run.info.run_id, "val_loss"))
    # each job registered its best checkpoint as a new version of the experiment's model
    assert first.tracking["model_uri"] == "models:/e2e-local/1" and second.tracking["model_uri"] == "models:/e2e-local/2"


def test_mlflow_server_dying_midrun_does_not_stop_training(shards, tmp_path):
    """The tracking server is killed while the job runs: training finishes with its checkpoints regardless."""
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    run_dir = tmp_path / "runs" / "doomed"
    killed_at: list[int] = []

    def kill_when_training_is_under_way() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            path = run_dir / "metrics.jsonl"
            steps = [r["step"] for r in records(run_dir) if "loss" in r] if path.exists() else []
            if steps and max(steps) >= 5:
                server.kill()
                killed_at.append(max(steps))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_training_is_under_way, daemon=True)
    watcher.start()
    try:
        outcome = pretrain(tracked_config(shards, tmp_path / "runs", "doomed", "e2e-doomed", "--run.num_workers=1",
                                          "--train.max_iters=20", "--optim.lr_decay_iters=20",
                                          f"--run.tracking_uri={server.uri}"))
    finally:
        watcher.join(timeout=5)
        server.kill()
    assert killed_at and killed_at[0] < 20  # the server died mid-run
    assert outcome.summary["step"] == 20 and outcome.best_checkpoint is not None
    assert (Path(outcome.latest_checkpoint) / "model.safetensors").is_file()
    assert sorted(r["step"] for r in records(run_dir) if "loss" in r) == list(range(20))
    assert outcome.tracking is None or "model_uri" not in outcome.tracking  # nothing registered with no server


OPEN_WHILE_RAY_STARTS = """
import sys
from nanogpt.config import load_config
from pipelines.mlflow_adapter.store import resolve_tracking_uri
from pipelines.pretrain import PRESET_DIR, _JobRunOpener
from pipelines.ray_adapter.session import init_ray
from pipelines.ray_adapter.runs import plan_run
config = load_config("debug", [f"--data.dir={sys.argv[1]}", f"--run.out_dir={sys.argv[2]}"], search_dirs=[PRESET_DIR])
plan = plan_run(config, "debug")
config = config.replace(run__tracking_uri=resolve_tracking_uri(config))
with _JobRunOpener(config, plan, early=True) as opener:
    init_ray(num_cpus=1)
    print("run", opener.run_id())
"""


def test_the_run_opens_in_a_fresh_process_while_ray_starts(shards, tmp_path):
    """The driver's first mlflow import runs on two threads at once (the opener's and its tracker's): once, mlflow's
    circular imports failed there in 2 of 5 fresh processes ("partially initialized module 'mlflow.entities'").
    Three fresh processes, started together (the race is inside each; each starts its own Ray)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    attempts = []
    try:
        for attempt in range(3):
            out, log = tmp_path / f"runs{attempt}", tmp_path / f"attempt{attempt}"
            with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
                attempts.append((out, log, subprocess.Popen(
                    [sys.executable, "-c", OPEN_WHILE_RAY_STARTS, str(shards), str(out)], env=env, stdout=stdout,
                    stderr=stderr)))
        for out, log, process in attempts:
            process.wait(timeout=300)
            stderr = Path(f"{log}.err").read_text()
            assert process.returncode == 0 and "partially initialized" not in stderr, stderr[-3000:]
            run_id = Path(f"{log}.out").read_text().split("run ", 1)[1].strip()
            client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
            assert [i.dataset.name for i in client.get_run(run_id).inputs.dataset_inputs] == [shards.name]
    finally:
        for _, _, process in attempts:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_ctrl_c_ends_the_job_killed_and_keeps_its_checkpoints(shards, tmp_path):
    """Ctrl-C in a terminal (SIGINT to the command's whole process group, Ray's daemons with it): exit 130, the
    MLflow run ends KILLED (not left RUNNING in the UI), the committed checkpoints stay resumable. While it trained,
    the job's own Ray instance ran none of the dashboard's modules, Ray Train's placement-group cleaner, its
    DatasetManager, the autoscaling coordinator or a controller actor (the controller runs in the driver)."""
    import os
    import subprocess
    import sys

    import psutil

    from nanogpt.checkpoint.format import load_checkpoint

    out, repo = tmp_path / "runs", Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen([sys.executable, str(repo / "pipelines" / "pretrain.py"), "--config", "debug",
                            f"--data.dir={shards}", f"--run.out_dir={out}", "--run.name=r1", "--run.num_workers=1",
                            "--run.experiment=ctrl-c", "--train.max_iters=100000", "--train.eval_interval=5",
                            "--num-cpus", "1"], env=env, start_new_session=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    checkpoint = out / "r1" / "checkpoint_000005"
    processes: list[str] = []

    def trained_5_steps() -> bool:
        if (checkpoint / "state.json").exists():
            processes.extend(" ".join(unless_ended(p.cmdline, []))
                             for p in psutil.Process(job.pid).children(recursive=True))
            return True
        return False

    stderr = ctrl_c_when(job, trained_5_steps, 300, "checkpoint_000005")
    assert any("ray::RayTrainWorker" in p for p in processes), processes
    left_out = ("ray-dashboard-", "PlacementGroupCleaner", "DatasetManager", "AutoscalingCoordinator", "TrainController",
                "SynchronizationActor")
    assert [p for p in processes if any(name in p for name in left_out)] == []
    assert job.returncode == 130, stderr[-4000:]
    assert "interrupted: the run's checkpoints are kept; continue it with the same command and --model.init_from=resume --run.name=r1" in stderr
    run = the_only_run(MlflowClient(env["MLFLOW_TRACKING_URI"]), "ctrl-c")
    assert run.info.status == "KILLED"
    assert load_checkpoint(checkpoint).step == 5
