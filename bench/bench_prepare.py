"""Throughput of pipelines/prepare.py (Ray Data) on 1 and 2 CPUs against a single-process tiktoken loop.

    NANOGPT_TINYSHAKESPEARE=/path/input.txt TIKTOKEN_CACHE_DIR=/path/tiktoken_cache \
        python bench/bench_prepare.py [--mb 200] [--files 16] [--cpus 1 2] [--shard-size 100000000]

The corpus: Tiny Shakespeare's paragraphs (split on blank lines), repeated until --mb megabytes and shuffled
(seeded), written as --files text files into a temporary directory; prepare.py reads them with separator "\\n\\n"
and the default tail split. The baseline tokenizes the same documents, already in memory, with tiktoken's
`encode_ordinary` in one process (so it pays no reading, splitting or writing), before and after the pipelines;
the ratio is against it. A second line also keeps the tokens (as any prepare must). The corpus repeats paragraphs, so
the pipeline runs with dedup off (--data.dedup=false): both sides tokenize every document, and a run whose token
count differs from the baseline's stops with an error instead of printing a ratio of unequal work.
Each pipeline run gets a fresh Ray instance limited to N CPUs, its workers at the baseline's niceness (Ray's default
is 15), and a warm-up run on a tiny corpus (worker processes started, tiktoken loaded, as on any run but the first);
its time is then the whole prepare() call: scheduling, reading, tokenizing, shards, sha256, manifest.
Goal: >= 1.8x the single process with 2 CPUs (issue 30; the limit is 2x).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanogpt.config import DataConfig  # noqa: E402
from nanogpt.data.corpus import resolve_named_corpus  # noqa: E402


def make_corpus(root: Path, megabytes: float, num_files: int, seed: int = 0) -> list[str]:
    """Write the shuffled, repeated paragraphs as files; return the documents in the pipeline's order."""
    paragraphs = [p for p in resolve_named_corpus("tinyshakespeare").read_text().split("\n\n") if p]
    size = sum(len(p.encode()) + 2 for p in paragraphs)
    repeats = int(np.ceil(megabytes * 1e6 / size))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(paragraphs) * repeats) % len(paragraphs)
    docs = [paragraphs[i] for i in order]
    for i, part in enumerate(np.array_split(np.arange(len(docs)), num_files)):
        (root / f"part_{i:03d}.txt").write_text("\n\n".join(docs[j] for j in part))
    return docs


def single_process(docs: list[str], keep: bool = False) -> tuple[int, float]:
    """tiktoken's encode_ordinary over the documents: counting the tokens only, or (keep) also keeping them as
    one uint16 array, the least a single-process prepare must do (nanoGPT's does np.array(ids, dtype=np.uint16))."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    start = time.perf_counter()
    if keep:
        num_tokens = np.concatenate([np.array(enc.encode_ordinary(d), dtype=np.uint16) for d in docs]).size
    else:
        num_tokens = sum(len(enc.encode_ordinary(d)) for d in docs)
    return num_tokens, time.perf_counter() - start


def pipeline(corpus: Path, out: Path, num_cpus: int, shard_size: int) -> tuple[int, float]:
    import ray

    from pipelines.prepare import prepare

    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    # Ray starts its workers at niceness 15: on a shared machine they would yield to every other process while the
    # baseline runs at 0. Same priority for both sides, or the ratio measures the neighbours.
    os.environ["RAY_worker_niceness"] = "0"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
             logging_level=logging.WARNING)
    try:
        # Warm up: start the worker processes and load tiktoken in each, as any run after the first finds them.
        warm = corpus.parent / "warmup"
        warm.mkdir(exist_ok=True)
        for i in range(2 * num_cpus):
            (warm / f"w{i}.txt").write_text("Warm up the workers.\n\n" * 1000)
        prepare(DataConfig(input=str(warm), tokenizer="gpt2", separator="\n\n", dedup=False), out, force=True)
        start = time.perf_counter()
        manifest = prepare(DataConfig(input=str(corpus), tokenizer="gpt2", separator="\n\n", shard_size=shard_size,
                                      dedup=False), out, force=True)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    return manifest.num_tokens("train") + manifest.num_tokens("val"), seconds, manifest.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=200.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=100_000_000)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        docs = make_corpus(corpus, args.mb, args.files)
        megabytes = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
        header = f"corpus: {megabytes:,.1f} MB in {args.files} files, {len(docs):,} documents; {os.cpu_count()} cores"

        base_tokens, before_s = single_process(docs)
        rows = []
        for cpus in args.cpus:
            tokens, seconds, stats = pipeline(corpus, work / f"out{cpus}", cpus, args.shard_size)
            phases = f"(tokenize {stats['seconds_tokenize']:.1f} s, write shards {stats['seconds_write']:.1f} s)"
            rows.append((f"prepare.py, Ray Data, {cpus} CPU{'s' * (cpus > 1)}", tokens, seconds, phases))
        # The baseline runs before and after the pipelines: on a shared machine, a drift between the two shows load.
        _, after_s = single_process(docs)
        _, keep_s = single_process(docs, keep=True)
        base_s = (before_s + after_s) / 2
        rows.insert(0, ("single process, tiktoken loop", base_tokens, base_s,
                        f"(before {before_s:.1f} s, after {after_s:.1f} s)"))
        rows.insert(1, ("  same, keeping uint16 tokens", base_tokens, keep_s, ""))
        unequal = [(name, tokens) for name, tokens, _, _ in rows[2:] if tokens != base_tokens]
        if unequal:
            raise SystemExit(f"the pipeline wrote other tokens than the baseline counted ({base_tokens:,}): {unequal}")
        base_rate = base_tokens / base_s
        print(header)
        for name, tokens, seconds, phases in rows:  # printed together, after Ray's own logging
            rate = tokens / seconds
            print(f"{name:<34} {tokens:>12,} tokens {seconds:7.2f} s {rate / 1e6:6.2f} M tokens/s "
                  f"{rate / base_rate:5.2f}x {phases}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
