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
take either kind. The file names and the completeness checks (`is_checkpoint`, `check_committed`,
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
    export_nanogpt_ckpt("out/checkpoint_000250", "ckpt.pt")  # nanoGPT's sample.py loads it
    consolidate_checkpoint("out/checkpoint_000250", "out/whole_000250")   # a sharded checkpoint, unsharded
    export_hf_dir("out/checkpoint_000250", "hf/")            # transformers.GPT2LMHeadModel.from_pretrained("hf/")

`LocalReporter` is the plain-process `Reporter` for `nanogpt.train.loop.train`: it moves each reported checkpoint into
`out_dir/checkpoint_<step:06d>` (merging the ranks' parts of a sharded one) and keeps the best (by val_loss) plus
the latest `num_to_keep`.
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
import torch.distributed as dist
import yaml

from nanogpt.checkpoint import sharded
from nanogpt.checkpoint.files import (
    CONFIG_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_DIR,
    MODEL_FILE,
    OPTIMIZER_DIR,
    OPTIMIZER_FILE,
    SCALER_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    check_committed,
    checkpoint_dirs,
    has_optimizer_shards,
    is_sharded,
    read_file,
)
from nanogpt.checkpoint.weight_shapes import first_mismatch, meta_state_dict
from nanogpt.config import Config
from nanogpt.data.shards import fsync_dir  # files and directories alike
from nanogpt.model import GPT, MODEL_ARGS, GPTConfig, clean_state_dict

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


def export_nanogpt_ckpt(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write nanoGPT's `ckpt.pt` ({model, optimizer, model_args, iter_num, best_val_loss, config}) from a checkpoint,
    sharded or not (a sharded one's weights and AdamW state are read whole).

    Plain types only (config is a flat dict of str/int/float/bool/None), so nanoGPT's sample.py and
    `torch.load(weights_only=True)` read it. Written to a temporary name and renamed (nanoGPT overwrites in place).
    """
    ckpt = load_checkpoint(ckpt_dir, map_location="cpu")
    flat = ckpt.config.to_flat()
    bare: dict[str, Any] = {}
    for key, value in flat.items():  # nanoGPT's config keys have no section: add the unambiguous bare names
        name = key.split(".", 1)[1]
        bare[name] = value if name not in bare else _AMBIGUOUS
    config = {**{k: v for k, v in bare.items() if v is not _AMBIGUOUS}, **flat}
    payload = {
        "model": ckpt.model_state,
        "optimizer": full_optimizer_state(ckpt),
        "model_args": {k: ckpt.model_args[k] for k in MODEL_ARGS},
        "iter_num": ckpt.step,
        "best_val_loss": ckpt.best_val_loss,
        "config": config,
    }
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_hf_dir(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int | None = None) -> Path:
    """A Hugging Face GPT-2 directory (config.json + model.safetensors) from a checkpoint (nanogpt.hf.export_hf).
    vocab_size cuts a padded vocabulary back to the tokenizer's (50304 -> 50257)."""
    from nanogpt.hf import export_hf

    model, _ = load_model(ckpt_dir)
    return export_hf(model, out_dir, vocab_size=vocab_size)


# ------------------------------------------------------------------------------------------ plain-process reporter


class LocalReporter:
    """The `Reporter` of a plain process: each reported checkpoint is moved to out_dir/checkpoint_<step:06d>
    (copied under a temporary name and renamed when the source is on another filesystem), with the reported
    metrics beside it in metrics.json. Kept: the latest `num_to_keep` (None: all) and the best by val_loss among
    checkpoints evaluated at their own step. Every report's metrics are appended to `history`.

    Several processes on one machine (torch.distributed initialized: mp.spawn, torchrun) each report, at the same
    steps: the ranks' parts of a checkpoint (every rank's shards under FSDP, rank 0's whole checkpoint under DDP)
    are moved into one directory, and rank 0 puts it in place once every rank is done (a collective); no rank returns
    before it is in place."""

    def __init__(self, out_dir: str | os.PathLike, num_to_keep: int | None = None) -> None:
        if num_to_keep is not None and num_to_keep < 1:
            raise ValueError(f"num_to_keep must be >= 1 or None, got {num_to_keep}")
        self.out_dir = Path(out_dir)
        self.num_to_keep = num_to_keep
        self.history: list[dict[str, float]] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))
        step = int(metrics["step"])
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            self._put_in_place(step, metrics, checkpoint_dir)
            return
        merged = self._merge_parts(step, checkpoint_dir)  # rank 0's; None on the others
        try:
            self._put_in_place(step, metrics, merged)
        finally:
            dist.barrier()  # no rank goes on (to resume from it, to read the latest) before it is in place

    def _put_in_place(self, step: int, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dest = self.out_dir / f"checkpoint_{step:06d}"
        staging = self.out_dir / f".{dest.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            try:
                os.rename(checkpoint_dir, staging)  # same filesystem: instant
            except OSError:
                shutil.copytree(checkpoint_dir, staging)
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
            (staging / METRICS_FILE).write_text(json.dumps({k: _json_number(v) for k, v in metrics.items()}) + "\n")
            if dest.exists():  # a rerun reaching the same step: the new checkpoint wins
                trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(dest, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("saved checkpoint %s", dest)
        self._prune()

    def _merge_parts(self, step: int, part: str | None) -> str | None:
        """Collective: every rank moves its part (if any) into one directory; rank 0 gets it (None if empty)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        token = [uuid.uuid4().hex[:8]]
        dist.broadcast_object_list(token, src=0)  # one fresh directory name for all ranks
        merged = self.out_dir / f".checkpoint_{step:06d}.parts-{token[0]}"
        if part is not None:
            _move_files(Path(part), merged)
        dist.barrier()  # every part is in
        if dist.get_rank() != 0:
            return None
        return str(merged) if merged.exists() else None

    def _prune(self) -> None:
        if self.num_to_keep is None:
            return
        found = checkpoint_dirs(self.out_dir)
        keep = {p for _, p in found[-self.num_to_keep:]}
        scored = [(m["val_loss"], s, p) for s, p in found if (m := _read_metrics(p)) is not None
                  and m.get("val_loss") is not None and m.get("val_loss_step", s) == s]
        if scored:
            keep.add(min(scored)[2])
        for _, p in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------ helpers

_AMBIGUOUS = object()


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


def _move_files(src: Path, dest: Path) -> None:
    """Every file under src to the same relative path under dest (folders merged), then src removed."""
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dest / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(file), str(target))  # a rename on one filesystem, a copy across
    shutil.rmtree(src, ignore_errors=True)


def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _json_number(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

