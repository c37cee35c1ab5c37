"""Corpora: where the text comes from, how files become documents, and which documents are validation.

Named corpora resolve to a local file without a network round trip when possible:

    path = resolve_named_corpus("tinyshakespeare")
    # 1. $NANOGPT_TINYSHAKESPEARE, if set (must name an existing file)
    # 2. $NANOGPT_CACHE_DIR (default ~/.cache/nanogpt-ray)/tinyshakespeare/input.txt, if already downloaded
    # 3. downloaded from karpathy/char-rnn into that cache, checked against its sha256, renamed into place

An input spec (`DataConfig.input`) is resolved by `resolve_input`: a file, a directory (a saved Hugging Face dataset
when it holds dataset_info.json/state.json or dataset_dict.json, else every .txt/.jsonl/.json/.parquet file under it),
a glob, `hf:<name>[:<config>]`, an `s3://`/`gs://` URI, or a corpus name. Files are taken in sorted path order and
documents in file order, which fixes the token order whatever the parallelism. A file reached by two paths (a
symlink beside its target) is one input, read once.

`parse_documents` turns one file's bytes into documents: a .txt file is one document, or several split on a
separator; a .jsonl/.json line is one document (its text field); a .parquet row is one (its text column); `.gz`
is decompressed first. Bytes are decoded as UTF-8 exactly (no newline translation). What happens to bytes that are
not UTF-8 is `encoding_errors`: "auto" (the default) replaces them by U+FFFD and counts them, but fails a file when
more than 1% of its bytes are undecodable (binary data, or another encoding: that is not text to train on);
"replace" always replaces; "fail" rejects any. Errors name the file and the byte offset (and line) of the first.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import gzip
import hashlib
import io
import json
import logging
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "abfs://", "abfss://")
HF_PREFIX = "hf:"


MAX_UNDECODABLE_FRACTION = 0.01
"""encoding_errors="auto": a file with more undecodable byte sequences than this fraction of its bytes fails ..."""
MIN_UNDECODABLE_TO_FAIL = 16
"""... unless it has no more than this many: a few stray bytes in a small file are a warning, not binary input."""


class CorpusError(ValueError):
    """The input cannot be found, read or parsed; the message names the file (and line) and what to do."""


# ------------------------------------------------------------------------------------------ named corpora


@dataclass(frozen=True)
class NamedCorpus:
    env_var: str
    """Points at a local copy; checked first, so tests and offline machines never download."""
    url: str
    cache_path: str
    """Relative to the cache directory."""
    sha256: str


NAMED_CORPORA: dict[str, NamedCorpus] = {
    "tinyshakespeare": NamedCorpus(
        env_var="NANOGPT_TINYSHAKESPEARE",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        cache_path="tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",  # 1,115,394 bytes
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("NANOGPT_CACHE_DIR") or Path.home() / ".cache" / "nanogpt-ray")


def resolve_named_corpus(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The local file of a named corpus: its env var, else the cache, else a fresh download into the cache."""
    if name not in NAMED_CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(sorted(NAMED_CORPORA))}")
    corpus = NAMED_CORPORA[name]
    if os.environ.get(corpus.env_var):
        path = Path(os.environ[corpus.env_var]).expanduser()
        if not path.is_file():
            raise CorpusError(f"{corpus.env_var}={path} is not a file")
        return path
    path = Path(cache or cache_dir()) / corpus.cache_path
    if path.is_file():
        return path
    log.info("downloading %s from %s to %s", name, corpus.url, path)
    try:
        download(corpus.url, path, sha256=corpus.sha256)
    except CorpusError as e:
        raise CorpusError(
            f"{e}. Offline, point at a local copy of {name}: {corpus.env_var}=/path/input.txt, or pass the file "
            "itself (--data.input=/path/input.txt to pretrain.py, --input /path/input.txt to prepare.py); for GPT-2 tokens also set TIKTOKEN_CACHE_DIR to a pre-seeded "
            "tiktoken cache."
        ) from None
    return path


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, timeout_s: float = 60.0) -> Path:
    """Download to a temporary file beside `dest`, check the sha256, rename into place (never half a file)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as f:  # noqa: S310
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CorpusError(f"download of {url} has sha256 {digest.hexdigest()}, expected {sha256}")
        os.replace(tmp, dest)
    except OSError as e:  # URLError, timeouts and HTTP errors are OSErrors
        raise CorpusError(f"could not download {url} ({type(e).__name__}: {e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------------------------------ input specs


@dataclass(frozen=True)
class InputFile:
    path: str
    """Absolute local path, or a URI (s3://bucket/key): what prepare's tasks read (nanogpt/data/storage.py)."""
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class InputSource:
    """A resolved input: a sorted list of files, or a Hugging Face dataset (from the Hub or a local directory)."""

    spec: str
    kind: str
    """files | hf"""
    files: tuple[InputFile, ...] = ()
    hf_path: str | None = None
    """Hub name or local saved-dataset directory."""
    hf_config: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"spec": self.spec, "kind": self.kind}
        d["num_files"] = len(self.files)
        d["num_bytes"] = sum(f.size for f in self.files)
        if self.kind == "hf":
            d.update(hf_path=self.hf_path, hf_config=self.hf_config)
        return {**d, **self.details}

    def fingerprint(self) -> str:
        """Paths, sizes and modification times of the files (cheap: no file is read)."""
        if self.kind == "files":
            return fingerprint([(f.path, f.size, f.mtime_ns) for f in self.files])
        # A local saved dataset also lists its files; a Hub dataset relies on datasets' own fingerprint, which
        # prepare.py records in details["hf_fingerprint"] after loading it.
        files = [(f.path, f.size, f.mtime_ns) for f in self.files]
        return fingerprint([self.hf_path, self.hf_config, files, self.details.get("hf_fingerprint")])


def fingerprint(obj: Any) -> str:
    """sha256 of a JSON-able value, key order ignored."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def resolve_input(spec: str) -> InputSource:
    """Turn `DataConfig.input` into the files (or HF dataset) to read. Raises CorpusError when nothing is there."""
    if not spec:
        raise CorpusError("no input: pass --input <path|glob|dir|hf:name|s3://...> or --preset <name>")
    if spec.startswith(HF_PREFIX):
        name, _, config = spec[len(HF_PREFIX):].partition(":")
        if not name:
            raise CorpusError(f"{spec!r}: expected hf:<name> or hf:<name>:<config>")
        return InputSource(spec=spec, kind="hf", hf_path=name, hf_config=config or None)
    if spec.startswith(REMOTE_SCHEMES):
        return InputSource(spec=spec, kind="files", files=_list_remote(spec))
    path = Path(spec).expanduser()
    if spec in NAMED_CORPORA and not path.exists():
        path = resolve_named_corpus(spec)
        return InputSource(spec=spec, kind="files", files=(_stat(path),))
    if path.is_dir():
        if is_hf_dataset_dir(path):
            files = tuple(_stat(p) for p in sorted(path.rglob("*")) if p.is_file())
            return InputSource(spec=spec, kind="hf", files=files, hf_path=str(path.resolve()))
        found = sorted(
            p for p in path.rglob("*")
            if p.is_file() and _suffix(p.name) in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise CorpusError(f"{path}: no {'/'.join(SUPPORTED_SUFFIXES)} files in this directory")
        return InputSource(spec=spec, kind="files", files=_unique_files(spec, found))
    if path.is_file():
        return InputSource(spec=spec, kind="files", files=(_stat(path),))
    if globlib.has_magic(spec):
        found = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True))
        found = [p for p in found if p.is_file()]
        if not found:
            raise CorpusError(f"{spec}: the pattern matches no files")
        return InputSource(spec=spec, kind="files", files=_unique_files(spec, found))
    hint = f" (named corpora: {', '.join(sorted(NAMED_CORPORA))})" if "/" not in spec else ""
    raise CorpusError(f"{spec}: no such file or directory{hint}")


def is_hf_dataset_dir(path: str | os.PathLike) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    path = Path(path)
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def load_hf_dataset(source: InputSource, text_field: str):
    """The `datasets.Dataset` of an hf input (its "train" split, or its only split), with the text column checked."""
    import datasets

    path = source.hf_path
    if source.kind != "hf" or path is None:
        raise CorpusError(f"{source.spec}: not a Hugging Face dataset")
    try:
        if Path(path).is_dir():
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, source.hf_config)
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError)
        raise CorpusError(f"{source.spec}: could not load the Hugging Face dataset ({type(e).__name__}: {e})") from None
    if isinstance(ds, (datasets.DatasetDict, dict)):
        splits = list(ds.keys())
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise CorpusError(f"{source.spec}: has splits {splits} and no 'train'; save the one to use on its own")
    if text_field not in ds.column_names:
        raise CorpusError(
            f"{source.spec}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
            "choose one with --data.text_field=<column>"
        )
    return ds


def _suffix(name: str) -> str:
    name = name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def _unique_files(spec: str, paths: list[Path]) -> tuple[InputFile, ...]:
    """The files at `paths`, in their order, each once: a symlink beside its target (or a file a pattern matches
    twice) names one file, which is read once, not taken for two documents of the same text."""
    files: dict[str, InputFile] = {}
    for p in paths:
        f = _stat(p)
        files.setdefault(f.path, f)
    if len(files) < len(paths):
        log.info("%s: %d of the %d paths it matches name a file matched already (a symlink to it): each file is "
                 "read once", spec, len(paths) - len(files), len(paths))
    return tuple(files.values())


def _stat(path: Path) -> InputFile:
    st = path.stat()
    return InputFile(path=str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)


def _list_remote(uri: str) -> tuple[InputFile, ...]:
    """List a cloud file, prefix or glob with pyarrow's filesystems (the driver's only remote I/O)."""
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0] + "://"
    base = uri.split("*", 1)[0].rsplit("/", 1)[0] if globlib.has_magic(uri) else uri
    try:
        fs, root = pafs.FileSystem.from_uri(base)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.Directory:
            infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
        else:
            raise CorpusError(f"{uri}: no such object or prefix")
    except OSError as e:
        raise CorpusError(f"{uri}: cannot list ({e})") from None
    if globlib.has_magic(uri):
        pattern = uri[len(scheme):]
        infos = [i for i in infos if _glob_match(i.path.split("/"), pattern.split("/"))]
    elif info.type == pafs.FileType.Directory:
        infos = [i for i in infos if _suffix(i.base_name) in SUPPORTED_SUFFIXES]
    if not infos:
        raise CorpusError(f"{uri}: no files")
    files = (InputFile(path=scheme + i.path, size=i.size or 0, mtime_ns=i.mtime_ns or 0) for i in infos)
    return tuple(sorted(files, key=lambda f: f.path))


def _glob_match(parts: list[str], patterns: list[str]) -> bool:
    """A key's segments against a glob's, by the local glob's rule (as --input 'dir/*.txt' reads on disk): `*`, `?`
    and `[...]` stay within one segment; a `**` segment stands for any number of them."""
    if not patterns:
        return not parts
    if patterns[0] == "**":
        return any(_glob_match(parts[i:], patterns[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], patterns[0]) and _glob_match(parts[1:], patterns[1:])


# ------------------------------------------------------------------------------------------ documents


@dataclass
class ParsedFile:
    texts: list[str]
    """The documents, in file order (empty ones included: they keep their index and are skipped later)."""
    num_replaced: int = 0
    """Undecodable byte sequences replaced by U+FFFD."""
    first_replaced: str | None = None
    """Where the first of them is ("byte offset 12", "line 3, byte offset 40", "row 7, byte offset 0"); None: none."""


def decode_text(data: bytes, name: str, errors: str = "replace") -> tuple[str, int]:
    """UTF-8 text and the number of undecodable sequences replaced ("replace", "auto"), or CorpusError ("fail")."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as e:
        if errors == "fail":
            raise CorpusError(
                f"{name}: byte offset {e.start}: not UTF-8 ({e.reason}); "
                "--data.encoding_errors=auto or =replace substitutes U+FFFD and counts them"
            ) from None
    text = data.decode("utf-8", errors="replace")
    # U+FFFD that was already in the file is legitimate text, not a replacement.
    return text, text.count("\ufffd") - data.count("\ufffd".encode())


def parse_documents(
    name: str, data: bytes, text_field: str = "text", separator: str | None = None, encoding_errors: str = "auto"
) -> ParsedFile:
    """The documents in one file, by its extension (see the module docstring). `name` is used in errors."""
    if name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CorpusError(f"{name}: not a valid gzip file ({e})") from None
    suffix = _suffix(name)
    if suffix in PARQUET_SUFFIXES:
        return _parse_parquet(name, data, text_field, encoding_errors)
    text, num_replaced = decode_text(data, name, encoding_errors)
    first = _where_undecodable(data, by_line=suffix in JSON_SUFFIXES) if num_replaced else None
    check_undecodable(name, num_replaced, len(data), first, encoding_errors)
    if suffix in JSON_SUFFIXES:
        return ParsedFile(_parse_json(name, text, text_field, suffix), num_replaced, first)
    texts = text.split(separator) if separator else [text]
    return ParsedFile(texts, num_replaced, first)


def check_undecodable(name: str, num_replaced: int, num_bytes: int, first: str | None, errors: str) -> None:
    """Under "auto", CorpusError when so much of a file is not UTF-8 that it cannot be text (see the constants)."""
    if errors != "auto" or num_replaced <= max(MIN_UNDECODABLE_TO_FAIL, MAX_UNDECODABLE_FRACTION * num_bytes):
        return
    raise CorpusError(
        f"{name}: {num_replaced:,} undecodable byte sequences in {num_bytes:,} bytes "
        f"({num_replaced / num_bytes:.1%}; the first at {first}): not UTF-8 text (binary data, or another "
        f"encoding?). Above {MAX_UNDECODABLE_FRACTION:.0%} a file fails; --data.encoding_errors=replace keeps "
        "them as U+FFFD"
    )


def _where_undecodable(data: bytes, by_line: bool = False) -> str | None:
    """Where the first byte that is not UTF-8 is: its byte offset, and its line when `by_line`; None when all is."""
    try:
        data.decode("utf-8")
        return None
    except UnicodeDecodeError as e:
        offset = e.start
    if by_line:
        line = data.count(b"\n", 0, offset) + 1
        return f"line {line}, byte offset {offset}"
    return f"byte offset {offset}"


def _parse_json(name: str, text: str, text_field: str, suffix: str) -> list[str]:
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{name}: line {e.lineno}: not valid JSON ({e.msg})") from None
        return [_text_of(name, f"record {i}", r, text_field) for i, r in enumerate(records)]
    texts = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline) are not documents
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{name}: line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        texts.append(_text_of(name, f"line {lineno}", record, text_field))
    return texts


def _text_of(name: str, where: str, record: Any, text_field: str) -> str:
    if not isinstance(record, dict):
        raise CorpusError(f"{name}: {where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(list(record)[:10])
        raise CorpusError(
            f"{name}: {where}: no field {text_field!r} (fields: {fields}); choose one with --data.text_field=<field>"
        )
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CorpusError(f"{name}: {where}: field {text_field!r} is {type(value).__name__}, not a string")
    return value


def _parse_parquet(name: str, data: bytes, text_field: str, encoding_errors: str) -> ParsedFile:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        columns = pf.schema_arrow.names
        if text_field not in columns:
            raise CorpusError(
                f"{name}: no column {text_field!r} (columns: {', '.join(columns)}); "
                "choose one with --data.text_field=<column>"
            )
        column = pf.read(columns=[text_field]).column(text_field)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{name}: not a readable parquet file ({e})") from None
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return ParsedFile([t or "" for t in column.to_pylist()])
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        return _decode_rows(name, [b or b"" for b in column.to_pylist()], encoding_errors)
    raise CorpusError(f"{name}: column {text_field!r} has type {column.type}, not string")


def _decode_rows(name: str, rows: list[bytes], encoding_errors: str) -> ParsedFile:
    """A binary column's rows as documents; "auto" judges the file by all its rows' bytes together."""
    texts, num_replaced, first = [], 0, None
    for i, b in enumerate(rows):
        t, n = decode_text(b, f"{name}: row {i}", encoding_errors)
        if n and first is None:
            first = f"row {i}, {_where_undecodable(b)}"
        texts.append(t)
        num_replaced += n
    check_undecodable(name, num_replaced, sum(map(len, rows)), first, encoding_errors)
    return ParsedFile(texts, num_replaced, first)


# ------------------------------------------------------------------------------------------ splits


def is_val_document(seed: int, file_index: int, doc_indices: np.ndarray, val_fraction: float) -> np.ndarray:
    """The "random" split: each document goes to val with probability val_fraction, decided by a hash of
    (seed, file index, document index), so the choice never depends on how the work was divided."""
    doc_indices = np.asarray(doc_indices, dtype=np.uint64)
    file_key = _splitmix64(np.array([seed & (2**64 - 1)], dtype=np.uint64) ^ np.uint64(file_index))
    h = _splitmix64(doc_indices ^ file_key)
    uniform = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 random bits -> [0, 1)
    return uniform < val_fraction


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Steele et al.'s SplitMix64 finalizer: a fast, well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
