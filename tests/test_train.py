"""The training loop in a plain process (world size 1, CPU, float32) on real char-level shards on disk."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from nanogpt.checkpoint.files import checkpoint_dirs
from nanogpt.checkpoint.format import load_checkpoint
from nanogpt.config import Config, ConfigError
from nanogpt.data import shards
from nanogpt.model import GPT
from nanogpt.tracking import JsonlTracker
from nanogpt.train.devices import resolve_dtype
from nanogpt.train.local_reporter import LocalReporter
from nanogpt.train.loop import TrainContext, train
from nanogpt.train.model_fit import default_vocab_size
from nanogpt.train.step import NonFiniteError
from tests.test_batches import make_char_shards

TINY = {
    "model": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0),
    "train": dict(batch_size=4, gradient_accumulation_steps=2, max_iters=12, eval_interval=4, eval_iters=2,
                  log_interval=1, device="cpu", dtype="float32", seed=1337),
    "optim": dict(learning_rate=1e-2, warmup_iters=2, lr_decay_iters=12, min_lr=1e-3),
    "run": dict(num_to_keep=None),
}


def tiny_config(**sections) -> Config:
    merged = {k: {**v, **sections.get(k, {})} for k, v in TINY.items()}
    return Config.from_dict(merged)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_char_shards(tmp_path_factory.mktemp("data"), train_shard_size=2000)


def run(cfg: Config, data: Path, out: Path, **kw):
    reporter = LocalReporter(out, num_to_keep=cfg.run.num_to_keep)
    return train(cfg, str(data), TrainContext(), reporter, **kw), reporter


@pytest.fixture
def capture_model(monkeypatch):
    """The GPT that train() builds, caught when it asks it for its optimizer (train() does not expose it)."""
    models: list[GPT] = []
    original = GPT.configure_optimizers

    def spy(self, *args, **kwargs):
        models.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "configure_optimizers", spy)
    return models


def test_short_run_loss_decreases_and_reports(data_dir, tmp_path):
    tracker = JsonlTracker(tmp_path / "out" / "metrics.jsonl")
    result, reporter = run(tiny_config(), data_dir, tmp_path / "out", tracker=tracker)
    assert result.step == 12 and result.start_step == 0 and len(result.losses) == 12
    assert result.losses[-1] < result.losses[0]
    assert result.val_loss < math.log(40)  # below the uniform guess over the ~40-char vocabulary
    # evals (and reports) at 0, 4, 8 and max_iters; checkpoints at all but step 0 (nanoGPT skips it too)
    assert [m["step"] for m in reporter.history] == [0, 4, 8, 12]
    assert all({"step", "val_loss", "best_val_loss"} <= set(m) for m in reporter.history)
    assert "loss" not in reporter.history[0] and "loss" in reporter.history[-1]
    assert [s for s, _ in checkpoint_dirs(tmp_path / "out")] == [4, 8, 12]
    lines = tracker.read()
    iters = [m for m in lines if "lr" in m]
    evals = [m for m in lines if "val_loss" in m]
    assert [m["step"] for m in iters] == list(range(12))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_ms"} <= set(iters[0]) and "mfu" not in iters[0]
    assert [m["step"] for m in evals] == [0, 4, 8, 12]
    assert evals[-1]["val_perplexity"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    # bits per byte over the same windows: every character of this ASCII text is one UTF-8 byte
    assert all(m["val_bpb"] == pytest.approx(m["val_loss"] / math.log(2), rel=1e-12) for m in evals)
    assert [m["loss"] for m in iters] == pytest.approx(result.losses, rel=0, abs=0)


def test_resume_is_bit_exact(data_dir, tmp_path):
    # dropout on and two micro-steps, so the data, the RNG and the optimizer state all have to come back exactly
    cfg = tiny_config(model=dict(dropout=0.1), train=dict(eval_interval=3))
    full, _ = run(cfg, data_dir, tmp_path / "full")
    first, _ = run(cfg.replace(train__max_iters=6), data_dir, tmp_path / "part")
    ckpt = tmp_path / "part" / "checkpoint_000006"
    assert load_checkpoint(ckpt).step == 6
    rest, _ = run(cfg, data_dir, tmp_path / "part", resume_from=str(ckpt))
    assert rest.start_step == 6 and rest.step == 12
    assert first.losses == full.losses[:6]
    assert rest.losses == full.losses[6:]  # bit for bit: float ==, no tolerance
    final_full = load_checkpoint(tmp_path / "full" / "checkpoint_000012").model_state
    final_resumed = load_checkpoint(tmp_path / "part" / "checkpoint_000012").model_state
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


def test_indivisible_world_size_fails_before_step_0(data_dir, tmp_path):
    steps = []
    with pytest.raises(ConfigError, match=r"run.num_workers=3: at 3 workers the 2 micro-batches .* cannot be split "
                                          r"\(a worker would have no micro-batch\)"):
        train(tiny_config(), str(data_dir), TrainContext(world_size=3), LocalReporter(tmp_path),
              on_step=lambda s, m: steps.append(s))
    with pytest.raises(ConfigError, match=r"at 3 workers the 4 micro-batches .* \(under train.parallel=fsdp every size "
                                          r"must divide it"):
        train(tiny_config(train=dict(parallel="fsdp", gradient_accumulation_steps=4)), str(data_dir),
              TrainContext(world_size=3), LocalReporter(tmp_path), on_step=lambda s, m: steps.append(s))
    assert steps == []


def test_nan_stops_before_the_optimizer_update(data_dir, tmp_path, capture_model):
    snapshot = {}

    def poison(step, metrics):
        if step == 4:  # after update 4, one weight goes NaN: update 5's loss is NaN
            model = capture_model[0]
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})

    with pytest.raises(NonFiniteError, match=r"^step 5: non-finite"):
        run(tiny_config(), data_dir, tmp_path / "out", on_step=poison)
    after = capture_model[0].state_dict()
    # an AdamW update would have spread the NaN into every tensor: unchanged weights mean no update happened
    for k in snapshot:
        torch.testing.assert_close(after[k], snapshot[k], rtol=0, atol=0, equal_nan=True)
    assert sum(torch.isnan(v).sum().item() for v in after.values()) == 1


def nan_loss_at(monkeypatch, bad_steps: set[int]):
    """Make the first forward pass after on_step(s - 1) return a NaN loss, for each s in bad_steps."""
    armed = []
    original = GPT.forward

    def forward(self, idx, targets=None, kv_cache=None):
        logits, loss = original(self, idx, targets, kv_cache)
        if armed and loss is not None:
            armed.clear()
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    return lambda step, metrics: armed.append(1) if step + 1 in bad_steps else None


def test_skip_mode_skips_then_continues(data_dir, tmp_path, monkeypatch, capture_model):
    on_step = nan_loss_at(monkeypatch, {5})  # not an eval step (eval_interval 4): the NaN hits update 5
    cfg = tiny_config(train=dict(max_nonfinite_skips=1))
    result, _ = run(cfg, data_dir, tmp_path / "out", on_step=on_step)
    assert result.step == 12 and result.num_skipped == 1
    assert math.isnan(result.losses[5]) and all(math.isfinite(v) for i, v in enumerate(result.losses) if i != 5)
    assert all(torch.isfinite(p).all() for p in capture_model[0].parameters())


def test_skip_budget_exhausted_is_an_error(data_dir, tmp_path, monkeypatch):
    on_step = nan_loss_at(monkeypatch, {5, 7})
    cfg = tiny_config(train=dict(max_nonfinite_skips=1))
    with pytest.raises(NonFiniteError, match=r"^step 7: .*max_nonfinite_skips=1"):
        run(cfg, data_dir, tmp_path / "out", on_step=on_step)


def test_best_val_loss_never_increases(data_dir, tmp_path, capture_model):
    def spoil(step, metrics):
        if step == 5:  # blow up the logits: the val loss at step 6 is far worse than at step 4
            with torch.no_grad():
                capture_model[0].transformer.wte.weight.mul_(30.0)

    cfg = tiny_config(train=dict(eval_interval=2, always_save_checkpoint=True, max_iters=8))
    run(cfg, data_dir, tmp_path / "out", on_step=spoil)
    states = [json.loads((p / "state.json").read_text()) for _, p in checkpoint_dirs(tmp_path / "out")]
    vals = [s["extra"]["val_loss"] for s in states]
    bests = [s["best_val_loss"] for s in states]
    assert [s["step"] for s in states] == [2, 4, 6, 8]
    assert vals[2] > vals[1], "the spoiled weights should evaluate worse"
    assert bests == [min(vals[: i + 1]) for i in range(len(vals))]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:]))


def test_always_save_false_checkpoints_only_improvements(data_dir, tmp_path, capture_model):
    def spoil(step, metrics):
        if step == 5:
            with torch.no_grad():
                capture_model[0].transformer.wte.weight.mul_(30.0)

    cfg = tiny_config(train=dict(eval_interval=2, always_save_checkpoint=False, max_iters=8))
    _, reporter = run(cfg, data_dir, tmp_path / "out", on_step=spoil)
    assert [m["step"] for m in reporter.history] == [0, 2, 4, 6, 8]  # reports at every eval regardless
    saved = [s for s, _ in checkpoint_dirs(tmp_path / "out")]
    assert 6 not in saved and saved[:2] == [2, 4]


def test_checkpoint_interval(data_dir, tmp_path):
    cfg = tiny_config(train=dict(checkpoint_interval=5, eval_interval=100, max_iters=12))
    _, reporter = run(cfg, data_dir, tmp_path / "out")
    assert [s for s, _ in checkpoint_dirs(tmp_path / "out")] == [5, 10, 12]
    assert [m["step"] for m in reporter.history] == [0, 5, 10, 12]
    assert reporter.history[1]["val_loss_step"] == 0  # no eval at step 5: the last val loss, marked as such


def test_eval_only(data_dir, tmp_path):
    steps = []
    result, reporter = run(tiny_config(train=dict(eval_only=True)), data_dir, tmp_path / "out",
                           on_step=lambda s, m: steps.append(s))
    assert result.step == 0 and result.losses == [] and steps == []
    assert len(reporter.history) == 1 and reporter.history[0]["val_loss"] == result.val_loss
    assert checkpoint_dirs(tmp_path / "out") == []


def test_eval_only_from_a_checkpoint_matches_its_val_loss(data_dir, tmp_path):
    trained, reporter = run(tiny_config(train=dict(max_iters=4)), data_dir, tmp_path / "out")
    again, _ = run(tiny_config(train=dict(eval_only=True)), data_dir, tmp_path / "eval",
                   resume_from=str(tmp_path / "out" / "checkpoint_000004"))
    assert again.step == 4 and again.val_loss == trained.val_loss


@pytest.mark.parametrize("damage", ["missing", "corrupt", "no_manifest"])
def test_damaged_shards_fail_before_step_0(tmp_path, damage):
    data = make_char_shards(tmp_path / "data", train_shard_size=2000)
    victim = data / "train_000001.bin"
    if damage == "missing":
        victim.unlink()
    elif damage == "corrupt":
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 0xFF
        victim.write_bytes(bytes(raw))
    else:
        (data / "manifest.json").unlink()
    steps, reporter = [], LocalReporter(tmp_path / "out")
    with pytest.raises(shards.ShardError) as err:
        train(tiny_config(), str(data), TrainContext(), reporter, on_step=lambda s, m: steps.append(s))
    assert ("manifest.json" if damage == "no_manifest" else "train_000001.bin") in str(err.value)
    assert steps == [] and reporter.history == []


def test_float16_on_cpu_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="float16 needs a CUDA device"):
        run(tiny_config(train=dict(dtype="float16")), data_dir, tmp_path / "out")
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_vocab_smaller_than_the_dataset_is_a_config_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"vocabulary has 16 tokens but the dataset's tokenizer \(char\) has"):
        run(tiny_config(model=dict(vocab_size=16)), data_dir, tmp_path / "out")


def test_scratch_vocab_is_the_char_vocab_as_is_and_gpt2_padded_to_64(data_dir, tmp_path):
    run(tiny_config(train=dict(max_iters=4)), data_dir, tmp_path / "out")
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint_000004")
    char_vocab = shards.load_manifest(data_dir).vocab_size
    assert ckpt.model_args["vocab_size"] == char_vocab  # nanoGPT's meta.pkl vocabulary, unpadded
    gpt2 = dataclasses.replace(shards.load_manifest(data_dir), tokenizer={"name": "gpt2", "vocab_size": 50257},
                               vocab_size=50257)
    assert default_vocab_size(gpt2) == 50304


def test_resume_with_a_different_architecture_is_a_config_error(data_dir, tmp_path):
    run(tiny_config(train=dict(max_iters=4)), data_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"trained with model.n_layer=2 but this config has model.n_layer=3"):
        run(tiny_config(model=dict(n_layer=3)), data_dir, tmp_path / "out2",
            resume_from=str(tmp_path / "out" / "checkpoint_000004"))


def test_resume_on_data_of_another_tokenizer_is_a_config_error(data_dir, tmp_path):
    from tests.test_batches import tiny_text

    run(tiny_config(train=dict(max_iters=4)), data_dir, tmp_path / "out")
    other = make_char_shards(tmp_path / "other", text=tiny_text() + "XYZ!")  # a different character set
    with pytest.raises(ConfigError, match="different tokenizer"):
        run(tiny_config(), other, tmp_path / "out2", resume_from=str(tmp_path / "out" / "checkpoint_000004"))


def test_init_from_a_local_hf_dir_crops_the_block_size(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=96,
                                        activation_function="gelu", bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path / "hf")
    cfg = tiny_config(model=dict(init_from=str(tmp_path / "hf"), block_size=32), train=dict(max_iters=4))
    result, _ = run(cfg, data_dir, tmp_path / "out")
    assert result.step == 4 and all(math.isfinite(v) for v in result.losses)
    args = load_checkpoint(tmp_path / "out" / "checkpoint_000004").model_args
    assert (args["block_size"], args["vocab_size"], args["n_embd"]) == (32, 96, 32)


def test_sample_text_at_eval(data_dir, tmp_path):
    tracker = JsonlTracker(tmp_path / "out" / "metrics.jsonl")
    run(tiny_config(train=dict(max_iters=4, sample_tokens=30)), data_dir, tmp_path / "out", tracker=tracker)
    samples = sorted((tmp_path / "out" / "samples").iterdir())
    assert [p.name for p in samples] == ["step_000000.txt", "step_000004.txt"]
    assert len(samples[-1].read_text()) == 31  # the "\n" it starts from + 30 characters


def _ddp_worker(rank: int, world_size: int, data: str, out: str, store: str, result_file: str,
                accumulation: int = 2) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        cfg = tiny_config(model=dict(dropout=0.1), train=dict(max_iters=6, eval_interval=3,
                                                              gradient_accumulation_steps=accumulation))
        reporter = LocalReporter(out, num_to_keep=None)
        result = train(cfg, data, TrainContext(rank=rank, world_size=world_size), reporter)
        if rank == 0:
            Path(result_file).write_text(json.dumps({"losses": result.losses, "history": reporter.history}))
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_match_one(data_dir, tmp_path):
    """Same windows per step (global micro-batch index), same dropout masks (seeded per micro-batch), same eval
    windows (partitioned): a 2-worker DDP run follows the 1-worker run up to float summation order."""
    mp = pytest.importorskip("torch.multiprocessing")
    cfg = tiny_config(model=dict(dropout=0.1), train=dict(max_iters=6, eval_interval=3))
    single, reporter = run(cfg, data_dir, tmp_path / "one")
    result_file = tmp_path / "two.json"
    mp.spawn(_ddp_worker, args=(2, str(data_dir), str(tmp_path / "two"), str(tmp_path / "store"), str(result_file)),
             nprocs=2, join=True)
    two = json.loads(result_file.read_text())
    assert two["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert [m["val_loss"] for m in two["history"]] == pytest.approx([m["val_loss"] for m in reporter.history], rel=1e-5)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "two")] == [3, 6]  # only rank 0 wrote checkpoints


def test_three_ddp_workers_on_an_uneven_split_match_one(data_dir, tmp_path):
    """4 micro-batches on 3 ranks (2, 1, 1): each micro-batch's loss is divided by the mean share 4/3, so after
    DDP's average over 3 ranks the step's gradient is still the mean over its 4 micro-batches, as on one worker."""
    mp = pytest.importorskip("torch.multiprocessing")
    cfg = tiny_config(model=dict(dropout=0.1), train=dict(max_iters=6, eval_interval=3, gradient_accumulation_steps=4))
    single, reporter = run(cfg, data_dir, tmp_path / "one")
    result_file = tmp_path / "three.json"
    mp.spawn(_ddp_worker, args=(3, str(data_dir), str(tmp_path / "three"), str(tmp_path / "store"),
                                str(result_file), 4), nprocs=3, join=True)
    three = json.loads(result_file.read_text())
    assert three["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert [m["val_loss"] for m in three["history"]] == pytest.approx([m["val_loss"] for m in reporter.history],
                                                                       rel=1e-5)
    final_one = load_checkpoint(tmp_path / "one" / "checkpoint_000006").model_state
    final_three = load_checkpoint(tmp_path / "three" / "checkpoint_000006").model_state
    assert all(torch.allclose(final_one[k], final_three[k], rtol=1e-4, atol=1e-6) for k in final_one)


def test_a_run_continued_on_another_world_size_says_so_and_counts_the_resize(data_dir, tmp_path, caplog):
    """What an elastic job's restart does: the 2-worker run's checkpoint at 3, continued on one worker."""
    mp = pytest.importorskip("torch.multiprocessing")
    mp.spawn(_ddp_worker, args=(2, str(data_dir), str(tmp_path / "two"), str(tmp_path / "store"),
                                str(tmp_path / "two.json")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two.json").read_text())
    cfg = tiny_config(model=dict(dropout=0.1), train=dict(max_iters=6, eval_interval=3))
    tracker = JsonlTracker(tmp_path / "one" / "metrics.jsonl")
    with caplog.at_level(logging.INFO, logger="nanogpt.train.loop"):
        result, _ = run(cfg, data_dir, tmp_path / "one", tracker=tracker,
                        resume_from=str(tmp_path / "two" / "checkpoint_000003"))
    lines = [r.getMessage() for r in caplog.records]
    assert ("resized 2 -> 1 workers at step 3 (fewer workers than before: a node was lost); 256 tokens per step "
            "unchanged") in lines
    assert "tokens per iteration will be: 256 (1 workers x 2 micro-steps x 4 x 32)" in lines
    assert result.losses == pytest.approx(two["losses"][3:], rel=1e-5)
    assert json.loads((tmp_path / "one" / "tags.json").read_text())["resizes"] == 1
    assert load_checkpoint(tmp_path / "one" / "checkpoint_000006").extra["resizes"] == 1
    assert load_checkpoint(tmp_path / "two" / "checkpoint_000006").extra["resizes"] == 0
    logged = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [m["world_size"] for m in logged if "loss" in m] == [1, 1, 1]


def test_sample_text_is_seeded_and_stays_in_the_tokenizer_vocabulary():
    from nanogpt.model import GPTConfig
    from nanogpt.sampling import sample_text
    from nanogpt.tokenizers import CharTokenizer

    tok = CharTokenizer.from_text("abc\n")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=64))  # 60 ids no char has
    with torch.no_grad():
        model.lm_head.weight[4:] += 5.0  # make the padding ids the likeliest: they must still never be drawn
    state = torch.random.get_rng_state()
    texts = sample_text(model, tok, "", max_new_tokens=20, num_samples=3, temperature=1.0, top_k=None)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert texts == sample_text(model, tok, "", max_new_tokens=20, num_samples=3, temperature=1.0, top_k=None)
    assert all(t[0] == "\n" and len(t) == 21 and set(t) <= set("abc\n") for t in texts)
    assert sample_text(model, tok, "ab", max_new_tokens=5)[0].startswith("ab") and model.training


@pytest.mark.parametrize("learning_rate", [1e4, 1e30])
def test_a_diverging_run_never_saves_a_non_finite_checkpoint(data_dir, tmp_path, learning_rate):
    """lr 1e4: the val loss grows huge (perplexity inf, no crash); lr 1e30: it goes NaN and the run stops at that
    eval, naming the step, with the last good checkpoint left the latest."""
    cfg = tiny_config(optim=dict(learning_rate=learning_rate, min_lr=1.0), train=dict(eval_interval=2, max_iters=8))
    tracker = JsonlTracker(tmp_path / "out" / "metrics.jsonl")
    try:
        run(cfg, data_dir, tmp_path / "out", tracker=tracker)
    except NonFiniteError as e:
        assert str(e).startswith("step ")
    for step, path in checkpoint_dirs(tmp_path / "out"):
        ckpt = load_checkpoint(path)
        assert math.isfinite(ckpt.extra["val_loss"]), step
        assert all(torch.isfinite(t).all() for t in ckpt.model_state.values()), step
    assert all(r.get("val_perplexity") is None or r["val_perplexity"] >= 0 for r in tracker.read())
