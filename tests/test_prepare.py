"""pipelines/prepare.py end to end on a real Ray local cluster, real tiktoken, real shards on disk.

nanoGPT's figures on Tiny Shakespeare: char-level 1,003,854 train / 111,540 val tokens (vocabulary 65);
GPT-2 BPE 301,966 / 36,059. Outputs are shared through module-scoped fixtures: each Ray Data run costs seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanogpt.config import ConfigError, DataConfig, load_config
from nanogpt.data.corpus import CorpusError, fingerprint, is_val_document, resolve_input
from nanogpt.data.shards import MANIFEST_NAME, load_split, read_shard, verify
from nanogpt.tokenizers import tokenizer_from_dict
from pipelines.data_prep import plan
from pipelines.prepare import PRESET_DIR, main, pipeline_settings, prepare
from tests.conftest import hold_lock

REPO = Path(__file__).resolve().parents[1]
EOT = 50256


def preset(name: str, *overrides: str) -> DataConfig:
    return load_config(name, list(overrides), search_dirs=[PRESET_DIR]).data


def split_tokens(out: Path, split: str) -> np.ndarray:
    shards = load_split(out, split)
    return np.concatenate([np.asarray(s) for s in shards]) if shards else np.empty(0, np.uint16)


def shard_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.fixture(scope="module")
def gpt2():
    import tiktoken

    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def char_out(ray_local, shakespeare_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shakespeare_char")
    prepare(preset("shakespeare_char"), out)
    return out


@pytest.fixture(scope="module")
def bpe_out(ray_local, shakespeare_path, tiktoken_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shakespeare")
    prepare(preset("shakespeare"), out)
    return out


# ------------------------------------------------------------------------------------------ nanoGPT's datasets


def test_char_shards_decode_to_the_original_text(char_out, shakespeare_path):
    text = shakespeare_path.read_text()
    manifest = verify(char_out)  # every shard hashed against the manifest
    tok = tokenizer_from_dict(manifest.tokenizer)
    train, val = split_tokens(char_out, "train"), split_tokens(char_out, "val")
    assert (len(train), len(val), tok.vocab_size) == (1_003_854, 111_540, 65)
    assert tok.decode(train) + tok.decode(val) == text
    assert tok.decode(val) == text[int(len(text) * 0.9):]  # nanoGPT's data[int(n*0.9):]


def test_char_manifest_contents(char_out, shakespeare_path):
    text = shakespeare_path.read_text()
    m = verify(char_out)
    assert m.tokenizer == {"name": "char", "vocab_size": 65, "chars": sorted(set(text))}
    assert (m.vocab_size, m.dtype, m.num_documents) == (65, "uint16", 1)
    assert m.split_rule == {"split": "tail", "val_fraction": 0.1, "seed": 2357, "unit": "characters"}
    assert {k: (s.num_tokens, len(s.shards), s.num_documents) for k, s in m.splits.items()} == {
        "train": (1_003_854, 1, 1), "val": (111_540, 1, 1)}
    for s in m.splits["train"].shards + m.splits["val"].shards:
        assert s.sha256 == hashlib.sha256((char_out / s.name).read_bytes()).hexdigest()
    assert m.input_fingerprint == resolve_input(str(shakespeare_path)).fingerprint()
    assert m.settings_fingerprint == fingerprint(pipeline_settings(preset("shakespeare_char")))
    assert m.settings["tokenizer"] == "char" and m.shard_size == 100_000_000
    assert m.inputs["num_files"] == 1 and m.inputs["num_bytes"] == len(text.encode())
    assert m.stats["num_characters"] == len(text) and m.stats["num_replaced_characters"] == 0
    assert m.stats["tokens_per_second"] > 0
    datetime.fromisoformat(m.created_at)
    assert json.loads((char_out / MANIFEST_NAME).read_text())["dtype"] == "uint16"
    assert shard_files(char_out) == ["manifest.json", "train_000000.bin", "val_000000.bin"]


def test_bpe_shards_are_tiktokens_encoding(bpe_out, shakespeare_path, gpt2):
    text = shakespeare_path.read_text()
    n = int(len(text) * 0.9)
    train, val = split_tokens(bpe_out, "train"), split_tokens(bpe_out, "val")
    assert (len(train), len(val)) == (301_966, 36_059)
    assert train.tolist() == gpt2.encode_ordinary(text[:n])
    assert val.tolist() == gpt2.encode_ordinary(text[n:])
    m = verify(bpe_out)
    assert m.tokenizer == {"name": "gpt2", "vocab_size": 50257, "eot_token": 50256} and m.dtype == "uint16"


# ------------------------------------------------------------------------------------------ determinism, shards


@pytest.fixture(scope="module")
def shakespeare_files(shakespeare_path, tmp_path_factory) -> Path:
    """Tiny Shakespeare as 8 files of paragraphs, so that 1 and 4 blocks really divide the work differently."""
    paragraphs = shakespeare_path.read_text().split("\n\n")
    root = tmp_path_factory.mktemp("plays")
    for i, part in enumerate(np.array_split(np.array(paragraphs, dtype=object), 8)):
        (root / f"part{i}.txt").write_text("\n\n".join(part))
    return root


def expected_random_split(root: Path, gpt2, val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Reference: documents in file order, GPT-2 tokens + EOT, each routed by the seeded per-document hash; a
    document with the text of an earlier one is dropped (its count under "duplicates")."""
    out, seen = {"train": [], "val": [], "duplicates": 0}, set()
    for file_index, path in enumerate(sorted(root.iterdir())):
        docs = path.read_text().split("\n\n")
        val = is_val_document(seed, file_index, np.arange(len(docs)), val_fraction)
        for doc, is_val in zip(docs, val):
            if doc and doc in seen:
                out["duplicates"] += 1
            elif doc:
                seen.add(doc)
                out["val" if is_val else "train"] += gpt2.encode_ordinary(doc) + [EOT]
    return out


@pytest.mark.slow
def test_same_shards_whatever_the_parallelism(ray_local, shakespeare_files, tiktoken_cache, tmp_path, gpt2):
    common = dict(input=str(shakespeare_files), tokenizer="gpt2", split="random", val_fraction=0.1, separator="\n\n",
                  append_eot=True, shard_size=40_000)
    one, four = tmp_path / "one", tmp_path / "four"
    m1 = prepare(DataConfig(**common, num_blocks=1), one)
    m4 = prepare(DataConfig(**common, num_blocks=4), four)
    assert shard_files(one) == shard_files(four)
    for name in m1.shard_names():
        assert (one / name).read_bytes() == (four / name).read_bytes(), name
    assert m1.splits == m4.splits and m1.settings_fingerprint == m4.settings_fingerprint

    # Several shards of exactly shard_size tokens (the last shorter), whose concatenation is the reference.
    expected = expected_random_split(shakespeare_files, gpt2, 0.1, 2357)
    for split in ("train", "val"):
        sizes = [s.num_tokens for s in m1.splits[split].shards]
        assert all(n == 40_000 for n in sizes[:-1]) and 0 < sizes[-1] <= 40_000
        assert split_tokens(one, split).tolist() == expected[split]
    assert len(m1.splits["train"].shards) >= 8
    # Tiny Shakespeare repeats some paragraphs ("GLOUCESTER:", "CATESBY:\nMy lord?"), in one part and across parts
    docs = [d for p in shakespeare_files.iterdir() for d in p.read_text().split("\n\n") if d]
    assert m1.stats["num_duplicate_documents_removed"] == expected["duplicates"] == len(docs) - len(set(docs)) > 0
    assert m1.num_documents == len(set(docs))


def documents_of(out: Path, split: str, gpt2) -> list[str]:
    """The documents of a split written with append_eot, decoded."""
    tokens = split_tokens(out, split).tolist()
    ends = [i for i, t in enumerate(tokens) if t == EOT]
    return [gpt2.decode(tokens[a + 1:b]) for a, b in zip([-1, *ends], ends)]


def test_copies_of_documents_are_removed_counted_and_reported(ray_local, tiktoken_cache, tmp_path, gpt2, caplog):
    paragraphs = [f"Paragraph {i}: " + "words " * i for i in range(40)]
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text("\n\n".join(paragraphs))
    (root / "b.txt").write_text("\n\n".join(paragraphs))  # a copy of the file
    (root / "c.txt").symlink_to("a.txt")  # the same file through a symlink: read once
    (root / "d.txt").write_text("\n\n".join([paragraphs[3], "A new one.", paragraphs[3]]))
    # a first document that is a copy, then undecodable bytes: the file's count of them must survive the copy's drop
    (root / "e.txt").write_bytes(paragraphs[0].encode() + b"\n\nbad \xff byte")
    out = tmp_path / "out"
    argv = ["--input", str(root / "*.txt"), "--tokenizer", "gpt2", "--out", str(out), "--data.split=random",
            '--data.separator="\\n\\n"', "--data.val_fraction=0.3", "--data.append_eot=true", "--data.num_blocks=3"]
    caplog.set_level(logging.INFO, logger="nanogpt.prepare")
    assert main(argv) == 0
    m = verify(out)
    train, val = documents_of(out, "train", gpt2), documents_of(out, "val", gpt2)
    assert sorted(train + val) == sorted([*paragraphs, "A new one.", "bad \ufffd byte"])  # each once: no text in both
    assert (m.num_documents, m.stats["num_duplicate_documents_removed"], m.inputs["num_files"]) == (42, 43, 4)
    assert m.stats["num_replaced_characters"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings[0].startswith(f"replaced 1 undecodable byte sequences by U+FFFD in 1 file (the first: {root / 'e.txt'}")
    assert warnings[1:] == [f"removed 43 duplicate documents (the same text as an earlier one; the first: document 0 "
                            f"of {root / 'b.txt'} repeats document 0 of {root / 'a.txt'}): --data.dedup=false keeps them"]

    caplog.clear()
    assert main(argv) == 0
    assert "up to date" in caplog.text  # the rerun does nothing
    assert main([*argv, "--data.dedup=false"]) == 0  # another setting: rebuilt, with the copies
    m = verify(out)
    assert (m.num_documents, m.stats["num_duplicate_documents_removed"], m.settings["dedup"]) == (85, 0, False)
    assert len(documents_of(out, "train", gpt2) + documents_of(out, "val", gpt2)) == 85  # c.txt still read once


# ------------------------------------------------------------------------------------------ input formats


def expected_tail_split(docs: list[str], val_fraction: float, gpt2, eot: bool) -> dict[str, list[int]]:
    """Reference for the tail rule on documents: the first int(n * (1 - val_fraction)) characters are train; the
    document holding the cut is tokenized as two halves (each ending with EOT when eot)."""
    end = [EOT] if eot else []
    cut = int(sum(map(len, docs)) * (1 - val_fraction))
    train, val, seen = [], [], 0
    for doc in docs:
        if seen + len(doc) <= cut:
            train += gpt2.encode_ordinary(doc) + end
        elif seen >= cut:
            val += gpt2.encode_ordinary(doc) + end
        else:
            k = cut - seen
            train += gpt2.encode_ordinary(doc[:k]) + end
            val += gpt2.encode_ordinary(doc[k:]) + end
        seen += len(doc)
    return {"train": train, "val": val}


def test_jsonl_parquet_and_text_in_one_directory(ray_local, tiktoken_cache, tmp_path, gpt2):
    root = tmp_path / "mixed"
    root.mkdir()
    jsonl = [{"text": "The first document.\n", "id": 1}, {"text": "Ünïcödé and emoji 🙂", "id": 2}, {"text": ""}]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in jsonl))
    pq.write_table(pa.table({"text": ["Parquet row zero.", "Parquet row one, a little longer."]}), root / "b.parquet")
    (root / "c.txt").write_text("A plain text file\nwith two lines.\n")
    docs = [r["text"] for r in jsonl if r["text"]] + ["Parquet row zero.", "Parquet row one, a little longer."] + [
        "A plain text file\nwith two lines.\n"]

    out = tmp_path / "out"
    m = prepare(DataConfig(input=str(root), tokenizer="gpt2", val_fraction=0.2, append_eot=True), out)

    expected = expected_tail_split(docs, 0.2, gpt2, eot=True)
    assert split_tokens(out, "train").tolist() == expected["train"]
    assert split_tokens(out, "val").tolist() == expected["val"]
    assert m.num_documents == 5 and m.stats["num_empty_documents_skipped"] == 1 and m.inputs["num_files"] == 3


def test_local_hugging_face_dataset(ray_local, tiktoken_cache, tmp_path, gpt2):
    import datasets

    texts = [f"Document number {i}: " + "words " * (i % 7) for i in range(60)]
    datasets.Dataset.from_dict({"id": list(range(60)), "text": texts}).save_to_disk(str(tmp_path / "ds"))
    data = preset("openwebtext", f"--data.input={tmp_path / 'ds'}", "--data.val_fraction=0.25", "--data.num_blocks=3")
    out = tmp_path / "out"
    m = prepare(data, out)
    val = is_val_document(2357, 0, np.arange(60), 0.25)
    for split, want in (("train", ~val), ("val", val)):
        expected = [t for i, text in enumerate(texts) if want[i] for t in gpt2.encode_ordinary(text) + [EOT]]
        assert split_tokens(out, split).tolist() == expected
    assert m.inputs["kind"] == "hf" and m.split_rule["split"] == "random" and m.num_documents == 60

    # The tail rule reads the document holding the cut back from the dataset to tokenize its halves.
    # 0.2 puts the cut inside a document, 0.15 exactly between two.
    for val_fraction, num_documents in ((0.2, 61), (0.15, 60)):
        m = prepare(DataConfig(input=str(tmp_path / "ds"), tokenizer="gpt2", val_fraction=val_fraction), out)
        expected = expected_tail_split(texts, val_fraction, gpt2, eot=False)
        assert split_tokens(out, "train").tolist() == expected["train"]
        assert split_tokens(out, "val").tolist() == expected["val"]
        assert m.splits["train"].num_documents + m.splits["val"].num_documents == num_documents  # the cut one twice


@pytest.mark.slow
def test_vocabulary_over_65536_characters_gives_uint32_shards(ray_local, tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70_000))  # 70,000 distinct supplementary-plane characters
    (tmp_path / "wide.txt").write_text(text)
    out = tmp_path / "out"
    m = prepare(DataConfig(input=str(tmp_path / "wide.txt"), tokenizer="char"), out)
    assert (m.vocab_size, m.dtype) == (70_000, "uint32")
    assert read_shard(out / "train_000000.bin").dtype == np.uint32
    tok = tokenizer_from_dict(m.tokenizer)
    assert tok.decode(split_tokens(out, "train")) + tok.decode(split_tokens(out, "val")) == text


# ------------------------------------------------------------------------------------------ reruns, CLI


def test_rerun_is_a_noop_and_force_rebuilds(ray_local, tmp_path, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 20)
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="nanogpt.prepare")
    argv = ["--input", str(corpus), "--tokenizer", "char", "--out", str(out), "--data.shard_size=300"]
    assert main(argv) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert len(before) == 1 + 3 + 1  # manifest, 3 train shards of <= 300 tokens, 1 val shard

    caplog.clear()
    assert main(argv) == 0
    assert "up to date" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    assert main([*argv, "--force"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)

    corpus.write_text(corpus.read_text() + "Whether 'tis nobler in the mind to suffer\n")  # changed input: rebuilt
    assert main(argv) == 0
    assert verify(out).num_tokens("train") + verify(out).num_tokens("val") == len(corpus.read_text())


def test_rerun_rebuilds_a_damaged_shard(ray_local, tmp_path, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 20)
    out = tmp_path / "out"
    argv = ["--input", str(corpus), "--tokenizer", "char", "--out", str(out)]
    assert main(argv) == 0
    shard = out / "train_000000.bin"
    good = shard.read_bytes()
    damaged = bytearray(good)
    damaged[2000] ^= 0x01  # one flipped bit in a token: header, size and count still right
    shard.write_bytes(bytes(damaged))

    caplog.clear()
    caplog.set_level(logging.INFO, logger="nanogpt.prepare")
    assert main(argv) == 0
    assert "train_000000.bin: corrupted: sha256" in caplog.text and "up to date" not in caplog.text
    assert shard.read_bytes() == good
    verify(out)


def test_cli_errors_are_reported_not_raised(tmp_path, caplog):
    assert main(["--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt: no such file or directory" in caplog.text
    assert main(["--input", str(tmp_path)]) == 2
    assert "no output directory" in caplog.text
    with pytest.raises(ConfigError, match="needs an end-of-text token"):
        prepare(DataConfig(input=str(tmp_path), tokenizer="char", append_eot=True), tmp_path / "o")


@pytest.mark.slow
def test_script_runs_as_a_plain_command(tmp_path, shakespeare_path):
    """`python pipelines/prepare.py ...` from another directory: its own local Ray, imports through sys.path."""
    out = tmp_path / "out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": ""}
    cmd = [sys.executable, str(REPO / "pipelines" / "prepare.py"), "--input", str(shakespeare_path),
           "--tokenizer", "char", "--out", str(out), "--address", "local", "--num-cpus", "1"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "prepared 1 documents" in result.stderr
    assert verify(out).num_tokens("train") == 1_003_854


# ------------------------------------------------------------------------------------------ bad input


BAD_INPUTS = {
    "empty corpus": ({"a.txt": b"", "b.txt": b""}, {}, r"empty corpus \(2 files"),
    "undecodable bytes": ({"bad.txt": b"fine \xff\xfe not fine"}, {"encoding_errors": "fail"},
                          r"bad\.txt: byte offset 5: not UTF-8"),
    "jsonl line not JSON": ({"d.jsonl": b'{"text": "ok"}\n{"text": \n'}, {}, r"d\.jsonl: line 2: not valid JSON"),
    "jsonl field missing": ({"d.jsonl": b'{"text": "ok"}\n{"body": "x"}\n'}, {},
                            r"d\.jsonl: line 2: no field 'text' \(fields: body\)"),
    "parquet column missing": ({"d.parquet": None}, {}, r"d\.parquet: no column 'text' \(columns: body\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_leaves_nothing(ray_local, tmp_path, case):
    files, overrides, message = BAD_INPUTS[case]
    root = tmp_path / "in"
    root.mkdir()
    for name, data in files.items():
        if name.endswith(".parquet"):
            pq.write_table(pa.table({"body": ["no text column"]}), root / name)
        else:
            (root / name).write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=message):
        prepare(DataConfig(input=str(root), tokenizer="char", **overrides), out)
    assert shard_files(out) == []


def test_bad_input_is_one_line_naming_the_first_bad_file(ray_local, tmp_path, caplog, capfd):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.txt").write_text("fine\n")
    (root / "b.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    (root / "c.jsonl").write_text('{"text": \n')
    (root / "d.jsonl").write_text('{"text": "fine"}\n')
    capfd.readouterr()
    assert main(["--input", str(root), "--tokenizer", "char", "--out", str(tmp_path / "out"), "--data.num_blocks=2"]) == 2
    printed = capfd.readouterr()
    assert "Traceback" not in printed.out + printed.err  # Ray Data printed ~160 lines of it around the message
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"{root}/b.jsonl: line 2: no field 'text' (fields: body); choose one with "
                      "--data.text_field=<field> (and 1 more file that cannot be parsed: c.jsonl)"]


@pytest.mark.parametrize("change", ["removed", "appended to"])
def test_a_file_changed_before_its_task_reads_it_is_one_line_naming_it(ray_local, tmp_path, monkeypatch, change):
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a.txt", "b.txt"):
        (root / name).write_text("some words\n")

    def listed_then_changed(spec: str):  # as on shared storage: listed by the driver, changed when a task reads it
        source = resolve_input(spec)
        (root / "b.txt").unlink() if change == "removed" else (root / "b.txt").write_text("some words\nmore\n")
        return source

    monkeypatch.setattr("pipelines.prepare.resolve_input", listed_then_changed)
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as e:
        prepare(DataConfig(input=str(root), tokenizer="char"), out)
    assert str(e.value) == {
        "removed": f"{root}/b.txt: cannot read: no such file",
        "appended to": f"{root}/b.txt: changed since prepare listed it (11 bytes then, 16 now); run prepare again",
    }[change]
    assert not out.exists()


@pytest.mark.parametrize("change", ["removed", "appended to"])
def test_a_file_changed_before_its_cut_document_is_read_again_is_one_line_naming_it(ray_local, tiktoken_cache,
                                                                                    tmp_path, monkeypatch, change):
    corpus = tmp_path / "one.txt"
    text = "a single document, which the tail split cuts in two " * 40
    corpus.write_text(text)
    original = plan.order_runs

    def tokenized_then_changed(*args):  # every document is tokenized; the cut one is read again after this
        corpus.unlink() if change == "removed" else corpus.write_text(text + "more")
        return original(*args)

    monkeypatch.setattr(plan, "order_runs", tokenized_then_changed)
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as e:
        prepare(DataConfig(input=str(corpus), tokenizer="gpt2"), out)
    assert str(e.value) == {
        "removed": f"{corpus}: cannot read: no such file",
        "appended to": f"{corpus}: changed since prepare listed it ({len(text):,} bytes then, {len(text) + 4:,} "
                       "now); run prepare again",
    }[change]
    assert not out.exists()


def test_bad_input_keeps_a_previous_complete_output(ray_local, tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("a perfectly good corpus\n" * 10)
    bad.write_bytes(b"\xff" * 10)
    out = tmp_path / "out"
    before = prepare(DataConfig(input=str(good), tokenizer="char"), out)
    with pytest.raises(CorpusError, match="byte offset 0"):
        prepare(DataConfig(input=str(bad), tokenizer="char", encoding_errors="fail"), out)
    assert verify(out) == before


def test_undecodable_bytes_replaced_and_counted(ray_local, tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine \xff\xfe not fine")
    m = prepare(DataConfig(input=str(tmp_path / "bad.txt"), tokenizer="char", val_fraction=0.0), tmp_path / "out")
    assert m.stats["num_replaced_characters"] == 2
    assert tokenizer_from_dict(m.tokenizer).decode(split_tokens(tmp_path / "out", "train")) == "fine \ufffd\ufffd not fine"
    assert m.splits["val"].num_tokens == 0 and m.splits["val"].shards == []


def test_random_binary_input_fails_unless_replace_is_asked_for(ray_local, tmp_path, caplog):
    data = np.random.default_rng(0).bytes(100_000)
    (tmp_path / "random.txt").write_bytes(data)
    with pytest.raises(UnicodeDecodeError) as raised:
        data.decode("utf-8")
    first = raised.value.start
    argv = ["--input", str(tmp_path / "random.txt"), "--tokenizer", "char", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert re.search(rf"random\.txt: [\d,]+ undecodable byte sequences in 100,000 bytes \(\d+\.\d%; the first at "
                     rf"byte offset {first}\): not UTF-8 text", caplog.text)
    assert shard_files(tmp_path / "out") == []

    caplog.clear()
    assert main([*argv, "--data.encoding_errors=replace"]) == 0
    m = verify(tmp_path / "out")
    num_replaced = data.decode("utf-8", errors="replace").count("\ufffd")
    assert m.stats["num_replaced_characters"] == num_replaced
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"replaced {num_replaced:,} undecodable byte sequences by U+FFFD in 1 file (the first: "
                        f"{tmp_path / 'random.txt'}, byte offset {first}): the shards hold U+FFFD there; "
                        "--data.encoding_errors=fail rejects any"]


def test_missing_hf_column_is_named(ray_local, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: body\)"):
        prepare(DataConfig(input=str(tmp_path / "ds"), tokenizer="char"), tmp_path / "out")


# ------------------------------------------------------------------------------------------ failed writes


def test_full_disk_is_an_error_naming_the_shard(ray_local, tmp_path, tiny_fs, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_text("All the world's a stage,\n" * 8000)  # 200,000 characters: 400 KB of uint16, on 64 KiB
    out = tiny_fs / "out"
    assert main(["--input", str(corpus), "--tokenizer", "char", "--out", str(out)]) == 2
    assert re.search(r"out/(train|val)_000000\.bin: cannot write: No space left on device \(the disk is full\)",
                     caplog.text)
    assert shard_files(out) == []


def test_read_only_output_is_an_error_naming_it(ray_local, tmp_path, read_only_fs, caplog):
    (tmp_path / "c.txt").write_text("Some text.\n")
    assert main(["--input", str(tmp_path / "c.txt"), "--tokenizer", "char", "--out", str(read_only_fs / "out")]) == 2
    assert f"{read_only_fs}/out: cannot create the directory: Read-only file system" in caplog.text


# ------------------------------------------------------------------------------------------ whose directory


def test_a_second_prepare_into_the_same_output_fails_naming_the_first(ray_local, tmp_path, caplog):
    (tmp_path / "c.txt").write_text("Some text.\n")
    out = tmp_path / "out"
    holder = hold_lock(out)  # another prepare, between its lock and its manifest
    try:
        assert main(["--input", str(tmp_path / "c.txt"), "--tokenizer", "char", "--out", str(out)]) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"{out}: locked by another prepare (pid {holder.pid} on host {socket.gethostname()}" in caplog.text


def test_someone_elses_files_are_never_touched(ray_local, tmp_path, caplog):
    (tmp_path / "c.txt").write_text("Some text.\n" * 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "train_000000.bin").write_bytes(b"whatever this is")
    argv = ["--input", str(tmp_path / "c.txt"), "--tokenizer", "char", "--out", str(out)]
    assert main(argv) == 2
    assert f"{out}: holds files that prepare did not write (notes.txt) and no manifest.json" in caplog.text
    assert shard_files(out) == ["notes.txt", "train_000000.bin"]
    assert (out / "train_000000.bin").read_bytes() == b"whatever this is"


def test_what_a_killed_prepare_left_is_cleared(ray_local, tmp_path):
    (tmp_path / "c.txt").write_text("Some text.\n" * 10)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train_000000.bin", "train_000007.bin", ".val_000000.bin.tmp-77-0badc0de", ".prepare.lock"):
        (out / name).write_bytes(b"left by a killed prepare")
    m = prepare(DataConfig(input=str(tmp_path / "c.txt"), tokenizer="char"), out)
    assert verify(out) == m  # every listed shard rewritten, no stale one left (verify fails on an unlisted shard)
    assert shard_files(out) == ["manifest.json", "train_000000.bin", "val_000000.bin"]
