"""The driver of the elastic rehearsal (tests/test_elastic_rehearsal.py), in a process of its own: a process holds one
Ray connection, and the test session's is `ray_local`.

    python tests/elastic_driver.py <shards dir> <out dir or URI> <run name> <work dir> <tracking URI>

A head with no CPUs (the driver and Ray Train's controller) and three worker nodes of one CPU each, separate
raylets (ray.cluster_utils.Cluster, token auth from the environment). An elastic debug pretrain, at least 2 and at
most 3 workers, starts on all three nodes. Once every rank is held after update SHRINK_AT (past the checkpoint
at 10), the node of rank 0 is lost: Ray Train restarts the group from that checkpoint on the two nodes left,
without waiting for a replacement. Once the 2-worker group is held after update GROW_AT (past the checkpoint at
20), a new node joins: at its next resize check Ray Train grows the group back to 3, from that checkpoint.

Prints one JSON line (the last line of stdout): the nodes, which died, which joined, where each rank ran at each
stage, and the run directory.
"""
# ruff: noqa: E402 -- the sys.path line below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import logging
import time
from dataclasses import dataclass

from nanogpt.data import storage

SHRINK_AT = 13  # three ranks hold here; the last checkpoint is update 10's (debug: a checkpoint every 5 updates)
GROW_AT = 22  # two ranks hold here, past the checkpoint at 20, until the group grows (Ray stops them to resize)
ELASTIC_ARGS = ["--run.num_workers=3", "--run.min_workers=2", "--run.max_failures=-1", "--run.resize_interval_s=2",
                "--train.gradient_accumulation_steps=4", "--train.max_iters=30", "--train.eval_interval=5",
                "--optim.lr_decay_iters=30", "--run.num_to_keep=null"]
"""Also the fixed reference run's, with --run.min_workers=null: 4 micro-batches are 2+1+1 on 3 workers, 2+2 on 2."""


@dataclass
class HoldOnSize:
    """After update `step`, in a group of `world_size` ranks, rank r writes `<held_dir>/<tag>.rank<r>` (its node id)
    and waits until Ray stops the group (at most `timeout_s`); a group of another size goes on."""

    step: int
    world_size: int
    held_dir: str
    tag: str
    timeout_s: float = 240.0

    def __call__(self, step: int, metrics: dict) -> None:
        import ray
        import ray.train

        context = ray.train.get_context()
        if step != self.step or context.get_world_size() != self.world_size:
            return
        rank = context.get_world_rank()
        Path(self.held_dir, f"{self.tag}.rank{rank}").write_text(ray.get_runtime_context().get_node_id())
        time.sleep(self.timeout_s)
        raise TimeoutError(f"rank {rank}: the {self.world_size}-worker group was not resized in {self.timeout_s} s")


@dataclass
class StampAt:
    """Rank 0 of a group of `world_size` writes the time to `path` after update `step`: when a resized group got going."""

    step: int
    world_size: int
    path: str

    def __call__(self, step: int, metrics: dict) -> None:
        import ray.train

        context = ray.train.get_context()
        if (step, context.get_world_size(), context.get_world_rank()) == (self.step, self.world_size, 0):
            Path(self.path).write_text(repr(time.time()))


def main(shards: str, out_dir: str, name: str, work_dir: str, tracking_uri: str) -> int:
    from pipelines.ray_adapter.runs import RAY_SNAPSHOT
    from tests.faults import wait_for_latest
    from tests.node_loss_driver import WORKER_NODE, Training, lose_node, node_cluster
    from tests.pretrain_runs import debug_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(work_dir)
    snapshot = storage.join(storage.join(out_dir, name), RAY_SNAPSHOT)
    report: dict = {}
    with node_cluster(work, 3) as (cluster, workers):
        report["worker_nodes"] = [node.node_id for node in workers]
        config = debug_config(Path(shards), out_dir, name, *ELASTIC_ARGS, "--run.tracker=mlflow",
                              f"--run.tracking_uri={tracking_uri}")
        training = Training(config, [HoldOnSize(SHRINK_AT, 3, str(work), "three"),
                                     HoldOnSize(GROW_AT, 2, str(work), "two"),
                                     StampAt(11, 2, str(work / "shrunk")), StampAt(21, 3, str(work / "grown"))])

        report["three"] = training.wait_for([work / f"three.rank{r}" for r in range(3)])
        wait_for_latest(snapshot, "checkpoint_000010")
        victim = next(node for node in workers if node.node_id == report["three"][0])  # rank 0's node
        report["lost_at"] = time.time()
        lose_node(cluster, victim)
        report["removed"] = victim.node_id

        report["two"] = training.wait_for([work / f"two.rank{r}" for r in range(2)])
        wait_for_latest(snapshot, "checkpoint_000020")
        report["added"] = cluster.add_node(**WORKER_NODE).node_id
        report["added_at"] = time.time()
        logging.info("added node %s", report["added"])
        report.update(training.finish())
    # seconds from the node's loss to the 2-worker group's first update, and from the new node to the 3-worker one's
    report["shrink_s"] = float((work / "shrunk").read_text()) - report["lost_at"]
    report["grow_s"] = float((work / "grown").read_text()) - report["added_at"]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:6]))
