"""Step 3 of pipelines/prepare.py: the plan of the output from small summaries of the document blocks. Ray tasks
read each block where it lies and send the driver a few numbers per run of documents (never the tokens); the
driver orders the runs, applies the split rule and plans each split's stream: nanogpt/data/split_plan.py, plain
NumPy. Here are the tasks and their use.

    planned = tokenize_and_plan(data, source, hf_ds, spec, tokenizer)    # blocks, streams, vocabulary, stats

With data.dedup (the default), a task finds the documents whose text an earlier document (in corpus order) has,
and each block holding some is rewritten without them. The tail rule's cut may fall inside a document: with BPE it
is tokenized again as two halves (nanoGPT's data[:i] / data[i:]), a block of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from nanogpt.config import DataConfig
from nanogpt.data.corpus import CorpusError, InputFile, InputSource
from nanogpt.data.split_plan import (
    DOC_KEY,
    RUN,
    CutHalves,
    CutLocation,
    DocumentColumns,
    Duplicates,
    Stream,
    corpus_stats,
    find_duplicates,
    locate_cut,
    order_runs,
    random_split_streams,
    summarize_runs,
    tail_cut,
    tail_split_streams,
)
from nanogpt.tokenizers import CharTokenizer, Tokenizer
from pipelines.data_prep.documents import TokenizeSpec, encode_documents, read_documents, tokenize_documents
from pipelines.data_prep.task_errors import reraise_user_error

log = logging.getLogger("nanogpt.prepare")


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


def tokenize_and_plan(
    data: DataConfig, source: InputSource, hf_ds: Any, spec: TokenizeSpec, tokenizer: Tokenizer | None
) -> PlannedOutput:
    """Tokenize every document into blocks, summarize the blocks, and plan each split's stream over them. A
    CorpusError (or another user error) that a task raised comes out as itself, without Ray's wrapping.

    `tokenizer` is None for char-level: its vocabulary, the corpus's sorted set of characters, is known only here.
    """
    try:
        return _tokenize_and_plan(data, source, hf_ds, spec, tokenizer)
    except Exception as e:
        reraise_user_error(e)
        raise


def _tokenize_and_plan(
    data: DataConfig, source: InputSource, hf_ds: Any, spec: TokenizeSpec, tokenizer: Tokenizer | None
) -> PlannedOutput:
    blocks = tokenize_documents(source, hf_ds, spec, data.num_blocks)
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
        ref, sizes = _tokenize_halves.remote(spec, char_offset, file=source.files[file_index], doc_index=doc_index)
    else:
        ref, sizes = _tokenize_halves.remote(spec, char_offset, text=hf_ds[doc_index][spec.text_field] or "")
    return ref, ray.get(sizes)


@ray.remote(num_returns=2)
def _tokenize_halves(spec: TokenizeSpec, char_offset: int, file: InputFile | None = None, doc_index: int = 0,
                     text: str | None = None) -> tuple[pa.Table, tuple[int, int]]:
    """The halves' document block, which stays where it is made, and their token counts, which the driver needs."""
    if text is None:
        text = read_documents(file.path, file.size, spec).texts[doc_index]  # one line if the file changed
    halves = [text[:char_offset], text[char_offset:]]
    table = encode_documents(0, np.array([0, 1], dtype=np.int64), halves, 0, spec)
    lengths = pc.list_value_length(table.column("tokens")).to_pylist()
    return table, (int(lengths[0]), int(lengths[1]))
