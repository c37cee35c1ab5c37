"""Checkpoints: one directory per checkpoint, written atomically, loadable with no pickle.

    checkpoint_000250/
        model.safetensors   weights, nanoGPT's key names (no `_orig_mod.`/`module.` prefix ever), tied lm_head once
        optimizer.pt        AdamW state_dict (tensors and plain values: torch.load(weights_only=True) reads it)
        scaler.pt           GradScaler state, only for float16 training
        config.yaml         the resolved Config
        tokenizer.json      the dataset's tokenizer description (tokenizers.tokenizer_from_dict rebuilds it)
        manifest.json       a copy of the dataset manifest the run trained on
        state.json          step, best_val_loss, model_args, seed, world_size, tokens_seen, extra, and the size of
                            every other file: the commit record, written LAST

An FSDP run writes a sharded checkpoint instead (nanogpt/checkpoint/sharded.py): `model/` and `optimizer/`
folders of torch.distributed.checkpoint shards in place of model.safetensors and optimizer.pt, one file per rank in
each, the rest as above. `is_checkpoint`, `load_checkpoint` (the weights read whole), `load_model` and the exports
(nanogpt/checkpoint/nanogpt_ckpt.py, hf_dir.py) take either kind. The file names and the completeness checks (`is_checkpoint`, `check_committed`,
`latest_checkpoint`) live in nanogpt/checkpoint/files.py, which needs no torch.

The directory is built under a temporary sibling name and renamed into place once state.json is in it. A copy of
it (Ray's upload to run storage, an MLflow download) counts as a checkpoint only when state.json reads and every
file it lists has the recorded size (`is_checkpoint`): a copy cut short by a full disk is refused with a
`CheckpointError` naming the file, and `latest_checkpoint` passes over it. `step` is the number of optimizer updates
the weights have had: training resumed from it makes update `step` next, exactly as the uninterrupted run did.

    save_checkpoint("out/checkpoint_000250", model_state=model.state_dict(), model_args=model.config, step=250,
                    best_val_loss=1.9, config=cfg)
    ckpt = load_checkpoint("out/checkpoint_000250")          # Checkpoint(model_state=..., step=250, ...)
    model, config = load_model("out/checkpoint_000250")      # a GPT in eval mode, and the run's Config
    consolidate_checkpoint("out/checkpoint_000250", "out/whole_000250")   # a sharded checkpoint, unsharded
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from nanogpt.checkpoint import sharded
from nanogpt.checkpoint.files import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_DIR,
    MODEL_FILE,
    OPTIMIZER_DIR,
    OPTIMIZER_FILE,
    SCALER_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    check_committed,
    has_optimizer_shards,
    is_sharded,
    read_file,
)
from nanogpt.checkpoint.state_dict_keys import clean_state_dict
from nanogpt.checkpoint.weight_shapes import first_mismatch, meta_state_dict
from nanogpt.config import Config
from nanogpt.data.shards import fsync_dir  # files and directories alike
from nanogpt.model import GPT, MODEL_ARGS, GPTConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    path: Path
    model_state: dict[str, torch.Tensor]
    """nanoGPT keys, both of the tied `transformer.wte.weight` / `lm_head.weight` present (one tensor)."""
    model_args: dict[str, Any]
    """The GPTConfig the weights belong to."""
    optimizer_state: dict[str, Any] | None
    scaler_state: dict[str, Any] | None
    step: int
    best_val_loss: float
    """math.inf before any evaluation."""
    config: Config
    tokenizer: dict[str, Any] | None
    manifest_json: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    """All of state.json (seed, world_size, tokens_seen, versions, ...)."""
    sharded: bool = False
    """Written by FSDP: the weights were read whole from model/; the AdamW state stays in optimizer/ (optimizer_state
    is None) for the strategy to load shard by shard, or whole with `full_optimizer_state`."""


@dataclass(frozen=True)
class CheckpointRecord:
    """What a checkpoint records besides weights and optimizer state: where the run is and what it trained on."""

    model_args: GPTConfig
    config: Config
    step: int
    best_val_loss: float
    tokenizer: dict[str, Any] | None = None
    manifest_json: str | None = None
    extra: dict[str, Any] | None = None
    world_size: int = 1
    tokens_seen: int | None = None
    scaler_state: dict[str, Any] | None = None


def save_checkpoint(
    dir: str | os.PathLike,
    *,
    model_state: dict[str, torch.Tensor],
    model_args: GPTConfig,
    optimizer_state: dict[str, Any] | None = None,
    scaler_state: dict[str, Any] | None = None,
    step: int,
    best_val_loss: float,
    config: Config,
    tokenizer: dict[str, Any] | None = None,
    manifest_json: str | None = None,
    extra: dict[str, Any] | None = None,
    world_size: int = 1,
    tokens_seen: int | None = None,
) -> Path:
    """Write a checkpoint directory at `dir` (which must not exist, or be empty) atomically; return its path.
    `model_state`: the full state with nanoGPT's keys (parallel.Strategy.model_state_dict), for `model_args`."""
    from safetensors.torch import save_file

    record = CheckpointRecord(model_args=model_args, config=config, step=step, best_val_loss=best_val_loss,
                              tokenizer=tokenizer, manifest_json=manifest_json, extra=extra, world_size=world_size,
                              tokens_seen=tokens_seen, scaler_state=scaler_state)
    final = Path(dir)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise CheckpointError(f"{final}: already exists and is not an empty directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        tensors, tied = _dedup_tied(clean_state_dict(model_state))
        save_file(tensors, str(staging / MODEL_FILE), metadata={"format": "pt", "tied": json.dumps(tied)})
        files = [MODEL_FILE]
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        write_record(staging, {name: (staging / name).stat().st_size for name in files}, record)
        if final.exists():
            final.rmdir()  # empty (checked above): os.replace needs the name free or an empty directory
        os.replace(staging, final)
        fsync_dir(final.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def write_record(dir: str | os.PathLike, sizes: dict[str, int], record: CheckpointRecord,
                 tied: dict[str, str] | None = None) -> None:
    """Finish a checkpoint directory that holds its tensors already: config, tokenizer, manifest and scaler files,
    then state.json, the commit record, last. `sizes`: {path relative to the checkpoint: bytes} of the tensor files,
    every rank's for a sharded checkpoint (other ranks' files may live in their own parts until the reporter merges
    them). `tied`: {alias: kept} of a sharded checkpoint's weights (safetensors metadata records it otherwise)."""
    root = Path(dir)
    written = []
    if record.scaler_state:
        torch.save(record.scaler_state, root / SCALER_FILE)
        written.append(SCALER_FILE)
    (root / CONFIG_FILE).write_text(record.config.to_yaml())
    written.append(CONFIG_FILE)
    if record.tokenizer is not None:
        (root / TOKENIZER_FILE).write_text(json.dumps(record.tokenizer, ensure_ascii=False) + "\n")
        written.append(TOKENIZER_FILE)
    if record.manifest_json is not None:
        (root / MANIFEST_FILE).write_text(record.manifest_json)
        written.append(MANIFEST_FILE)
    sizes = {**sizes, **{name: (root / name).stat().st_size for name in written}}
    state = {
        "format_version": FORMAT_VERSION,
        "step": int(record.step),
        "best_val_loss": float(record.best_val_loss) if math.isfinite(record.best_val_loss) else None,  # no inf in JSON
        "model_args": dataclasses.asdict(record.model_args),
        "seed": record.config.train.seed,
        "world_size": int(record.world_size),
        "tokens_seen": int(record.tokens_seen) if record.tokens_seen is not None else None,
        "files": list(sizes),
        # the commit record: a copy of this directory (Ray's upload to run storage, an MLflow download) is
        # complete only when every file has the size it had here
        "sizes": sizes,
        "extra": record.extra or {},
        "versions": {"torch": torch.__version__},
    }
    if tied is not None:
        state["tied"] = tied
    for name in sizes:  # every file durable before the commit record that vouches for it (this rank's files)
        if (root / name).exists():
            fsync_dir(root / name)
    (root / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    fsync_dir(root / STATE_FILE)


def load_checkpoint(
    dir: str | os.PathLike, map_location: str | torch.device = "cpu", *, with_optimizer: bool = True
) -> Checkpoint:
    """Read a checkpoint directory, sharded or not. Missing or unreadable files raise CheckpointError naming the
    file."""
    path = Path(dir)
    state_path = path / STATE_FILE
    # Training state (optimizer, scaler) is only needed to resume: a weights-only copy (the MLflow registered model
    # leaves it out) loads for sampling and evaluation.
    optional = () if with_optimizer else (OPTIMIZER_FILE, SCALER_FILE, OPTIMIZER_DIR)
    state = check_committed(path, optional=optional)
    sharded_weights = is_sharded(list(state.get("files") or []))

    model_state = _read_weights(path, state, sharded_weights, map_location)
    try:
        step = int(state["step"])
        best = state["best_val_loss"]
        model_args = dict(state["model_args"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{state_path}: malformed ({type(e).__name__}: {e})") from None
    _check_weights_fit(path, model_args, model_state, MODEL_DIR if sharded_weights else MODEL_FILE)

    optimizer_state = scaler_state = None
    if with_optimizer and (path / OPTIMIZER_FILE).is_file():
        optimizer_state = read_file(path / OPTIMIZER_FILE, lambda p: torch.load(p, map_location=map_location, weights_only=True), binary=True)
    if with_optimizer and (path / SCALER_FILE).is_file():
        scaler_state = read_file(path / SCALER_FILE, lambda p: torch.load(p, map_location="cpu", weights_only=True), binary=True)
    config = read_file(path / CONFIG_FILE, lambda text: Config.from_dict(yaml.safe_load(text) or {}, source=str(path / CONFIG_FILE)))
    tokenizer = read_file(path / TOKENIZER_FILE, json.loads) if (path / TOKENIZER_FILE).is_file() else None
    manifest_json = (path / MANIFEST_FILE).read_text() if (path / MANIFEST_FILE).is_file() else None
    return Checkpoint(
        path=path,
        model_state=model_state,
        model_args=model_args,
        optimizer_state=optimizer_state,
        scaler_state=scaler_state,
        step=step,
        best_val_loss=math.inf if best is None else float(best),
        config=config,
        tokenizer=tokenizer,
        manifest_json=manifest_json,
        extra=dict(state.get("extra") or {}),
        state=state,
        sharded=sharded_weights,
    )


def _read_weights(path: Path, state: dict[str, Any], sharded_weights: bool,
                  map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """The weights with nanoGPT's keys, both names of a tied tensor present (one tensor)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    model_path = path / (MODEL_DIR if sharded_weights else MODEL_FILE)
    try:
        if sharded_weights:  # whole tensors from every rank's shards, in this process alone
            model_state = {k: v.to(map_location) for k, v in sharded.read_full(model_path).items()}
            tied = dict(state.get("tied") or {})
        else:
            model_state = load_file(str(model_path), device=str(map_location))
            with safe_open(str(model_path), framework="pt") as f:
                tied = json.loads((f.metadata() or {}).get("tied", "{}"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{model_path}: unreadable ({type(e).__name__}: {e})") from None
    for alias, kept in tied.items():
        model_state[alias] = model_state[kept]
    return model_state


def _check_weights_fit(path: Path, model_args: dict[str, Any], model_state: dict[str, torch.Tensor],
                       weights: str) -> None:
    """The weights must be exactly GPT(model_args)'s, checked before anything builds that model: state.json may
    declare any size, and building it would allocate that much before load_state_dict could refuse it."""
    try:
        config = GPTConfig(**{k: model_args[k] for k in MODEL_ARGS if k in model_args})
        mismatch = first_mismatch(meta_state_dict(config, model_state), model_state)
    except (TypeError, ValueError) as e:
        mismatch = str(e)
    if mismatch is not None:
        raise CheckpointError(f"{path / STATE_FILE}: its model_args do not fit {weights} ({mismatch})")


def full_optimizer_state(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's whole AdamW state in torch's numbered layout (optimizer.load_state_dict, nanoGPT's ckpt.pt):
    as read, or from a sharded checkpoint's optimizer/ shards; None when it has none (a weights-only copy)."""
    if not ckpt.sharded:
        return ckpt.optimizer_state
    if not has_optimizer_shards(list(ckpt.state.get("files") or [])):
        return None
    folder = ckpt.path / OPTIMIZER_DIR
    try:
        return sharded.by_index(sharded.read_full(folder))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{folder}: unreadable ({type(e).__name__}: {e})") from None


def build_model(ckpt: Checkpoint, dropout: float | None = None) -> GPT:
    """The GPT a checkpoint describes, its weights loaded strictly (on the device the state was loaded to)."""
    args = dict(ckpt.model_args)
    if dropout is not None:
        args["dropout"] = dropout
    model = GPT(GPTConfig(**{k: v for k, v in args.items() if k in MODEL_ARGS}))
    try:
        model.load_state_dict(ckpt.model_state)
    except RuntimeError as e:
        weights = ckpt.path / (sharded.MODEL_DIR if ckpt.sharded else MODEL_FILE)
        raise CheckpointError(f"{weights}: does not match its model_args {args}: {e}") from None
    return model


def load_model(dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPT, Config]:
    """The checkpoint's GPT on `device`, in eval mode, and the Config it was trained with (no optimizer read)."""
    ckpt = load_checkpoint(dir, map_location="cpu", with_optimizer=False)
    model = build_model(ckpt).to(device)
    model.eval()
    return model, ckpt.config


def consolidate_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           with_optimizer: bool = True) -> Path:
    """An unsharded copy of a checkpoint at `out_dir` (model.safetensors and optimizer.pt, DDP's layout, written
    atomically): what sample.py, evaluate.py, nanoGPT and the MLflow registry read without torch.distributed. A
    sharded checkpoint's weights and AdamW state are read whole in this process (no process group needed).
    `with_optimizer=False`: weights only."""
    ckpt = load_checkpoint(ckpt_dir, map_location="cpu", with_optimizer=with_optimizer)
    return save_checkpoint(
        out_dir, model_state=ckpt.model_state, model_args=GPTConfig(**{k: ckpt.model_args[k] for k in MODEL_ARGS}),
        optimizer_state=full_optimizer_state(ckpt) if with_optimizer else None,
        scaler_state=ckpt.scaler_state if with_optimizer else None, step=ckpt.step,
        best_val_loss=ckpt.best_val_loss, config=ckpt.config, tokenizer=ckpt.tokenizer,
        manifest_json=ckpt.manifest_json, extra=ckpt.extra, world_size=int(ckpt.state.get("world_size") or 1),
        tokens_seen=ckpt.state.get("tokens_seen"),
    )


# ------------------------------------------------------------------------------------------ helpers


def _dedup_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors for safetensors (contiguous, on CPU, each storage once) and {dropped key: kept key} for the ties."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu().contiguous()
    return tensors, tied
