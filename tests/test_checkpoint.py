"""Checkpoint directories: exact round trip, no wrapper prefixes on disk, atomicity, nanoGPT and HF exports."""

from __future__ import annotations

import datetime
import json
import math
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open

from nanogpt.checkpoint.files import CheckpointError, checkpoint_dirs, is_checkpoint, latest_checkpoint
from nanogpt.checkpoint.format import (
    CheckpointRecord,
    consolidate_checkpoint,
    full_optimizer_state,
    load_checkpoint,
    load_model,
    save_checkpoint,
    sharded,
    write_record,
)
from nanogpt.checkpoint.hf_dir import export_hf_dir
from nanogpt.checkpoint.nanogpt_ckpt import export_nanogpt_ckpt
from nanogpt.config import Config
from nanogpt.model import GPT, GPTConfig
from nanogpt.train.local_reporter import LocalReporter
from nanogpt.train.parallel import SingleProcess, unwrap_model

CONFIG = Config.from_dict({"model": dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)})
TOKENIZER = {"name": "char", "vocab_size": 3, "chars": ["a", "b", "c"]}


def trained_model(steps: int = 2) -> tuple[GPT, torch.optim.Optimizer]:
    """A tiny GPT and its AdamW after a few updates, so the optimizer has state to save."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    for _ in range(steps):
        idx = torch.randint(0, 64, (2, 16))
        _, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def save(path: Path, model, optimizer=None, step: int = 7, best: float = 1.25) -> Path:
    """The way the training loop saves: the strategy's full state of the (maybe wrapped) model."""
    strategy = SingleProcess()
    return save_checkpoint(path, model_state=strategy.model_state_dict(model), model_args=unwrap_model(model).config,
                           optimizer_state=optimizer.state_dict() if optimizer else None, step=step,
                           best_val_loss=best, config=CONFIG, tokenizer=TOKENIZER,
                           manifest_json='{"vocab_size": 3}\n', extra={"run_id": "abc"})


def save_sharded(path: Path, model, optimizer, step: int = 7) -> Path:
    """A sharded checkpoint as FSDP writes it (nanogpt/checkpoint/sharded.py), written by this process alone: DCP
    folders of one rank's shards plus the record, with no process group to start."""
    path.mkdir(parents=True)
    with warnings.catch_warnings():  # DCP: "torch.distributed is disabled ... assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        sizes = sharded.write_shards(path, model, optimizer)
    record = CheckpointRecord(model_args=model.config, config=CONFIG, step=step, best_val_loss=1.25,
                              tokenizer=TOKENIZER, manifest_json='{"vocab_size": 3}\n')
    write_record(path, sizes, record, tied=sharded.tied_aliases(model))
    return path


def restamp(path: Path, **state) -> Path:
    """What whoever plants a file in a checkpoint does next: state.json records the sizes the files now have (and
    `state`'s entries), so the checkpoint passes for complete."""
    record = json.loads((path / "state.json").read_text())
    record.update(state)
    record["sizes"] = {name: (path / name).stat().st_size for name in record["sizes"]}
    (path / "state.json").write_text(json.dumps(record))
    return path


class RunsCode:
    """A pickle whose loading would create `marker` (as a hostile file would run anything)."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def disk_keys(ckpt: Path) -> list[str]:
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_round_trip_is_exact(tmp_path):
    model, optimizer = trained_model()
    path = save(tmp_path / "checkpoint_000007", model, optimizer)
    ckpt = load_checkpoint(path)
    assert (ckpt.step, ckpt.best_val_loss, ckpt.extra, ckpt.tokenizer) == (7, 1.25, {"run_id": "abc"}, TOKENIZER)
    assert ckpt.config == CONFIG and ckpt.manifest_json == '{"vocab_size": 3}\n'
    assert ckpt.model_args == {"block_size": 16, "vocab_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                               "dropout": 0.0, "bias": True}
    sd = model.state_dict()
    assert set(ckpt.model_state) == set(sd)
    assert all(torch.equal(ckpt.model_state[k], sd[k]) for k in sd)
    saved, original = ckpt.optimizer_state, optimizer.state_dict()
    assert saved["param_groups"] == original["param_groups"]
    for i, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(saved["state"][i][name], value), (i, name)
    # the tied matrix is stored once and comes back tied
    assert "lm_head.weight" not in disk_keys(path)
    loaded, config = load_model(path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight and not loaded.training and config == CONFIG
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])


def test_best_val_loss_inf_round_trips(tmp_path):
    model, _ = trained_model(0)
    path = save(tmp_path / "c", model, best=math.inf)
    assert json.loads((path / "state.json").read_text())["best_val_loss"] is None
    assert load_checkpoint(path).best_val_loss == math.inf and load_checkpoint(path).optimizer_state is None


def test_no_prefix_reaches_disk_from_a_compiled_model(tmp_path):
    model, _ = trained_model(0)
    compiled = torch.compile(model)  # wrapping only: its state_dict keys carry `_orig_mod.`
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    path = save(tmp_path / "c", compiled)
    assert not [k for k in disk_keys(path) if "_orig_mod" in k or k.startswith("module.")]
    assert unwrap_model(compiled) is model


def test_no_prefix_reaches_disk_from_ddp(tmp_path):
    model, _ = trained_model(0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(torch.compile(model))
        assert all(k.startswith("module._orig_mod.") for k in wrapped.state_dict())
        path = save(tmp_path / "c", wrapped)
    finally:
        dist.destroy_process_group()
    assert sorted(disk_keys(path)) == sorted(k for k in model.state_dict() if k != "lm_head.weight")
    assert unwrap_model(wrapped) is model


def test_half_written_dir_is_not_a_checkpoint(tmp_path):
    model, optimizer = trained_model(1)
    path = save(tmp_path / "checkpoint_000007", model, optimizer)
    partial = tmp_path / "checkpoint_000009"
    partial.mkdir()
    for name in ("model.safetensors", "config.yaml"):  # a copy cut short before state.json
        (partial / name).write_bytes((path / name).read_bytes())
    with pytest.raises(CheckpointError, match=r"state.json: missing"):
        load_checkpoint(partial)
    assert latest_checkpoint(tmp_path) == str(path)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [7]


def test_copy_cut_short_by_a_full_disk_is_not_a_checkpoint(tmp_path):
    """What a full disk left in run storage: every file there, state.json among them, but optimizer.pt truncated
    (and, in a second copy, state.json empty). Neither counts; the newest committed checkpoint is the latest."""
    model, optimizer = trained_model(1)
    good = save(tmp_path / "checkpoint_000010", model, optimizer, step=10)
    for step, victim, keep in ((20, "optimizer.pt", 100), (30, "state.json", 0)):
        cut = tmp_path / f"checkpoint_{step:06d}"
        shutil.copytree(good, cut)
        (cut / victim).write_bytes((cut / victim).read_bytes()[:keep])
        assert not is_checkpoint(cut)
        with pytest.raises(CheckpointError, match=victim):
            load_checkpoint(cut)
    with pytest.raises(CheckpointError, match=r"optimizer.pt: 100 bytes, but state.json records \d+"):
        load_checkpoint(tmp_path / "checkpoint_000020")
    assert latest_checkpoint(tmp_path) == str(good)
    assert [s for s, _ in checkpoint_dirs(tmp_path)] == [10]


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.pt", "config.yaml", "state.json"])
def test_corrupt_or_missing_file_is_named(tmp_path, victim):
    model, optimizer = trained_model(1)
    path = save(tmp_path / "c", model, optimizer)
    (path / victim).write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=victim):
        load_checkpoint(path)
    if victim != "state.json":
        (path / victim).unlink()
        with pytest.raises(CheckpointError, match=rf"{victim}: missing"):
            load_checkpoint(path)


def test_saving_over_an_existing_checkpoint_is_refused(tmp_path):
    model, _ = trained_model(0)
    path = save(tmp_path / "c", model)
    with pytest.raises(CheckpointError, match="already exists"):
        save(path, model)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind


def test_export_hf_dir_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = trained_model()
    path = save(tmp_path / "c", model)
    out = export_hf_dir(path, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model.eval()(idx, idx)[0], rtol=1e-4, atol=1e-4)


def report_checkpoint(reporter: LocalReporter, tmp_path: Path, model, step: int, val_loss: float | None) -> None:
    src = save(tmp_path / "tmp" / f"checkpoint_{step:06d}", model, step=step)
    metrics = {"step": step, "loss": 1.0}
    if val_loss is not None:
        metrics.update(val_loss=val_loss, val_loss_step=step)
    reporter.report(metrics, str(src))
    assert not src.exists()  # the reporter took it over


def test_local_reporter_keeps_best_and_latest(tmp_path):
    model, _ = trained_model(0)
    reporter = LocalReporter(tmp_path / "out", num_to_keep=2)
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, None)]:
        report_checkpoint(reporter, tmp_path, model, step, val)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "out")] == [2, 4, 5]  # best (step 2) + the latest two
    assert latest_checkpoint(tmp_path / "out") == str(tmp_path / "out" / "checkpoint_000005")
    assert json.loads((tmp_path / "out" / "checkpoint_000002" / "metrics.json").read_text())["val_loss"] == 1.0
    reporter.report({"step": 6, "val_loss": 0.5}, None)  # metrics only
    assert len(reporter.history) == 6 and len(checkpoint_dirs(tmp_path / "out")) == 3
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


class _SlowToPlaceReporter(LocalReporter):
    """Rank 0 takes a second to put the merged checkpoint in place (a slow disk, a big checkpoint)."""

    def _put_in_place(self, step, metrics, checkpoint_dir):
        if dist.get_rank() == 0:
            time.sleep(1.0)
        super()._put_in_place(step, metrics, checkpoint_dir)


def _report_one_part(rank: int, world_size: int, root: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    part = Path(root) / f"part{rank}"
    part.mkdir()
    (part / f"shard_{rank}.bin").write_bytes(bytes([rank]))
    _SlowToPlaceReporter(Path(root) / "out").report({"step": 3, "val_loss": 1.0}, str(part))
    # what a rank does next (resume from it, look for the latest) must find it in place
    placed = Path(root) / "out" / "checkpoint_000003"
    (Path(root) / f"seen{rank}").write_text(",".join(sorted(p.name for p in placed.iterdir())) if placed.is_dir() else "")
    dist.destroy_process_group()


def test_local_reporter_on_two_ranks_returns_once_the_checkpoint_is_in_place(tmp_path):
    """Every rank's part ends up in one checkpoint, and no rank returns from report() before rank 0 has put it in
    place: rank 1 used to, and a resume right after it found no checkpoint (tests/test_fsdp.py, now and then)."""
    mp.spawn(_report_one_part, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        assert (tmp_path / f"seen{rank}").read_text() == "metrics.json,shard_0.bin,shard_1.bin", f"rank {rank}"


def test_files_are_plain_and_loadable_without_pickle(tmp_path):
    model, optimizer = trained_model(1)
    path = save(tmp_path / "c", model, optimizer)
    assert sorted(os.listdir(path)) == sorted(
        ["model.safetensors", "optimizer.pt", "config.yaml", "tokenizer.json", "manifest.json", "state.json"]
    )
    torch.load(path / "optimizer.pt", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    assert state["files"] == ["model.safetensors", "optimizer.pt", "config.yaml", "tokenizer.json", "manifest.json"]


READERS_OF = {  # every way the project reads each folder of a sharded checkpoint
    "model": {
        "load_checkpoint": lambda path, tmp: load_checkpoint(path, with_optimizer=False),
        "load_model": lambda path, tmp: load_model(path),
        "export_hf_dir": lambda path, tmp: export_hf_dir(path, tmp / "hf"),
    },
    "optimizer": {
        "full_optimizer_state (a DDP or 1-process resume)": lambda path, tmp: full_optimizer_state(load_checkpoint(path)),
        "load_optimizer_shards (an FSDP resume)": lambda path, tmp: sharded.load_optimizer_shards(*trained_model(0), path),
        "consolidate_checkpoint": lambda path, tmp: consolidate_checkpoint(path, tmp / "whole"),
        "export_nanogpt_ckpt": lambda path, tmp: export_nanogpt_ckpt(path, tmp / "ckpt.pt"),
    },
}


@pytest.mark.parametrize("folder", sorted(READERS_OF))
def test_every_reader_refuses_a_crafted_dcp_metadata_without_running_it(tmp_path, folder):
    model, optimizer = trained_model(1)
    path = save_sharded(tmp_path / "checkpoint_000007", model, optimizer)
    marker = tmp_path / "pwned"
    (path / folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    restamp(path)
    for name, read in READERS_OF[folder].items():
        with pytest.raises(CheckpointError, match=rf"{folder}/\.metadata: refused, not plain DCP metadata"):
            read(path, tmp_path)
        assert not marker.exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000007"]  # nothing half-written


def _text(s: str) -> bytes:
    return b"\x8c" + bytes([len(s)]) + s.encode()  # pickle's SHORT_BINUNICODE


METADATA = "torch.distributed.checkpoint.metadata"
SHARED_OBJECTS = {  # a pickle pushing an object the unpickler allows and other code shares, and what it is
    "a class": (_text(METADATA) + _text("MetadataIndex") + b"\x93", "MetadataIndex", "__hash__"),
    "an enum member": (_text(METADATA) + _text("_MEM_FORMAT_ENCODING") + b"\x93K\x00\x85R",
                       "_MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT", "_value_"),
}


@pytest.mark.parametrize("target", sorted(SHARED_OBJECTS))
def test_a_dcp_metadata_that_changes_a_shared_object_is_refused_and_undone(tmp_path, target):
    """The allowed globals only build records, but pickle's BUILD can set attributes on them (a class's __hash__,
    an enum member's value) for every later user in the process: refused, and put back."""
    from torch.distributed.checkpoint import metadata

    push, name, attr = SHARED_OBJECTS[target]
    owner = metadata.MetadataIndex if target == "a class" else metadata._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT
    before = vars(owner)[attr]
    model, optimizer = trained_model(0)
    path = save_sharded(tmp_path / "checkpoint_000007", model, optimizer)
    state = b"N}" + _text(attr) + _text("torch") + _text("Size") + b"\x93s\x86"  # (None, {attr: torch.Size})
    (path / "model" / ".metadata").write_bytes(b"\x80\x04" + push + state + b"b.")  # BUILD, STOP
    restamp(path)
    with pytest.raises(CheckpointError, match=rf"model/\.metadata: refused, not plain DCP metadata "
                                              rf"\(UnpicklingError: it sets attributes of {re.escape(name)}\)"):
        load_checkpoint(path)
    assert vars(owner)[attr] is before
