"""Step 4 of pipelines/prepare.py: each planned shard written by a Ray task of its own, straight from the document
blocks (Ray passes them to the task, zero-copy), into the output (nanogpt/data/shard_output.py): no token crosses
the driver. The driver writes the manifest after this, last.

    infos = write_shards(output, planned, shard_size)     # {"train": [ShardInfo, ...], "val": [...]}
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from nanogpt.data.shard_output import ShardOutput
from nanogpt.data.shards import SPLITS, ShardInfo, shard_name
from nanogpt.data.split_plan import Piece, ShardPlan, plan_output_shards
from pipelines.data_prep.plan import PlannedOutput
from pipelines.data_prep.task_errors import reraise_user_error

log = logging.getLogger("nanogpt.prepare")


def write_shards(output: ShardOutput, planned: PlannedOutput, shard_size: int) -> dict[str, list[ShardInfo]]:
    """Write each planned shard from a task of its own, at most IN_FLIGHT_PER_CPU per cluster CPU at a time; on any
    failure, submit no more, wait for those in flight, and remove the output. Nothing is cancelled: in Ray 2.60
    `ray.cancel` (with force or without) of a task whose reply is on its way fails a check in the driver's task
    manager and aborts the driver (it took down test processes twice); the window bounds what a failure waits for."""
    plans = plan_output_shards(planned.streams, shard_size)
    window = max(1, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
    in_flight: dict[ray.ObjectRef, ShardPlan] = {}
    infos: dict[tuple[str, int], ShardInfo] = {}
    try:
        for plan in plans:
            if len(in_flight) >= window:
                _collect_one(in_flight, infos, len(plans))
            in_flight[_submit(output, planned, plan)] = plan
        while in_flight:
            _collect_one(in_flight, infos, len(plans))
    except BaseException as e:  # KeyboardInterrupt too: leave nothing that looks like output
        ray.wait(list(in_flight), num_returns=len(in_flight))  # no shard lands after the output is removed
        output.remove_output()
        reraise_user_error(e)
        raise
    return {split: [infos[(p.split, p.index)] for p in plans if p.split == split] for split in SPLITS}


IN_FLIGHT_PER_CPU = 2
"""Shard tasks in flight per cluster CPU: enough to keep every CPU writing while the driver collects results."""


def _submit(output: ShardOutput, planned: PlannedOutput, plan: ShardPlan) -> ray.ObjectRef:
    used = [planned.blocks[b] for b in plan.blocks]
    return _write_shard_task.remote(output, shard_name(plan.split, plan.index), planned.tokenizer.vocab_size,
                                    planned.codepoints, plan.parts, *used)


def _collect_one(in_flight: dict[ray.ObjectRef, ShardPlan], infos: dict[tuple[str, int], ShardInfo],
                 total: int) -> None:
    """Wait for one shard task, record its ShardInfo (raising its error), and take it out of `in_flight`."""
    [done], _ = ray.wait(list(in_flight), num_returns=1)
    plan = in_flight.pop(done)
    info = ray.get(done)
    infos[(plan.split, plan.index)] = info
    log.info("wrote %s: %s tokens (%d/%d shards)", info.name, f"{info.num_tokens:,}", len(infos), total)


@ray.remote
def _write_shard_task(
    output: ShardOutput, name: str, vocab_size: int, codepoints: np.ndarray | None,
    plan: list[tuple[int, Piece, int, int]], *blocks: pa.Table,
) -> ShardInfo:
    """Gather one shard's tokens from the document blocks and write it."""
    chunks = []
    for position, piece, lo, hi in plan:
        table = blocks[position].slice(piece.row_lo, piece.row_hi - piece.row_lo)
        tokens = table.column("tokens")
        if piece.split is not None:
            tokens = tokens.filter(pc.equal(table.column("split"), piece.split))
        values = pc.list_flatten(tokens).to_numpy(zero_copy_only=False)
        chunk = values[piece.skip + lo: piece.skip + hi]
        if codepoints is not None:  # char-level: code point -> its index in the sorted vocabulary
            chunk = np.searchsorted(codepoints, chunk).astype(np.int64)
        chunks.append(chunk)
    return output.write_shard(name, chunks, vocab_size)
