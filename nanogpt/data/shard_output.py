"""Where pipelines/prepare.py writes its shards, behind one interface: a directory (nanogpt/data/shard_dir.py) or
an object-store prefix (nanogpt/data/shard_prefix.py), chosen once from --out. prepare then holds only the order of
the steps, which is what makes an output that looks complete be complete: the manifest is removed first and
written last.

    output = shard_output("s3://bucket/shards/owt")                       # or "data/owt"
    with output.lock():                                                   # a directory's flock; a prefix has none
        output.check_owned()                                              # nobody else's files are in the way
        if output.has_manifest(): output.check_shards(load_manifest(output.location))   # the existing output
        output.remove_output()                                            # manifest first, then the shards
        info = output.write_shard("train_000000.bin", [tokens], 50257)    # in a Ray task, on any node
        output.write_manifest(manifest)                                   # last

Both implementations are small frozen dataclasses, so a Ray task that writes a shard takes one as an argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol, runtime_checkable

import numpy as np

from nanogpt.data.shard_dir import ShardDir
from nanogpt.data.shard_prefix import ShardPrefix
from nanogpt.data.shards import Manifest, ShardInfo
from nanogpt.data.storage import is_uri


@runtime_checkable
class ShardOutput(Protocol):
    location: str
    """What --out named: a directory or a URI prefix."""
    verified_by: str
    """How `check_shards` checks an existing shard: "sha256" or "size"."""

    def lock(self) -> AbstractContextManager:
        """Held for the whole preparation: a second prepare into the output fails at once, naming this one."""

    def check_owned(self) -> None:
        """ShardError unless the output is prepare's to rewrite (empty, or holding only what prepare writes)."""

    def has_manifest(self) -> bool: ...

    def check_shards(self, manifest: Manifest) -> Manifest:
        """The manifest, once every shard it lists is there as listed; ShardError naming the first that is not."""

    def remove_output(self) -> None:
        """Remove the manifest first (the output stops looking complete), then every shard."""

    def write_shard(self, name: str, tokens: Sequence[np.ndarray], vocab_size: int) -> ShardInfo:
        """Write one shard whole (no reader ever sees part of it under its name)."""

    def write_manifest(self, manifest: Manifest) -> None:
        """The last write: the mark that the output is complete."""


def shard_output(out: str) -> ShardOutput:
    """The output that --out names: an object-store prefix for a URI, else a directory."""
    return ShardPrefix(out) if is_uri(out) else ShardDir(out)
