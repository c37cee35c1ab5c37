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
from collections.abc import Iterator

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


@contextlib.contextmanager
def node_cluster(work: Path, num_nodes: int) -> Iterator[tuple[object, list]]:
    """(cluster, worker nodes): a head with no CPUs (the driver and Ray Train's controller live there) and `num_nodes`
    worker nodes of one CPU each, separate raylets, started at once; this process connected. Stopped after: only
    what it started (Cluster.shutdown)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * 1024**2,
        "temp_dir": str(work / "ray")})
    try:
        workers = [cluster.add_node(wait=False, **WORKER_NODE) for _ in range(num_nodes)]
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, log_to_driver=True)
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


class Training:
    """pretrain(config, on_step=hooks) in a thread: Ray starts a node's processes from the main thread only (it sets
    signal handlers), which the driver keeps for adding and removing nodes meanwhile."""

    def __init__(self, config, hooks: list) -> None:
        from pipelines.pretrain import pretrain

        self.result: dict = {}
        self.thread = threading.Thread(target=lambda: self.result.update(outcome=pretrain(config, on_step=hooks)),
                                       daemon=True)
        self.thread.start()

    def wait_for(self, paths: list[Path], timeout_s: float = 300) -> dict[int, str]:
        """{i: text} of files the ranks write (rank i the i-th), once all exist; an error if training ends first."""
        deadline = time.monotonic() + timeout_s
        while not all(p.exists() for p in paths):
            if not self.thread.is_alive():
                raise RuntimeError(f"training ended before {[p.name for p in paths]} were all written")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{[p.name for p in paths]} not all written in {timeout_s} s")
            time.sleep(0.2)
        return {rank: p.read_text() for rank, p in enumerate(paths)}

    def finish(self) -> dict:
        """The outcome's fields a report needs, once training has ended."""
        self.thread.join()
        outcome = self.result["outcome"]  # a KeyError here: the training thread raised (its traceback is above)
        return dict(run_dir=outcome.plan.run_dir, tracking=outcome.tracking, best_val_loss=outcome.best_val_loss,
                    world_size=outcome.summary.get("world_size"), step=outcome.summary.get("step"),
                    start_step=outcome.summary.get("start_step"))


def main(shards: str, out_dir: str, name: str, work_dir: str) -> int:
    from pipelines.ray_adapter.runs import RAY_SNAPSHOT
    from tests.faults import HoldAt, NodeAt, wait_for_latest
    from tests.pretrain_runs import debug_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(work_dir)
    report: dict = {}
    with node_cluster(work, 2) as (cluster, workers):
        report["worker_nodes"] = [node.node_id for node in workers]
        release = work / "released"
        config = debug_config(Path(shards), out_dir, name, "--run.num_workers=2", "--run.max_failures=1")
        training = Training(config, [HoldAt(HOLD_STEP, str(work), str(release)), NodeAt(AFTER_STEP, str(work))])

        report["held"] = training.wait_for([work / f"held.rank{rank}" for rank in (0, 1)])
        wait_for_latest(storage.join(storage.join(out_dir, name), RAY_SNAPSHOT), "checkpoint_000010")
        victim = next(node for node in workers if node.node_id == report["held"][0])  # rank 0's node
        lose_node(cluster, victim)
        report["removed"] = victim.node_id
        release.write_text("go\n")
        report["added"] = cluster.add_node(**WORKER_NODE).node_id
        logging.info("added node %s", report["added"])
        report.update(training.finish())
        report["after"] = {rank: (work / f"step{AFTER_STEP}.rank{rank}").read_text() for rank in (0, 1)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
