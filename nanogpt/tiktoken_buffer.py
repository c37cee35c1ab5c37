"""A document's GPT-2 tokens as a uint32 buffer straight from tiktoken's Rust core: the one private tiktoken name the
project uses, behind a version guard and a switch, with tiktoken's public call as the fallback.

tiktoken's public `encode_to_numpy` wraps the same core call, but checks for special tokens and builds a numpy array
on every call: slower per short document (figures: bench/NOTES.md), and tokenizing is most of a prepare's worker
time.

    encode = buffer_encoder(tiktoken.get_encoding("gpt2"))
    encode("some text")      # encode_ordinary's tokens, as a uint32 buffer (bytes-like)

The private call is used only under the tiktoken release it was written for (WRITTEN_FOR) and unless
NANOGPT_TIKTOKEN_CORE=0; otherwise, and wherever the name is missing, the public one.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Callable
from typing import Any

WRITTEN_FOR = "0.14.0"
SWITCH = "NANOGPT_TIKTOKEN_CORE"
"""Set to 0 for tiktoken's public call only."""


def buffer_encoder(enc: Any, allowed_special: frozenset[str] = frozenset()) -> Callable[[str], Any]:
    """text -> its tokens as a uint32 buffer: the special tokens in `allowed_special` are read as such, any other
    special token's text as ordinary text (none allowed: encode_ordinary's tokens)."""
    core = private_core(enc)
    allowed = set(allowed_special)
    if core is not None:
        return lambda text: core(text, allowed)
    return lambda text: enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())


def private_core(enc: Any) -> Callable[[str, set], Any] | None:
    """tiktoken's core buffer encoder where this module may use it, else None."""
    if os.environ.get(SWITCH, "1") == "0" or not _written_for_this_release():
        return None
    return getattr(getattr(enc, "_core_bpe", None), "encode_to_tiktoken_buffer", None)


@functools.cache
def _written_for_this_release() -> bool:
    return importlib.metadata.version("tiktoken") == WRITTEN_FOR
