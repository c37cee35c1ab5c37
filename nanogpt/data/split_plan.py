"""Plan the train and val token streams of a prepared corpus, and their shards, from small summaries of its blocks.

pipelines/prepare.py tokenizes documents into blocks (one row per document) with Ray Data. Blocks come back in any
number, and a file's documents may be spread over several of them. This module turns a few numbers per block into
a plan that does not depend on how the work was divided, without reading a single token:

    duplicates = find_duplicates([keys_of_block_0, ...])  # documents whose text an earlier one has: dropped
    runs = summarize_runs(columns)                    # one block: its runs of consecutive documents
    runs = order_runs([runs_of_block_0, ...])         # every block: corpus order (file, document), each doc once
    stats = corpus_stats(runs, num_files)
    streams = random_split_streams(runs)              # nanoGPT's openwebtext rule, decided per document, or
    cut = tail_cut(runs, val_fraction)                # nanoGPT's Shakespeare rule: the first n * (1 - f) characters
    location = locate_cut(columns_of_cut_block, row_lo, row_hi, cut.offset)
    streams = tail_split_streams(runs, cut, location, halves)
    shards = plan_output_shards(streams, shard_size)  # which rows of which blocks fill each shard

A stream is a list of pieces (rows of one block, maybe one split of them, maybe a token range); the tasks that
write the shards gather the tokens the pieces name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nanogpt.data.shards import SPLITS, plan_shards

TRAIN, VAL = 0, 1
"""The values of a document's split (the `split` column): what `nanogpt.data.corpus.is_val_document` gives as int."""

RUN = np.dtype([
    ("file", np.int64),            # file index (0 for a Hugging Face dataset)
    ("doc_lo", np.int64),          # documents [doc_lo, doc_hi) of that file ...
    ("doc_hi", np.int64),
    ("block", np.int64),           # ... are rows [row_lo, row_hi) of this block (set by order_runs)
    ("row_lo", np.int64),
    ("row_hi", np.int64),
    ("train_tokens", np.int64),    # tokens of the run's train documents (all of them until the tail rule applies)
    ("val_tokens", np.int64),
    ("train_docs", np.int64),      # non-empty train documents
    ("val_docs", np.int64),
    ("chars", np.int64),           # characters of all its documents
    ("empty_docs", np.int64),      # empty documents (skipped: no characters)
    ("replaced_chars", np.int64),  # undecodable bytes replaced by U+FFFD
])
"""A run: consecutive rows of one block holding consecutive documents of one file. A structured array of runs
keeps the sums vectorized and the columns named."""


DOC_KEY = np.dtype([
    ("hash_hi", np.uint64),  # the 128-bit hash of the document's text
    ("hash_lo", np.uint64),
    ("file", np.int64),      # which document it is: document `doc` of file `file`
    ("doc", np.int64),
    ("block", np.int64),     # where it is: row `row` of block `block`
    ("row", np.int64),
])
"""A non-empty document's content hash and where it is: what finding duplicates reads of a block."""


class PrepareError(RuntimeError):
    """Preparation failed for a reason that is not about the input (an inconsistency the pipeline detected)."""


@dataclass(frozen=True)
class DocumentColumns:
    """One block's documents as NumPy columns, a row per document in block order: all the plan reads of a block."""

    file_index: np.ndarray    # (n,) int
    doc_index: np.ndarray     # (n,) int, the document's index in its file
    split: np.ndarray         # (n,) TRAIN | VAL (all TRAIN under the tail rule, which is applied later)
    num_chars: np.ndarray     # (n,) int
    num_tokens: np.ndarray    # (n,) int64
    num_replaced: np.ndarray  # (n,) int


@dataclass(frozen=True)
class Piece:
    """A contiguous part of a split's token stream: rows [row_lo, row_hi) of a block, keeping only the rows of
    `split` (None: all), then tokens [skip, skip + num_tokens) of their concatenation."""

    block: int
    row_lo: int
    row_hi: int
    split: int | None
    num_tokens: int
    skip: int = 0


@dataclass
class Stream:
    """One split's tokens in order, as pieces of blocks, and how many documents it holds (a document cut in two
    by the tail rule counts in both splits, as in nanoGPT)."""

    pieces: list[Piece]
    num_documents: int


# ------------------------------------------------------------------------------------------ runs


def summarize_runs(docs: DocumentColumns) -> np.ndarray:
    """The runs of one block (`block` left 0 for `order_runs` to fill): its summary, a few numbers per run."""
    n = len(docs.file_index)
    if n == 0:
        return np.zeros(0, RUN)
    breaks = np.flatnonzero(
        (docs.file_index[1:] != docs.file_index[:-1]) | (docs.doc_index[1:] != docs.doc_index[:-1] + 1)
    ) + 1
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, n]
    ntok = docs.num_tokens.astype(np.int64)
    nonempty = docs.num_chars > 0
    is_train, is_val = docs.split == TRAIN, docs.split == VAL

    def per_run(values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values, starts)

    runs = np.zeros(len(starts), RUN)
    runs["file"] = docs.file_index[starts]
    runs["doc_lo"] = docs.doc_index[starts]
    runs["doc_hi"] = docs.doc_index[ends - 1] + 1
    runs["row_lo"] = starts
    runs["row_hi"] = ends
    runs["train_tokens"] = per_run(ntok * is_train)
    runs["val_tokens"] = per_run(ntok * is_val)
    runs["train_docs"] = per_run((nonempty & is_train).astype(np.int64))
    runs["val_docs"] = per_run((nonempty & is_val).astype(np.int64))
    runs["chars"] = per_run(docs.num_chars)
    runs["empty_docs"] = per_run((~nonempty).astype(np.int64))
    runs["replaced_chars"] = per_run(docs.num_replaced)
    return runs


def order_runs(runs_per_block: Sequence[np.ndarray]) -> np.ndarray:
    """All runs in corpus order (file, then document), each tagged with its block, checked to cover each document
    once. Sorting the runs, not the blocks, is what makes the output the same whatever the block boundaries."""
    runs = np.concatenate([np.zeros(0, RUN), *runs_per_block])
    runs["block"] = np.repeat(np.arange(len(runs_per_block)), [len(r) for r in runs_per_block])
    runs = runs[np.lexsort((runs["doc_lo"], runs["file"]))]
    same_file = runs["file"][1:] == runs["file"][:-1]
    if np.any(same_file & (runs["doc_lo"][1:] < runs["doc_hi"][:-1])):
        raise PrepareError("internal error: a document appears in two blocks")
    return runs


def corpus_stats(runs: np.ndarray, num_files: int, num_duplicates: int = 0) -> dict[str, Any]:
    """The corpus's counts, as the manifest's `stats` records them (`runs`: the documents kept; `num_duplicates`:
    those dropped by find_duplicates)."""
    return {
        "num_files": num_files,
        "num_documents": int(runs["train_docs"].sum() + runs["val_docs"].sum()),
        "num_empty_documents_skipped": int(runs["empty_docs"].sum()),
        "num_duplicate_documents_removed": num_duplicates,
        "num_characters": int(runs["chars"].sum()),
        "num_replaced_characters": int(runs["replaced_chars"].sum()),
    }


# ------------------------------------------------------------------------------------------ duplicates


@dataclass(frozen=True)
class Duplicates:
    """Documents whose text an earlier document already has, in corpus order, and the earlier document of each."""

    dropped: np.ndarray    # DOC_KEY rows
    originals: np.ndarray  # DOC_KEY rows: originals[i] is the first document with dropped[i]'s text

    def rows_of_block(self, block: int) -> np.ndarray:
        return self.dropped["row"][self.dropped["block"] == block]


def find_duplicates(keys_per_block: Sequence[np.ndarray]) -> Duplicates:
    """Every document but the first (in corpus order: file, then document) of each content hash. The keys decide
    it, not the blocks they came in, so the same documents are dropped whatever the parallelism."""
    keys = np.concatenate([np.zeros(0, DOC_KEY), *keys_per_block])
    keys = keys[np.lexsort((keys["doc"], keys["file"], keys["hash_lo"], keys["hash_hi"]))]
    repeat = np.zeros(len(keys), dtype=bool)  # the same hash as the key before it: not the first of its text
    repeat[1:] = (keys["hash_hi"][1:] == keys["hash_hi"][:-1]) & (keys["hash_lo"][1:] == keys["hash_lo"][:-1])
    first = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(keys))))  # the index of each key's group head
    dropped, originals = keys[repeat], keys[first[repeat]]
    order = np.lexsort((dropped["doc"], dropped["file"]))
    return Duplicates(dropped[order], originals[order])


# ------------------------------------------------------------------------------------------ split rules


def random_split_streams(runs: np.ndarray) -> dict[str, Stream]:
    """nanoGPT's openwebtext rule: each document's split was decided when it was tokenized; a run gives a piece to
    each split that has tokens in it, filtered to that split's rows."""
    def stream(split: int, tokens: str, docs: str) -> Stream:
        pieces = [_run_piece(r, split, int(r[tokens])) for r in runs if r[tokens]]
        return Stream(pieces, int(runs[docs].sum()))

    return {"train": stream(TRAIN, "train_tokens", "train_docs"), "val": stream(VAL, "val_tokens", "val_docs")}


@dataclass(frozen=True)
class TailCut:
    """Where the tail rule cuts the corpus: character `offset` of run `run` (in corpus order) is the first of val."""

    run: int
    offset: int


@dataclass(frozen=True)
class CutLocation:
    """The document holding the tail cut, found in its block's rows (`locate_cut`)."""

    row: int            # its row in the block
    char_offset: int    # the cut's offset inside it; 0: the cut falls between two documents
    tokens_before: int  # tokens of the run's rows before it
    row_tokens: int     # its own tokens
    docs_before: int    # non-empty documents of the run before it
    file_index: int     # which document it is, to read it again
    doc_index: int


@dataclass(frozen=True)
class CutHalves:
    """A document cut by the tail rule, tokenized again as its train half (row 0) and val half (row 1) in an extra
    block: BPE tokens may span the cut, so the halves are not slices of the whole document's tokens."""

    block: int
    num_train_tokens: int
    num_val_tokens: int


def tail_cut(runs: np.ndarray, val_fraction: float) -> TailCut | None:
    """nanoGPT's rule: the first int(n * (1 - val_fraction)) of the n characters are train. None when that is all
    of them (val is empty)."""
    total = int(runs["chars"].sum())
    train_chars = int(total * (1 - val_fraction))
    ends = np.cumsum(runs["chars"])
    run = int(np.searchsorted(ends, train_chars, side="right"))  # the first run whose end lies beyond the cut
    if run == len(runs):
        return None
    return TailCut(run=run, offset=train_chars - int(ends[run] - runs["chars"][run]))


def locate_cut(docs: DocumentColumns, row_lo: int, row_hi: int, offset: int) -> CutLocation:
    """Which row of [row_lo, row_hi) holds character `offset` of their concatenated text, and the counts before it."""
    chars = docs.num_chars[row_lo:row_hi]
    ntok = docs.num_tokens[row_lo:row_hi]
    ends = np.cumsum(chars)
    i = int(np.searchsorted(ends, offset, side="right"))  # the first document ending after the offset
    return CutLocation(
        row=row_lo + i,
        char_offset=offset - int(ends[i] - chars[i]),
        tokens_before=int(ntok[:i].sum()),
        row_tokens=int(ntok[i]),
        docs_before=int((chars[:i] > 0).sum()),
        file_index=int(docs.file_index[row_lo + i]),
        doc_index=int(docs.doc_index[row_lo + i]),
    )


def tail_split_streams(
    runs: np.ndarray, cut: TailCut | None, location: CutLocation | None, halves: CutHalves | None
) -> dict[str, Stream]:
    """The streams of the tail rule: runs before the cut are train, runs after it val, and the run holding it is
    split at `location`'s row. A document cut in two (location.char_offset > 0) gives `halves` when it was
    tokenized again (BPE), else (char-level: one token per character) slices of its own tokens."""
    if cut is None:
        return {"train": Stream(_whole_runs(runs), int(runs["train_docs"].sum())), "val": Stream([], 0)}
    if location is None:
        raise ValueError("a tail cut inside the corpus needs its location (locate_cut)")
    before, r, after = runs[:cut.run], runs[cut.run], runs[cut.run + 1:]
    block, row_lo, row_hi = int(r["block"]), int(r["row_lo"]), int(r["row_hi"])
    cut_inside = location.char_offset > 0  # the document counts in both splits, like nanoGPT's data[:i] / data[i:]
    train = Stream(_whole_runs(before), int(before["train_docs"].sum()) + location.docs_before + int(cut_inside))
    # val's documents: the run's from the cut's document on (a cut document included), then every later run's.
    val = Stream([], int(r["train_docs"]) - location.docs_before + int(after["train_docs"].sum()))
    if location.tokens_before:
        train.pieces.append(Piece(block, row_lo, location.row, None, location.tokens_before))
    if cut_inside:
        train_half, val_half = _cut_halves(block, location, halves)
        train.pieces.append(train_half)
        val.pieces.append(val_half)
    after_row = location.row + 1 if cut_inside else location.row
    tokens_after = int(r["train_tokens"]) - location.tokens_before - (location.row_tokens if cut_inside else 0)
    if tokens_after:
        val.pieces.append(Piece(block, after_row, row_hi, None, tokens_after))
    val.pieces.extend(_whole_runs(after))
    return {"train": train, "val": val}


def _cut_halves(block: int, location: CutLocation, halves: CutHalves | None) -> tuple[Piece, Piece]:
    """The train and val pieces of the document holding the cut."""
    if halves is not None:
        return (Piece(halves.block, 0, 1, None, halves.num_train_tokens),
                Piece(halves.block, 1, 2, None, halves.num_val_tokens))
    k, row = location.char_offset, location.row  # char-level: one token per character, so slice at the cut
    return Piece(block, row, row + 1, None, k), Piece(block, row, row + 1, None, location.row_tokens - k, skip=k)


def _whole_runs(runs: np.ndarray) -> list[Piece]:
    """One piece per run with tokens, all its rows (the tail rule marks every document train when tokenizing)."""
    return [_run_piece(r, None, int(r["train_tokens"])) for r in runs if r["train_tokens"]]


def _run_piece(run: np.void, split: int | None, num_tokens: int) -> Piece:
    return Piece(int(run["block"]), int(run["row_lo"]), int(run["row_hi"]), split, num_tokens)


# ------------------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class ShardPlan:
    """One output shard: the blocks it reads (ascending) and, in order, the token ranges of pieces that fill it.
    Each part is (position of the piece's block in `blocks`, piece, start, stop): tokens [start, stop) of the
    piece. Positions, not block indices, because the writing task is handed only the blocks it reads."""

    split: str
    index: int
    blocks: list[int]
    parts: list[tuple[int, Piece, int, int]]


def plan_output_shards(streams: dict[str, Stream], shard_size: int) -> list[ShardPlan]:
    """Every shard of every split, train first: each split's stream cut into shards of `shard_size` tokens."""
    plans = []
    for split in SPLITS:
        pieces = streams[split].pieces
        for index, ranges in enumerate(plan_shards([p.num_tokens for p in pieces], shard_size)):
            used = sorted({pieces[i].block for i, _, _ in ranges})
            position = {b: k for k, b in enumerate(used)}
            parts = [(position[pieces[i].block], pieces[i], lo, hi) for i, lo, hi in ranges]
            plans.append(ShardPlan(split, index, used, parts))
    return plans
