"""Tokenizers: nanoGPT's char vocabulary, tiktoken's GPT-2 BPE, exact round trips, manifest descriptions."""

from __future__ import annotations

import pytest

from nanogpt.tokenizers import (
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    TokenizerError,
    build_tokenizer,
    tokenizer_from_dict,
)

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


def test_char_vocabulary_is_nanogpts_sorted_set():
    tok = CharTokenizer.from_text(SAMPLE)
    assert tok.chars == sorted(set(SAMPLE))
    assert tok.vocab_size == len(set(SAMPLE))
    assert tok.eot_token is None
    assert tok.encode("\n") == [0]  # "\n" sorts first, as in nanoGPT's meta.pkl
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.encode_batch(["Speak", ""]) == [tok.encode("Speak"), []]
    assert isinstance(tok, Tokenizer)


def test_char_unknown_character_is_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A\) at index 2"):
        tok.encode("abz")


def test_char_rejects_bad_vocabularies():
    with pytest.raises(TokenizerError, match="distinct"):
        CharTokenizer(["a", "a"])
    with pytest.raises(TokenizerError, match="single characters"):
        CharTokenizer(["ab"])


def test_gpt2_is_tiktokens_encode_ordinary(tiktoken_cache):
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    tok = build_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eot_token) == (50257, 50256)
    assert tok.encode(SAMPLE) == enc.encode_ordinary(SAMPLE)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    assert tok.encode_batch([SAMPLE, "", "x"]) == [enc.encode_ordinary(t) for t in (SAMPLE, "", "x")]
    # A literal "<|endoftext|>" in a corpus is text, not the special token (nanoGPT's prepare does the same).
    assert 50256 not in tok.encode("a<|endoftext|>b")
    assert tok.decode(tok.encode("a<|endoftext|>b")) == "a<|endoftext|>b"


def test_round_trip_of_unusual_text(tiktoken_cache):
    text = "naïve café — 日本語 🙂\r\n\ttabs  and  spaces\n\n\n"
    for tok in (build_tokenizer("gpt2"), build_tokenizer("char", text=text)):
        assert tok.decode(tok.encode(text)) == text


def test_descriptions_rebuild_the_same_tokenizer(tiktoken_cache):
    char = CharTokenizer.from_text(SAMPLE)
    d = char.to_dict()
    assert d == {"name": "char", "vocab_size": char.vocab_size, "chars": char.chars}
    assert tokenizer_from_dict(d).encode(SAMPLE) == char.encode(SAMPLE)
    gpt2 = build_tokenizer("gpt2")
    assert gpt2.to_dict() == {"name": "gpt2", "vocab_size": 50257, "eot_token": 50256}
    assert tokenizer_from_dict(gpt2.to_dict()).encode(SAMPLE) == gpt2.encode(SAMPLE)
    with pytest.raises(TokenizerError, match="says 99"):
        tokenizer_from_dict({**d, "vocab_size": 99})


def test_build_tokenizer_errors():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'bpe'"):
        build_tokenizer("bpe")
    with pytest.raises(TokenizerError, match="needs its vocabulary"):
        build_tokenizer("char")
    assert build_tokenizer("char", chars=["a", "b"]).encode("ba") == [1, 0]


@pytest.mark.parametrize("switch", ["1", "0"])
def test_encode_flat_is_encode_back_to_back(tiktoken_cache, monkeypatch, switch):
    """With tiktoken's core call (nanogpt/tiktoken_buffer.py) and, switched off, with its public one."""
    from nanogpt import tiktoken_buffer

    monkeypatch.setenv(tiktoken_buffer.SWITCH, switch)
    # the first list is encoded in one call (joined by the end-of-text token); a text of the others holds the
    # token's text or a lone surrogate, and the list is encoded text by text
    plain = [SAMPLE, "", "naïve 🙂\r\n", "  trailing spaces  ", "", "x<|endoftext", "|>y"]
    gpt2 = build_tokenizer("gpt2")
    # this tiktoken is the release the core call was written for: used unless switched off
    assert (tiktoken_buffer.private_core(gpt2._enc) is not None) == (switch == "1")
    for texts in (plain, [*plain, "a<|endoftext|>b"], [*plain, "lone \ud800 surrogate"], [], [""]):
        for append_eot in (False, True):
            tokens, lengths = gpt2.encode_flat(texts, append_eot=append_eot)
            expected = [gpt2.encode(t) + ([50256] if append_eot and t else []) for t in texts]
            assert lengths.tolist() == [len(e) for e in expected]
            assert tokens.tolist() == [i for e in expected for i in e]
    char = CharTokenizer.from_text(SAMPLE)
    tokens, lengths = char.encode_flat(["Speak", "", "all"])
    assert tokens.tolist() == char.encode("Speakall") and lengths.tolist() == [5, 0, 3]
    with pytest.raises(TokenizerError, match="no end-of-text"):
        char.encode_flat(["a"], append_eot=True)

