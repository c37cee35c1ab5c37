"""Training-loop speed on nanoGPT's README CPU recipe, next to nanoGPT's own figure on this kind of machine.

    .venv/bin/python bench/bench_train.py --input ../shared/data/tinyshakespeare/input.txt --iters 200
    NANOGPT_TINYSHAKESPEARE=../shared/data/tinyshakespeare/input.txt .venv/bin/python bench/bench_train.py
    .venv/bin/python bench/bench_train.py --data-dir data/shakespeare_char --iters 200 --threads 2
    .venv/bin/python bench/bench_train.py --input ... --full        # the whole 2000-step recipe: val-loss curve too

The recipe (nanoGPT: train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0):
a 0.8M-parameter GPT, bias off and the 65-character vocabulary unpadded as nanoGPT has them, float32, one
micro-batch per step, on Tiny Shakespeare characters split 90/10 as nanoGPT's prepare.py does. nanoGPT measured
47.4 ms/iter (median), about 16.2k tokens/s, on a 2-core CPU machine (../shared/docs/ANCHORS.md).

ms/iter is the median time between consecutive optimizer updates after `--warmup` updates, measured from the
on_step hook, so it covers everything the loop does per step (batch, forward, backward, clip, the non-finite
check, AdamW, logging) and no eval. The same recipe also runs through nanoGPT's own inner loop (random batches,
no per-step sync; `run_nanogpt_loop`), alternating with ours `--repeat` times, so the two are compared under
the same machine load: on a shared 2-core machine that comparison is the meaningful one. Without --data-dir the shards are prepared in this process (char tokenizer,
no Ray) into a temporary directory. `run_plain(config, data_dir, iters)` is importable for other benches.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/bench_train.py` from the repo root

from nanogpt.config import Config, apply_overrides  # noqa: E402
from nanogpt.data import shards  # noqa: E402
from nanogpt.tokenizers import CharTokenizer  # noqa: E402
from nanogpt.train.loop import TrainContext, train  # noqa: E402

log = logging.getLogger("bench_train")

NANOGPT_MS_PER_ITER = 47.4
NANOGPT_TOKENS_PER_S = 16_200
NANOGPT_VAL_CURVE = [4.1649, 2.4447, 2.3141, 2.1905, 2.0528, 2.0089, 1.9225, 1.8921, 1.8857]  # steps 0, 250 .. 2000

RECIPE = {
    "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False, vocab_size=65),
    "optim": dict(learning_rate=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
                  warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4),
    "train": dict(batch_size=12, gradient_accumulation_steps=1, max_iters=2000, eval_interval=250, eval_iters=20,
                  log_interval=10, always_save_checkpoint=False, dtype="float32", device="cpu", compile=False),
}


class DiscardReporter:
    """Drops reports and checkpoints (train() deletes its temporary checkpoint directory after report)."""

    def __init__(self) -> None:
        self.history: list[dict] = []

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.history.append(dict(metrics))


def prepare_char_shards(text: str, out_dir: str | Path, val_fraction: float = 0.1) -> Path:
    """nanoGPT's data/shakespeare_char/prepare.py, into llm.c shards + manifest: chars = sorted(set(text)), the
    first 90% of the characters are train, the rest val."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = CharTokenizer.from_text(text)
    ids = np.array(tok.encode(text), dtype=np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    splits = {}
    for split, tokens in (("train", ids[:n]), ("val", ids[n:])):
        info = shards.write_shard(out / shards.shard_name(split, 0), tokens, tok.vocab_size)
        splits[split] = shards.SplitInfo(shards=[info], num_tokens=len(tokens), num_documents=1)
    shards.write_manifest(out, shards.Manifest(
        tokenizer=tok.to_dict(), vocab_size=tok.vocab_size, dtype=shards.dtype_for_vocab(tok.vocab_size).name,
        splits=splits, split_rule={"split": "tail", "val_fraction": val_fraction}, input_fingerprint="bench",
        settings_fingerprint="bench",
    ))
    return out


def run_plain(config: Config, data_dir: str | Path, iters: int, warmup: int = 10) -> dict:
    """Time `iters` optimizer updates of the plain loop (one process, world size 1) after `warmup` updates.

    Returns ms_per_iter (median), tokens_per_s (from the median), mean_ms_per_iter, val_loss (at the end),
    val_curve [(step, val_loss)], and the run's config as flat dict."""
    total = warmup + iters
    config = config.replace(train__max_iters=total, optim__lr_decay_iters=max(config.optim.lr_decay_iters, total),
                            optim__warmup_iters=min(config.optim.warmup_iters, config.optim.lr_decay_iters - 1))
    stamps: list[float] = []
    reporter = DiscardReporter()
    result = train(config, str(data_dir), TrainContext(), reporter,
                   on_step=lambda step, metrics: stamps.append(time.perf_counter()))
    # stamps[i] closes update i; update i's time is stamps[i] - stamps[i-1] (no eval runs in between unless
    # eval_interval divides i, and those intervals are dropped)
    evals = {int(m["step"]) for m in reporter.history}
    dts = [stamps[i] - stamps[i - 1] for i in range(max(warmup, 1), len(stamps)) if i not in evals]
    tokens_per_step = config.train.batch_size * config.model.block_size * config.train.gradient_accumulation_steps
    median = statistics.median(dts)
    return {
        "ms_per_iter": median * 1000,
        "tokens_per_s": tokens_per_step / median,
        "mean_ms_per_iter": statistics.fmean(dts) * 1000,
        "iters_timed": len(dts),
        "val_loss": result.val_loss,
        "val_curve": [(int(m["step"]), m["val_loss"]) for m in reporter.history if m.get("val_loss_step") == m["step"]],
        "config": config.to_flat(),
    }


def run_nanogpt_loop(config: Config, data_dir: str | Path, iters: int, warmup: int = 10) -> dict:
    """nanoGPT's train.py inner loop, verbatim in substance, on the same model and shards: a same-machine,
    same-moment reference (the 47.4 ms figure was measured on another day under another load).

    Random batches by torch.randint over the (single) train shard, loss.item() only at log_interval, no eval."""
    from nanogpt.model import GPT, GPTConfig
    from nanogpt.train.loop import lr_at

    mc, tc, oc = config.model, config.train, config.optim
    train_data = shards.load_split(data_dir, "train")[0]
    torch.manual_seed(1337)
    model = GPT(GPTConfig(n_layer=mc.n_layer, n_head=mc.n_head, n_embd=mc.n_embd, block_size=mc.block_size,
                          vocab_size=mc.vocab_size or 65, dropout=mc.dropout, bias=mc.bias))
    optimizer = model.configure_optimizers(oc.weight_decay, oc.learning_rate, (oc.beta1, oc.beta2), "cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    block_size, batch_size, accum = mc.block_size, tc.batch_size, tc.gradient_accumulation_steps

    def get_batch():
        ix = torch.randint(len(train_data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy((train_data[i:i + block_size]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((train_data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
        return x, y

    X, Y = get_batch()
    dts = []
    t0 = time.perf_counter()
    for iter_num in range(warmup + iters):
        lr = lr_at(iter_num, oc)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for _ in range(accum):
            _, loss = model(X, Y)
            loss = loss / accum
            X, Y = get_batch()
            scaler.scale(loss).backward()
        if oc.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        if iter_num >= warmup:
            dts.append(t1 - t0)
        t0 = t1
        if iter_num % tc.log_interval == 0:
            loss.item()
    median = statistics.median(dts)
    tokens_per_step = batch_size * block_size * accum
    return {"ms_per_iter": median * 1000, "tokens_per_s": tokens_per_step / median,
            "mean_ms_per_iter": statistics.fmean(dts) * 1000, "iters_timed": len(dts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="prepared char shards of Tiny Shakespeare")
    parser.add_argument("--input", default=os.environ.get("NANOGPT_TINYSHAKESPEARE"),
                        help="Tiny Shakespeare input.txt (default: $NANOGPT_TINYSHAKESPEARE)")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--full", action="store_true", help="the whole recipe: 2000 steps, evals every 250")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the two loops this many times")
    parser.add_argument("overrides", nargs="*", help="--section.key=value changes to the recipe")
    args, unknown = parser.parse_known_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("nanogpt").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = apply_overrides(Config.from_dict(RECIPE), list(args.overrides) + unknown)
    if not args.full:  # timing only: evaluate at the start and the end, not in between
        config = config.replace(train__eval_interval=10**9)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        if args.data_dir:
            data_dir = Path(args.data_dir)
        elif args.input:
            start = time.perf_counter()
            data_dir = prepare_char_shards(Path(args.input).read_text(encoding="utf-8"), Path(tmp) / "data")
            log.info("prepared char shards in %.2fs", time.perf_counter() - start)
        else:
            parser.error("pass --data-dir, --input or set NANOGPT_TINYSHAKESPEARE")
        iters = 2000 - args.warmup if args.full else args.iters
        start = time.perf_counter()
        runs: dict[str, list[dict]] = {"nanoGPT's loop, same machine": [], "nanogpt.train.loop plain loop": []}
        for _ in range(args.repeat):  # alternate, so a change in machine load hits both
            runs["nanoGPT's loop, same machine"].append(run_nanogpt_loop(config, data_dir, iters, warmup=args.warmup))
            runs["nanogpt.train.loop plain loop"].append(out := run_plain(config, data_dir, iters, warmup=args.warmup))
        wall = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("torch %s, %d threads, %s, load average %.2f", torch.__version__, torch.get_num_threads(),
             os.uname().machine, os.getloadavg()[0])
    log.info("%-30s %10s %12s %10s", "", "ms/iter", "tokens/s", "mean ms")
    log.info("%-30s %10.1f %12s %10s", "nanoGPT (ANCHORS.md)", NANOGPT_MS_PER_ITER, f"{NANOGPT_TOKENS_PER_S:,}", "")
    for name, results in runs.items():
        for r in results:
            log.info("%-30s %10.1f %12s %10.1f", name, r["ms_per_iter"], f"{r['tokens_per_s']:,.0f}", r["mean_ms_per_iter"])
    ours = statistics.median(r["ms_per_iter"] for r in runs["nanogpt.train.loop plain loop"])
    ref = statistics.median(r["ms_per_iter"] for r in runs["nanoGPT's loop, same machine"])
    log.info("median of %d timed iters each; plain loop / nanoGPT's loop: %.3fx; / ANCHORS figure: %.2fx; "
             "peak RSS %.0f MB; wall %.1fs", iters, ours / ref, ours / NANOGPT_MS_PER_ITER, rss_mb, wall)
    if args.full:
        for (step, val), ref in zip(out["val_curve"], NANOGPT_VAL_CURVE):
            log.info("step %4d: val loss %.4f   (nanoGPT %.4f)", step, val, ref)


if __name__ == "__main__":
    main()
