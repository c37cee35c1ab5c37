"""The driver of the node-loss rehearsal (tests/test_cluster_rehearsal.py), in a process of its own: a process holds
one Ray connection, and the test session's is `ray_local`.

    python tests/node_loss_driver.py <shards dir> <out dir or URI> <run name> <work dir>

It starts a Ray cluster on this machine with ray.cluster_utils.Cluster: a head with no CPUs (the driver and Ray
Train's controller live there) and two worker nodes of one CPU each, separate raylets. The 2-worker debug pretrain
(run.max_failures=1) therefore puts one rank on each worker node. Once both ranks are held after update HOLD_STEP,
past the checkpoint at update 10, it kills the node of rank 0 (SIGKILL of its raylet, object store and agents: the
workers on it die with them, rank 0's records in its local files too), adds a fresh node (what an autoscaler does
after losing a spot instance), and lets the survivor go on. Ray Train restarts the group on the survivor and the
new node, from the last checkpoint. With an s3:// out dir the nodes reach the store through AWS_ENDPOINT_URL and
the credentials in the environment, as a cluster's nodes do.

Prints one JSON line (the last line of stdout): where the ranks were, which node died, where they ran after the
restart, the step the restarted group started from, and the run directory. The cluster is stopped by Cluster.shutdown(), which stops only the nodes it started;
set RAY_TMPDIR (and so where Ray writes its address file) to a directory of your own.
"""
# ruff: noqa: E402 -- the sys.path line below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import json
import logging
import threading
import time

from nanogpt.data import storage

HOLD_STEP = 15  # the debug run reports a checkpoint every 10 updates: the restart must resume from update 10
AFTER_STEP = 20  # an update the restarted group makes: where its ranks run
WORKER_NODE = {"num_cpus": 1, "resources": {"worker_node": 1}, "object_store_memory": 100 * 1024**2}


def lose_node(cluster, node) -> None:
    """The machine is gone: SIGKILL the raylet's descendants (the Ray workers on the node, our training rank among
    them: they would otherwise run on until they next talk to their raylet), then the node's own processes."""
    import psutil
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    workers = psutil.Process(raylet.pid).children(recursive=True)
    logging.info("removing node %s: raylet %d and %d processes under it", node.node_id, raylet.pid, len(workers))
    for process in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    cluster.remove_node(node, allow_graceful=False)


def main(shards: str, out_dir: str, name: str, work_dir: str) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.pretrain import pretrain
    from pipelines.ray_adapter.runs import RAY_SNAPSHOT
    from tests.faults import HoldAt, NodeAt, wait_for_latest
    from tests.pretrain_runs import debug_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(work_dir)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * 1024**2,
        "temp_dir": str(work / "ray")})
    report: dict = {}
    try:
        workers = [cluster.add_node(wait=False, **WORKER_NODE) for _ in range(2)]  # both start at once
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, log_to_driver=True)
        report["worker_nodes"] = [node.node_id for node in workers]

        release = work / "released"
        config = debug_config(Path(shards), out_dir, name, "--run.num_workers=2", "--run.max_failures=1")
        hooks = [HoldAt(HOLD_STEP, str(work), str(release)), NodeAt(AFTER_STEP, str(work))]
        # pretrain in a thread: Ray starts a node's processes from the main thread only (it sets signal handlers)
        training: dict = {}
        trainer = threading.Thread(target=lambda: training.update(outcome=pretrain(config, on_step=hooks)), daemon=True)
        trainer.start()

        held = [work / f"held.rank{rank}" for rank in (0, 1)]
        while not all(p.exists() for p in held):
            if not trainer.is_alive():
                raise RuntimeError("training ended before both ranks reached the hold")
            time.sleep(0.2)
        wait_for_latest(storage.join(storage.join(out_dir, name), RAY_SNAPSHOT), "checkpoint_000010")
        report["held"] = {rank: p.read_text() for rank, p in enumerate(held)}
        victim = next(node for node in workers if node.node_id == report["held"][0])  # rank 0's node
        lose_node(cluster, victim)
        report["removed"] = victim.node_id
        release.write_text("go\n")
        report["added"] = cluster.add_node(**WORKER_NODE).node_id
        logging.info("added node %s", report["added"])
        trainer.join()
        outcome = training["outcome"]  # a KeyError here: the training thread raised (its traceback is above)
        report["after"] = {rank: (work / f"step{AFTER_STEP}.rank{rank}").read_text() for rank in (0, 1)}
        report.update(run_dir=outcome.plan.run_dir, best_val_loss=outcome.best_val_loss,
                      world_size=outcome.summary.get("world_size"), step=outcome.summary.get("step"),
                      start_step=outcome.summary.get("start_step"))
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
