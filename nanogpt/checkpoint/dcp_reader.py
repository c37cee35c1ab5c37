"""torch.distributed.checkpoint (DCP) folders read without trusting them: a sharded checkpoint may come from a shared
bucket or an MLflow store that others can write to, and reading one must neither run its code nor allocate what
its metadata merely declares.

DCP's own FileSystemReader unpickles `.metadata` with plain pickle, and its load planners unpickle each non-tensor
item (the optimizer's param_groups) with torch's unrestricted unpickler: a crafted file runs code. Here

- `.metadata` is unpickled with DCP's metadata classes allowed and nothing else (pickle's documented find_class
  restriction: torch.load cannot read the file, a bare pickle, and torch's weights-only unpickler is private), and
  refused if it set attributes on one of those classes (pickle's BUILD can), which are put back;
- non-tensor items load with torch.load(weights_only=True);
- what the metadata declares is checked before DCP allocates a tensor for it: every chunk lies in a file of this
  folder (a plain name, no symlink out), inside that file, and holds at least its elements' bytes; the chunks of a
  tensor add up to it; no planner path indexes a list past the number of items.

    with dcp_errors(folder):                # DCP's CheckpointException as one CheckpointError line
        dcp.load(state, storage_reader=checked_reader(folder), planner=SafeLoadPlanner())
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import io
import math
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)

from nanogpt.checkpoint.files import DCP_METADATA, CheckpointError, parse_error

_METADATA = "torch.distributed.checkpoint.metadata"
# every global a .metadata written by torch.distributed.checkpoint names (besides torch's dtypes); all of them build
# plain records when called: dataclasses, an enum, torch.Size, a path object, a layout looked up by name
ALLOWED_GLOBALS = frozenset({
    *((_METADATA, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                     "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                     "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),  # storage_meta's id
})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                  torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {module}.{name}")  # torch.load's wording


def _unpickle_metadata(file: Any) -> Any:
    """The restricted unpickler's load, refused when it changed an allowed class or function or an enum member:
    pickle's BUILD sets attributes on whatever object it is given, those shared ones included. The change is
    undone."""
    allowed = [obj for obj in map(_importable, ALLOWED_GLOBALS) if obj is not None]
    members = [m for obj in allowed if isinstance(obj, type) and issubclass(obj, enum.Enum) for m in obj]
    before = [(obj, dict(vars(obj))) for obj in allowed + members if hasattr(obj, "__dict__")]
    try:
        return _MetadataUnpickler(file).load()
    finally:
        changed = [obj for obj, attrs in before if _restore(obj, attrs)]
        if changed:
            raise pickle.UnpicklingError(f"it sets attributes of {getattr(changed[0], '__qualname__', changed[0])}")


def _importable(module_and_name: tuple[str, str]) -> Any:
    module, name = module_and_name
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # pathlib._local exists from Python 3.13 on
        return None


def _restore(obj: Any, attrs: dict[str, Any]) -> bool:
    """Put back `obj`'s attributes as `attrs` holds them (compared by identity); True if any had changed."""
    now = dict(vars(obj))
    changed = [k for k in now.keys() | attrs.keys() if k not in now or k not in attrs or now[k] is not attrs[k]]
    for key in changed:
        if key in attrs:
            setattr(obj, key, attrs[key])
        else:
            delattr(obj, key)
    return bool(changed)


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with `.metadata` read by the restricted unpickler and checked against the folder's
    files (see the module docstring); a CheckpointError naming the file otherwise."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")  # DCP asks for a rank's own metadata when the folder has no global one
        path = Path(self.checkpoint_id) / (DCP_METADATA if rank is None else f"__{int(rank)}{DCP_METADATA}")
        try:
            with open(path, "rb") as f:
                metadata = _unpickle_metadata(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing") from None
        except Exception as e:  # whatever a crafted or damaged pickle raises: the file is refused, nothing ran
            raise CheckpointError(f"{path}: refused, not plain DCP metadata ({parse_error(e)})") from None
        problem = metadata_problem(metadata, path.parent)
        if problem is not None:
            raise CheckpointError(f"{path}: {problem}")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checked_reader(folder: str | os.PathLike) -> SafeFileSystemReader:
    """The safe reader of `folder`, its metadata read and checked here first: inside DCP, the reader's
    CheckpointError would become a logged warning and an AssertionError."""
    reader = SafeFileSystemReader(Path(folder))
    reader.read_metadata()
    return reader


class _WeightsOnlyBytes:
    """A load planner's load_bytes with torch.load(weights_only=True) (DCP's own unpickles without restriction)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            item = torch.load(value, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"item {read_item.dest_index.fqn}: refused ({parse_error(e)})") from None
        plain = io.BytesIO()
        torch.save(item, plain)  # DCP places the item from bytes; these hold only what was just read safely
        plain.seek(0)
        super().load_bytes(read_item, plain)  # type: ignore[misc]


class SafeLoadPlanner(_WeightsOnlyBytes, DefaultLoadPlanner):
    """dcp.load's default planner (into a given state dict), non-tensor items read weights-only."""


def empty_state(metadata: Metadata) -> dict[str, Any]:
    """Every item of checked metadata (SafeFileSystemReader's: no more declared than its files hold) by its flat
    name: an empty tensor of its shape and dtype, or None for a non-tensor item, which DCP's load sets."""
    return {fqn: torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata)
            else None for fqn, item in metadata.state_dict_metadata.items()}


def nested(flat: dict[str, Any], planner_data: dict[str, tuple] | None) -> dict[str, Any]:
    """The flat items back at their places in the saved state dict (DCP's planner_data paths, as its format_utils
    rebuilds them): a str step is a dict key, an int step a list index; an item without a path stays at the top."""
    root: dict[str, Any] = {}
    for fqn, value in flat.items():
        path = tuple((planner_data or {}).get(fqn) or (fqn,))
        container: Any = root
        for step, following in zip(path, path[1:]):
            empty: Any = [] if isinstance(following, int) else {}
            if isinstance(container, dict):
                container = container.setdefault(step, empty)
                continue
            container.extend([None] * (step + 1 - len(container)))
            container[step] = empty if container[step] is None else container[step]
            container = container[step]
        if isinstance(path[-1], int):
            container.extend([None] * (path[-1] + 1 - len(container)))
        container[path[-1]] = value
    return root


@contextlib.contextmanager
def dcp_errors(folder: str | os.PathLike) -> Iterator[None]:
    """DCP's CheckpointException (a BaseException holding every rank's traceback) as one CheckpointError line
    naming the folder."""
    try:
        yield
    except CheckpointException as e:
        failure = next(iter(e.failures.values()), (e, None))[0]
        detail = str(failure) if isinstance(failure, CheckpointError) else f"unreadable ({parse_error(failure)})"
        raise CheckpointError(f"{folder}: {detail}") from None


def metadata_problem(metadata: Any, folder: Path) -> str | None:
    """What is wrong with unpickled metadata for the files of `folder`, or None: checked before DCP allocates the
    tensors it declares, whose bytes must all be in those files (so no more than the files' size is allocated)."""
    if not isinstance(metadata, Metadata):
        return f"holds a {type(metadata).__name__}, not DCP metadata"
    try:
        files = _data_files(metadata.storage_data, folder)
        if isinstance(files, str):
            return files
        return (_items_problem(metadata.state_dict_metadata, metadata.storage_data, sum(files.values()))
                or _planner_data_problem(metadata.planner_data, len(metadata.state_dict_metadata)))
    except (TypeError, AttributeError, ValueError, OverflowError, RuntimeError, OSError) as e:
        return f"malformed ({parse_error(e)})"  # RuntimeError, OSError: a symlink loop


def _data_files(storage_data: dict, folder: Path) -> dict[str, int] | str:
    """{name: size} of the data files the stored ranges lie in, or what is wrong with a range: each must be a
    plain file of `folder` (no path or symlink out of it), hold the range, and need no transform (compression)."""
    sizes: dict[str, int] = {}
    for index, info in storage_data.items():
        name = info.relative_path
        if not isinstance(index, MetadataIndex) or not isinstance(name, str):
            return "malformed storage_data"
        if name not in sizes:
            problem = _data_file_problem(folder, name)
            if problem is not None:
                return problem
            sizes[name] = (folder / name).stat().st_size
        if not (_count(info.offset) and _count(info.length)) or info.offset + info.length > sizes[name]:
            return (f"places {index.fqn} at bytes {info.offset}..{info.offset + info.length} of {name}, which "
                    f"holds {sizes[name]}")
        if getattr(info, "transform_descriptors", None):
            return f"stores {index.fqn} through transforms {list(info.transform_descriptors)}: not read here"
    return sizes


def _data_file_problem(folder: Path, name: str) -> str | None:
    if name != Path(name).name or name in ("", ".."):
        return f"names {name!r} as a data file, which is not a file of this folder"
    if not (folder / name).resolve().is_relative_to(folder.resolve()):
        return f"names {name}, a symlink out of the checkpoint directory: refused"
    if not (folder / name).is_file():
        return f"names {name}, which is missing"
    return None


def _items_problem(items: dict, storage_data: dict, data_bytes: int) -> str | None:
    """Each declared tensor: covered by its chunks, each chunk stored in at least its elements' bytes; all of them
    together no bigger than the data files (chunks may not share bytes to declare more)."""
    declared = 0
    for fqn, item in items.items():
        if isinstance(item, BytesStorageMetadata):
            if MetadataIndex(fqn) not in storage_data:
                return f"declares {fqn} but stores no bytes for it"
            continue
        if not isinstance(item, TensorStorageMetadata) or not isinstance(item.properties.dtype, torch.dtype):
            return f"declares {fqn} as a {type(item).__name__}, not a tensor or bytes"
        size, itemsize = tuple(item.size), item.properties.dtype.itemsize
        if not all(_count(n) for n in size):
            return f"declares {fqn} with shape {size}"
        covered = 0
        for chunk in item.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offsets) != len(size) or len(sizes) != len(size) or not all(
                    _count(o) and _count(n) and o + n <= d for o, n, d in zip(offsets, sizes, size)):
                return f"declares a chunk of {fqn} at {offsets} of shape {sizes}, outside its shape {size}"
            info = storage_data.get(MetadataIndex(fqn, offsets))
            need = math.prod(sizes) * itemsize
            if info is None or need > info.length:
                return (f"declares {fqn} as {size} {item.properties.dtype} ({_bytes(math.prod(size) * itemsize)}), "
                        f"but stores {0 if info is None else info.length} bytes for its chunk of {_bytes(need)}")
            covered += math.prod(sizes)
        if covered != math.prod(size):
            return f"declares {fqn} of {math.prod(size)} elements, but its chunks hold {covered}"
        declared += covered * itemsize
        if declared > data_bytes:
            return f"declares {_bytes(declared)} of tensors up to {fqn}, but its data files hold {_bytes(data_bytes)}"
    return None


def _planner_data_problem(planner_data: Any, num_items: int) -> str | None:
    """DCP rebuilds nesting from these paths, growing a list up to each integer in them: keep those small."""
    if planner_data is None:
        return None
    for fqn, path in planner_data.items():
        if not isinstance(path, (tuple, list)) or not all(
                isinstance(p, str) or (type(p) is int and 0 <= p <= num_items) for p in path):
            return f"has a malformed planner path for {fqn}"
    return None


def _count(n: Any) -> bool:
    return type(n) is int and n >= 0


def _bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n:,} bytes"
