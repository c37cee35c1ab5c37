"""Corpora: named-corpus resolution (env var, cache, download), input specs, documents from files, the random split."""

from __future__ import annotations

import dataclasses
import gzip
import http.server
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanogpt.data import corpus
from nanogpt.data.corpus import (
    NAMED_CORPORA,
    CorpusError,
    decode_text,
    download,
    fingerprint,
    is_val_document,
    parse_documents,
    resolve_input,
    resolve_named_corpus,
)

# ------------------------------------------------------------------------------------------ named corpora


def test_named_corpus_from_env_var(shakespeare_path):
    assert resolve_named_corpus("tinyshakespeare") == shakespeare_path


def test_named_corpus_env_var_must_name_a_file(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOGPT_TINYSHAKESPEARE", str(tmp_path / "nope.txt"))
    with pytest.raises(CorpusError, match="NANOGPT_TINYSHAKESPEARE=.*nope.txt is not a file"):
        resolve_named_corpus("tinyshakespeare")


def test_named_corpus_from_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOGPT_TINYSHAKESPEARE", raising=False)
    monkeypatch.setenv("NANOGPT_CACHE_DIR", str(tmp_path))
    cached = tmp_path / "tinyshakespeare" / "input.txt"
    cached.parent.mkdir()
    cached.write_text("cached copy")
    assert resolve_named_corpus("tinyshakespeare") == cached


@pytest.fixture
def http_server(tmp_path):
    """A real local HTTP server (no network here) serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_is_checked_and_atomic(http_server, tmp_path, monkeypatch, shakespeare_path):
    root, url = http_server
    (root / "input.txt").write_bytes(shakespeare_path.read_bytes())
    entry = NAMED_CORPORA["tinyshakespeare"]
    monkeypatch.setitem(NAMED_CORPORA, "tinyshakespeare", dataclasses.replace(entry, url=f"{url}/input.txt"))
    monkeypatch.delenv("NANOGPT_TINYSHAKESPEARE")
    monkeypatch.setenv("NANOGPT_CACHE_DIR", str(tmp_path / "cache"))
    path = resolve_named_corpus("tinyshakespeare")
    assert path == tmp_path / "cache" / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == shakespeare_path.read_bytes()  # and its sha256 matched the registry's
    assert [p.name for p in path.parent.iterdir()] == ["input.txt"]

    (root / "bad.txt").write_text("not shakespeare")
    with pytest.raises(CorpusError, match="has sha256 .*, expected"):
        download(f"{url}/bad.txt", tmp_path / "bad" / "input.txt", sha256=entry.sha256)
    assert list((tmp_path / "bad").iterdir()) == []  # no half file, no temporary file


def test_offline_error_says_how_to_point_at_local_copies(monkeypatch, tmp_path):
    entry = NAMED_CORPORA["tinyshakespeare"]
    # Port 9 (discard) on localhost refuses connections: the same path as having no network.
    monkeypatch.setitem(NAMED_CORPORA, "tinyshakespeare", dataclasses.replace(entry, url="http://127.0.0.1:9/input.txt"))
    monkeypatch.delenv("NANOGPT_TINYSHAKESPEARE", raising=False)
    monkeypatch.setenv("NANOGPT_CACHE_DIR", str(tmp_path))
    with pytest.raises(CorpusError) as e:
        resolve_named_corpus("tinyshakespeare")
    message = str(e.value)
    assert "could not download" in message
    assert "NANOGPT_TINYSHAKESPEARE=/path/input.txt" in message and "--input /path/input.txt" in message
    assert "TIKTOKEN_CACHE_DIR" in message
    assert not (tmp_path / "tinyshakespeare" / "input.txt").exists()


def test_unknown_named_corpus():
    with pytest.raises(CorpusError, match="unknown corpus 'tinyshakespear'"):
        resolve_named_corpus("tinyshakespear")


# ------------------------------------------------------------------------------------------ input specs


def test_resolve_file_dir_and_glob(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.parquet").write_bytes(b"")
    (tmp_path / "notes.csv").write_text("skipped: not a supported extension")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "d.txt").write_text("skipped: hidden")

    src = resolve_input(str(tmp_path))
    assert src.kind == "files"
    assert [Path(f.path).relative_to(tmp_path).as_posix() for f in src.files] == ["a.jsonl", "b.txt", "sub/c.parquet"]
    assert [Path(f.path).name for f in resolve_input(str(tmp_path / "*.txt")).files] == ["b.txt"]
    assert [Path(f.path).name for f in resolve_input(str(tmp_path / "**" / "*.parquet")).files] == ["c.parquet"]
    single = resolve_input(str(tmp_path / "b.txt"))
    assert single.files[0].size == 1 and single.describe()["num_files"] == 1


def test_a_file_reached_by_two_paths_is_read_once(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    (corpus_dir / "a.txt").write_text("the same text")
    (corpus_dir / "b.txt").symlink_to("a.txt")  # a symlink beside its target: one file
    (corpus_dir / "c.txt").write_text("the same text")  # a copy: another file (its documents are deduplicated later)
    expected = [str((corpus_dir / n).resolve()) for n in ("a.txt", "c.txt")]
    for spec in (corpus_dir, corpus_dir / "*.txt"):
        assert [f.path for f in resolve_input(str(spec)).files] == expected, spec
    assert [f.path for f in resolve_input(str(tmp_path / "**" / "*.txt")).files] == expected  # matched via **/ too


def test_resolve_errors(tmp_path):
    with pytest.raises(CorpusError, match="no such file or directory"):
        resolve_input(str(tmp_path / "missing.txt"))
    with pytest.raises(CorpusError, match="matches no files"):
        resolve_input(str(tmp_path / "*.txt"))
    with pytest.raises(CorpusError, match="no .txt/.*files in this directory"):
        resolve_input(str(tmp_path))
    with pytest.raises(CorpusError, match="no input"):
        resolve_input("")


def test_resolve_hf_specs(tmp_path):
    src = resolve_input("hf:openwebtext")
    assert (src.kind, src.hf_path, src.hf_config) == ("hf", "openwebtext", None)
    assert resolve_input("hf:wikitext:wikitext-103-raw-v1").hf_config == "wikitext-103-raw-v1"
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    local = resolve_input(str(tmp_path / "ds"))
    assert local.kind == "hf" and local.hf_path == str((tmp_path / "ds").resolve())
    assert corpus.load_hf_dataset(local, "text")["text"] == ["a", "b"]
    with pytest.raises(CorpusError, match=r"no column 'body' \(columns: text\)"):
        corpus.load_hf_dataset(local, "body")


def test_input_fingerprint_follows_size_and_mtime(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    first = resolve_input(str(f)).fingerprint()
    assert resolve_input(str(f)).fingerprint() == first
    f.write_text("two!")
    assert resolve_input(str(f)).fingerprint() != first
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


# ------------------------------------------------------------------------------------------ documents


def test_text_is_one_document_or_split_on_a_separator():
    data = b"para one\n\npara two\n\n\n\nthree\n"
    assert parse_documents("x.txt", data).texts == ["para one\n\npara two\n\n\n\nthree\n"]
    assert parse_documents("x.txt", data, separator="\n\n").texts == ["para one", "para two", "", "three\n"]
    assert parse_documents("x.txt", b"a\r\nb").texts == ["a\r\nb"]  # bytes exactly: no newline translation
    assert parse_documents("x.txt.gz", gzip.compress(b"zipped")).texts == ["zipped"]


def test_undecodable_bytes_are_replaced_and_counted_or_fail():
    data = b"ok \xff\xfe bad \xef\xbf\xbd real replacement char"
    text, num_replaced = decode_text(data, "x.txt", "replace")
    assert num_replaced == 2 and text.count("\ufffd") == 3
    assert parse_documents("x.txt", data).num_replaced == 2
    with pytest.raises(CorpusError, match=r"x\.txt: byte offset 3: not UTF-8"):
        parse_documents("x.txt", data, encoding_errors="fail")


def random_bytes(n: int) -> bytes:
    return np.random.default_rng(0).bytes(n)


def first_bad_offset(data: bytes) -> int:
    with pytest.raises(UnicodeDecodeError) as raised:
        data.decode("utf-8")
    return raised.value.start


def test_auto_fails_binary_input_and_replace_keeps_it():
    data = random_bytes(50_000)
    bad = first_bad_offset(data)
    pattern = rf"r\.txt: \d\d,\d{{3}} undecodable byte sequences in 50,000 bytes \(\d\d\.\d%; the first at byte offset {bad}\)"
    with pytest.raises(CorpusError, match=pattern + r": not UTF-8 text .*--data\.encoding_errors=replace"):
        parse_documents("r.txt", data)  # "auto", the default
    parsed = parse_documents("r.txt", data, encoding_errors="replace")
    assert parsed.num_replaced > 10_000 and parsed.first_replaced == f"byte offset {bad}"
    with pytest.raises(CorpusError, match=rf"r\.txt: byte offset {bad}: not UTF-8"):
        parse_documents("r.txt", data, encoding_errors="fail")


def test_auto_replaces_up_to_one_percent():
    text = bytearray(b"a" * 10_000)
    text[500] = 0xFF
    parsed = parse_documents("t.txt", bytes(text))
    assert (parsed.num_replaced, parsed.first_replaced) == (1, "byte offset 500")
    text[1000:1100] = b"\xff" * 100  # 101 of 10,000 bytes: just over 1%
    with pytest.raises(CorpusError, match=r"t\.txt: 101 undecodable byte sequences in 10,000 bytes \(1\.0%; the first at byte offset 500\)"):
        parse_documents("t.txt", bytes(text))
    small = b"\xff" * 16 + b"a"  # a few stray bytes in a tiny file: a warning, not binary input
    assert parse_documents("s.txt", small).num_replaced == 16
    with pytest.raises(CorpusError, match=r"s\.txt: 17 undecodable"):
        parse_documents("s.txt", b"\xff" + small)


def test_undecodable_bytes_are_located_by_line_and_row(tmp_path):
    lines = b'{"text": "fine"}\n{"text": "caf\xe9"}\n'
    parsed = parse_documents("d.jsonl", lines)
    assert parsed.first_replaced == "line 2, byte offset 30" and parsed.texts == ["fine", "caf\ufffd"]
    pq.write_table(pa.table({"text": [b"ok", b"ok \xff", b"\xff"]}), tmp_path / "b.parquet")
    parsed = parse_documents("b.parquet", (tmp_path / "b.parquet").read_bytes())
    assert (parsed.num_replaced, parsed.first_replaced) == (2, "row 1, byte offset 3")
    pq.write_table(pa.table({"text": [b"ok", random_bytes(2000)]}), tmp_path / "r.parquet")
    with pytest.raises(CorpusError, match=r"r\.parquet: \d+ undecodable byte sequences in 2,002 bytes .*the first at row 1, byte offset"):
        parse_documents("r.parquet", (tmp_path / "r.parquet").read_bytes())


def test_jsonl_documents_and_errors():
    lines = b'{"text": "first", "id": 1}\n\n{"text": "second\\n"}\n{"text": null}\n'
    assert parse_documents("d.jsonl", lines).texts == ["first", "second\n", ""]
    with pytest.raises(CorpusError, match=r"d\.jsonl: line 2: not valid JSON"):
        parse_documents("d.jsonl", b'{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(CorpusError, match=r"d\.jsonl: line 1: no field 'text' \(fields: body, id\)"):
        parse_documents("d.jsonl", b'{"body": "a", "id": 1}\n')
    with pytest.raises(CorpusError, match=r"line 1: field 'text' is int"):
        parse_documents("d.jsonl", b'{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"line 1: expected a JSON object"):
        parse_documents("d.jsonl", b'["text"]\n')
    assert parse_documents("d.jsonl", b'{"body": "x"}\n', text_field="body").texts == ["x"]
    assert parse_documents("d.json", b'[{"text": "a"}, {"text": "b"}]').texts == ["a", "b"]


def test_parquet_documents_and_missing_column(tmp_path):
    table = pa.table({"id": [1, 2, 3], "text": ["alpha", None, "gamma"]})
    pq.write_table(table, tmp_path / "d.parquet")
    data = (tmp_path / "d.parquet").read_bytes()
    assert parse_documents("d.parquet", data).texts == ["alpha", "", "gamma"]
    with pytest.raises(CorpusError, match=r"d\.parquet: no column 'body' \(columns: id, text\)"):
        parse_documents("d.parquet", data, text_field="body")
    with pytest.raises(CorpusError, match=r"d\.parquet: column 'id' has type int64"):
        parse_documents("d.parquet", data, text_field="id")
    with pytest.raises(CorpusError, match=r"d\.parquet: not a readable parquet file"):
        parse_documents("d.parquet", b"not parquet")


def test_random_split_is_a_seeded_per_document_hash():
    docs = np.arange(200_000)
    val = is_val_document(2357, 0, docs, 0.1)
    assert abs(val.mean() - 0.1) < 0.005
    # The same document gets the same answer however the documents are batched.
    assert np.array_equal(np.concatenate([is_val_document(2357, 0, d, 0.1) for d in np.array_split(docs, 7)]), val)
    assert not np.array_equal(is_val_document(1, 0, docs, 0.1), val)
    assert not np.array_equal(is_val_document(2357, 1, docs, 0.1), val)
    assert not is_val_document(2357, 0, docs, 0.0).any()


def test_json_error_names_line_after_blank_lines():
    text = '{"text": "a"}\n\n\n{oops}\n'
    with pytest.raises(CorpusError, match="line 4"):
        parse_documents("x.jsonl", text.encode())
