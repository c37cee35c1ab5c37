"""Turn a corpus into token shards with Ray Data: llm.c `.bin` shards plus a manifest, the input of training.

    python pipelines/prepare.py --input data/input.txt --tokenizer char --out data/shakespeare_char
    python pipelines/prepare.py --preset shakespeare --out data/shakespeare          # GPT-2 BPE, 90/10 tail split
    python pipelines/prepare.py --input 'corpus/*.jsonl' --tokenizer gpt2 --out data/c --data.append_eot=true
    python pipelines/prepare.py --preset openwebtext --out s3://bucket/shards/owt    # on a cluster:
    ray job submit --working-dir . -- python pipelines/prepare.py --preset openwebtext --out s3://bucket/shards/owt

Options: --preset <name> (pipelines/configs/data/<name>.yaml), --input, --tokenizer, --out, any --data.key=value
(nanogpt/config.py's DataConfig), --force (rebuild even when the manifest says the output is up to date),
--address / --num-cpus (which Ray to use; by default the running cluster, else a local one).

How the work is divided, and why the output never depends on it:
  1. Driver: list the input files (sorted) or open the HF dataset; fingerprint them and the settings. Lock --out
     (a second prepare into it fails at once, naming this one) and refuse a directory holding files prepare did not
     write; stop here when an existing manifest has the same fingerprints (a no-op rerun).
  2. Ray Data: one row per file (its index, path and listed size); in `map_batches`, each task reads its files whole
     (a path or a URI: nanogpt/data/storage.py), splits them into documents and tokenizes them. Each output row is
     one document keyed by (file index, document index) with its tokens; blocks stay in the object store. A file
     that cannot be read or parsed (gone or changed since it was listed, bad JSON, a missing field) becomes an error
     row, not an exception: the driver reports the first in corpus order, in one line.
     (pipelines/data_prep/documents.py)
  3. Tasks summarize each block as runs of consecutive document keys (a few numbers per block). With data.dedup
     (the default), a task first finds the documents whose text (a 128-bit hash of it) an earlier document in
     corpus order already has, and each block holding some is rewritten without them: no text reaches the shards
     twice, in one split or in both. The driver sorts the runs by key (the corpus order, whatever the block
     boundaries), applies the split rule, and cuts each split's token stream into shards of `shard_size` tokens:
     nanogpt/data/split_plan.py, plain NumPy. (pipelines/data_prep/plan.py)
  4. Tasks write the shards (temp file, fsync, rename) straight from the blocks; the driver writes manifest.json
     last, after removing the old manifest and shards. No token crosses the driver. (pipelines/data_prep/write.py,
     into a directory or an object-store prefix: nanogpt/data/shard_output.py)

The tail split (nanoGPT's Shakespeare rule) cuts the concatenated characters at int(n * (1 - val_fraction)); the one
document holding that point is tokenized again as two halves, like nanoGPT's `data[:i]` / `data[i:]`. The random
split (nanoGPT's openwebtext rule) hashes (seed, file, document) per document. On a multi-node cluster --out must
be a URI (s3://, gs://: each task uploads its shard as one object, nanogpt/data/shard_prefix.py) or a filesystem
every node sees (NFS, FSx): shards are written by the tasks. Parallelism is per file (a file is read and split into
documents by one task), and a Hugging Face dataset goes through
`ray.data.from_huggingface`, which copies its table from the driver into the object store: for corpora beyond
that, point --input at the dataset's parquet or jsonl files.
"""
# ruff: noqa: E402 -- the two sys.path lines below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

# `python pipelines/prepare.py` puts pipelines/ first on sys.path, not the repo root, and `ray job submit
# --working-dir .` may run where the package is not installed: make `import nanogpt, pipelines` work either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from nanogpt.config import ConfigError, DataConfig, load_config
from nanogpt.data.corpus import InputSource, fingerprint, load_hf_dataset, resolve_input
from nanogpt.data.shard_output import ShardOutput, shard_output
from nanogpt.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardError,
    ShardInfo,
    SplitInfo,
    dtype_for_vocab,
    load_manifest,
)
from nanogpt.data.storage import join
from nanogpt.tokenizers import build_tokenizer
from nanogpt.user_errors import USER_ERRORS
from pipelines.ray_adapter.session import init_ray

if TYPE_CHECKING:
    from pipelines.data_prep.plan import PlannedOutput

log = logging.getLogger("nanogpt.prepare")

PRESET_DIR = Path(__file__).resolve().parent / "configs" / "data"
PIPELINE_VERSION = 2
"""Bump when the same settings would produce different shards: it is part of the settings fingerprint."""


@dataclass(frozen=True)
class Request:
    """What was asked for, as the manifest records it: the settings, the input, and the fingerprints of both."""

    data: DataConfig
    source: InputSource
    settings: dict[str, Any]
    input_fingerprint: str
    settings_fingerprint: str


# ------------------------------------------------------------------------------------------ entry points


def prepare(data: DataConfig, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    """Tokenize `data.input` into shards under `out_dir` (a directory or a URI prefix) and return the manifest (Ray
    is started if needed).

    Holds `out_dir`'s lock throughout: a second prepare into it fails at once, naming this one. A no-op returning
    the existing manifest when its input and settings fingerprints match and every shard is still as listed,
    unless `force`. Bad input raises CorpusError (or TokenizerError) and leaves `out_dir` as it was; so does an `out_dir`
    holding files prepare did not write (ShardError): it only ever removes its own shards and temporary files.
    """
    start = time.perf_counter()
    output = shard_output(str(out_dir))
    if data.tokenizer == "char" and data.append_eot:
        raise ConfigError("data.append_eot=true needs an end-of-text token; the char tokenizer has none")
    request, hf_ds = _resolve_request(data)
    with output.lock():
        output.check_owned()
        existing = None if force else _up_to_date(output, request.input_fingerprint, request.settings_fingerprint)
        if existing is not None:
            log.info("%s is up to date (same input and settings fingerprints, every shard with its %s): nothing to "
                     "do; --force rebuilds", join(output.location, MANIFEST_NAME), output.verified_by)
            return existing
        manifest = _build(output, request, hf_ds, start)
    _log_summary(manifest, output.location, time.perf_counter() - start)
    return manifest


def _build(output: ShardOutput, request: Request, hf_ds: Any, start: float) -> Manifest:
    """Tokenize, plan and write the output: everything after the up-to-date check."""
    data = request.data
    tokenizer = build_tokenizer("gpt2") if data.tokenizer == "gpt2" else None  # fail fast, before any Ray work
    init_ray()  # before anything imports ray: a local instance started here then listens on 127.0.0.1 only
    from pipelines.data_prep.documents import tokenize_spec
    from pipelines.data_prep.plan import tokenize_and_plan
    from pipelines.data_prep.write import write_shards

    spec = tokenize_spec(data, tokenizer)
    log.info("preparing %s (%s) -> %s", request.source.spec, _describe_source(request.source), output.location)
    planned = tokenize_and_plan(data, request.source, hf_ds, spec, tokenizer)
    planned.stats["seconds_tokenize"] = round(time.perf_counter() - start, 3)
    writing = time.perf_counter()
    output.remove_output()
    shards = write_shards(output, planned, data.shard_size)
    manifest = _manifest(planned, request, shards, start, writing)
    output.write_manifest(manifest)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Tokenize a corpus into llm.c token shards with Ray Data.",
        epilog="Any DataConfig field can be set as --data.<key>=<value>, e.g. --data.val_fraction=0.05.",
    )
    parser.add_argument("--preset", help=f"a data preset: a name in {PRESET_DIR} or a YAML path")
    parser.add_argument("--input", help="path, glob, directory, hf:<name>[:<config>], s3://..., or tinyshakespeare")
    parser.add_argument("--tokenizer", choices=("gpt2", "char"))
    parser.add_argument("--out", help="output directory (default: data.dir of the preset)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, a running cluster, else local)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance started here")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        unknown = [a for a in rest if not a.startswith("--data.")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)} (settings are --data.<key>=<value>)")
        cfg = load_config(args.preset, rest, search_dirs=[PRESET_DIR])
        shortcuts = {k: getattr(args, k) for k in ("input", "tokenizer") if getattr(args, k) is not None}
        data = cfg.data if not shortcuts else dataclasses.replace(cfg.data, **shortcuts)
        out = args.out or data.dir
        if not out:
            raise ConfigError("no output directory: pass --out <dir> (or --data.dir=<dir>)")
        if args.address or args.num_cpus:
            init_ray(address=args.address, num_cpus=args.num_cpus)
        prepare(data, out, force=args.force)
    except USER_ERRORS as e:
        log.error("%s", e)
        return 2
    return 0


def pipeline_settings(data: DataConfig) -> dict[str, Any]:
    """The settings that decide the bytes of the shards (not where they go, nor the parallelism)."""
    keys = ("tokenizer", "val_fraction", "split", "seed", "shard_size", "text_field", "separator", "append_eot",
            "encoding_errors", "dedup")
    return {"pipeline_version": PIPELINE_VERSION, **{k: getattr(data, k) for k in keys}}


def _resolve_request(data: DataConfig) -> tuple[Request, Any]:
    """The input and the fingerprints that decide whether to rebuild; and the Hugging Face dataset, loaded, when
    the input is one (else None)."""
    source = resolve_input(data.input or "")
    hf_ds = None
    if source.kind == "hf":
        hf_ds = load_hf_dataset(source, data.text_field)
        source = dataclasses.replace(
            source, details={"hf_fingerprint": getattr(hf_ds, "_fingerprint", None), "num_rows": len(hf_ds)}
        )
    settings = pipeline_settings(data)
    return Request(data, source, settings, source.fingerprint(), fingerprint(settings)), hf_ds


def _up_to_date(output: ShardOutput, input_fp: str, settings_fp: str) -> Manifest | None:
    """The output's manifest when it has these fingerprints and every shard it lists is still as listed (a shard
    damaged since is a rebuild, not a silent "nothing to do"); None otherwise."""
    if not output.has_manifest():
        return None
    try:
        manifest = load_manifest(output.location)
        if (manifest.input_fingerprint, manifest.settings_fingerprint) != (input_fp, settings_fp):
            log.info("%s: input or settings changed, rebuilding", join(output.location, MANIFEST_NAME))
            return None
        return output.check_shards(manifest)
    except ShardError as e:
        log.warning("rebuilding: %s", e)
        return None


def _manifest(
    planned: PlannedOutput, request: Request, shards: dict[str, list[ShardInfo]], start: float, writing: float
) -> Manifest:
    data, stats, tokenizer = request.data, planned.stats, planned.tokenizer
    splits = {
        split: SplitInfo(shards=infos, num_tokens=sum(s.num_tokens for s in infos),
                         num_documents=planned.streams[split].num_documents)
        for split, infos in shards.items()
    }
    if splits["val"].num_tokens == 0 and data.val_fraction > 0:
        log.warning("the val split is empty (%d documents, val_fraction=%s)", stats["num_documents"], data.val_fraction)
    seconds = time.perf_counter() - start
    num_tokens = sum(s.num_tokens for s in splits.values())
    return Manifest(
        tokenizer=tokenizer.to_dict(),
        vocab_size=tokenizer.vocab_size,
        dtype=dtype_for_vocab(tokenizer.vocab_size).name,
        splits=splits,
        split_rule={"split": data.split, "val_fraction": data.val_fraction, "seed": data.seed,
                    "unit": "characters" if data.split == "tail" else "documents"},
        input_fingerprint=request.input_fingerprint,
        settings_fingerprint=request.settings_fingerprint,
        inputs=request.source.describe(),
        settings=request.settings,
        shard_size=data.shard_size,
        num_documents=stats["num_documents"],
        stats={**stats, "seconds_write": round(time.perf_counter() - writing, 3), "seconds": round(seconds, 3),
               "tokens_per_second": round(num_tokens / max(seconds, 1e-9))},
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _describe_source(source: InputSource) -> str:
    if source.kind == "files":
        return f"{len(source.files)} files, {sum(f.size for f in source.files) / 1e6:,.1f} MB"
    return f"Hugging Face dataset, {source.details.get('num_rows', '?'):,} rows"


def _log_summary(manifest: Manifest, out: str, seconds: float) -> None:
    s = manifest.stats
    splits = ", ".join(
        f"{name} {info.num_tokens:,} tokens in {len(info.shards)} shard{'s' * (len(info.shards) != 1)}"
        for name, info in manifest.splits.items()
    )
    log.info(
        "prepared %s documents (%s empty skipped, %s duplicates removed, %s characters replaced): %s; %s vocabulary "
        "%s, %s; %.1f s, %s tokens/s -> %s",
        f"{manifest.num_documents:,}", s["num_empty_documents_skipped"], s["num_duplicate_documents_removed"],
        s["num_replaced_characters"], splits,
        manifest.tokenizer["name"], manifest.vocab_size, manifest.dtype, seconds,
        f"{s['tokens_per_second']:,}", join(out, MANIFEST_NAME),
    )


if __name__ == "__main__":
    # Run through the package module so Ray pickles its functions by reference, not as __main__ code.
    from pipelines.prepare import main as _main

    sys.exit(_main())
