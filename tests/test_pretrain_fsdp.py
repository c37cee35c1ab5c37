"""FSDP under Ray Train: pipelines/pretrain.py with --train.parallel=fsdp on the session's real local cluster (CPU,
gloo), every rank reporting its part of each sharded checkpoint and Ray merging the uploads into one directory.

Checked: a 2-worker FSDP run follows the 2-worker DDP reference (tests/pretrain_runs.py) within rel 1e-5 (why that
bound: tests/test_fsdp.py); a worker SIGKILLed mid-run resumes from the merged sharded checkpoint with bit-identical
losses; a run whose Ray snapshot lags its sharded checkpoints resumes from the newest complete one (that same killed
run, continued); the 2-worker checkpoint resumes on 1 FSDP worker (DCP reshards) and on 1 plain DDP worker; the best
checkpoint exports unsharded through pretrain's command line (the reference's own) and loads in Hugging Face
transformers.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanogpt.checkpoint.files import is_checkpoint
from nanogpt.checkpoint.format import load_checkpoint
from pipelines.pretrain import main, pretrain
from tests.pretrain_runs import (
    DEBUG_ARGS,
    KILL_STEP,
    KilledRun,
    char_shards,
    debug_config,
    debug_run,
    eval_records,
    killed_midrun,
    records,
    resume_from_a_stale_snapshot,
    shared_root,
    step_losses,
)

pytestmark = pytest.mark.slow

FSDP = ["--train.parallel=fsdp", "--run.num_to_keep=null"]
REL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return shared_root(tmp_path_factory)


@pytest.fixture(scope="module")
def shards(ray_local, root, shakespeare_path) -> Path:
    return char_shards(root, shakespeare_path)


@dataclass
class FsdpReference:
    run_dir: Path
    best_checkpoint: str
    """As pretrain's command line printed it."""
    exports: Path
    """hf/ and whole/: the best checkpoint as --export-hf and --export-checkpoint wrote it."""


@pytest.fixture(scope="module")
def fsdp_reference(ray_local, root, shards) -> FsdpReference:
    """The 2-worker FSDP reference (30 updates, the debug run's config but for train.parallel), run through
    pretrain's command line with its best checkpoint exported: the exports are checked without a run of their own."""
    out, exports = root / "runs", root / "fsdp-ref-exports"
    argv = ["--config", "debug", *DEBUG_ARGS, f"--data.dir={shards}", f"--run.out_dir={out}", "--run.name=fsdp-ref",
            "--run.num_workers=2", *FSDP, f"--export-hf={exports / 'hf'}", f"--export-checkpoint={exports / 'whole'}"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0, "the FSDP reference run failed"
    best = re.search(r"^best checkpoint: (\S+) \(step", printed.getvalue(), re.MULTILINE)
    assert best is not None, printed.getvalue()
    return FsdpReference(out / "fsdp-ref", best.group(1), exports)


def test_two_fsdp_workers_follow_ddp_and_merge_their_shards(ray_local, root, shards, fsdp_reference):
    run_dir = fsdp_reference.run_dir
    losses, ddp = step_losses(run_dir), step_losses(debug_run(root, shards).plan.run_dir)
    assert sorted(losses) == list(range(30)) and losses[29] < losses[0] - 0.3
    assert [losses[s] for s in range(30)] == pytest.approx([ddp[s] for s in range(30)], rel=REL)
    ckpt = run_dir / "checkpoint_000030"
    state = json.loads((ckpt / "state.json").read_text())
    # both ranks' uploads landed in the one directory Ray registered
    assert {"model/__0_0.distcp", "model/__1_0.distcp", "optimizer/__1_0.distcp"} <= set(state["files"])
    assert state["world_size"] == 2 and is_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    assert fsdp_reference.best_checkpoint == str(ckpt)


@pytest.fixture(scope="module")
def killed(ray_local, root, shards) -> KilledRun:
    return killed_midrun(shards, root / "runs", "fsdp-killed", *FSDP)


def test_killed_fsdp_worker_resumes_bit_exactly(killed, fsdp_reference):
    assert killed.marker.is_file(), "the fault hook did not fire"
    run_dir = Path(killed.outcome.plan.run_dir)
    logged = [r["step"] for r in records(run_dir) if "loss" in r]
    # restarted from checkpoint_000010
    assert [logged.count(step) for step in (9, 10, KILL_STEP - 1, KILL_STEP + 1)] == [1, 2, 2, 1]
    reference = step_losses(fsdp_reference.run_dir)
    assert step_losses(run_dir) == {s: reference[s] for s in range(20)}  # bit-equal, all 20 updates
    ours, theirs = eval_records(run_dir), eval_records(fsdp_reference.run_dir)
    assert {s: r["val_loss"] for s, r in ours.items()} == {s: theirs[s]["val_loss"] for s in (0, 10, 20)}


def test_fsdp_resume_starts_from_the_newest_complete_checkpoint_when_rays_snapshot_lags(shards, killed,
                                                                                        fsdp_reference):
    stale, run_dir = killed.stale_snapshot, Path(killed.outcome.plan.run_dir)
    assert "checkpoint_000020" not in stale.read_text() and (run_dir / "checkpoint_000020").is_dir()
    resumed, added = resume_from_a_stale_snapshot(shards, killed, "fsdp-stale", *FSDP)
    assert resumed.summary["start_step"] == 20 and resumed.summary["step"] == 30  # not 10, the snapshot's latest
    logged = [r["step"] for r in added if "loss" in r]
    assert logged == list(range(20, 30)), "an update was trained twice (or never)"
    reference = step_losses(fsdp_reference.run_dir)
    assert {r["step"]: r["loss"] for r in added if "loss" in r} == {s: reference[s] for s in range(20, 30)}


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_worker_checkpoint_resumes_on_one_worker(ray_local, root, shards, fsdp_reference, parallel):
    source = fsdp_reference.run_dir / "checkpoint_000020"
    outcome = pretrain(debug_config(shards, root / "runs", f"fsdp-to-1-{parallel}", "--run.num_workers=1",
                                    f"--train.parallel={parallel}", "--model.init_from=resume",
                                    f"--run.resume_from={source}", "--train.max_iters=25"))
    assert outcome.summary["start_step"] == 20 and outcome.summary["world_size"] == 1
    losses, reference = step_losses(outcome.plan.run_dir), step_losses(fsdp_reference.run_dir)
    assert sorted(losses) == list(range(20, 25))
    assert [losses[s] for s in range(20, 25)] == pytest.approx([reference[s] for s in range(20, 25)], rel=REL)
    state = json.loads((Path(outcome.latest_checkpoint) / "state.json").read_text())
    assert state["world_size"] == 1 and ("model/.metadata" in state["files"]) == (parallel == "fsdp")


def test_export_of_the_best_sharded_checkpoint_loads_in_transformers(fsdp_reference):
    """What --export-checkpoint and --export-hf wrote of the reference's best checkpoint (see fsdp_reference)."""
    transformers = pytest.importorskip("transformers")
    import torch

    whole = load_checkpoint(fsdp_reference.exports / "whole")
    sharded = load_checkpoint(fsdp_reference.best_checkpoint)
    assert sharded.sharded and not whole.sharded and whole.step == 30
    assert all(torch.equal(whole.model_state[k], sharded.model_state[k]) for k in whole.model_state)
    hf = transformers.GPT2LMHeadModel.from_pretrained(fsdp_reference.exports / "hf", attn_implementation="eager").eval()
    from nanogpt.checkpoint.format import build_model

    model = build_model(whole).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0], atol=1e-5, rtol=0)
