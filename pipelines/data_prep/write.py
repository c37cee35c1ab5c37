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
    """Write each planned shard from a task of its own; on any failure, cancel them all and remove the output."""
    plans = plan_output_shards(planned.streams, shard_size)
    tasks: dict[ray.ObjectRef, ShardPlan] = {}
    for plan in plans:
        name = shard_name(plan.split, plan.index)
        used = [planned.blocks[b] for b in plan.blocks]
        ref = _write_shard_task.remote(output, name, planned.tokenizer.vocab_size, planned.codepoints, plan.parts,
                                       *used)
        tasks[ref] = plan
    infos: dict[tuple[str, int], ShardInfo] = {}
    try:
        pending = list(tasks)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            info = ray.get(done[0])
            infos[(tasks[done[0]].split, tasks[done[0]].index)] = info
            log.info("wrote %s: %s tokens (%d/%d shards)", info.name, f"{info.num_tokens:,}", len(infos), len(tasks))
    except BaseException as e:  # KeyboardInterrupt too: leave nothing that looks like output
        stop_tasks(list(tasks))
        output.remove_output()
        reraise_user_error(e)
        raise
    return {split: [infos[(p.split, p.index)] for p in plans if p.split == split] for split in SPLITS}


def stop_tasks(refs: list[ray.ObjectRef], timeout_s: float = 60.0) -> None:
    """Cancel the tasks and wait until none runs, so that no shard lands after the output is removed. Not
    force=True: in Ray 2.60 force-cancelling a task as it finishes fails a check in the driver's task manager,
    which aborts the driver (it took down a test process); a plain cancel stops a queued task before it starts
    and interrupts a running one in Python."""
    for ref in refs:
        ray.cancel(ref)
    _, running = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if running:
        log.warning("%d shard tasks still running %.0f s after they were cancelled", len(running), timeout_s)


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
