"""Tokenizers: GPT-2 BPE (tiktoken) and nanoGPT's character level, behind one small interface.

    tok = build_tokenizer("gpt2")                  # tiktoken's "gpt2": 50257 tokens, <|endoftext|> = 50256
    tok = CharTokenizer.from_text(text)             # chars = sorted(set(text)), exactly as nanoGPT's prepare.py
    tok = tokenizer_from_dict(manifest.tokenizer)   # what prepare.py recorded next to the shards

Both round-trip exactly: `tok.decode(tok.encode(text)) == text`. GPT-2 encodes with `encode_ordinary`, so a
literal "<|endoftext|>" in a corpus is plain text, never the special token (nanoGPT's prepare does the same).
tiktoken downloads its files on first use; offline, point TIKTOKEN_CACHE_DIR at a pre-seeded cache.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

GPT2_VOCAB_SIZE = 50257
GPT2_EOT = 50256


class TokenizerError(ValueError):
    """Text a tokenizer cannot encode, or a tokenizer description that makes no sense."""


@runtime_checkable
class Tokenizer(Protocol):
    name: str
    """"gpt2" | "char": what build_tokenizer() and the manifest call it."""
    vocab_size: int
    eot_token: int | None
    """The end-of-text token appended between documents, or None when the vocabulary has none."""

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def encode_flat(self, texts: Sequence[str], append_eot: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Every text's tokens back to back (uint32) and each text's token count (int64); with append_eot the
        end-of-text token follows every non-empty text. The tokens of encode(), for bulk work."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records: enough for tokenizer_from_dict() to rebuild the same tokenizer."""
        ...


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken."""

    name = "gpt2"

    def __init__(self) -> None:
        import tiktoken  # imported here so char-level work never needs tiktoken's files

        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # network errors come in many types (requests, urllib3, OSError)
            raise TokenizerError(
                f"could not load tiktoken's gpt2 encoding ({type(e).__name__}: {e}). Offline, point "
                "TIKTOKEN_CACHE_DIR at a directory pre-seeded with tiktoken's gpt2 files."
            ) from e
        self.vocab_size: int = self._enc.n_vocab  # 50257
        self.eot_token: int | None = self._enc.eot_token  # 50256, <|endoftext|>

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: under Ray every task already owns a CPU; tiktoken's thread pool would oversubscribe it.
        return [self._enc.encode_ordinary(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def encode_flat(self, texts: Sequence[str], append_eot: bool = False) -> tuple[np.ndarray, np.ndarray]:
        # tiktoken writes a document's tokens as a uint32 buffer (nanogpt/tiktoken_buffer.py): no Python int per
        # token, so bulk tokenization is faster than encode_ordinary's lists (bench/NOTES.md)
        separated = self._encode_separated(texts, append_eot)
        return separated if separated is not None else self._encode_each(texts, append_eot)

    def _encode_separated(self, texts: Sequence[str], append_eot: bool) -> tuple[np.ndarray, np.ndarray] | None:
        """encode_flat in one call to tiktoken, less CPU over short documents (bench/NOTES.md): the texts joined
        by the end-of-text token's text, which tiktoken reads as the token and encodes each piece between as it would
        alone; the tokens then dropped unless asked for. None where that would not be the same: a text holding the
        token's text (ordinary text there), or a lone surrogate."""
        from nanogpt.tiktoken_buffer import buffer_encoder

        eot_text = self._enc.decode([self.eot_token])
        kept = list(filter(None, texts))  # an empty text has no tokens, and no end-of-text token either
        joined = eot_text.join([*kept, ""])  # each text followed by the token's text: one copy of them all
        if joined.count(eot_text) != len(kept):  # the token's text has no border: a count off means a text holds it
            return None
        try:
            tokens = np.frombuffer(buffer_encoder(self._enc, frozenset({eot_text}))(joined), dtype="<u4")
        except UnicodeEncodeError:
            return None
        is_eot = tokens == self.eot_token
        lengths = np.diff(np.flatnonzero(is_eot), prepend=-1) - (not append_eot)
        if len(kept) < len(texts):  # the empty texts' lengths are zeros
            counts, lengths = lengths, np.zeros(len(texts), dtype=np.int64)
            lengths[np.fromiter(map(bool, texts), dtype=bool, count=len(texts))] = counts
        return (tokens, lengths) if append_eot else (tokens[~is_eot], lengths)

    def _encode_each(self, texts: Sequence[str], append_eot: bool) -> tuple[np.ndarray, np.ndarray]:
        from nanogpt.tiktoken_buffer import buffer_encoder

        encode_buffer = buffer_encoder(self._enc)
        eot = np.array([self.eot_token], dtype="<u4").tobytes() if append_eot else None
        chunks: list[Any] = []
        sizes = []
        for text in texts:
            if not text:
                sizes.append(0)  # an empty text gets no end-of-text token either
                continue
            try:
                chunk = encode_buffer(text)
            except UnicodeEncodeError:  # a lone surrogate: encode_ordinary knows tiktoken's fix-up
                chunk = np.array(self.encode(text), dtype="<u4")
            chunks.append(chunk)
            n = memoryview(chunk).nbytes // 4
            if eot is not None:
                chunks.append(eot)
                n += 1
            sizes.append(n)
        lengths = np.array(sizes, dtype=np.int64)
        return np.frombuffer(b"".join(chunks), dtype="<u4"), lengths

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_token": self.eot_token}


class CharTokenizer:
    """One token per character; the vocabulary is the corpus's sorted set of characters (nanoGPT's meta.pkl)."""

    name = "char"
    eot_token: int | None = None

    def __init__(self, chars: Sequence[str]) -> None:
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise TokenizerError("CharTokenizer needs single characters")
        if len(set(chars)) != len(chars):
            raise TokenizerError("CharTokenizer's characters must be distinct")
        self.chars: list[str] = chars
        self.vocab_size: int = len(chars)
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise TokenizerError(
                f"character {c!r} (U+{ord(c):04X}) at index {text.index(c)} is not in the "
                f"{self.vocab_size}-character vocabulary"
            ) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def encode_flat(self, texts: Sequence[str], append_eot: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if append_eot:
            raise TokenizerError("the char tokenizer has no end-of-text token")
        ids = [self.encode(t) for t in texts]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        return np.fromiter((i for x in ids for i in x), dtype=np.uint32, count=int(lengths.sum())), lengths

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "chars": list(self.chars)}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """The UTF-8 byte length of every token id (what it adds to the text): the denominator of bits per byte."""
    if isinstance(tokenizer, CharTokenizer):
        return np.array([len(c.encode("utf-8")) for c in tokenizer.chars], dtype=np.int64)
    if isinstance(tokenizer, GPT2Tokenizer):
        enc = tokenizer._enc
        return np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.int64)
    raise TokenizerError(f"bits per byte: no byte lengths for tokenizer {tokenizer.name!r}")


def build_tokenizer(name: str, **kw: Any) -> Tokenizer:
    """"gpt2", or "char" with `chars=[...]` (or `text=...` to take the vocabulary from a corpus)."""
    if name == "gpt2":
        if kw:
            raise TokenizerError(f"the gpt2 tokenizer takes no options, got {sorted(kw)}")
        return GPT2Tokenizer()
    if name == "char":
        if "chars" in kw:
            return CharTokenizer(kw["chars"])
        if "text" in kw:
            return CharTokenizer.from_text(kw["text"])
        raise TokenizerError("the char tokenizer needs its vocabulary: chars=[...] or text=...")
    raise TokenizerError(f"unknown tokenizer {name!r}: expected 'gpt2' or 'char'")


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild the tokenizer a manifest describes, checking its vocabulary size."""
    name = d.get("name")
    tok = build_tokenizer("char", chars=d.get("chars", [])) if name == "char" else build_tokenizer(str(name))
    if "vocab_size" in d and d["vocab_size"] != tok.vocab_size:
        raise TokenizerError(f"{name} tokenizer has {tok.vocab_size} tokens but the description says {d['vocab_size']}")
    return tok
