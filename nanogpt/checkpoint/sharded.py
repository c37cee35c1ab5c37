"""Sharded checkpoints: the weights and AdamW state of an FSDP run as torch.distributed.checkpoint (DCP) folders
inside a checkpoint directory, and the readers that turn them back into whole tensors in one process.

    checkpoint_000250/
        model/.metadata             DCP's index of every chunk (written by rank 0)
        model/__<rank>_0.distcp     each rank's shards of the weights, nanoGPT's keys, the tied lm_head.weight left
                                    out (it is transformer.wte.weight; state.json "tied" records the alias)
        optimizer/.metadata
        optimizer/__<rank>_0.distcp AdamW state keyed by parameter name ({"state": {name: {...}}, "param_groups"})
        config.yaml, tokenizer.json, manifest.json, state.json   as in nanogpt/checkpoint/format.py (rank 0's part)

Every rank writes its own part (`write_shards`) into a directory of its own; the reporter merges the parts (Ray
Train uploads every rank's directory into one checkpoint; nanogpt/train/local_reporter.py moves them into one). DCP
reshards on load: a checkpoint written by N ranks loads on M (`load_optimizer_shards`), and `read_full` reads it
whole in a plain process with no process group (export, sampling, a DDP or 1-process resume). Both read through
nanogpt/checkpoint/dcp_reader.py, which runs no pickle from the folder and allocates nothing its metadata merely declares.

AdamW state comes in two layouts: torch's `optimizer.state_dict()` numbers the parameters (0, 1, ... in
param_groups order: what optimizer.pt and nanoGPT's ckpt.pt hold); DCP's names them. `by_index` and `by_name`
convert between the two.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from nanogpt.checkpoint.files import MODEL_DIR, OPTIMIZER_DIR

# torch.distributed.checkpoint is imported in the functions that use it: its import costs CPU (bench/NOTES.md) that
# every process that imports nanogpt.checkpoint.format would pay (the driver before Ray starts, each worker before step
# 0), and only FSDP runs and their checkpoints need it.


def write_shards(dir: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Collective (every rank, the same call): this rank's shards of the weights and of the AdamW state into
    dir/model and dir/optimizer. Returns {path relative to dir: size in bytes} of the files this rank wrote."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    root = Path(dir)
    model_state = get_model_state_dict(model)
    for alias in tied_aliases(model):
        model_state.pop(alias)  # written once, under the name it is kept by
    dcp.save(model_state, checkpoint_id=root / MODEL_DIR)
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=root / OPTIMIZER_DIR)
    return {str(p.relative_to(root)): p.stat().st_size
            for folder in (MODEL_DIR, OPTIMIZER_DIR) for p in sorted((root / folder).iterdir()) if p.is_file()}


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: name kept} for parameters registered under two names (GPT's lm_head.weight is transformer.wte.weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def read_full(folder: str | os.PathLike) -> dict[str, Any]:
    """Everything saved in one DCP folder, as whole tensors on the CPU, read by this process alone: no process
    group and no collective, whatever the number of ranks that wrote it (and whether or not one is initialized).
    Read without trusting the folder (nanogpt/checkpoint/dcp_reader.py): a CheckpointError naming the file otherwise.
    What DCP's format_utils.dcp_to_torch_save does, through dcp.load's public arguments: an empty state of every
    item the checked metadata declares, filled in place, then nested back as it was saved."""
    import torch.distributed.checkpoint as dcp

    from nanogpt.checkpoint.dcp_reader import SafeLoadPlanner, checked_reader, dcp_errors, empty_state, nested

    with dcp_errors(folder), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist says so: intended
        reader = checked_reader(folder)
        metadata = reader.read_metadata()
        state = empty_state(metadata)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=True)
    return nested(state, metadata.planner_data)


def load_optimizer_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer, dir: str | os.PathLike) -> None:
    """Collective: the AdamW state saved under dir/optimizer into `optimizer` (built over the FSDP-sharded `model`),
    each rank reading the chunks its shards need: resharded to the current world size by DCP."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from nanogpt.checkpoint.dcp_reader import SafeLoadPlanner, checked_reader, dcp_errors

    folder = Path(dir) / OPTIMIZER_DIR
    state = get_optimizer_state_dict(model, optimizer)  # the layout to fill: this rank's shards
    with dcp_errors(folder):
        dcp.load(state, storage_reader=checked_reader(folder), planner=SafeLoadPlanner())
    set_optimizer_state_dict(model, optimizer, state)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """A whole AdamW state in torch's numbered layout (optimizer.pt) into `optimizer` over the FSDP-sharded `model`:
    every rank passes it whole and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    named = by_name(state, parameter_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in its param_groups order (torch's numbering)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's numbered optimizer state -> DCP's named one; names[i] is parameter i."""
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def by_index(state: dict[str, Any]) -> dict[str, Any]:
    """DCP's named optimizer state -> torch's numbered one (optimizer.load_state_dict, nanoGPT's ckpt.pt): the
    parameters numbered in param_groups order, as optimizer.state_dict() numbers them."""
    index: dict[str, int] = {}
    for group in state["param_groups"]:
        for name in group["params"]:
            index[name] = len(index)
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}
