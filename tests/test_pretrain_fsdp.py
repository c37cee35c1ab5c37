"""FSDP under Ray Train: pipelines/pretrain.py with --train.parallel=fsdp on the session's real local cluster (CPU,
gloo), every rank reporting its part of each sharded checkpoint and Ray merging the uploads into one directory.

Checked: a 2-worker FSDP run follows the 2-worker DDP reference (tests/pretrain_runs.py) within rel 1e-5 (why that
bound: tests/test_fsdp.py); a worker SIGKILLed mid-run resumes from the merged sharded checkpoint with bit-identical
losses; a run whose Ray snapshot lags its sharded checkpoints resumes from the newest complete one; the 2-worker
checkpoint resumes on 1 FSDP worker (DCP reshards) and on 1 plain DDP worker; the best
checkpoint exports unsharded through pretrain's command line and loads in Hugging Face transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanogpt.checkpoint.files import is_checkpoint
from nanogpt.checkpoint.format import load_checkpoint
from pipelines.pretrain import main, pretrain
from tests.faults import KillRankAt
from tests.pretrain_runs import (
    char_shards,
    debug_config,
    debug_run,
    eval_records,
    records,
    resume_after_a_stale_snapshot,
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


@pytest.fixture(scope="module")
def fsdp_reference(ray_local, root, shards):
    return pretrain(debug_config(shards, root / "runs", "fsdp-ref", "--run.num_workers=2", *FSDP))


def test_two_fsdp_workers_follow_ddp_and_merge_their_shards(ray_local, root, shards, fsdp_reference):
    run_dir = Path(fsdp_reference.plan.run_dir)
    losses, ddp = step_losses(run_dir), step_losses(debug_run(root, shards).plan.run_dir)
    assert sorted(losses) == list(range(30)) and losses[29] < losses[0] - 0.3
    assert [losses[s] for s in range(30)] == pytest.approx([ddp[s] for s in range(30)], rel=REL)
    ckpt = run_dir / "checkpoint_000030"
    state = json.loads((ckpt / "state.json").read_text())
    # both ranks' uploads landed in the one directory Ray registered
    assert {"model/__0_0.distcp", "model/__1_0.distcp", "optimizer/__1_0.distcp"} <= set(state["files"])
    assert state["world_size"] == 2 and is_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    assert fsdp_reference.best_checkpoint == str(ckpt)


def test_killed_fsdp_worker_resumes_bit_exactly(ray_local, root, shards, fsdp_reference):
    marker = root / "fsdp-killed.marker"
    config = debug_config(shards, root / "runs", "fsdp-killed", "--run.num_workers=2", "--run.max_failures=1", *FSDP)
    outcome = pretrain(config, on_step=[KillRankAt(step=15, marker=str(marker))])
    assert marker.is_file(), "the fault hook did not fire"
    run_dir = Path(outcome.plan.run_dir)
    logged = [r["step"] for r in records(run_dir) if "loss" in r]
    assert [logged.count(step) for step in (9, 10, 15, 16)] == [1, 2, 2, 1]  # restarted from checkpoint_000010
    assert step_losses(run_dir) == step_losses(fsdp_reference.plan.run_dir)  # bit-equal, all 30 updates
    ours, theirs = eval_records(run_dir), eval_records(fsdp_reference.plan.run_dir)
    assert {s: r["val_loss"] for s, r in ours.items()} == {s: r["val_loss"] for s, r in theirs.items()}


def test_fsdp_resume_starts_from_the_newest_complete_checkpoint_when_rays_snapshot_lags(ray_local, root, shards):
    resumed = resume_after_a_stale_snapshot(shards, root / "runs", "fsdp-stale", "--run.num_workers=2",
                                            "--train.parallel=fsdp")
    assert resumed.summary["start_step"] == 40 and resumed.summary["step"] == 50  # not 20, the snapshot's latest
    logged = [r["step"] for r in records(resumed.plan.run_dir) if "loss" in r]
    assert sorted(logged) == list(range(50)), "an update was trained twice (or never)"


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_worker_checkpoint_resumes_on_one_worker(ray_local, root, shards, fsdp_reference, parallel):
    source = Path(fsdp_reference.plan.run_dir) / "checkpoint_000020"
    outcome = pretrain(debug_config(shards, root / "runs", f"fsdp-to-1-{parallel}", "--run.num_workers=1",
                                    f"--train.parallel={parallel}", "--model.init_from=resume",
                                    f"--run.resume_from={source}"))
    assert outcome.summary["start_step"] == 20 and outcome.summary["world_size"] == 1
    losses, reference = step_losses(outcome.plan.run_dir), step_losses(fsdp_reference.plan.run_dir)
    assert sorted(losses) == list(range(20, 30))
    assert [losses[s] for s in range(20, 30)] == pytest.approx([reference[s] for s in range(20, 30)], rel=REL)
    state = json.loads((Path(outcome.latest_checkpoint) / "state.json").read_text())
    assert state["world_size"] == 1 and ("model/.metadata" in state["files"]) == (parallel == "fsdp")


def test_export_of_the_best_sharded_checkpoint_loads_in_transformers(ray_local, root, shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    out = tmp_path / "runs"
    argv = ["--config", "debug", f"--data.dir={shards}", f"--run.out_dir={out}", "--run.name=export",
            "--run.num_workers=2", "--run.tracker=none", "--train.max_iters=10", "--train.eval_interval=5",
            "--optim.lr_decay_iters=10", "--train.parallel=fsdp", f"--export-hf={tmp_path / 'hf'}",
            f"--export-checkpoint={tmp_path / 'whole'}"]
    assert main(argv) == 0
    whole = load_checkpoint(tmp_path / "whole")
    sharded = load_checkpoint(out / "export" / "checkpoint_000010")
    assert sharded.sharded and not whole.sharded and whole.step == 10
    assert all(torch.equal(whole.model_state[k], sharded.model_state[k]) for k in whole.model_state)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    from nanogpt.checkpoint.format import build_model

    model = build_model(whole).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx, idx)[0], atol=1e-5, rtol=0)
