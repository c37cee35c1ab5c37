"""The GPU path of the plain nanogpt loop, measured in one run: no Ray, no MLflow (torch, numpy, pyyaml,
safetensors and tiktoken are all it imports).

    PYTHONPATH=. python3 bench/bench_gpu.py --out $OUT/bench_gpu.json        # on a GPU; ~3 min expected on an H200
    PYTHONPATH=. python3 bench/bench_gpu.py --tiny                           # every section, small shapes, on a CPU

The exact command for the lent H200 (device tool, from the repository root; nothing to install):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 bench/bench_gpu.py --out $OUT/bench_gpu.json 2>&1 | tee $OUT/bench_gpu.log

What it runs, in order, each part under its own time limit (`LIMITS`, seconds, on a GPU; a part stops at its limit
after the step in flight and reports what it measured). The limits add up to 5.5 minutes, plus ~30 s for the rest,
so one rerun fits in 15 minutes of device time. Expected on an H200: ~3 minutes, torch.compile the only long part
(40-90 s). Not measured yet: this script was written without a GPU; its --tiny run is what the tests check.
  data        random but learnable token shards (phrases of GPT-2 token ids drawn from a fixed set, repeated), written
              with nanogpt.data.shards.write_shard + a manifest and read back through shards.verify / load_split
  throughput  GPT-2 124M (block 1024, vocab 50304, bias off), 12 x 1024 tokens per micro-batch, 4 micro-steps per
              update, fused AdamW, grad clip 1.0: (a) eager fp32 with TF32 matmuls, (b) eager bf16 autocast,
              (c) bf16 + torch.compile; tokens/s, MFU against the device's dense peak (nanogpt.metrics), peak memory.
              Then (c') the compiled model with the per-update host read moved off the update (below)
  bf16 loss   20 updates of the same initial weights on the same batches in bf16 autocast and in plain fp32 (TF32
              off), the per-step losses side by side
  generation  greedy decoding (temperature 0) of 256 tokens after a 16-token prompt, with and without the KV cache
              (bounded by its size: seconds): identical tokens required, tokens/s
  XL step     a GPT-2 XL-shaped model (48 layers, 25 heads, 1600 wide: 1.56B parameters, random weights) in bf16,
              8 x 1024 tokens per update: step time, tokens/s, MFU, peak memory
  FSDP        train.parallel=fsdp through nanogpt.train.loop on one rank (nccl on CUDA, gloo on a CPU), a 4-layer model
              in bf16: 6 updates with sharded checkpoints at 3 and 6, updates 3-5 again resumed from the one at 3,
              and the same run with ddp; the GPU-only paths of FSDP (nccl, bf16 mixed precision, fused AdamW over
              DTensors, DCP writes from GPU memory) checked once. Resumed losses equal on a CPU; on a GPU the
              embedding backward's atomics make them merely close, so the differences are printed

Each update is the training loop's own: nanogpt.train.step.compute_gradients + read_stats + apply_update, with lr_at's
warmup, as nanogpt.train.loop runs them; evals and checkpoints are left out (a 124M checkpoint is 1.5 GB and an XL one
19 GB of writes, which measure the disk, not the step).

bf16 against fp32: the per-step losses must agree within REL_BF16 = 2e-2 relative. bf16 keeps 8 significant bits:
each rounding of a matmul input is off by at most 2^-9 (0.2%), accumulation stays fp32, and the loss is a mean over
12,288 token losses, so independent roundings mostly cancel; what is left is the drift of 20 AdamW updates made
from slightly different gradients. 2% allows that drift to compound over the 20 steps while a broken mixed-precision
path (weights or optimizer state kept in bf16, the loss computed from bf16 logits without fp32 accumulation) moves
the loss curve by more as training goes on. The run prints the measured maximum, to tighten the bound once there
are numbers from GPUs.

What could hold the loop back on a GPU, and what this bench checks (hypotheses until measured):
- The per-update host sync. read_stats (`stats.tolist()`) waits for the update's forward and backward to finish,
  because the non-finite policy must decide before the optimizer step whether to apply it. The GPU then idles from
  the end of the backward until the host has launched the AdamW kernels and the next forward: a few hundred
  microseconds of Python per update. With 4 micro-steps of 12 x 1024 tokens (~0.1 s of GPU work per update for
  124M in bf16) that is under 1%; with nanoGPT's 40 micro-steps per update it vanishes. (c') measures it: the same
  compiled model with the statistics read every 10 updates instead. The loop is left as is unless (c') shows a
  gap worth a change. The change would keep the non-finite check exact: the read made one update late through a
  non-blocking copy to pinned memory and an event, the update skipped on the device when its step is not finite
  (fused AdamW's found_inf, as GradScaler does), with a device counter so that every update after the one that
  exhausts train.max_nonfinite_skips is skipped too; the host then stops with the weights of that step.
- Kernel launches in eager mode: GPT-2 124M runs ~20 kernels per layer per micro-step; at 12 x 1024 tokens the
  kernels are long enough that launch overhead is small, and torch.compile fuses the elementwise work (LayerNorm,
  GELU, residual adds): (b) against (c) measures it.
- Host work per micro-batch: 12 window reads from the memory-mapped shard, a pinned copy and a non-blocking
  transfer, overlapped with the previous micro-step's forward (step.py fetches the next micro-batch before the
  backward). MFU estimation and logging run every log_interval on the host only (no device work).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python3 bench/bench_gpu.py` from the repo root

from nanogpt import metrics  # noqa: E402
from nanogpt.config import Config, OptimConfig  # noqa: E402
from nanogpt.data import shards  # noqa: E402
from nanogpt.data.windows import TokenWindows  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402
from nanogpt.train.devices import Precision  # noqa: E402
from nanogpt.train.local_reporter import LocalReporter  # noqa: E402
from nanogpt.train.loop import TrainContext, train  # noqa: E402
from nanogpt.train.parallel import SingleProcess  # noqa: E402
from nanogpt.train.schedule import lr_at  # noqa: E402
from nanogpt.train.step import StepStats, apply_update, compute_gradients, read_stats  # noqa: E402

log = logging.getLogger("bench_gpu")

REL_BF16 = 2e-2  # see the module docstring
# seconds: a and b each get "throughput", c (compilation included) "compile", c' "sync"; 330 s in all, the rest of
# the run (start-up, data, generation, FSDP) ~30 s on an H200
LIMITS = {"throughput": 30, "compile": 150, "sync": 20, "bf16 loss": 40, "XL step": 60}
OPTIM = OptimConfig(learning_rate=6e-4, warmup_iters=10, lr_decay_iters=10_000, min_lr=6e-5)
GPT2_VOCAB = 50257  # the token ids the data uses; the model's 50304 pads it to a multiple of 64


@dataclass(frozen=True)
class Shapes:
    model: GPTConfig
    xl: GPTConfig
    batch_size: int
    micro_steps: int
    xl_batch_size: int
    steps: int
    """Timed updates per throughput configuration, after `warmup`."""
    warmup: int
    loss_steps: int
    prompt_tokens: int
    new_tokens: int
    data_tokens: int
    data_vocab: int
    limits: dict[str, float]
    """Seconds per part (LIMITS on a GPU; on a shared CPU the tiny run is bounded by its sizes alone)."""


FULL = Shapes(
    model=GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=False),
    xl=GPTConfig(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50304, bias=False),
    batch_size=12, micro_steps=4, xl_batch_size=8, steps=10, warmup=3, loss_steps=20, prompt_tokens=16,
    new_tokens=256, data_tokens=8_000_000, data_vocab=GPT2_VOCAB, limits=LIMITS,
)
TINY = Shapes(
    model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=128, bias=False),
    xl=GPTConfig(n_layer=3, n_head=5, n_embd=80, block_size=32, vocab_size=128, bias=False),
    batch_size=4, micro_steps=2, xl_batch_size=2, steps=3, warmup=1, loss_steps=20, prompt_tokens=4,
    new_tokens=20, data_tokens=50_000, data_vocab=100, limits={name: 3600 for name in LIMITS},
)


# ------------------------------------------------------------------------------------------ data


def write_data(out: Path, shapes: Shapes, seed: int = 0) -> TokenWindows:
    """Train/val shards of phrases (8-64 random token ids each, 2,048 of them) strung together at random: random
    ids, yet a model can learn to continue a phrase, so the loss moves within 20 updates. Returns the train
    windows, read back the way the loop reads them."""
    rng = np.random.default_rng(seed)
    phrases = [rng.integers(0, shapes.data_vocab, rng.integers(8, 65)) for _ in range(2048)]
    splits = {}
    for split, num_tokens in (("train", shapes.data_tokens), ("val", shapes.data_tokens // 10)):
        picks = rng.integers(0, len(phrases), num_tokens // 20)  # 36 tokens a phrase on average: ~1.8x enough
        tokens = np.concatenate([phrases[i] for i in picks])[:num_tokens]
        info = shards.write_shard(out / shards.shard_name(split, 0), tokens, shapes.data_vocab)
        splits[split] = shards.SplitInfo(shards=[info], num_tokens=len(tokens), num_documents=1)
    shards.write_manifest(out, shards.Manifest(
        tokenizer={"name": "random-phrases", "vocab_size": shapes.data_vocab}, vocab_size=shapes.data_vocab,
        dtype=shards.dtype_for_vocab(shapes.data_vocab).name, splits=splits,
        split_rule={"split": "tail", "val_fraction": 0.1}, input_fingerprint="bench_gpu", settings_fingerprint="bench",
    ))
    shards.verify(out)
    return TokenWindows(shards.load_split(out, "train"), shapes.model.block_size)


# ------------------------------------------------------------------------------------------ timed updates


@dataclass
class Run:
    """What a sequence of updates measured."""

    losses: list[float]
    seconds_per_step: float | None
    """Median over the timed updates (or mean when the statistics are read late); None if none was timed."""
    first_step_s: float
    peak_memory_gib: float | None
    num_timed: int


def run_updates(model: torch.nn.Module, precision: Precision, windows: TokenWindows, shapes: Shapes, *,
                batch_size: int, micro_steps: int, num_steps: int, warmup: int, limit_s: float,
                read_every: int = 1) -> Run:
    """`num_steps` updates of the loop (warmup ones untimed). read_every=1 is the loop: statistics read before
    each update. read_every=k applies every update unread and reads the statistics k at a time (timing only)."""
    optimizer = unwrap(model).configure_optimizers(0.1, OPTIM.learning_rate, (0.9, 0.95), precision.device_type)
    scaler = torch.amp.GradScaler(precision.device_type, enabled=False)
    strategy, losses, pending, times = SingleProcess(), [], [], []
    reset_peak_memory(precision)
    deadline, timed_from = time.perf_counter() + limit_s, None
    for step in range(num_steps):
        if step == warmup:
            synchronize(precision)
            timed_from = time.perf_counter()
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, OPTIM)
        stats = compute_gradients(model, optimizer, windows, step, seed=1337, batch_size=batch_size,
                                  accumulation=micro_steps, strategy=strategy, precision=precision, scaler=scaler,
                                  grad_clip=1.0)
        if read_every == 1:  # the loop: the non-finite check reads the statistics before the update
            read = read_stats(stats, 1)
            apply_update(optimizer, scaler, read)
            losses.append(read.loss)
        else:
            apply_update(optimizer, scaler, StepStats(math.nan, math.nan, finite=True))
            pending.append(stats)
            if len(pending) == read_every or step == num_steps - 1:
                losses += [read_stats(p, 1).loss for p in pending]
                pending = []
        if step == 0:
            synchronize(precision)  # the first update's time, compilation included
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > deadline and step + 1 < num_steps:
            log.warning("stopped after %d of %d updates: the part's %ds limit", step + 1, num_steps, limit_s)
            break
    losses += [read_stats(p, 1).loss for p in pending]
    synchronize(precision)
    timed = times[warmup:]
    if read_every == 1:
        per_step = statistics.median(timed) if timed else None
    else:
        per_step = (time.perf_counter() - timed_from) / len(timed) if timed else None
    return Run(losses, per_step, times[0], peak_memory_gib(precision), len(timed))


def throughput_row(name: str, model: GPT, run: Run, precision: Precision, tokens_per_step: int) -> dict:
    """One line of the table: tokens/s, MFU against the device's peak for the precision, peak memory."""
    row = {"config": name, "ms_per_step": None, "tokens_per_s": None, "mfu": None, "first_step_s": run.first_step_s,
           "peak_memory_gib": run.peak_memory_gib, "timed_steps": run.num_timed}
    if run.seconds_per_step:
        row["ms_per_step"] = run.seconds_per_step * 1000
        row["tokens_per_s"] = tokens_per_step / run.seconds_per_step
        peak = device_peak(precision)
        if peak is not None:
            row["mfu"] = metrics.mfu(model.flops_per_token() * tokens_per_step, run.seconds_per_step, peak)
    return row


# ------------------------------------------------------------------------------------------ the parts


def part_throughput(device: str, shapes: Shapes, windows: TokenWindows, compile_backend: str) -> list[dict]:
    tokens = shapes.batch_size * shapes.model.block_size * shapes.micro_steps
    common = dict(batch_size=shapes.batch_size, micro_steps=shapes.micro_steps, num_steps=shapes.warmup + shapes.steps,
                  warmup=shapes.warmup)
    rows = []
    for name, dtype, compiled in (("a. fp32 + TF32, eager", torch.float32, False),
                                  ("b. bf16, eager", torch.bfloat16, False),
                                  ("c. bf16 + torch.compile", torch.bfloat16, True)):
        precision = Precision(device, dtype)
        set_tf32(precision, True)
        model = fresh_model(shapes.model, device)
        trained = torch.compile(model, backend=compile_backend) if compiled else model
        run = run_updates(trained, precision, windows, shapes, **common,
                          limit_s=shapes.limits["compile" if compiled else "throughput"])
        rows.append(throughput_row(name, model, run, precision, tokens))
        log.info("%s: %s", name, _fmt(rows[-1]))
        if compiled:  # c': the same compiled model, the statistics read every 10 updates instead of every one
            run = run_updates(trained, precision, windows, shapes, **common, limit_s=shapes.limits["sync"], read_every=10)
            rows.append(throughput_row("c'. c, stats read every 10 updates", model, run, precision, tokens))
            log.info("%s: %s", rows[-1]["config"], _fmt(rows[-1]))
        del model, trained
        free_memory(device)
    return rows


def part_bf16_loss(device: str, shapes: Shapes, windows: TokenWindows) -> dict:
    """The same initial weights and batches, 20 updates in bf16 autocast and in plain fp32 (TF32 off)."""
    base = fresh_model(shapes.model, device)
    common = dict(batch_size=shapes.batch_size, micro_steps=1, num_steps=shapes.loss_steps, warmup=0,
                  limit_s=shapes.limits["bf16 loss"] / 2)
    curves = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        precision = Precision(device, dtype)
        set_tf32(precision, False)
        model = copy.deepcopy(base)
        curves[name] = run_updates(model, precision, windows, shapes, **common).losses
        del model
    n = min(len(curves["fp32"]), len(curves["bf16"]))
    rel = [abs(b - a) / abs(a) for a, b in zip(curves["fp32"][:n], curves["bf16"][:n])]
    free_memory(device)
    return {**curves, "max_rel_diff": max(rel), "tolerance": REL_BF16, "ok": max(rel) <= REL_BF16 and n > 0}


def part_generation(device: str, shapes: Shapes, windows: TokenWindows) -> dict:
    """Greedy decoding, fp32 (TF32 off: ties decided on the same logits), with and without the KV cache."""
    set_tf32(Precision(device, torch.float32), False)
    model = fresh_model(shapes.model, device).eval()
    x, _ = windows.train_batch(seed=0, step=0, g=0, batch_size=1)
    idx = torch.from_numpy(x[:, :shapes.prompt_tokens]).to(device)
    out, seconds = {}, {}
    for use_cache in (True, False):
        with torch.inference_mode():
            model.generate(idx, 4, temperature=0.0, use_cache=use_cache)  # warm-up
            synchronize_device(device)
            start = time.perf_counter()
            out[use_cache] = model.generate(idx, shapes.new_tokens, temperature=0.0, use_cache=use_cache)
            synchronize_device(device)
            seconds[use_cache] = time.perf_counter() - start
    free_memory(device)
    return {"cached_tokens_per_s": shapes.new_tokens / seconds[True],
            "uncached_tokens_per_s": shapes.new_tokens / seconds[False],
            "speedup": seconds[False] / seconds[True], "identical": bool(torch.equal(out[True], out[False])),
            "new_tokens": shapes.new_tokens}


def part_xl(device: str, shapes: Shapes, windows: TokenWindows) -> dict:
    """One XL-shaped model in bf16, built on the device (its block size is the 124M's: the same windows)."""
    precision = Precision(device, torch.bfloat16)
    set_tf32(precision, True)
    model = fresh_model(shapes.xl, device)
    run = run_updates(model, precision, windows, shapes, batch_size=shapes.xl_batch_size, micro_steps=1,
                      num_steps=2 + 5, warmup=2, limit_s=shapes.limits["XL step"])
    row = throughput_row("GPT-2 XL shape, bf16 eager", model, run, precision,
                         shapes.xl_batch_size * shapes.xl.block_size)
    row["num_params"] = model.get_num_params()
    del model
    free_memory(device)
    return row


def part_fsdp(device: str, data_dir: Path, tiny: bool) -> dict:
    """One rank of FSDP through the training loop, checkpointed, resumed, and against ddp (see the docstring)."""
    import torch.distributed as dist

    width = dict(n_layer=2, n_head=2, n_embd=32) if tiny else dict(n_layer=4, n_head=4, n_embd=256)
    config = Config.from_dict({
        "model": dict(**width, block_size=32 if tiny else 256, dropout=0.0, vocab_size=128 if tiny else 50304),
        "train": dict(batch_size=4, gradient_accumulation_steps=2, max_iters=6, eval_interval=3, eval_iters=2,
                      device=device, dtype="bfloat16", parallel="fsdp", seed=1337),
        "optim": dict(learning_rate=1e-3, warmup_iters=2, lr_decay_iters=6, min_lr=1e-4), "run": dict(num_to_keep=None)})
    with tempfile.TemporaryDirectory(prefix="bench-gpu-fsdp-") as tmp:
        out = Path(tmp)
        dist.init_process_group("nccl" if on_cuda(device) else "gloo", init_method=f"file://{out / 'store'}",
                                rank=0, world_size=1)
        try:
            ctx = TrainContext(device=device)
            full = train(config, str(data_dir), ctx, LocalReporter(out / "full"))
            resumed = train(config, str(data_dir), ctx, LocalReporter(out / "part"),
                            resume_from=str(out / "full" / "checkpoint_000003"))
            ddp = train(config.replace(train__parallel="ddp"), str(data_dir), ctx, LocalReporter(out / "ddp"))
            layout = sorted(p.name for p in (out / "full" / "checkpoint_000006" / "model").iterdir())
        finally:
            dist.destroy_process_group()
    rel = lambda a, b: max(abs(x - y) / abs(y) for x, y in zip(a, b))  # noqa: E731
    free_memory(device)
    return {"fsdp": full.losses, "resumed": resumed.losses, "ddp": ddp.losses, "sharded_files": layout,
            "resume_max_rel_diff": rel(resumed.losses, full.losses[3:]), "ddp_max_rel_diff": rel(full.losses, ddp.losses),
            "ok": all(math.isfinite(v) for v in full.losses + resumed.losses) and ".metadata" in layout}


# ------------------------------------------------------------------------------------------ device helpers


def fresh_model(config: GPTConfig, device: str) -> GPT:
    """nanoGPT's initialization, drawn on the device (fast for XL), the same weights for the same seed."""
    torch.manual_seed(0)
    with torch.device(device):
        return GPT(config)


def unwrap(model: torch.nn.Module) -> GPT:
    return getattr(model, "_orig_mod", model)


def on_cuda(device: str) -> bool:
    return torch.device(device).type == "cuda"


def set_tf32(precision: Precision, on: bool) -> None:
    precision.activate()  # the device index and the loop's TF32 default
    if precision.device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def synchronize(precision: Precision) -> None:
    synchronize_device(precision.device)


def synchronize_device(device: str) -> None:
    if on_cuda(device):
        torch.cuda.synchronize()


def reset_peak_memory(precision: Precision) -> None:
    if precision.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(precision: Precision) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if precision.device_type == "cuda" else None


def free_memory(device: str) -> None:
    if on_cuda(device):
        torch.cuda.empty_cache()


def device_peak(precision: Precision) -> float | None:
    if precision.device_type != "cuda":
        return None
    return metrics.peak_flops(torch.cuda.get_device_name(torch.device(precision.device)), precision.mfu_dtype)


# ------------------------------------------------------------------------------------------ report


def _fmt(row: dict) -> str:
    def num(key: str, spec: str) -> str:
        value = row.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    return (f"{num('ms_per_step', '.1f')} ms/update, {num('tokens_per_s', ',.0f')} tokens/s, MFU "
            f"{num('mfu', '.1%')}, peak {num('peak_memory_gib', '.2f')} GiB, first update "
            f"{num('first_step_s', '.1f')} s, {row.get('timed_steps')} timed")


def print_report(results: dict) -> None:
    print(f"\n== bench_gpu: {results['device_name']}, torch {results['torch']}, {results['shapes']} shapes")
    print("== throughput (GPT-2 124M shape)")
    print(f"{'config':38s} {'ms/update':>10s} {'tokens/s':>12s} {'MFU %':>7s} {'peak GiB':>9s} {'1st s':>7s}")
    for row in results["throughput"] + [results["xl_step"]]:
        cells = [row.get("ms_per_step"), row.get("tokens_per_s"), row.get("mfu"), row.get("peak_memory_gib"),
                 row.get("first_step_s")]
        specs = [".1f", ",.0f", ".1f", ".2f", ".1f"]
        scales = [1, 1, 100, 1, 1]
        text = ["n/a" if c is None else format(c * k, s) for c, s, k in zip(cells, specs, scales)]
        print(f"{row['config']:38s} {text[0]:>10s} {text[1]:>12s} {text[2]:>7s} {text[3]:>9s} {text[4]:>7s}")
    loss = results["bf16_loss"]
    print(f"== bf16 vs fp32 loss, {len(loss['bf16'])} updates: max relative difference {loss['max_rel_diff']:.2e} "
          f"(tolerance {loss['tolerance']:.0e}): {'ok' if loss['ok'] else 'FAIL'}")
    print("   fp32 " + " ".join(f"{v:.4f}" for v in loss["fp32"]))
    print("   bf16 " + " ".join(f"{v:.4f}" for v in loss["bf16"]))
    gen = results["generation"]
    print(f"== generation, greedy, {gen['new_tokens']} new tokens: cached {gen['cached_tokens_per_s']:,.1f} tokens/s, "
          f"uncached {gen['uncached_tokens_per_s']:,.1f} tokens/s ({gen['speedup']:.1f}x); identical tokens: "
          f"{gen['identical']}")
    xl = results["xl_step"]
    print(f"== XL step: {xl.get('num_params', 0) / 1e6:,.1f}M parameters, {_fmt(xl)}")
    fsdp = results["fsdp"]
    print(f"== FSDP, 1 rank, bf16: {'ok' if fsdp['ok'] else 'FAIL'}; losses {' '.join(f'{v:.4f}' for v in fsdp['fsdp'])}; "
          f"resumed from step 3 max rel diff {fsdp['resume_max_rel_diff']:.1e}; against ddp {fsdp['ddp_max_rel_diff']:.1e}; "
          f"shards {' '.join(fsdp['sharded_files'])}")
    print(f"== total {results['seconds']:.0f} s")


def timed_part(name: str, results: dict, fn: Callable[[], object]) -> None:
    start = time.perf_counter()
    log.info("-- %s", name)
    results[name.replace(" ", "_")] = fn()
    results.setdefault("part_seconds", {})[name] = time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes, on the CPU unless --device says otherwise")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend for (c): inductor (default), or aot_eager/eager to check tracing only")
    parser.add_argument("--out", help="write every number as JSON here too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("nanogpt").setLevel(logging.WARNING)
    shapes, device = (TINY, args.device or "cpu") if args.tiny else (FULL, args.device or "cuda")
    if on_cuda(device) and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --tiny (or --device=cpu)")
    start = time.perf_counter()
    results: dict = {"torch": torch.__version__, "shapes": "tiny" if args.tiny else "full", "device": device,
                     "device_name": torch.cuda.get_device_name() if on_cuda(device) else "cpu"}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        windows = write_data(Path(tmp), shapes)
        timed_part("throughput", results, lambda: part_throughput(device, shapes, windows, args.compile_backend))
        timed_part("bf16 loss", results, lambda: part_bf16_loss(device, shapes, windows))
        timed_part("generation", results, lambda: part_generation(device, shapes, windows))
        timed_part("xl step", results, lambda: part_xl(device, shapes, windows))
        timed_part("fsdp", results, lambda: part_fsdp(device, Path(tmp), args.tiny))
    results["seconds"] = time.perf_counter() - start
    print_report(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    ok = results["bf16_loss"]["ok"] and results["generation"]["identical"] and results["fsdp"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
