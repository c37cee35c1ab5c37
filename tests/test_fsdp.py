"""FSDP2 (train.parallel=fsdp) in real gloo process groups on the CPU: 2 ranks (mp.spawn) against DDP, a sharded
checkpoint resumed bit-exactly, resharded onto 1 rank and onto a plain process, exported whole.

Tolerance against DDP: rel 1e-5 on the per-step losses, the same bound as 2 DDP workers against 1 process
(tests/test_train.py). The two compute the same sums in another order: FSDP reduce-scatters where DDP all-reduces
(bucketed), and it takes the gradient norm as a sum of per-shard squares before the clip, so the weights may
differ in the last float32 bits after any update, and such differences grow step by step. Measured here (torch
2.13, gloo): the 6 training losses equal to the bit, the final val loss 4e-8 relative apart. 1e-5 leaves room for
other summation orders (another torch, more steps) and is far below what a wrong shard, a lost micro-batch or an
unsynchronized gradient does to the losses of a run at learning rate 1e-2.
"""

from __future__ import annotations

import copy
import datetime
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanogpt.checkpoint.files import checkpoint_dirs, is_checkpoint, is_sharded_checkpoint
from nanogpt.checkpoint.format import (
    consolidate_checkpoint,
    full_optimizer_state,
    load_checkpoint,
    load_model,
)
from nanogpt.checkpoint.hf_dir import export_hf_dir
from nanogpt.checkpoint.nanogpt_ckpt import export_nanogpt_ckpt, load_nanogpt_ckpt
from nanogpt.config import ConfigError
from nanogpt.data import shards
from nanogpt.data.windows import TokenWindows
from nanogpt.model import GPT, GPTConfig
from nanogpt.sampling import generate_from_checkpoint
from nanogpt.tracking import JsonlTracker
from nanogpt.train.devices import Precision
from nanogpt.train.evaluation import evaluate_windows
from nanogpt.train.local_reporter import LocalReporter
from nanogpt.train.loop import TrainContext, train
from tests.test_batches import make_char_shards
from tests.test_train import tiny_config

REL = 1e-5  # FSDP against DDP, and a resharded resume against the run it continues: see the module docstring


def fsdp_config(**train):
    # dropout and 2 micro-steps per rank: data, RNG, gradient accumulation (no_sync) and AdamW state all matter;
    # a sample at every eval: every rank has to take part in its forwards
    defaults = dict(gradient_accumulation_steps=4, max_iters=6, eval_interval=3, parallel="fsdp", sample_tokens=8)
    return tiny_config(model=dict(dropout=0.1), train={**defaults, **train})


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_char_shards(tmp_path_factory.mktemp("data"), train_shard_size=2000)


def _init(rank: int, world_size: int, store: str) -> None:
    # a hang (a rank skipping a collective) fails in a minute instead of gloo's 30
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)


def _padded_eval(rank: int, world_size: int, data: str) -> dict[str, float]:
    """evaluate_windows on a sharded model with shares of unequal batch counts (3 windows in batches of 1 over 2
    ranks: 2 and 1) and with an empty share (1 window), against the same model whole on this rank."""
    from nanogpt.train.fsdp import FullySharded

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64))
    whole = copy.deepcopy(model)
    FullySharded(rank, world_size, "cpu", torch.float32).wrap(model)
    windows = TokenWindows(shards.load_split(data, "val"), 32)
    precision = Precision("cpu", torch.float32)
    strategy = FullySharded(rank, world_size, "cpu", torch.float32)
    out = {}
    for n in (3, 1):
        got = evaluate_windows(model, windows, n, 1, precision, strategy)
        want = evaluate_windows(whole, windows, n, 1, precision)
        out[f"sharded_{n}"], out[f"whole_{n}"], out[f"count_{n}"] = got.loss, want.loss, got.num_windows
    return out


def _two_rank_worker(rank: int, world_size: int, data: str, root: str, store: str) -> None:
    _init(rank, world_size, store)
    try:
        out, ctx = Path(root), TrainContext(rank=rank, world_size=world_size)
        cfg = fsdp_config()
        tracker = JsonlTracker(out / "fsdp" / "metrics.jsonl") if rank == 0 else None
        full = train(cfg, data, ctx, LocalReporter(out / "fsdp"), tracker=tracker)
        first = train(cfg.replace(train__max_iters=3), data, ctx, LocalReporter(out / "part"))
        rest = train(cfg, data, ctx, LocalReporter(out / "part"), resume_from=str(out / "part" / "checkpoint_000003"))
        ddp = train(cfg.replace(train__parallel="ddp"), data, ctx, LocalReporter(out / "ddp"))
        padded = _padded_eval(rank, world_size, data)
        if rank == 0:
            (out / "two.json").write_text(json.dumps({
                "full": full.losses, "first": first.losses, "rest": rest.losses, "ddp": ddp.losses,
                "val": [full.val_loss, ddp.val_loss], "rest_start": rest.start_step, "padded": padded}))
    finally:
        dist.destroy_process_group()


def _one_rank_worker(rank: int, world_size: int, data: str, root: str, store: str) -> None:
    _init(rank, world_size, store)
    try:
        out = Path(root)
        result = train(fsdp_config(), data, TrainContext(), LocalReporter(out / "one"),
                       resume_from=str(out / "part" / "checkpoint_000003"))
        (out / "one.json").write_text(json.dumps({"losses": result.losses, "start": result.start_step}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> Path:
    """2 ranks: FSDP 6 steps; FSDP 3 steps then resumed to 6; DDP 6 steps; the padded eval. Then 1 rank: FSDP
    resumed from the 2-rank checkpoint at step 3."""
    mp = pytest.importorskip("torch.multiprocessing")
    root = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_two_rank_worker, args=(2, str(data_dir), str(root), str(root / "store2")), nprocs=2, join=True)
    mp.spawn(_one_rank_worker, args=(1, str(data_dir), str(root), str(root / "store1")), nprocs=1, join=True)
    return root


def test_fsdp_follows_ddp(runs):
    two = json.loads((runs / "two.json").read_text())
    assert len(two["full"]) == 6 and two["full"][-1] < two["full"][0]
    assert two["full"] == pytest.approx(two["ddp"], rel=REL)
    assert two["val"][0] == pytest.approx(two["val"][1], rel=REL)
    fsdp = load_checkpoint(runs / "fsdp" / "checkpoint_000006").model_state
    ddp = load_checkpoint(runs / "ddp" / "checkpoint_000006").model_state
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-6)


def test_resume_from_a_sharded_checkpoint_is_bit_exact(runs):
    two = json.loads((runs / "two.json").read_text())
    assert two["rest_start"] == 3
    assert two["first"] + two["rest"] == two["full"]  # float ==: the same sums in the same order
    whole = load_checkpoint(runs / "fsdp" / "checkpoint_000006").model_state
    resumed = load_checkpoint(runs / "part" / "checkpoint_000006").model_state
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_sharded_checkpoint_layout_and_commit_record(runs):
    ckpt = runs / "fsdp" / "checkpoint_000006"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["world_size"] == 2 and state["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert {"model/.metadata", "model/__0_0.distcp", "model/__1_0.distcp", "optimizer/.metadata",
            "optimizer/__0_0.distcp", "optimizer/__1_0.distcp", "config.yaml", "tokenizer.json",
            "manifest.json"} == set(state["files"])
    assert not (ckpt / "model.safetensors").exists() and is_checkpoint(ckpt)
    assert [s for s, _ in checkpoint_dirs(runs / "fsdp")] == [3, 6]
    assert sorted(p.name for p in (runs / "fsdp" / "samples").iterdir()) == [
        "step_000000.txt", "step_000003.txt", "step_000006.txt"]
    # a copy with rank 1's shard cut short is not a checkpoint, and says which file
    cut = runs / "cut"
    shutil.copytree(ckpt, cut)
    shard = cut / "model" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert not is_checkpoint(cut)
    with pytest.raises(Exception, match=r"__1_0\.distcp: 100 bytes"):
        load_checkpoint(cut)


def test_padded_eval_matches_the_whole_model(runs):
    padded = json.loads((runs / "two.json").read_text())["padded"]
    for n in (3, 1):
        assert padded[f"count_{n}"] == n
        assert padded[f"sharded_{n}"] == pytest.approx(padded[f"whole_{n}"], rel=1e-6)


def test_resume_on_one_rank_reshards(runs):
    two, one = json.loads((runs / "two.json").read_text()), json.loads((runs / "one.json").read_text())
    assert one["start"] == 3 and len(one["losses"]) == 3
    assert one["losses"] == pytest.approx(two["full"][3:], rel=REL)
    state = json.loads((runs / "one" / "checkpoint_000006" / "state.json").read_text())
    assert state["world_size"] == 1 and "model/__0_0.distcp" in state["files"]


def test_plain_process_resumes_a_sharded_checkpoint_with_ddp(runs, data_dir, tmp_path):
    """No process group at all: the 2-rank shards read whole (weights and AdamW state, renumbered)."""
    two = json.loads((runs / "two.json").read_text())
    cfg = fsdp_config(parallel="ddp", sample_tokens=0)
    result = train(cfg, str(data_dir), TrainContext(), LocalReporter(tmp_path / "out"),
                   resume_from=str(runs / "part" / "checkpoint_000003"))
    assert result.start_step == 3
    assert result.losses == pytest.approx(two["full"][3:], rel=REL)


def test_exports_of_a_sharded_checkpoint(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt = runs / "fsdp" / "checkpoint_000006"
    model, _ = load_model(ckpt)
    idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(idx, idx)[0]
    hf = transformers.GPT2LMHeadModel.from_pretrained(export_hf_dir(ckpt, tmp_path / "hf"),
                                                      attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, logits, atol=1e-5, rtol=0)
    pt = torch.load(export_nanogpt_ckpt(ckpt, tmp_path / "ckpt.pt"), weights_only=True)
    again = load_nanogpt_ckpt(tmp_path / "ckpt.pt")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    optimizer = again.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    optimizer.load_state_dict(pt["optimizer"])  # nanoGPT's resume: torch's numbering, every parameter's moments
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in params) and pt["iter_num"] == 6


def test_consolidated_copy_is_an_unsharded_checkpoint(runs, tmp_path):
    ckpt = runs / "fsdp" / "checkpoint_000006"
    whole = consolidate_checkpoint(ckpt, tmp_path / "whole")
    assert (whole / "model.safetensors").is_file() and not (whole / "model").exists()
    assert is_sharded_checkpoint(ckpt) and not is_sharded_checkpoint(whole)
    a, b = load_checkpoint(ckpt), load_checkpoint(whole)
    assert a.step == b.step == 6 and a.best_val_loss == b.best_val_loss and b.state["world_size"] == 2
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert b.optimizer_state["param_groups"] == full_optimizer_state(a)["param_groups"]
    assert generate_from_checkpoint(str(ckpt), max_new_tokens=20) == generate_from_checkpoint(str(whole),
                                                                                              max_new_tokens=20)
    weights_only = consolidate_checkpoint(ckpt, tmp_path / "weights", with_optimizer=False)
    assert not (weights_only / "optimizer.pt").exists()


def test_genuine_sharded_checkpoints_read_through_the_safe_reader(runs):
    """What FSDP wrote on 2 ranks passes the safe reader's checks as it is: the metadata plain pickle reads (the
    files of this test's own run: trusted), and sample.py samples from it."""
    from torch.distributed.checkpoint import FileSystemReader

    from nanogpt.checkpoint.dcp_reader import SafeFileSystemReader
    from pipelines import sample

    ckpt = runs / "fsdp" / "checkpoint_000006"
    for folder in (ckpt / "model", ckpt / "optimizer"):
        safe, plain = SafeFileSystemReader(folder).read_metadata(), FileSystemReader(folder).read_metadata()
        assert safe.state_dict_metadata == plain.state_dict_metadata and safe.storage_data == plain.storage_data
        assert {info.relative_path for info in safe.storage_data.values()} == {"__0_0.distcp", "__1_0.distcp"}
    assert sample.main(["--checkpoint", str(ckpt), "--max_new_tokens", "5", "--num_samples", "1"]) == 0


def test_fsdp_without_a_process_group_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"train.parallel=fsdp needs torch.distributed initialized"):
        train(fsdp_config(), str(data_dir), TrainContext(), LocalReporter(tmp_path))
    with pytest.raises(ConfigError, match=r"train.parallel=fsdp .*not train.dtype=float16"):
        fsdp_config(dtype="float16")


def test_mlflow_registers_a_sharded_checkpoint_unsharded(runs, tmp_path):
    pytest.importorskip("mlflow")
    from nanogpt.config import Config
    from pipelines.mlflow_adapter.checkpoint_uris import resolve_checkpoint_uri
    from pipelines.mlflow_adapter.job_run import make_mlflow_tracker
    from pipelines.mlflow_adapter.registry import register_checkpoint

    ckpt = runs / "fsdp" / "checkpoint_000006"
    config = Config().replace(run__out_dir=str(tmp_path), run__name="fsdp", run__experiment="fsdp-test")
    tracker = make_mlflow_tracker(config, world_size=2, device="cpu", manifest={"vocab_size": 8})
    version = register_checkpoint(tracker, ckpt)
    tracker.close()
    local = Path(resolve_checkpoint_uri(f"models:/fsdp-test-fsdp/{version}", dst=tmp_path / "got",
                                        tracking_uri=tracker.tracking_uri))
    assert (local / "model.safetensors").is_file() and not (local / "model").exists()
    assert not (local / "optimizer.pt").exists()  # the registry holds no pickles
    got, want = load_checkpoint(local, with_optimizer=False), load_checkpoint(ckpt)
    assert all(torch.equal(got.model_state[k], want.model_state[k]) for k in want.model_state)
