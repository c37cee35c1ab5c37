"""Cluster rehearsals on one machine: real multi-node Ray clusters (separate raylets on this host), token auth on.

1. A node is lost mid-run: a head and two worker nodes (ray.cluster_utils.Cluster, in the driver process
   tests/node_loss_driver.py), a 2-worker pretrain with one rank per node and its run in object storage (moto's S3
   server, tests/s3_server.py); rank 0's node is killed past a checkpoint, and a new node joins. Ray Train restarts
   the group there, from the checkpoint; the run's metrics.jsonl in the bucket holds every step exactly once, and
   every per-step loss equals the uninterrupted reference run's (tests/pretrain_runs.py, on the session's
   `ray_local`). Rank 0's node, not rank 1's: rank 0 alone keeps the run's records.
2. An elastic job (tests/elastic_driver.py): a head and three worker nodes; an elastic 2-3 worker pretrain loses
   rank 0's node, goes on with 2 workers without waiting for a replacement, and grows back to 3 when a node joins.
   Every step trains on the same 4 micro-batches (2+1+1 on 3 workers, 2+2 on 2); the per-step losses equal a fixed
   3-worker run's within float32 reduction order, every update is logged once, with its world size.
3. Ray's fake autoscaler (cluster/local-fake.yaml): a head with no CPUs gets worker nodes when a pretrain job asks
   for CPUs, and loses them again once they are idle.

Each starts and stops its own cluster (never `ray stop`): a short temp dir of its own, its own token and ports; the
driver runs in a subprocess, since this process already holds the session's Ray connection. See tests/local_cluster.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nanogpt.data import storage
from pipelines.pretrain import pretrain
from tests.local_cluster import (
    cluster_env,
    dashboard_get,
    free_port,
    leftovers,
    short_dir,
    stop_group,
    wait_for_dashboard,
)
from tests.pretrain_runs import char_shards, debug_config, debug_run, shared_root, step_losses

pytestmark = pytest.mark.slow
pytest_plugins = ("tests.s3_server", "tests.mlflow_server")

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6
"""Elastic vs fixed per-step losses, relative: float32 summation order only (measured up to 9e-8: bench/NOTES.md)."""


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def shards(ray_local, root, shakespeare_path) -> Path:
    return char_shards(root, shakespeare_path)


def test_rank0_node_lost_midrun_resumes_on_a_new_node_bit_exactly_with_every_step_logged_once(
        ray_local, root, shards, s3):
    work = short_dir("nl")
    env = cluster_env(work)  # with the S3 server's endpoint and credentials (the s3 fixture set them)
    log = Path(work) / "driver.log"  # a file, not a pipe: nobody reads the driver's output until it ends
    proc = None
    try:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "node_loss_driver.py"), str(shards), s3.bucket_uri("runs"),
                 "nodeloss", work],
                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        # meanwhile (the rehearsal's cluster starts, then waits on Ray's default failure timings): the same config,
        # uninterrupted, on the session's local Ray
        reference = debug_run(root, shards)
        try:
            proc.wait(timeout=540)
        except subprocess.TimeoutExpired:
            stop_group(proc, work)
            pytest.fail(f"the rehearsal did not finish in 540 s:\n{log.read_text()[-6000:]}")
        output = log.read_text()
        assert proc.returncode == 0, output[-6000:]
        report = json.loads(output.strip().splitlines()[-1])
        assert leftovers(work) == [], "Cluster.shutdown() left processes of the rehearsal's cluster"
    finally:
        if proc is not None and proc.poll() is None:
            stop_group(proc, work)
        shutil.rmtree(work, ignore_errors=True)

    first, second = report["worker_nodes"]
    held, after = report["held"], report["after"]
    # one rank per worker node; rank 0's node died; the restarted group ran on the survivor and the new node
    assert {held["0"], held["1"]} == {first, second}
    assert report["removed"] == held["0"] and report["added"] not in (first, second)
    assert {after["0"], after["1"]} == {held["1"], report["added"]}
    assert report["step"] == 30 and report["world_size"] == 2
    assert report["start_step"] == 10  # resumed from checkpoint_000010, not from scratch
    # the run's records in the bucket: every update and every eval exactly once, the losses bit-equal
    history = _stored_records(report["run_dir"])
    assert [r["step"] for r in history if "loss" in r] == list(range(30))
    assert [r["step"] for r in history if "val_loss" in r] == [0, 10, 20, 30]
    assert {r["step"]: r["loss"] for r in history if "loss" in r} == step_losses(reference.plan.run_dir)
    assert report["best_val_loss"] == reference.best_val_loss


def _run_driver(script: str, args: list[str], work: str, env: dict[str, str], while_it_runs) -> tuple[dict, object]:
    """Run a rehearsal driver (tests/<script>) in its own process group; meanwhile call `while_it_runs()` here.
    Returns the driver's JSON report, with its whole output under "output", and what `while_it_runs` returned."""
    log = Path(work) / "driver.log"  # a file, not a pipe: nobody reads the driver's output until it ends
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / script), *args], env=env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        meanwhile = while_it_runs()
        try:
            proc.wait(timeout=540)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the rehearsal did not finish in 540 s:\n{log.read_text()[-6000:]}")
        output = log.read_text()
        assert proc.returncode == 0, output[-6000:]
        assert leftovers(work) == [], "Cluster.shutdown() left processes of the rehearsal's cluster"
        return {**json.loads(output.strip().splitlines()[-1]), "output": output}, meanwhile
    finally:
        if proc.poll() is None:
            stop_group(proc, work)


def test_an_elastic_job_shrinks_when_rank0s_node_is_lost_and_grows_back_when_a_node_joins(
        ray_local, root, shards, s3, mlflow_server):
    from tests.elastic_driver import ELASTIC_ARGS

    work = short_dir("el")
    env = cluster_env(work)  # with the S3 server's endpoint and credentials (the s3 fixture set them)
    out_dir = s3.bucket_uri("runs")
    try:
        # meanwhile, on the session's local Ray: the same config on a fixed group of 3, uninterrupted
        report, fixed = _run_driver(
            "elastic_driver.py", [str(shards), out_dir, "elastic", work, mlflow_server.uri], work, env,
            lambda: pretrain(debug_config(shards, root / "runs", "fixed3", *ELASTIC_ARGS, "--run.min_workers=null",
                                          "--run.max_failures=0")))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    three, two = report["three"], report["two"]
    assert len(set(three.values())) == 3 and report["removed"] == three["0"]  # one rank per node; rank 0's died
    assert set(two.values()) == set(three.values()) - {three["0"]}  # the 2 survivors, before any node was added
    assert report["added"] not in three.values()
    assert (report["step"], report["start_step"], report["world_size"]) == (30, 20, 3)  # grew back, from 20
    output = report["output"]
    assert f"run elastic -> {out_dir}/elastic (2 to 3 workers, elastic)" in output
    assert "resized 3 -> 2 workers at step 10 (fewer workers than before: a node was lost); 1,024 tokens per step " \
           "unchanged" in output
    assert "resized 2 -> 3 workers at step 20 (more workers available); 1,024 tokens per step unchanged" in output

    history = _stored_records(report["run_dir"])
    updates = [r for r in history if "loss" in r]
    assert [r["step"] for r in updates] == list(range(30))  # every update once: none twice, none skipped
    assert [r["world_size"] for r in updates] == [3] * 10 + [2] * 10 + [3] * 10
    assert {r["step"]: r["tokens"] for r in history if "val_loss" in r} == {s: s * 1024 for s in range(0, 31, 5)}
    reference = step_losses(fixed.plan.run_dir)
    print(_loss_table(updates, reference))
    print(f"shrunk to 2 workers {report['shrink_s']:.1f} s after the node was lost; grew to 3 "
          f"{report['grow_s']:.1f} s after a node joined")
    # before the first resize the two runs are the same computation: equal to the bit
    assert [r["loss"] for r in updates[:10]] == [reference[s] for s in range(10)]
    # then float32 only: 2 ranks (2+2 micro-batches) sum the same gradients in another order than 3 (2+1+1), the
    # weights differ in the last bits, and Adam carries that forward; the data and the scale of every step are equal
    assert [r["loss"] for r in updates] == pytest.approx([reference[s] for s in range(30)], rel=TOLERANCE)
    assert report["best_val_loss"] == pytest.approx(fixed.best_val_loss, rel=TOLERANCE)

    from mlflow import MlflowClient

    client = MlflowClient(report["tracking"]["tracking_uri"])
    run = client.get_run(report["tracking"]["run_id"])
    assert run.data.tags["resizes"] == "2"
    sizes = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "world_size")}
    assert [sizes[s] for s in range(30)] == [3] * 10 + [2] * 10 + [3] * 10


def _loss_table(updates: list[dict], reference: dict[int, float]) -> str:
    rows = [f"{r['step']:>4} {r['world_size']:>7} {r['loss']:.7f} {reference[r['step']]:.7f} "
            f"{abs(r['loss'] - reference[r['step']]) / reference[r['step']]:.1e}" for r in updates]
    return "\n".join(["step workers elastic   fixed-3   rel.diff", *rows])


def _stored_records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).splitlines()]


def _fake_cluster_config(gcs_address: str) -> dict:
    """cluster/local-fake.yaml as shipped, pointed at this test's head and with a 6 s idle timeout."""
    config = yaml.safe_load((REPO / "cluster" / "local-fake.yaml").read_text())
    config["provider"]["gcs_address"] = gcs_address
    config["idle_timeout_minutes"] = 0.1
    return config


def _nodes(dashboard: str, token: str, attempts: int = 5) -> list[dict]:
    """The cluster's nodes, from the dashboard's State API. A loaded head's dashboard now and then drops a request
    without an answer: asked again, a second later, a few times."""
    for attempt in range(attempts):
        try:
            status, body = dashboard_get(f"{dashboard}/api/v0/nodes?limit=100&detail=true", token)
            break
        except OSError:  # http.client.RemoteDisconnected, a reset: no answer at all
            if attempt == attempts - 1:
                raise
            time.sleep(1)
    assert status == 200, status
    return body["data"]["result"]["result"]


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} in {timeout_s} s"
        time.sleep(1)


def test_fake_autoscaler_adds_nodes_for_a_job_and_removes_them_when_idle(ray_local, shards, tmp_path):
    from ray._private.services import get_node_ip_address

    work = short_dir("fa")
    port, dashboard_port = free_port(), free_port()
    config_path = Path(work) / "fake.yaml"
    config_path.write_text(yaml.safe_dump(_fake_cluster_config(f"{get_node_ip_address()}:{port}")))
    # the monitor looks at the cluster every second instead of every 5 (Ray's own knob for its tests)
    env = cluster_env(work, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    token = env["RAY_AUTH_TOKEN"]
    ports = {flag: free_port() for flag in (
        "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port")}
    log = Path(work) / "head.log"
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    with log.open("w") as out:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=0", "--disable-usage-stats",
             f"--temp-dir={work}", f"--autoscaling-config={config_path}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
             *(f"{flag}={p}" for flag, p in ports.items())],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_dashboard(dashboard, head, log)
        assert dashboard_get(f"{dashboard}/api/v0/nodes", None)[0] == 401  # token auth is on
        _wait_until(lambda: [n["is_head_node"] for n in _nodes(dashboard, token) if n["state"] == "ALIVE"] == [True],
                    60, "the head did not register alone")

        # 2 workers of 1 CPU each, and the head has none: nothing can run until the autoscaler adds a node
        started = time.monotonic()
        job = subprocess.run(
            [sys.executable, "pipelines/pretrain.py", "--address", f"{get_node_ip_address()}:{port}",
             "--config", "debug", "--train.max_iters=6", "--train.eval_interval=3", "--optim.lr_decay_iters=6",
             "--run.num_workers=2", "--run.tracker=none", f"--data.dir={shards}",
             f"--run.out_dir={tmp_path / 'runs'}", "--run.name=autoscaled"],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=420)
        job_s = time.monotonic() - started
        assert job.returncode == 0, (job.stdout + job.stderr)[-6000:]
        assert "training waits until an autoscaler adds nodes" in job.stderr
        assert f"best checkpoint: {tmp_path / 'runs' / 'autoscaled' / 'checkpoint_000006'}" in job.stdout
        workers = [n for n in _nodes(dashboard, token) if not n["is_head_node"]]
        assert workers, "the autoscaler added no node"
        assert all(n["resources_total"].get("CPU") == 2 for n in workers)  # cpu_worker nodes of local-fake.yaml

        # idle for 6 s: the autoscaler removes every worker node again
        _wait_until(lambda: not [n for n in _nodes(dashboard, token) if n["state"] == "ALIVE" and not n["is_head_node"]],
                    90, "idle worker nodes were not removed")
        removed = [n for n in _nodes(dashboard, token) if not n["is_head_node"]]
        assert removed and all(n["state"] == "DEAD" for n in removed)
        print(f"job {job_s:.0f} s on {len(workers)} added node(s), removed after {time.monotonic() - started:.0f} s")
    finally:
        stop_group(head, work)  # SIGTERM: `ray start --block` stops the head and the nodes its autoscaler added
        shutil.rmtree(work, ignore_errors=True)
