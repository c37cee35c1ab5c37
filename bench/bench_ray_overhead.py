"""Ray Train's overhead on the training loop: the shakespeare_char_cpu preset in the plain loop and inside Ray Train
(pipelines/pretrain.py) on 1 and 2 workers, side by side, under the same machine load.

    .venv/bin/python bench/bench_ray_overhead.py --input ../shared/data/tinyshakespeare/input.txt
    .venv/bin/python bench/bench_ray_overhead.py --data-dir data/shakespeare_char --iters 150 --repeat 2 --threads 2

The plain loop runs in a fresh process (not the Ray driver, whose background threads would slow it down).
ms/iter is the median time between consecutive optimizer updates after --warmup updates, taken from the loop's
on_step hook in the process that runs the loop (bench/bench_train.py's run_plain; inside Ray, rank 0's worker), so
Ray's startup, worker-group creation and checkpoint upload are excluded and what remains is the per-step cost of
running under Ray (DDP all-reduce over gloo with 2 workers). Evaluations are outside the timed updates (eval at
the start and the end only).

Threads: the plain loop uses --threads torch threads; a 1-worker Ray run reserves --threads CPUs for its worker
(Ray sets OMP_NUM_THREADS, hence torch's threads, to the worker's CPUs); with 2 workers each gets --threads / 2.
Tokens per step stay the preset's 768 (12 x 64) everywhere: the 2-worker run splits each step into 2 micro-batches
of 6 sequences, one per worker (batch_size=6, gradient_accumulation_steps=2).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from the repo root

from bench.bench_train import prepare_char_shards, run_plain  # noqa: E402
from nanogpt.config import Config, load_config  # noqa: E402
from pipelines.pretrain import PRESET_DIR, pretrain  # noqa: E402
from pipelines.ray_adapter.session import init_ray  # noqa: E402

log = logging.getLogger("bench_ray_overhead")


@dataclass
class StepTimes:
    """An on_step hook: rank 0 appends `step perf_counter()` after every update to `path` (a local file)."""

    path: str

    def __call__(self, step: int, metrics: dict) -> None:
        import ray.train

        if ray.train.get_context().get_world_rank() == 0:
            with open(self.path, "a") as f:
                f.write(f"{step} {time.perf_counter()!r}\n")

    @staticmethod
    def read(path: str | Path) -> dict[int, float]:
        """{step: time}; a step written twice (after a restart): the last wins."""
        return {int(a): float(b) for a, b in (line.split() for line in Path(path).read_text().splitlines())}


def run_ray(config: Config, data_dir: Path, out_dir: Path, name: str, num_workers: int, cpus_per_worker: float,
            iters: int, warmup: int) -> dict:
    """Time `iters` updates of a Ray Train run after `warmup`, as run_plain does, from rank 0's on_step times."""
    total = warmup + iters
    if num_workers > 1:  # same tokens per step: one micro-batch of batch_size / num_workers per worker
        config = config.replace(train__batch_size=config.train.batch_size // num_workers,
                                train__gradient_accumulation_steps=num_workers)
    config = config.replace(
        train__max_iters=total, optim__lr_decay_iters=max(config.optim.lr_decay_iters, total),
        # Ray's overhead alone: MLflow off (its tracker is measured by nothing here; metrics.jsonl stays on)
        run__tracker="none", run__num_workers=num_workers, run__cpus_per_worker=cpus_per_worker, run__name=name,
        run__out_dir=str(out_dir), data__dir=str(data_dir),
    )
    stamps_file = out_dir / f"{name}.step_times"
    start = time.perf_counter()
    outcome = pretrain(config, on_step=[StepTimes(str(stamps_file))])
    wall = time.perf_counter() - start
    stamps = StepTimes.read(stamps_file)  # step -> perf_counter after that update
    evals = set(range(0, total + 1, config.train.eval_interval))
    dts = [stamps[i] - stamps[i - 1] for i in range(max(warmup, 1), total) if i not in evals]
    tokens_per_step = config.train.batch_size * config.model.block_size * config.train.gradient_accumulation_steps
    median = statistics.median(dts)
    return {"ms_per_iter": median * 1000, "tokens_per_s": tokens_per_step / median,
            "mean_ms_per_iter": statistics.fmean(dts) * 1000, "iters_timed": len(dts), "wall_s": wall,
            "torch_threads": outcome.summary["torch_threads"], "val_loss": outcome.summary["val_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="prepared char shards of Tiny Shakespeare")
    parser.add_argument("--input", default=os.environ.get("NANOGPT_TINYSHAKESPEARE"),
                        help="Tiny Shakespeare input.txt (default: $NANOGPT_TINYSHAKESPEARE)")
    parser.add_argument("--iters", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="CPUs for the loop: plain torch threads, Ray CPUs")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of (plain, Ray 1 worker, Ray 2 workers)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to time")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("nanogpt", "ray", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    worker_counts = [int(w) for w in args.workers.split(",")]

    config = load_config("shakespeare_char_cpu", ["--train.eval_interval=1000000000"], search_dirs=[PRESET_DIR])
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        if args.data_dir:
            data_dir = Path(args.data_dir).resolve()
        elif args.input:
            data_dir = prepare_char_shards(Path(args.input).read_text(encoding="utf-8"), Path(tmp) / "data")
        else:
            parser.error("pass --data-dir, --input or set NANOGPT_TINYSHAKESPEARE")
        init_ray(num_cpus=args.threads)
        runs: dict[str, list[dict]] = {"plain loop": [], **{f"Ray Train, {w} worker(s)": [] for w in worker_counts}}
        for round_ in range(args.repeat):  # alternate, so a change in machine load hits every mode
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
                runs["plain loop"].append(pool.submit(run_plain, config, data_dir, args.iters, args.warmup).result())
            for w in worker_counts:
                runs[f"Ray Train, {w} worker(s)"].append(run_ray(
                    config, data_dir, Path(tmp) / "runs", f"bench-{round_}-{w}", w, args.threads / w,
                    args.iters, args.warmup))
    plain = statistics.median(r["ms_per_iter"] for r in runs["plain loop"])
    log.info("torch %s, %d CPUs for the loop, load average %.2f, %d timed iters after %d warm-up",
             torch.__version__, args.threads, os.getloadavg()[0], args.iters, args.warmup)
    log.info("%-26s %10s %12s %10s %10s %8s", "", "ms/iter", "tokens/s", "mean ms", "overhead", "threads")
    for name, results in runs.items():
        for r in results:
            overhead = f"{(r['ms_per_iter'] / plain - 1) * 100:+.1f}%"
            log.info("%-26s %10.1f %12s %10.1f %10s %8s", name, r["ms_per_iter"], f"{r['tokens_per_s']:,.0f}",
                     r["mean_ms_per_iter"], overhead, r.get("torch_threads", torch.get_num_threads()))
    for w in worker_counts:
        ray_ms = statistics.median(r["ms_per_iter"] for r in runs[f"Ray Train, {w} worker(s)"])
        log.info("Ray Train %d worker(s) vs plain loop (medians): %+.1f%%", w, (ray_ms / plain - 1) * 100)


if __name__ == "__main__":
    main()
