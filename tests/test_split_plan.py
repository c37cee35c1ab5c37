"""nanogpt/data/split_plan.py against small corpora worked out by hand (no Ray, no tokens on disk).

The corpus of most tests: five documents of two files, tokenized into two blocks that hold them out of order.
Tokens are the characters themselves (char-level), so every stream can be checked against the text:

    block 0: file 0 doc 2 "ghi" | file 0 doc 3 "" (empty) | file 1 doc 0 "jk"
    block 1: file 0 doc 0 "ab"  | file 0 doc 1 "cdef"
    corpus order: "ab" "cdef" "ghi" "" "jk" = "abcdefghijk" (11 characters)
"""

from __future__ import annotations

import numpy as np
import pytest

from nanogpt.data.split_plan import (
    DOC_KEY,
    RUN,
    TRAIN,
    VAL,
    CutHalves,
    CutLocation,
    DocumentColumns,
    Piece,
    PrepareError,
    ShardPlan,
    Stream,
    TailCut,
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

TEXT = "abcdefghijk"
# (file, doc, text, split under the random rule) per row of each block
BLOCKS = [
    [(0, 2, "ghi", TRAIN), (0, 3, "", TRAIN), (1, 0, "jk", VAL)],
    [(0, 0, "ab", TRAIN), (0, 1, "cdef", VAL)],
]


def columns(rows: list[tuple[int, int, str, int]], random_split: bool = False, replaced: int = 0) -> DocumentColumns:
    """A block's DocumentColumns, char-level (one token per character); splits all TRAIN unless `random_split`."""
    return DocumentColumns(
        file_index=np.array([r[0] for r in rows], dtype=np.int32),
        doc_index=np.array([r[1] for r in rows], dtype=np.int64),
        split=np.array([r[3] if random_split else TRAIN for r in rows], dtype=np.int8),
        num_chars=np.array([len(r[2]) for r in rows], dtype=np.int64),
        num_tokens=np.array([len(r[2]) for r in rows], dtype=np.int64),
        num_replaced=np.array([replaced] + [0] * (len(rows) - 1), dtype=np.int64)[:len(rows)],
    )


def corpus_runs(random_split: bool = False) -> np.ndarray:
    return order_runs([summarize_runs(columns(rows, random_split)) for rows in BLOCKS])


def gather(stream: Stream) -> str:
    """What the shard writer does with a stream's pieces, on the Python rows of BLOCKS."""
    out = []
    for p in stream.pieces:
        rows = BLOCKS[p.block][p.row_lo:p.row_hi]
        text = "".join(t for _, _, t, split in rows if p.split is None or split == p.split)
        out.append(text[p.skip:p.skip + p.num_tokens])
    return "".join(out)


def fields(runs: np.ndarray, *names: str) -> list[tuple[int, ...]]:
    return [tuple(int(r[n]) for n in names) for r in runs]


# ------------------------------------------------------------------------------------------ runs


def test_summarize_runs_breaks_at_a_new_file_and_at_a_gap_in_documents():
    rows = [(0, 2, "ghi", TRAIN), (0, 3, "", VAL), (1, 0, "jk", VAL), (1, 1, "l", TRAIN), (1, 5, "mnop", VAL)]
    runs = summarize_runs(columns(rows, random_split=True, replaced=2))
    assert runs.dtype == RUN
    assert fields(runs, "file", "doc_lo", "doc_hi", "block", "row_lo", "row_hi") == [
        (0, 2, 4, 0, 0, 2), (1, 0, 2, 0, 2, 4), (1, 5, 6, 0, 4, 5)]
    assert fields(runs, "train_tokens", "val_tokens", "train_docs", "val_docs") == [
        (3, 0, 1, 0), (1, 2, 1, 1), (0, 4, 0, 1)]  # the empty val document counts in neither split
    assert fields(runs, "chars", "empty_docs", "replaced_chars") == [(3, 1, 2), (3, 0, 0), (4, 0, 0)]


def test_summarize_runs_of_an_empty_block():
    runs = summarize_runs(columns([]))
    assert runs.dtype == RUN and len(runs) == 0


def test_order_runs_sorts_by_file_then_document_and_tags_each_block():
    runs = corpus_runs()
    assert fields(runs, "file", "doc_lo", "doc_hi", "block", "row_lo", "row_hi") == [
        (0, 0, 2, 1, 0, 2), (0, 2, 4, 0, 0, 2), (1, 0, 1, 0, 2, 3)]
    assert len(order_runs([])) == 0


def test_order_runs_rejects_a_document_in_two_blocks():
    twice = [[(0, 0, "ab", TRAIN), (0, 1, "cd", TRAIN)], [(0, 1, "cd", TRAIN), (0, 2, "e", TRAIN)]]
    with pytest.raises(PrepareError, match="a document appears in two blocks"):
        order_runs([summarize_runs(columns(rows)) for rows in twice])
    # the same document index in two files is no overlap
    order_runs([summarize_runs(columns([(0, 0, "ab", TRAIN)])), summarize_runs(columns([(1, 0, "cd", TRAIN)]))])


def test_corpus_stats():
    runs = order_runs([summarize_runs(columns(BLOCKS[0], replaced=3)), summarize_runs(columns(BLOCKS[1]))])
    assert corpus_stats(runs, num_files=2, num_duplicates=5) == {
        "num_files": 2, "num_documents": 4, "num_empty_documents_skipped": 1, "num_duplicate_documents_removed": 5,
        "num_characters": 11, "num_replaced_characters": 3}


# ------------------------------------------------------------------------------------------ duplicates


def doc_keys(rows: list[tuple[str, int, int]], block: int) -> np.ndarray:
    """A block's DOC_KEY rows from (text, file, doc) per row; the text's hash is a stand-in: its characters."""
    keys = np.zeros(len(rows), DOC_KEY)
    for row, (text, file, doc) in enumerate(rows):
        keys[row] = (len(text), int.from_bytes(text.encode().ljust(8, b"_")[:8], "little"), file, doc, block, row)
    return keys


def test_find_duplicates_keeps_the_first_in_corpus_order_whatever_the_blocks():
    # corpus order: (0,0) "ab", (0,1) "cd", (1,0) "ab", (1,1) "ef", (2,0) "cd", (2,1) "ab"
    docs = [("ab", 0, 0), ("cd", 0, 1), ("ab", 1, 0), ("ef", 1, 1), ("cd", 2, 0), ("ab", 2, 1)]
    expected = [((1, 0), (0, 0)), ((2, 0), (0, 1)), ((2, 1), (0, 0))]  # (dropped, the earlier one it repeats)
    for blocks in ([docs], [docs[3:], docs[:3]], [[d] for d in reversed(docs)]):
        found = find_duplicates([doc_keys(rows, b) for b, rows in enumerate(blocks)])
        pairs = [((int(d["file"]), int(d["doc"])), (int(o["file"]), int(o["doc"])))
                 for d, o in zip(found.dropped, found.originals)]
        assert pairs == expected, blocks
        dropped = {d for d, _ in expected}
        for block, rows in enumerate(blocks):  # each block's rows to drop, by position in the block
            assert sorted(found.rows_of_block(block)) == [i for i, (_, f, d) in enumerate(rows) if (f, d) in dropped]
    assert len(find_duplicates([doc_keys(docs[:2], 0), doc_keys([("ef", 1, 0)], 1)]).dropped) == 0
    assert len(find_duplicates([]).dropped) == 0


# ------------------------------------------------------------------------------------------ random split


def test_random_split_streams_filter_each_run_to_its_split():
    streams = random_split_streams(corpus_runs(random_split=True))
    assert streams["train"] == Stream([Piece(1, 0, 2, TRAIN, 2), Piece(0, 0, 2, TRAIN, 3)], 2)
    assert streams["val"] == Stream([Piece(1, 0, 2, VAL, 4), Piece(0, 2, 3, VAL, 2)], 2)
    assert (gather(streams["train"]), gather(streams["val"])) == ("abghi", "cdefjk")


# ------------------------------------------------------------------------------------------ tail split

# val_fraction -> (train characters int(11 * (1 - f)), the cut as (run, offset))
TAIL_CUTS = {
    0.5: (5, TailCut(run=0, offset=5)),   # inside "cdef", the second document of run 0
    0.4: (6, TailCut(run=1, offset=0)),   # exactly at the start of run 1
    0.3: (7, TailCut(run=1, offset=1)),   # inside "ghi"
    0.1: (9, TailCut(run=2, offset=0)),   # after the empty document: it stays in train
    0.0: (11, None),                      # val is empty
}


@pytest.mark.parametrize("val_fraction", list(TAIL_CUTS))
def test_tail_cut(val_fraction):
    train_chars, cut = TAIL_CUTS[val_fraction]
    assert int(len(TEXT) * (1 - val_fraction)) == train_chars
    assert tail_cut(corpus_runs(), val_fraction) == cut


def test_locate_cut_inside_a_document_and_between_two():
    docs = columns([(0, 7, "abc", TRAIN), (0, 8, "", TRAIN), (0, 9, "defg", TRAIN), (0, 10, "hi", TRAIN)])
    # rows 1..4 are "" "defg" "hi": character 5 of them is the "i"
    assert locate_cut(docs, 1, 4, 5) == CutLocation(row=3, char_offset=1, tokens_before=4, row_tokens=2,
                                                    docs_before=1, file_index=0, doc_index=10)
    # character 3 of rows 0..4 starts "defg": the empty document before it is not counted
    assert locate_cut(docs, 0, 4, 3) == CutLocation(row=2, char_offset=0, tokens_before=3, row_tokens=4,
                                                    docs_before=1, file_index=0, doc_index=9)


def char_tail_streams(val_fraction: float) -> dict[str, Stream]:
    runs = corpus_runs()
    cut = tail_cut(runs, val_fraction)
    location = None
    if cut is not None:
        r = runs[cut.run]
        location = locate_cut(columns(BLOCKS[int(r["block"])]), int(r["row_lo"]), int(r["row_hi"]), cut.offset)
    return tail_split_streams(runs, cut, location, halves=None)


def test_tail_split_inside_a_document_slices_its_characters():
    streams = char_tail_streams(0.5)  # "ab" "cde|f" "ghi" "" "jk"
    assert streams["train"] == Stream([Piece(1, 0, 1, None, 2), Piece(1, 1, 2, None, 3)], 2)
    assert streams["val"] == Stream([Piece(1, 1, 2, None, 1, skip=3), Piece(0, 0, 2, None, 3),
                                     Piece(0, 2, 3, None, 2)], 3)  # "cdef" counts in both splits


def test_tail_split_between_two_documents():
    streams = char_tail_streams(0.4)  # "ab" "cdef" | "ghi" "" "jk"
    assert streams["train"] == Stream([Piece(1, 0, 2, None, 6)], 2)
    assert streams["val"] == Stream([Piece(0, 0, 2, None, 3), Piece(0, 2, 3, None, 2)], 2)


@pytest.mark.parametrize("val_fraction", [k / 20 for k in range(21)])
def test_tail_split_cuts_the_text_at_nanogpts_index(val_fraction):
    n = int(len(TEXT) * (1 - val_fraction))
    streams = char_tail_streams(val_fraction)
    assert (gather(streams["train"]), gather(streams["val"])) == (TEXT[:n], TEXT[n:])


def test_tail_split_takes_the_retokenized_halves_of_a_bpe_document():
    runs = corpus_runs()  # as if BPE: "cdef" is 4 tokens, and its halves "cde" / "f" are 2 and 1
    location = CutLocation(row=1, char_offset=3, tokens_before=2, row_tokens=4, docs_before=1, file_index=0,
                           doc_index=1)
    streams = tail_split_streams(runs, TailCut(run=0, offset=5), location, CutHalves(block=2, num_train_tokens=2,
                                                                                       num_val_tokens=1))
    assert streams["train"] == Stream([Piece(1, 0, 1, None, 2), Piece(2, 0, 1, None, 2)], 2)
    assert streams["val"] == Stream([Piece(2, 1, 2, None, 1), Piece(0, 0, 2, None, 3), Piece(0, 2, 3, None, 2)], 3)


def test_tail_split_without_val():
    streams = char_tail_streams(0.0)
    assert streams["train"] == Stream([Piece(1, 0, 2, None, 6), Piece(0, 0, 2, None, 3), Piece(0, 2, 3, None, 2)], 4)
    assert streams["val"] == Stream([], 0)


# ------------------------------------------------------------------------------------------ shards


def test_plan_output_shards_hands_each_shard_only_the_blocks_it_reads():
    a, b, c = Piece(3, 0, 1, None, 5), Piece(1, 0, 2, None, 4), Piece(2, 0, 1, VAL, 3)
    plans = plan_output_shards({"train": Stream([a, b], 2), "val": Stream([c], 1)}, shard_size=6)
    assert plans == [
        ShardPlan("train", 0, blocks=[1, 3], parts=[(1, a, 0, 5), (0, b, 0, 1)]),
        ShardPlan("train", 1, blocks=[1], parts=[(0, b, 1, 4)]),
        ShardPlan("val", 0, blocks=[2], parts=[(0, c, 0, 3)]),
    ]
    assert plan_output_shards({"train": Stream([], 0), "val": Stream([], 0)}, shard_size=6) == []
