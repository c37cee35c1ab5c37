"""Sweeps end to end: pipelines/tune.py on the session's real Ray local cluster, logging to a real `mlflow server` on
127.0.0.1, read back with MlflowClient. No mocks. Tiny debug-preset trials, workers at 0.5 CPU.

    NANOGPT_TINYSHAKESPEARE=... TIKTOKEN_CACHE_DIR=... .venv/bin/python -m pytest tests/test_tune.py
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import tune
from pipelines.sweep.report import FINISHED, STOPPED
from tests.conftest import PNG_MAGIC
from tests.faults import KillProcessAt, ctrl_c_when
from tests.pretrain_runs import char_shards, eval_records, metric_history, records, shared_root

pytest_plugins = ("tests.mlflow_server",)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = {"train": {"max_iters": 30, "eval_interval": 10, "eval_iters": 2}, "optim": {"lr_decay_iters": 30},
        "run": {"cpus_per_worker": 0.5}}


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory, shakespeare_path) -> Path:
    return char_shards(shared_root(tmp_path_factory), shakespeare_path)


def sweep_file(tmp_path: Path, search: dict, base: str = "debug", overrides: dict | None = None, **top) -> str:
    data = {"base": base, "overrides": overrides if overrides is not None else TINY, "search": search, **top}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def runs_of(client: MlflowClient, experiment: str) -> tuple[object, list]:
    """(the sweep's parent run, its child runs); fails unless there is exactly one parent and every other run of
    the experiment is its child."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = [r for r in runs if r is not parents[0]]
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in children)
    return parents[0], children


def settled(client: MlflowClient, experiment: str, done, timeout: float = 120) -> tuple[object, list]:
    """runs_of(experiment) once `done(run)` holds for every child run (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        parent, children = runs_of(client, experiment)
        if all(done(r) for r in children) or time.monotonic() > deadline:
            return parent, children
        time.sleep(0.5)


def common_args(shards: Path, out: Path, server, experiment: str) -> list[str]:
    return [f"--data.dir={shards}", f"--run.out_dir={out}", f"--tracking-uri={server.uri}",
            f"--run.experiment={experiment}"]


def test_asha_sweep_stops_trials_early_one_parent_four_children(ray_local, shards, mlflow_server, tmp_path, capsys):
    """2 batch sizes x 2 learning rates, tokens per step kept, one trial at a time, ASHA on tokens. Tune's grid
    varies the learning rate fastest, so each hopeless trial (1e-5) comes right after a good one (1e-2) and is
    behind it at the first rung (5,120 tokens = step 10): stopped there. Every trial trains 512 tokens per step, its
    gradient accumulation derived from its batch size (the arithmetic: tests/test_sweep_spec.py)."""
    # 200 steps: a stop reaches a trial a second or so after its report, 20 ms steps of this tiny model later
    overrides = {**TINY, "train": {**TINY["train"], "max_iters": 200}, "optim": {"lr_decay_iters": 200}}
    search = {"train.batch_size": {"values": [4, 16]}, "optim.learning_rate": {"values": [1e-2, 1e-5]}}
    sweep = sweep_file(tmp_path, search, algorithm="grid", batch={"keep": "tokens_per_step", "tokens_per_step": 512},
                       scheduler={"name": "asha", "time_attr": "tokens", "grace_period": 5120, "reduction_factor": 2},
                       min_lr_ratio=0.1, max_concurrent_trials=1, overrides=overrides)
    args = ["--sweep", sweep, "--name", "asha", *common_args(shards, tmp_path / "out", mlflow_server, "tune-asha"),
            "--run.registered_model=tune-asha-best"]
    helpers = helper_actors()
    assert tune.main(args) == 0
    # each one-worker trial trained in its own Tune actor (pipelines/sweep/trial_here.py): no Ray Train worker,
    # controller or report queue actor was started
    assert helper_actors() == helpers
    out = capsys.readouterr().out
    assert "stopped early" in out and "best: trial" in out
    assert "tokens_per_step" in out  # the table's column

    client = MlflowClient(mlflow_server.uri)
    # a stopped trial's tracking helper outlives the trial and may still be sending when the sweep returns: every
    # point it was handed arrives, the eval at the first rung (step 10) included
    parent, children = settled(client, "tune-asha", lambda r: r.data.metrics.get("tokens", 0) >= 5120)
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert all(r.data.metrics.get("tokens", 0) >= 5120 for r in children), [r.data.metrics for r in children]
    stopped = [r for r in children if r.data.tags.get("sweep.early_stopped") == "true"]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    hopeless = {r.info.run_id for r in children if float(r.data.params["optim.learning_rate"]) == 1e-5}
    assert len(hopeless) == 2 and hopeless <= {r.info.run_id for r in stopped}
    finished = [r for r in children if r not in stopped]
    assert all(r.info.status == "FINISHED" and r.data.tags["sweep.early_stopped"] == "false" for r in finished)
    # ASHA's stop reaches a running trial asynchronously: on a loaded machine one may finish its 200 steps first,
    # but stopping must have cut at least one trial short (MLflow holds every point a trial logged)
    assert any(r.data.metrics["tokens"] < 200 * 512 for r in stopped)
    assert all(float(r.data.params["optim.min_lr"]) == pytest.approx(1e-3)  # min_lr_ratio
               for r in children if float(r.data.params["optim.learning_rate"]) == 1e-2)
    assert_tokens_per_step_kept(parent, children, finished)

    # the parent: sweep file, results table, plot; the best trial registered
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep.yaml", "base_config.yaml", "results.csv", "best_command.txt", "plots"} <= artifacts
    csv = Path(client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path))).read_text()
    assert len(csv.splitlines()) == 5 and csv.count("stopped early") == len(stopped)
    png = Path(client.download_artifacts(parent.info.run_id, "plots/val_loss_vs_lr.png", str(tmp_path)))
    assert png.read_bytes()[:8] == PNG_MAGIC
    best = min(children, key=lambda r: r.data.metrics["best_val_loss"])
    assert parent.data.tags["best_trial"] in best.info.run_name
    version = client.get_model_version("tune-asha-best", "1")
    assert version.run_id == best.info.run_id
    assert f"--optim.learning_rate={float(best.data.params['optim.learning_rate'])!r}" in out
    assert "--run.registered_model=tune-asha-best-retrain" in out  # the command's model is not the sweep's
    assert_no_placement_group_left(ray_local)


def helper_actors() -> dict[str, int]:
    """How many Ray Train workers, Ray Train controller actors and Tune report queue actors (ray.util.queue) this
    Ray instance has started, alive or not (Ray's State API)."""
    from ray.util.state import list_actors

    return {name: len(list_actors(filters=[("class_name", "=", name)], limit=10_000))
            for name in ("RayTrainWorker", "TrainController", "_QueueActor")}


def assert_tokens_per_step_kept(parent, children: list, finished: list) -> None:
    """batch.keep=tokens_per_step as the trials ran it (their own MLflow params, tags and metrics): accumulation
    derived from each batch size, 512 tokens per step everywhere, the finished trials' tokens = 200 steps of 512."""
    assert parent.data.params["sweep.base"] == "debug" and parent.data.params["sweep.batch.keep"] == "tokens_per_step"
    geometry = {int(r.data.params["train.batch_size"]): int(r.data.params["train.gradient_accumulation_steps"])
                for r in children}
    assert geometry == {4: 4, 16: 1}, geometry
    assert {r.data.tags["tokens_per_step"] for r in children} == {"512"}
    assert finished and {r.data.metrics["tokens"] for r in finished} == {200 * 512}


def assert_no_placement_group_left(ray, timeout: float = 60) -> None:
    """Stopped trials' placement groups are removed (ray#54305); Ray's cleaner does it shortly after."""
    from ray.util import placement_group_table

    deadline = time.monotonic() + timeout
    while True:
        alive = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert alive == []


TRAINING_ACTORS = ("RayTrainWorker", "ImplicitFunc")  # Ray Train's workers; Tune's trials, where one-worker ones train


def wait_until_training_workers_exit(timeout: float = 60) -> None:
    """A killed driver's training processes (its trials' actors, and their Ray Train workers) outlive it by a
    moment (Ray ends the actors of an owner that died, then their processes): until they are gone they may still
    log a step. Ray's State API names them, /proc says when their processes have exited."""
    import psutil
    from ray.util.state import list_actors

    def alive() -> list[int]:
        pids = [a.pid for name in TRAINING_ACTORS
                for a in list_actors(filters=[("class_name", "=", name)], limit=10_000) if a.pid]
        running = []
        for pid in pids:
            try:
                if any(name in " ".join(psutil.Process(pid).cmdline()) for name in TRAINING_ACTORS):
                    running.append(pid)
            except psutil.Error:  # exited
                pass
        return running

    deadline = time.monotonic() + timeout
    while (running := alive()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert running == [], f"training workers still running {timeout:.0f} s after their driver was killed: {running}"


def test_a_one_worker_trial_killed_midrun_is_restarted_by_tune_and_continues_from_its_checkpoint(
        ray_local, shards, mlflow_server, tmp_path):
    """A one-worker trial trains in its Tune actor; that process is SIGKILLed after update 12 (its checkpoint is
    step 10's). Tune restarts the trial (run.max_failures=1 is Tune's FailureConfig here), which continues from
    checkpoint_000010 on the same batches: updates 10..12 are made again with the same losses, the trial finishes,
    and it is still one MLflow run, holding every step."""
    from pipelines.sweep.plan import plan_sweep
    from pipelines.sweep.run import run_sweep

    sweep = sweep_file(tmp_path, {"optim.learning_rate": {"values": [1e-2]}}, algorithm="grid")
    marker = tmp_path / "killed"
    planned = plan_sweep(sweep, [], [f"--data.dir={shards}", f"--run.out_dir={tmp_path / 'out'}",
                                     f"--run.tracking_uri={mlflow_server.uri}", "--run.experiment=tune-restart",
                                     "--run.max_failures=1"], "restart")
    outcome = run_sweep(planned, on_step=[KillProcessAt(12, str(marker))])
    assert marker.exists()  # the kill happened
    [row] = outcome.rows
    assert row.status == FINISHED and row.step == 30
    lines = [r for r in records(row.run_dir) if "loss" in r]
    assert sorted({r["step"] for r in lines}) == list(range(30))
    redone = {}
    for r in lines:
        redone.setdefault(r["step"], []).append(r["loss"])
    assert sorted(s for s, losses in redone.items() if len(losses) == 2) == [10, 11, 12]
    assert all(losses[0] == losses[-1] for losses in redone.values())  # bit-exact on CPU: the same batches
    client = MlflowClient(mlflow_server.uri)
    parent, [child] = settled(client, "tune-restart", lambda r: r.info.status == "FINISHED")
    assert child.info.status == "FINISHED" and parent.info.status == "FINISHED"
    history = metric_history(client, child.info.run_id, "loss")
    assert sorted(history) == list(range(30)) and history[10] == redone[10]


@pytest.fixture(scope="module")
def bpe_shards(ray_local, tmp_path_factory, shakespeare_path, tiktoken_cache) -> Path:
    from nanogpt.config import DataConfig
    from pipelines.prepare import prepare

    out = shared_root(tmp_path_factory) / "shakespeare_bpe"
    if not (out / "manifest.json").exists():
        prepare(DataConfig(input=str(shakespeare_path), tokenizer="gpt2", val_fraction=0.1), out)
    return out


def test_finetune_sweep_from_a_local_hf_gpt2_dir(bpe_shards, tmp_path, capsys):
    """finetune_gpt2_lr (nanoGPT's finetune_shakespeare over LRs) from a tiny random GPT-2 that transformers saves:
    every trial starts from its weights and keeps its learning rate constant. Read from each trial's own records
    (params.json, metrics.jsonl): MLflow is off, it is not the subject here."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf_tiny")
    args = ["--sweep", "finetune_gpt2_lr", "--name", "ft", "--sweep.search.optim.learning_rate={values: [3e-5, 3e-4]}",
            f"--model.init_from={tmp_path / 'hf_tiny'}", "--model.block_size=32", "--run.use_gpu=false", "--train.device=cpu",
            "--train.dtype=float32", "--train.batch_size=2", "--train.gradient_accumulation_steps=2",
            "--train.max_iters=6", "--train.eval_interval=3", "--train.eval_iters=2", "--run.cpus_per_worker=0.5",
            f"--data.dir={bpe_shards}", f"--run.out_dir={tmp_path / 'out'}", "--run.tracker=none"]
    assert tune.main(args) == 0
    trials = sorted(p.parent for p in (tmp_path / "out" / "ft" / "trials").glob("trial-*/outcome.json"))
    outcomes = [json.loads((t / "outcome.json").read_text()) for t in trials]
    assert len(trials) == 2 and all(o["status"] == FINISHED for o in outcomes), outcomes
    learning_rates = []
    for run_dir in trials:  # the trial's own records, written by its rank 0
        params = json.loads((run_dir / "params.json").read_text())
        assert params["model.init_from"] == str(tmp_path / "hf_tiny")
        learning_rates.append(float(params["optim.learning_rate"]))
        values = [r["lr"] for r in records(run_dir) if "lr" in r]
        assert len(values) == 6 and all(v == pytest.approx(learning_rates[-1]) for v in values)
    assert sorted(learning_rates) == [3e-5, 3e-4]  # each trial its own
    assert "python pipelines/pretrain.py --config finetune_shakespeare " in capsys.readouterr().out  # the base


UNFINISHED = ("PENDING", "RUNNING")  # trial states that Tuner.restore(resume_unfinished=True) runs again


def experiment_trials(sweep_dir: Path) -> dict[str, str]:
    """{trial id: status} from Tune's saved experiment state (what a restore will see)."""
    states = sorted(glob.glob(str(sweep_dir / "experiment_state-*.json")))
    if not states:
        return {}
    try:
        data = json.loads(Path(states[-1]).read_text())
    except ValueError:  # being written
        return {}
    trials = [json.loads(t[0]) for t in data["trial_data"]]
    return {t["trial_id"]: t["status"] for t in trials}


def test_sweep_killed_right_after_a_trial_ends_resumes_without_training_it_again(ray_local, shards, mlflow_server,
                                                                                  tmp_path, capsys):
    """The driver (a `python pipelines/tune.py` process on the same cluster, Tune's DEFAULT state-saving period) is
    SIGKILLed at once after a trial ends, twice: after the good LR's trial finished, then (resumed) after ASHA
    stopped the hopeless LR's trial. Each time Tune's saved state still says RUNNING, so a resume runs that trial
    again. Neither trains again (their metrics.jsonl stay as they were), and the last resume reports and registers
    the true best trial. A copy of the finished sweep, resumed, is itself (not the sweep it was copied from)."""
    sweep = sweep_file(tmp_path, {"optim.learning_rate": {"values": [1e-2, 1e-5]}}, algorithm="grid",
                       scheduler={"name": "asha", "time_attr": "tokens", "grace_period": 5120, "reduction_factor": 2},
                       min_lr_ratio=0.1, max_concurrent_trials=1, overrides={
                           "train": {"max_iters": 40, "eval_interval": 10, "eval_iters": 2, "log_interval": 1},
                           "optim": {"lr_decay_iters": 40}, "run": {"cpus_per_worker": 0.5}})
    out, client = tmp_path / "out", MlflowClient(mlflow_server.uri)
    sweep_dir = out / "resume"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    env.pop("TUNE_GLOBAL_CHECKPOINT_S", None)  # Tune's own period: its saved state lags a trial's end
    first = ["--sweep", sweep, "--name", "resume", *common_args(shards, out, mlflow_server, "tune-resume")]

    good = kill_driver_when(first, env, tmp_path / "driver1.log", ended(client, sweep_dir, 1e-2, FINISHED))
    # the hard case: Tune's saved state has not seen it end (PENDING when the trial ended within Tune's first
    # saving period), so a restore runs it again
    assert experiment_trials(sweep_dir)[good] in UNFINISHED
    assert_no_placement_group_left(ray_local)  # the killed driver's trials are gone: no more writes
    wait_until_training_workers_exit()
    good_log = (sweep_dir / "trials" / f"trial-{good}" / "metrics.jsonl").read_text()
    bad = kill_driver_when(["--resume", str(sweep_dir)], env, tmp_path / "driver2.log",
                           ended(client, sweep_dir, 1e-5, STOPPED))
    # or not in it at all (it started and was stopped within Tune's saving period): the restore creates it
    # again, under the same id, from the searcher's saved state
    assert experiment_trials(sweep_dir).get(bad) in (*UNFINISHED, None)
    assert_no_placement_group_left(ray_local)
    wait_until_training_workers_exit()  # a stopped trial's workers log on until they are gone (the record says where it ended)
    logs = {t: (sweep_dir / "trials" / f"trial-{t}" / "metrics.jsonl").read_text() for t in (good, bad)}
    assert logs[good] == good_log  # the resume did not train the finished trial again

    assert tune.main(["--resume", str(sweep_dir)]) == 0
    printed = capsys.readouterr().out
    for trial, log in logs.items():  # nothing trained again: no step past where it ended, none twice
        run_dir = sweep_dir / "trials" / f"trial-{trial}"
        assert (run_dir / "metrics.jsonl").read_text() == log
        steps = [r["step"] for r in records(run_dir) if "loss" in r]
        assert len(steps) == len(set(steps)) and max(steps) < 40
    assert [r["step"] for r in records(sweep_dir / "trials" / f"trial-{good}") if "loss" in r] == list(range(40))
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith((good, bad))}
    assert rows[good].endswith(FINISHED) and rows[bad].endswith(STOPPED)
    # the true best, from every trial's eval records: the good LR's lowest val loss
    true_best = {t: min(r["val_loss"] for r in eval_records(sweep_dir / "trials" / f"trial-{t}").values())
                 for t in (good, bad)}
    assert min(true_best, key=true_best.get) == good
    assert f"best: trial {good}, val loss {true_best[good]:.4f} (finished)" in printed
    parent, children = runs_of(client, "tune-resume")
    assert len(children) == 2 and parent.info.status == "FINISHED"
    by_trial = {t: next(r for r in children if t in r.info.run_name) for t in (good, bad)}
    assert by_trial[good].info.status == "FINISHED" and by_trial[bad].info.status == "KILLED"
    assert client.get_model_version("tune-resume", "1").run_id == by_trial[good].info.run_id
    command = printed.split("train it")[1]
    assert "--optim.learning_rate=0.01 " in command and "--run.registered_model=tune-resume-retrain" in command
    assert "--run.cpus_per_worker" not in command  # the preset's, as a job of its own

    # --resume DIR acts on DIR: a copy of the sweep resumes (and reports) as itself
    results = sweep_dir / "results.csv"
    written = (results.read_text(), results.stat().st_mtime_ns)
    copy = shutil.copytree(sweep_dir, out / "copy")
    assert tune.main(["--resume", str(copy)]) == 0
    printed = capsys.readouterr().out
    summary = [line for line in printed.splitlines() if line.startswith(("sweep ", "best: "))]
    assert any(f"sweep copy: 2 trials in {copy}" in line for line in summary), summary
    assert f"checkpoint {copy}/trials/trial-{good}/" in printed, summary
    assert (copy / "results.csv").read_text() == written[0]
    assert (results.read_text(), results.stat().st_mtime_ns) == written  # the original was left alone


def ended(client: MlflowClient, sweep_dir: Path, lr: float, status: str):
    """A poll for the id of the trial with learning rate `lr` once it has ended with `status` (finished | stopped
    early): by its record (checked at every call: the kill must come at once), else by its MLflow run (FINISHED, or
    tagged sweep.early_stopped=true by the driver's callback; asked once a second)."""
    asked = [0.0]

    def poll() -> str | None:
        for outcome in sweep_dir.glob("trials/trial-*/outcome.json"):  # written whole
            record = json.loads(outcome.read_text())
            if record["params"]["optim.learning_rate"] == lr and record["status"] == status:
                return record["trial_id"]
        if time.monotonic() - asked[0] < 1:
            return None
        asked[0] = time.monotonic()
        experiment = client.get_experiment_by_name("tune-resume")
        for run in client.search_runs([experiment.experiment_id]) if experiment else []:
            if float(run.data.params.get("optim.learning_rate", 0)) == lr and (
                    status == FINISHED and run.info.status == "FINISHED"
                    or status == STOPPED and run.data.tags.get("sweep.early_stopped") == "true"):
                return run.info.run_name.removeprefix("trial-")
        return None

    return poll


def kill_driver_when(args: list[str], env: dict, log_path: Path, found, timeout: float = 600) -> str:
    """Run `python pipelines/tune.py *args` and SIGKILL it (its whole process group) as soon as found() returns
    something; returns that."""
    with log_path.open("w") as log:
        driver = subprocess.Popen([sys.executable, "pipelines/tune.py", *args], cwd=REPO, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = found()
            if value is not None:
                return value
            if driver.poll() is not None:
                pytest.fail(f"the sweep driver exited ({driver.returncode}) before it could be killed:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"nothing to kill the driver at within {timeout} s:\n{log_path.read_text()[-3000:]}")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)


def test_ctrl_c_stops_the_sweep_for_resume_and_ends_its_mlflow_runs_killed(ray_local, shards, mlflow_server, tmp_path):
    """Ctrl-C in the driver's terminal (SIGINT to its process group) once a trial has a checkpoint: Tune saves its
    state, the command exits 130 saying how to resume, and no MLflow run of the sweep is left RUNNING (Tune's own
    handler made fit() return as if the sweep had ended: parent FINISHED, the trial "stopped early", exit 1).
    The trials here are two workers each: the sweeps' TorchTrainer path, from the trial's actor through Ray Train's
    workers to Tune (the other tests' one-worker trials train in their actors)."""
    sweep = sweep_file(tmp_path, {"optim.learning_rate": {"values": [1e-3, 2e-3]}}, algorithm="grid",
                       max_concurrent_trials=1, overrides={
                           "train": {"max_iters": 2000, "eval_interval": 20, "eval_iters": 2, "log_interval": 5},
                           "optim": {"lr_decay_iters": 2000}, "run": {"cpus_per_worker": 0.5, "num_workers": 2}})
    workers = helper_actors()["RayTrainWorker"]
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "pipelines/tune.py", "--sweep", sweep, "--name", "ctrl-c",
                               *common_args(shards, out, mlflow_server, "tune-ctrl-c")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    def checkpointed() -> bool:
        return bool(glob.glob(str(out / "ctrl-c" / "trials" / "*" / "checkpoint_000020" / "state.json")))

    stderr = ctrl_c_when(driver, checkpointed, 600, "a trial's checkpoint_000020")
    assert driver.returncode == 130, stderr[-4000:]
    assert f"continue the sweep with python pipelines/tune.py --resume {out / 'ctrl-c'}" in stderr
    parent, children = runs_of(MlflowClient(mlflow_server.uri), "tune-ctrl-c")
    assert parent.info.status == "KILLED" and children
    assert all(r.info.status == "KILLED" for r in children), [r.info.status for r in children]
    assert helper_actors()["RayTrainWorker"] >= workers + 2  # the trial's, through its TorchTrainer
    from ray import tune as ray_tune

    assert ray_tune.Tuner.can_restore(str(out / "ctrl-c"))
