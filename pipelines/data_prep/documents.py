"""Step 2 of pipelines/prepare.py, on Ray Data: whole files (or Hugging Face rows) read and split into documents,
each tokenized into one row of a document table. The blocks stay in the object store; the driver sees none of it.

    spec = tokenize_spec(data, build_tokenizer("gpt2"))       # small and picklable: it ships with every task
    blocks = tokenize_documents(source, hf_ds, spec, num_blocks=None)      # [ObjectRef of a pyarrow.Table, ...]

A row is one document keyed by (file index, document index) with its split (random rule), character count, count
of replaced bytes, 128-bit content hash and tokens (code points for char-level). A file that cannot be read or
parsed becomes one error row, not an exception: the driver reports the first in corpus order, in one line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from nanogpt.config import DataConfig
from nanogpt.data.corpus import CorpusError, InputSource, ParsedFile, is_val_document, parse_documents
from nanogpt.data.shards import dtype_for_vocab
from nanogpt.data.storage import StorageError, read_bytes
from nanogpt.tokenizers import Tokenizer, build_tokenizer

INDEX_COLUMN = "__nanogpt_doc_index"


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
    dedup: bool = True
    """Whether the plan looks for duplicates: only then does each document get its content hash (data.dedup)."""


def tokenize_spec(data: DataConfig, tokenizer: Tokenizer | None) -> TokenizeSpec:
    """The spec of `data`; `tokenizer` is None for char-level (its vocabulary is known only at the end)."""
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
        dedup=data.dedup,
    )


def tokenize_documents(
    source: InputSource, hf_ds: Any, spec: TokenizeSpec, num_blocks: int | None
) -> list[ray.ObjectRef]:
    """Run the Ray Data pipeline; return the refs of its blocks: one row per document, tokens included."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if source.kind == "files":
        # One row per file, which the task that tokenizes it reads (a path or a URI): read_binary_files would also
        # serialize each whole file once only to estimate its size, 5% of the work (bench/NOTES.md). More tasks than
        # files would only be empty.
        files = [{"file_index": i, "path": f.path, "size": f.size} for i, f in enumerate(source.files)]
        blocks = num_blocks or min(len(files), max(200, 2 * cpus))
        ds = ray.data.from_items(files, override_num_blocks=blocks)
        fn = partial(tokenize_files, spec=spec)
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
    # throttles it (fewer tasks in flight: bench/NOTES.md, "Figures behind the code's comments").
    ds.context.op_resource_reservation_enabled = False
    return ds.to_arrow_refs()


def tokenize_files(batch: pa.Table, spec: TokenizeSpec) -> pa.Table:
    """Ray Data UDF: files (file index, path, listed size) -> one row per document; or, when some cannot be read or
    parsed, one error row per such file. The error is returned as data, not raised: Ray Data would print some 160
    lines of its own traceback around the one line that names the file."""
    tables, errors = [], []
    for index, path, size in zip(*(batch.column(c).to_pylist() for c in ("file_index", "path", "size"))):
        try:
            parsed = read_documents(path, size, spec)
        except CorpusError as e:
            errors.append(_error_row(index, str(e), spec))
            continue
        doc_index = np.arange(len(parsed.texts), dtype=np.int64)
        tables.append(encode_documents(index, doc_index, parsed.texts, parsed.num_replaced, spec,
                                       replaced_at=parsed.first_replaced))
    if errors:
        return pa.concat_tables(errors)  # the run fails: the documents of the other files are of no use
    return pa.concat_tables(tables) if tables else _empty_table(spec)


def read_documents(path: str, listed_size: int, spec: TokenizeSpec) -> ParsedFile:
    """The documents of the file at `path` (a path or a URI), read whole; CorpusError naming it when it cannot be
    read or parsed, or is no longer the size it was listed with: it changed since, and the manifest would record
    the listed file (its size and time) for other text, or a cut document's halves come from other text."""
    try:
        data = read_bytes(path)
    except StorageError as e:
        raise CorpusError(str(e)) from None
    if len(data) != listed_size:
        raise CorpusError(f"{path}: changed since prepare listed it ({listed_size:,} bytes then, {len(data):,} now); "
                          "run prepare again")
    return parse_documents(path, data, spec.text_field, spec.separator, spec.encoding_errors)


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
    # without dedup nothing reads the hashes: zeros, not a BLAKE2b call per document (7% of the worker's time)
    hashes = content_hashes(texts) if spec.dedup else np.zeros((len(texts), 2), dtype="<u8")
    return pa.table({
        "file_index": pa.array(np.full(len(texts), file_index, dtype=np.int32)),
        "doc_index": pa.array(doc_index.astype(np.int64)),
        "split": pa.array(split),
        "num_chars": pa.array(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))),
        "num_replaced": pa.array(replaced),
        "replaced_at": pa.array(where, type=pa.string()),
        "content_hash": pa.FixedSizeListArray.from_arrays(pa.array(hashes.reshape(-1)), 2),
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
    """One tokenizer per worker process: Ray reuses workers across tasks, and loading tiktoken's files each time
    would cost more than tokenizing a small file."""
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = build_tokenizer(name)
    return _TOKENIZERS[name]
