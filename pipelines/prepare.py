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
  2. Ray Data: read whole files (`read_binary_files`: `read_text` would strip newlines), split them into documents,
     tokenize in `map_batches`. Each output row is one document keyed by (file index, document index) with its
     tokens; blocks stay in the object store. A file that cannot be parsed (bad JSON, a missing field) becomes an
     error row, not an exception: the driver reports the first in corpus order, in one line.
  3. Tasks summarize each block as runs of consecutive document keys (a few numbers per block). With data.dedup
     (the default), a task first finds the documents whose text (a 128-bit hash of it) an earlier document in
     corpus order already has, and each block holding some is rewritten without them: no text reaches the shards
     twice, in one split or in both. The driver sorts the runs by key (the corpus order, whatever the block
     boundaries), applies the split rule, and cuts each split's token stream into shards of `shard_size` tokens:
     nanogpt/data/split_plan.py, plain NumPy.
  4. Tasks write the shards (temp file, fsync, rename) straight from the blocks; the driver writes manifest.json
     last, after removing the old manifest and shards. No token crosses the driver.

The tail split (nanoGPT's Shakespeare rule) cuts the concatenated characters at int(n * (1 - val_fraction)); the one
document holding that point is tokenized again as two halves, like nanoGPT's `data[:i]` / `data[i:]`. The random
split (nanoGPT's openwebtext rule) hashes (seed, file, document) per document. On a multi-node cluster --out must
be a URI (s3://, gs://: each task uploads its shard as one object, nanogpt/data/shard_prefix.py) or a filesystem every
node sees (NFS, FSx): shards are written by the tasks. Parallelism is per
file (a file is read and split into documents by one task), and a Hugging Face dataset goes through
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
import contextlib
import dataclasses
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from nanogpt.config import ConfigError, DataConfig, load_config
from nanogpt.data import shard_prefix
from nanogpt.data.corpus import (
    CorpusError,
    InputSource,
    fingerprint,
    is_val_document,
    load_hf_dataset,
    parse_documents,
    resolve_input,
)
from nanogpt.data.shard_dir import check_owned, lock_shard_dir
from nanogpt.data.shards import (
    MANIFEST_NAME,
    SHARD_NAME,
    SPLITS,
    TEMP_MARKER,
    Manifest,
    ShardError,
    ShardInfo,
    SplitInfo,
    dtype_for_vocab,
    fsync_dir,
    load_manifest,
    shard_name,
    verify,
    write_error,
    write_manifest,
    write_shard,
)
from nanogpt.data.split_plan import (
    DOC_KEY,
    RUN,
    CutHalves,
    CutLocation,
    DocumentColumns,
    Duplicates,
    Piece,
    ShardPlan,
    Stream,
    corpus_stats,
    find_duplicates,
    locate_cut,
    order_runs,
    plan_output_shards,
    random_split_streams,
    summarize_runs,
    tail_cut,
    tail_split_streams,
)
from nanogpt.data.storage import is_uri, join
from nanogpt.tokenizers import CharTokenizer, Tokenizer, TokenizerError, build_tokenizer
from pipelines.ray_adapter.session import init_ray

log = logging.getLogger("nanogpt.prepare")

PRESET_DIR = Path(__file__).resolve().parent / "configs" / "data"
PIPELINE_VERSION = 2
"""Bump when the same settings would produce different shards: it is part of the settings fingerprint."""
INDEX_COLUMN = "__nanogpt_doc_index"
ERRORS = (CorpusError, TokenizerError, ShardError, ConfigError)


@dataclass(frozen=True)
class TokenizeSpec:
    """What the tokenize step needs; small and picklable, shipped with every Ray Data task."""

    tokenizer: str
    """gpt2 | char (char-level emits Unicode code points; the vocabulary is known only at the end)."""
    token_dtype: str
    text_field: str
    separator: str | None
    encoding_errors: str
    append_eot: bool
    random_split: bool
    val_fraction: float
    seed: int


@dataclass(frozen=True)
class Request:
    """What was asked for, as the manifest records it: the settings, the input, and the fingerprints of both."""

    data: DataConfig
    source: InputSource
    settings: dict[str, Any]
    input_fingerprint: str
    settings_fingerprint: str


@dataclass
class PlannedOutput:
    """The tokenized corpus and the plan of the output: the document blocks (in the object store), each split's
    stream over them, and the vocabulary."""

    blocks: list[ray.ObjectRef]
    streams: dict[str, Stream]
    tokenizer: Tokenizer
    codepoints: np.ndarray | None
    """char-level: the corpus's sorted code points (a token id is an index in it); None for BPE."""
    stats: dict[str, Any]


# ------------------------------------------------------------------------------------------ entry points


def prepare(data: DataConfig, out_dir: str | os.PathLike, force: bool = False) -> Manifest:
    """Tokenize `data.input` into shards under `out_dir` and return the manifest (Ray is started if needed).

    Holds `out_dir`'s lock throughout: a second prepare into it fails at once, naming this one. A no-op returning
    the existing manifest when its input and settings fingerprints match and every shard still has its sha256,
    unless `force`. Bad input raises CorpusError (or TokenizerError) and leaves `out_dir` as it was; so does an `out_dir`
    holding files prepare did not write (ShardError): it only ever removes its own shards and temporary files.
    """
    start = time.perf_counter()
    out = str(out_dir)
    if data.tokenizer == "char" and data.append_eot:
        raise ConfigError("data.append_eot=true needs an end-of-text token; the char tokenizer has none")
    request, hf_ds = _resolve_request(data)
    with _locked(out):
        shard_prefix.check_owned(out) if is_uri(out) else check_owned(out)
        existing = None if force else _up_to_date(out, request.input_fingerprint, request.settings_fingerprint)
        if existing is not None:
            log.info("%s is up to date (same input and settings fingerprints, every shard %s): nothing to do; "
                     "--force rebuilds", join(out, MANIFEST_NAME),
                     "with its size" if is_uri(out) else "with its sha256")
            return existing
        manifest = _build(out, request, hf_ds, start)
    _log_summary(manifest, out, time.perf_counter() - start)
    return manifest


def _locked(out: str):
    """The output's lock (a directory's flock); object stores have none (nanogpt/data/shard_prefix.py)."""
    return contextlib.nullcontext() if is_uri(out) else lock_shard_dir(out)


def _build(out: str, request: Request, hf_ds: Any, start: float) -> Manifest:
    """Tokenize, plan and write the output: everything after the up-to-date check."""
    data = request.data
    tokenizer = build_tokenizer("gpt2") if data.tokenizer == "gpt2" else None  # fail fast, before any Ray work
    init_ray()
    spec = _tokenize_spec(data, tokenizer)
    log.info("preparing %s (%s) -> %s", request.source.spec, _describe_source(request.source), out)
    try:
        planned = _tokenize_and_plan(request, hf_ds, spec, tokenizer)
    except Exception as e:
        _reraise_user_error(e)
        raise
    planned.stats["seconds_tokenize"] = round(time.perf_counter() - start, 3)
    return _write_output(out, planned, request, start)


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
    except ERRORS as e:
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


def _tokenize_spec(data: DataConfig, tokenizer: Tokenizer | None) -> TokenizeSpec:
    return TokenizeSpec(
        tokenizer=data.tokenizer,
        token_dtype="uint32" if data.tokenizer == "char" else dtype_for_vocab(tokenizer.vocab_size).name,
        text_field=data.text_field,
        separator=data.separator,
        encoding_errors=data.encoding_errors,
        append_eot=data.append_eot,
        random_split=data.split == "random",
        val_fraction=data.val_fraction,
        seed=data.seed,
    )


# ------------------------------------------------------------------------------------------ 2. tokenize (Ray Data)


def _tokenize_documents(
    source: InputSource, hf_ds: Any, spec: TokenizeSpec, num_blocks: int | None
) -> list[ray.ObjectRef]:
    """Run the Ray Data pipeline; return the refs of its blocks: one row per document, tokens included."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if source.kind == "files":
        paths = [f.path for f in source.files]
        file_index = {p: i for i, p in enumerate(paths)}
        # Ray Data reports cloud paths without their scheme (bucket/key).
        file_index.update({p.split("://", 1)[1]: i for i, p in enumerate(paths) if "://" in p})
        # A file is one row, so read tasks beyond one per file only add empty blocks (Ray's default asks for
        # >= 200 and splits each file's block to get them) and prevent fusing the read with the tokenize step.
        blocks = num_blocks or min(len(paths), max(200, 2 * cpus))
        ds = ray.data.read_binary_files(paths, include_paths=True, override_num_blocks=blocks)
        fn = partial(tokenize_files, file_index=file_index, spec=spec)
    else:
        # A global row index keys each document; from_huggingface gives one block unless told otherwise.
        table_ds = hf_ds.select_columns([spec.text_field]).add_column(INDEX_COLUMN, np.arange(len(hf_ds)))
        blocks = num_blocks or max(1, min(len(hf_ds), 4 * cpus))
        ds = ray.data.from_huggingface(table_ds, override_num_blocks=blocks)
        fn = partial(tokenize_rows, spec=spec)
    ds = ds.map_batches(fn, batch_format="pyarrow", batch_size=None)
    # A bad file comes back as an error row (tokenize_files). Anything else a UDF raises is a bug: keep its own
    # type rather than Ray Data's UserCodeException around it.
    ds.context.raise_original_map_exception = True
    # The pipeline is one fused read->tokenize operator: Ray Data's per-operator resource reservation only
    # throttles it (measured on 2 CPUs: 1.25 tasks in flight on average with it, 1.84 without).
    ds.context.op_resource_reservation_enabled = False
    return ds.to_arrow_refs()


def tokenize_files(batch: pa.Table, file_index: dict[str, int], spec: TokenizeSpec) -> pa.Table:
    """Ray Data UDF: whole files (path, bytes) -> one row per document; or, when some cannot be parsed, one error
    row per such file. A CorpusError is returned as data, not raised: Ray Data would print some 160 lines of its
    own traceback around the one line that names the file."""
    tables, errors = [], []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        try:
            parsed = parse_documents(path, data, spec.text_field, spec.separator, spec.encoding_errors)
        except CorpusError as e:
            errors.append(_error_row(file_index[path], str(e), spec))
            continue
        doc_index = np.arange(len(parsed.texts), dtype=np.int64)
        tables.append(encode_documents(file_index[path], doc_index, parsed.texts, parsed.num_replaced, spec,
                                       replaced_at=parsed.first_replaced))
    if errors:
        return pa.concat_tables(errors)  # the run fails: the documents of the other files are of no use
    return pa.concat_tables(tables) if tables else _empty_table(spec)


def tokenize_rows(batch: pa.Table, spec: TokenizeSpec) -> pa.Table:
    """Ray Data UDF: Hugging Face rows -> one row per document (file index 0, document index = row index)."""
    texts = [t or "" for t in batch.column(spec.text_field).to_pylist()]
    doc_index = batch.column(INDEX_COLUMN).to_numpy().astype(np.int64)
    order = np.argsort(doc_index, kind="stable")  # rows arrive in order; sorting keeps the runs long regardless
    return encode_documents(0, doc_index[order], [texts[i] for i in order], 0, spec)


def encode_documents(
    file_index: int, doc_index: np.ndarray, texts: list[str], num_replaced: int, spec: TokenizeSpec,
    replaced_at: str | None = None, error: str | None = None,
) -> pa.Table:
    """The document table: keys, split, character count, content hash and tokens (code points for char-level) per
    document. The file's count of undecodable bytes and where the first is are on its first document; `error` is
    null, or why the file could not be parsed (see _error_row)."""
    if spec.tokenizer == "char":
        # surrogatepass: a JSON "\\ud800" escape is a lone surrogate, still one character.
        arrays = [np.frombuffer(t.encode("utf-32-le", "surrogatepass"), dtype="<u4") for t in texts]
        lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
        values = np.concatenate(arrays) if arrays else np.empty(0, np.uint32)
    else:
        tokens, lengths = _cached_tokenizer(spec.tokenizer).encode_flat(texts, append_eot=spec.append_eot)
        values = tokens.astype(spec.token_dtype)
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if spec.random_split:
        split = is_val_document(spec.seed, file_index, doc_index, spec.val_fraction).astype(np.int8)
    else:
        split = np.zeros(len(texts), dtype=np.int8)  # the tail rule is applied after all documents are counted
    replaced = np.zeros(len(texts), dtype=np.int64)
    where = [None] * len(texts)
    if len(texts):
        replaced[0], where[0] = num_replaced, replaced_at
    return pa.table({
        "file_index": pa.array(np.full(len(texts), file_index, dtype=np.int32)),
        "doc_index": pa.array(doc_index.astype(np.int64)),
        "split": pa.array(split),
        "num_chars": pa.array(np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))),
        "num_replaced": pa.array(replaced),
        "replaced_at": pa.array(where, type=pa.string()),
        "content_hash": pa.FixedSizeListArray.from_arrays(pa.array(content_hashes(texts).reshape(-1)), 2),
        "tokens": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values)),
        "error": pa.array([error] * len(texts), type=pa.string()),
    })


def content_hashes(texts: list[str]) -> np.ndarray:
    """(n, 2) uint64: each text's 128-bit BLAKE2b hash, the key that finds duplicate documents (at 128 bits, two
    different texts never share one in practice)."""
    digests = b"".join(hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts)
    return np.frombuffer(digests, dtype="<u8").reshape(len(texts), 2)


def _empty_table(spec: TokenizeSpec) -> pa.Table:
    return encode_documents(0, np.empty(0, np.int64), [], 0, spec)


def _error_row(file_index: int, message: str, spec: TokenizeSpec) -> pa.Table:
    """A one-row document table saying that file `file_index` cannot be parsed, and why (same columns as any)."""
    return encode_documents(file_index, np.zeros(1, np.int64), [""], 0, spec, error=message)


_TOKENIZERS: dict[str, Tokenizer] = {}


def _cached_tokenizer(name: str) -> Tokenizer:
    """One tokenizer per worker process (Ray reuses workers across tasks; loading tiktoken costs ~0.2 s)."""
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = build_tokenizer(name)
    return _TOKENIZERS[name]


# ------------------------------------------------------------------------------------------ 3. runs and splits
# The planning itself is nanogpt/data/split_plan.py; here are the tasks that read the blocks for it.


def _tokenize_and_plan(
    request: Request, hf_ds: Any, spec: TokenizeSpec, tokenizer: Tokenizer | None
) -> PlannedOutput:
    """Tokenize every document into blocks, summarize the blocks, and plan each split's stream over them.

    `tokenizer` is None for char-level: its vocabulary, the corpus's sorted set of characters, is known only here.
    """
    data, source = request.data, request.source
    blocks = _tokenize_documents(source, hf_ds, spec, data.num_blocks)
    want_codepoints = spec.tokenizer == "char"
    summaries = ray.get([_summarize_block.remote(b, want_codepoints) for b in blocks])
    _raise_parse_errors(summaries, source)
    duplicates = DuplicateReport(0, None, np.zeros(0, np.int64))
    if data.dedup:
        blocks, summaries, duplicates = _drop_duplicates(blocks, summaries, want_codepoints)
    runs = order_runs([s.runs for s in summaries])
    stats = corpus_stats(runs, len(source.files) if source.kind == "files" else 1, duplicates.count)
    _warn_replaced(summaries, runs, source)
    _warn_duplicates(duplicates, source)
    if stats["num_documents"] == 0:
        raise CorpusError(
            f"{source.spec}: empty corpus ({stats['num_files']} files, no non-empty document"
            + (f"; is --data.text_field={data.text_field!r} right?" if source.kind == "hf" else "") + ")"
        )
    codepoints = None
    if tokenizer is None:
        codepoints = np.unique(np.concatenate([s.codepoints for s in summaries if s.codepoints is not None]))
        tokenizer = CharTokenizer([chr(c) for c in codepoints])
    if data.split == "random":
        streams = random_split_streams(runs)
    else:
        streams, blocks = _tail_split(runs, blocks, source, hf_ds, spec, data.val_fraction)
    return PlannedOutput(blocks, streams, tokenizer, codepoints, stats)


def _warn_replaced(summaries: list[BlockSummary], runs: np.ndarray, source: InputSource) -> None:
    """One warning for the corpus when bytes that are not UTF-8 were replaced: how many, in how many files, and
    where the first is (a file above the "auto" limit has already failed)."""
    marked = [s.first_replaced for s in summaries if s.first_replaced is not None]
    if not marked:
        return
    file_index, where = min(marked)
    path = source.files[file_index].path if source.kind == "files" else source.spec
    num_files = len(np.unique(runs["file"][runs["replaced_chars"] > 0]))
    log.warning(
        "replaced %s undecodable byte sequences by U+FFFD in %d file%s (the first: %s, %s): the shards hold U+FFFD "
        "there; --data.encoding_errors=fail rejects any", f"{int(runs['replaced_chars'].sum()):,}", num_files,
        "s" * (num_files > 1), path, where,
    )


@dataclass(frozen=True)
class DuplicateReport:
    """What the driver learns of the duplicate documents (the list itself stays in the object store)."""

    count: int
    first: tuple[np.void, np.void] | None
    """The DOC_KEY of the first duplicate in corpus order, and of the earlier document it repeats."""
    blocks: np.ndarray
    """The blocks holding duplicates."""


def _drop_duplicates(
    blocks: list[ray.ObjectRef], summaries: list[BlockSummary], want_codepoints: bool
) -> tuple[list[ray.ObjectRef], list[BlockSummary], DuplicateReport]:
    """Take every document whose text an earlier one has out of its block; the blocks and summaries that result."""
    keys = [_document_keys.remote(b, i) for i, b in enumerate(blocks)]
    duplicates, report = _find_duplicates.remote(*keys)
    report = ray.get(report)
    blocks, summaries = list(blocks), list(summaries)
    for i in report.blocks:
        blocks[i] = _drop_rows.remote(blocks[i], int(i), duplicates)
    redone = ray.get([_summarize_block.remote(blocks[i], want_codepoints) for i in report.blocks])
    for i, summary in zip(report.blocks, redone):
        summaries[i] = summary
    return blocks, summaries, report


@ray.remote
def _document_keys(table: pa.Table, block: int) -> np.ndarray:
    """The block's non-empty documents as DOC_KEY rows: content hash and where each is."""
    if table.num_rows == 0:  # Ray Data may hand over an empty block without the document columns
        return np.zeros(0, DOC_KEY)
    hashes = pc.list_flatten(table.column("content_hash")).to_numpy(zero_copy_only=False).reshape(-1, 2)
    keys = np.zeros(table.num_rows, DOC_KEY)
    keys["hash_hi"], keys["hash_lo"] = hashes[:, 0], hashes[:, 1]
    keys["file"] = table.column("file_index").to_numpy()
    keys["doc"] = table.column("doc_index").to_numpy()
    keys["block"] = block
    keys["row"] = np.arange(table.num_rows)
    return keys[table.column("num_chars").to_numpy() > 0]  # empty documents are skipped anyway


@ray.remote(num_returns=2)
def _find_duplicates(*keys: np.ndarray) -> tuple[Duplicates, DuplicateReport]:
    duplicates = find_duplicates(keys)
    first = (duplicates.dropped[0], duplicates.originals[0]) if len(duplicates.dropped) else None
    return duplicates, DuplicateReport(len(duplicates.dropped), first, np.unique(duplicates.dropped["block"]))


@ray.remote
def _drop_rows(table: pa.Table, block: int, duplicates: Duplicates) -> pa.Table:
    """The block without its duplicate documents. A file's count of replaced bytes (on its first document) moves to
    its first document that stays: the text of the others is in the shards, so are its replacements."""
    drop = duplicates.rows_of_block(block)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[drop] = False
    files, replaced = table.column("file_index").to_numpy(), table.column("num_replaced").to_numpy().copy()
    where = table.column("replaced_at").to_pylist()
    for row in drop[replaced[drop] > 0]:
        stays = np.flatnonzero(keep & (files == files[row]))[:1]
        for kept in stays:
            replaced[kept], where[kept] = replaced[kept] + replaced[row], where[row]
    table = table.set_column(table.schema.get_field_index("num_replaced"), "num_replaced", pa.array(replaced))
    table = table.set_column(table.schema.get_field_index("replaced_at"), "replaced_at", pa.array(where, pa.string()))
    return table.filter(pa.array(keep))


def _warn_duplicates(report: DuplicateReport, source: InputSource) -> None:
    """One warning for the corpus when documents were dropped as copies: how many, and the first."""
    if not report.count:
        return
    dropped, original = report.first
    log.warning("removed %s duplicate document%s (the same text as an earlier one; the first: %s repeats %s): "
                "--data.dedup=false keeps them", f"{report.count:,}", "s" * (report.count > 1),
                _document_name(source, dropped), _document_name(source, original))


def _document_name(source: InputSource, key: np.void) -> str:
    if source.kind == "files":
        return f"document {int(key['doc'])} of {source.files[int(key['file'])].path}"
    return f"row {int(key['doc'])}"


def _document_columns(table: pa.Table) -> DocumentColumns:
    """A block's numbers per document, as NumPy (the token lists are measured, not copied)."""
    return DocumentColumns(
        file_index=table.column("file_index").to_numpy(),
        doc_index=table.column("doc_index").to_numpy(),
        split=table.column("split").to_numpy(),
        num_chars=table.column("num_chars").to_numpy(),
        num_tokens=pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False).astype(np.int64),
        num_replaced=table.column("num_replaced").to_numpy(),
    )


@dataclass(frozen=True)
class BlockSummary:
    """What the driver learns of one block: a few numbers per run of documents, not the tokens."""

    runs: np.ndarray
    codepoints: np.ndarray | None = None
    """char-level: the block's set of code points (the vocabulary is their union)."""
    errors: tuple[tuple[int, str], ...] = ()
    """(file index, message) of each file of the block that could not be parsed."""
    first_replaced: tuple[int, str] | None = None
    """(file index, where) of the block's first undecodable bytes replaced by U+FFFD."""


@ray.remote
def _summarize_block(table: pa.Table, want_codepoints: bool) -> BlockSummary:
    if table.num_rows == 0:  # Ray Data may hand over an empty block without the document columns
        return BlockSummary(np.zeros(0, RUN))
    errors = _marked_rows(table, "error")
    if errors:
        return BlockSummary(np.zeros(0, RUN), errors=tuple(errors))
    codepoints = None
    if want_codepoints:
        codepoints = np.unique(pc.list_flatten(table.column("tokens")).to_numpy(zero_copy_only=False))
    first_replaced = min(_marked_rows(table, "replaced_at"), default=None)
    return BlockSummary(summarize_runs(_document_columns(table)), codepoints, first_replaced=first_replaced)


def _marked_rows(table: pa.Table, column: str) -> list[tuple[int, str]]:
    """(file index, value) of the rows where the string `column` is not null."""
    values = table.column(column)
    if values.null_count == table.num_rows:
        return []
    valid = pc.is_valid(values)
    return list(zip(table.column("file_index").filter(valid).to_pylist(), values.filter(valid).to_pylist()))


def _raise_parse_errors(summaries: list[BlockSummary], source: InputSource) -> None:
    """Raise the CorpusError of the first file, in corpus order, that could not be parsed; name a few others."""
    errors = sorted(e for s in summaries for e in s.errors)
    if not errors:
        return
    message = errors[0][1]
    if len(errors) > 1:
        others = ", ".join(Path(source.files[i].path).name for i, _ in errors[1:4])
        more = len(errors) - 1
        message += f" (and {more} more file{'s' * (more > 1)} that cannot be parsed: {others}{', ...' * (more > 3)})"
    raise CorpusError(message)


def _tail_split(
    runs: np.ndarray, blocks: list[ray.ObjectRef], source: InputSource, hf_ds: Any, spec: TokenizeSpec,
    val_fraction: float,
) -> tuple[dict[str, Stream], list[ray.ObjectRef]]:
    """The tail rule's streams, and the blocks they read: when the cut falls inside a document tokenized by BPE,
    the block holding its two re-tokenized halves is appended (the streams refer to it by index len(blocks))."""
    cut = tail_cut(runs, val_fraction)
    location = halves = None
    if cut is not None:
        r = runs[cut.run]
        location = ray.get(_locate_cut.remote(blocks[int(r["block"])], int(r["row_lo"]), int(r["row_hi"]), cut.offset))
        if location.char_offset and spec.tokenizer != "char":
            cut_block, sizes = _retokenize_cut(source, hf_ds, spec, location.file_index, location.doc_index,
                                               location.char_offset)
            halves = CutHalves(len(blocks), *sizes)
            blocks = [*blocks, cut_block]
    return tail_split_streams(runs, cut, location, halves), blocks


@ray.remote
def _locate_cut(table: pa.Table, row_lo: int, row_hi: int, offset: int) -> CutLocation:
    """The document of rows [row_lo, row_hi) holding character `offset` of their text, and the counts before it."""
    return locate_cut(_document_columns(table), row_lo, row_hi, offset)


def _retokenize_cut(
    source: InputSource, hf_ds: Any, spec: TokenizeSpec, file_index: int, doc_index: int, char_offset: int
) -> tuple[ray.ObjectRef, tuple[int, int]]:
    """Tokenize the document holding the cut again, as its train half and its val half (nanoGPT tokenizes
    data[:i] and data[i:] separately). Returns a 2-row document block and the halves' token counts."""
    if source.kind == "files":
        ref = _tokenize_halves.remote(spec, char_offset, path=source.files[file_index].path, doc_index=doc_index)
    else:
        ref = _tokenize_halves.remote(spec, char_offset, text=hf_ds[doc_index][spec.text_field] or "")
    sizes = ray.get(_halves_sizes.remote(ref))
    return ref, sizes


@ray.remote
def _tokenize_halves(spec: TokenizeSpec, char_offset: int, path: str | None = None, doc_index: int = 0,
                     text: str | None = None) -> pa.Table:
    if text is None:
        parsed = parse_documents(path, _read_bytes(path), spec.text_field, spec.separator, spec.encoding_errors)
        text = parsed.texts[doc_index]
    halves = [text[:char_offset], text[char_offset:]]
    return encode_documents(0, np.array([0, 1], dtype=np.int64), halves, 0, spec)


@ray.remote
def _halves_sizes(table: pa.Table) -> tuple[int, int]:
    lengths = pc.list_value_length(table.column("tokens")).to_pylist()
    return int(lengths[0]), int(lengths[1])


def _read_bytes(path: str) -> bytes:
    if "://" not in path:
        return Path(path).read_bytes()
    import pyarrow.fs as pafs

    fs, key = pafs.FileSystem.from_uri(path)
    with fs.open_input_stream(key) as f:
        return f.read()


# ------------------------------------------------------------------------------------------ 4. write shards


def _write_output(out: str, planned: PlannedOutput, request: Request, start: float) -> Manifest:
    """Invalidate the old output, write every shard from tasks, then the manifest."""
    writing = time.perf_counter()
    if not is_uri(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    _remove_output(out)
    shards = _write_shards(out, planned, request.data.shard_size)
    manifest = _manifest(planned, request, shards, start, writing)
    shard_prefix.write_manifest(out, manifest) if is_uri(out) else write_manifest(out, manifest)
    return manifest


def _write_shards(out: str, planned: PlannedOutput, shard_size: int) -> dict[str, list[ShardInfo]]:
    """Write each planned shard from a task of its own; on any failure, cancel them all and remove the output."""
    plans = plan_output_shards(planned.streams, shard_size)
    tasks: dict[ray.ObjectRef, ShardPlan] = {}
    for plan in plans:
        path = join(out, shard_name(plan.split, plan.index))
        used = [planned.blocks[b] for b in plan.blocks]
        ref = _write_shard_task.remote(path, planned.tokenizer.vocab_size, planned.codepoints, plan.parts, *used)
        tasks[ref] = plan
    infos: dict[tuple[str, int], ShardInfo] = {}
    try:
        pending = list(tasks)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            info = ray.get(done[0])
            infos[(tasks[done[0]].split, tasks[done[0]].index)] = info
            log.info("wrote %s: %s tokens (%d/%d shards)", info.name, f"{info.num_tokens:,}", len(infos), len(tasks))
    except BaseException as e:  # KeyboardInterrupt too: leave nothing that looks like output
        for ref in tasks:
            ray.cancel(ref, force=True)
        _remove_output(out)
        _reraise_user_error(e)
        raise
    return {split: [infos[(p.split, p.index)] for p in plans if p.split == split] for split in SPLITS}


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


@ray.remote
def _write_shard_task(
    path: str, vocab_size: int, codepoints: np.ndarray | None, plan: list[tuple[int, Piece, int, int]],
    *blocks: pa.Table,
) -> ShardInfo:
    """Gather one shard's tokens from the document blocks (Ray passes them in, zero-copy) and write it."""
    chunks = []
    for position, piece, lo, hi in plan:
        table = blocks[position].slice(piece.row_lo, piece.row_hi - piece.row_lo)
        tokens = table.column("tokens")
        if piece.split is not None:
            tokens = tokens.filter(pc.equal(table.column("split"), piece.split))
        values = pc.list_flatten(tokens).to_numpy(zero_copy_only=False)
        chunk = values[piece.skip + lo: piece.skip + hi]
        if codepoints is not None:  # char-level: code point -> its index in the sorted vocabulary
            chunk = np.searchsorted(codepoints, chunk).astype(np.int64)
        chunks.append(chunk)
    if not is_uri(path):
        return write_shard(path, chunks, vocab_size)
    with tempfile.TemporaryDirectory(prefix="nanogpt-shard-") as tmp:  # on the task's node; one shard at a time
        local = os.path.join(tmp, path.rsplit("/", 1)[-1])
        info = write_shard(local, chunks, vocab_size)
        shard_prefix.upload_shard(local, path)  # one object, visible when its upload completes
    return info


def _remove_output(out: str) -> None:
    """Remove the manifest first (the output stops looking complete), then shards and stray temporary files."""
    if is_uri(out):
        return shard_prefix.remove_output(out)
    out = Path(out)
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        _remove(manifest)
        fsync_dir(out)
    for path in out.iterdir():
        if SHARD_NAME.match(path.name) or (TEMP_MARKER in path.name and path.name.startswith(".")):
            _remove(path)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        raise write_error(path, e, "cannot remove") from None


def _up_to_date(out: str, input_fp: str, settings_fp: str) -> Manifest | None:
    """The manifest of `out` when it has these fingerprints and every shard it lists still has its sha256 (a shard
    damaged since is a rebuild, not a silent "nothing to do"); None otherwise. In object storage: every shard with
    its size (hashing would download them all; each training node hashes its download)."""
    if not (shard_prefix.manifest_exists(out) if is_uri(out) else os.path.exists(join(out, MANIFEST_NAME))):
        return None
    try:
        manifest = load_manifest(out)
        if (manifest.input_fingerprint, manifest.settings_fingerprint) != (input_fp, settings_fp):
            log.info("%s: input or settings changed, rebuilding", join(out, MANIFEST_NAME))
            return None
        if is_uri(out):
            shard_prefix.check_sizes(out, manifest)
            return manifest
        return verify(out, check_hashes=True)
    except ShardError as e:
        log.warning("rebuilding: %s", e)
        return None


def _reraise_user_error(e: BaseException) -> None:
    """Raise the CorpusError (or TokenizerError, ShardError) a Ray task raised, without Ray's wrapping around it
    (its message already names the file and line); return when there is none, for the caller to re-raise `e`."""
    user = _user_error(e)
    if user is not e:
        raise user from None


def _user_error(e: BaseException) -> BaseException:
    seen = set()
    stack = [e]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, ERRORS):
            # A RayTaskError subclasses its cause's type; its .cause is the original exception with a clean message.
            cause = getattr(err, "cause", None)
            return cause if isinstance(cause, ERRORS) else err
        stack.extend([getattr(err, "cause", None), err.__cause__, err.__context__])
    return e


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
