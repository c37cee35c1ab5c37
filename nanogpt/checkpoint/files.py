"""What a checkpoint directory holds and whether it is complete, without torch: its file names, its state.json
(the commit record, written last) and the checks on it. nanogpt/checkpoint/format.py writes and loads checkpoints; the
drivers, run planning and the MLflow tracker's helper process read their records through this module alone, so
they do not pay torch's import (bench/NOTES.md, "Figures behind the code's comments").

    check_committed("out/checkpoint_000250")   # state.json, or CheckpointError naming the missing/short file
    latest_checkpoint("out")                   # the newest complete checkpoint_<step> directory, or None
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

from nanogpt.config import ConfigError

STATE_FILE = "state.json"  # written last: its presence marks a complete checkpoint
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCALER_FILE = "scaler.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"  # nanogpt/train/local_reporter.py's record of what was reported with the checkpoint
CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")
# an FSDP run's sharded checkpoint (nanogpt/checkpoint/sharded.py): torch.distributed.checkpoint folders
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
DCP_METADATA = ".metadata"


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or unreadable; the message names the file."""


def read_state(dir: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's state.json (step, best_val_loss, model_args, extra, ...); CheckpointError when it is
    missing or unreadable. The one reader of that file."""
    return read_file(Path(dir) / STATE_FILE, json.loads)


def is_checkpoint(dir: str | os.PathLike) -> bool:
    """True for a committed checkpoint: its state.json (written last) reads, and every file it lists has the size
    it records. A copy cut short (a full disk during an upload) is not one, whatever files it holds."""
    try:
        check_committed(dir)
    except CheckpointError:
        return False
    return True


def check_committed(dir: str | os.PathLike, optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """state.json of a committed checkpoint; CheckpointError naming the first file that is missing or has the
    wrong size. Files in `optional` (names, or folders of a sharded checkpoint) may be missing (a weights-only copy
    leaves the optimizer out)."""
    path = Path(dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    check_no_links_out(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing, so {path} is not a complete checkpoint (an interrupted save or copy?)")
    state = read_state(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_path}: malformed (not a JSON object)")
    sizes = state.get("sizes") or {name: None for name in state.get("files", [])}
    for name, size in sizes.items():
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{state_path}: lists {name!r}, which is not a path inside the checkpoint")
        file = path / name
        if not file.is_file():
            if name in optional or name.split("/")[0] in optional:
                continue
            raise CheckpointError(f"{file}: missing from the checkpoint (state.json lists it)")
        if size is not None and file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, but state.json records {size}: the checkpoint "
                                  "was cut short (a full disk or an interrupted copy?)")
    return state


def check_no_links_out(dir: str | os.PathLike) -> None:
    """CheckpointError naming the first symlink under `dir` that resolves outside it: a checkpoint from a shared
    store would otherwise make its reader open any file of the machine (and an error quote it)."""
    root = Path(dir).resolve()
    for folder, dirnames, filenames in os.walk(root):  # symlinked folders are not entered, only checked
        for name in dirnames + filenames:
            entry = Path(folder) / name
            if entry.is_symlink() and not _resolves_inside(entry, root):
                raise CheckpointError(f"{Path(dir) / entry.relative_to(root)}: a symlink out of the checkpoint "
                                      "directory: refused")


def _resolves_inside(link: Path, root: Path) -> bool:
    try:
        return link.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop
        return False


def is_sharded_checkpoint(dir: str | os.PathLike) -> bool:
    """True for a committed sharded (FSDP) checkpoint, False for an unsharded one; CheckpointError if neither."""
    state = check_committed(dir, optional=(OPTIMIZER_FILE, SCALER_FILE, OPTIMIZER_DIR))
    return is_sharded(list(state.get("files") or []))


def is_sharded(files: list[str]) -> bool:
    """True for the file list of a sharded checkpoint (state.json "files")."""
    return f"{MODEL_DIR}/{DCP_METADATA}" in files


def has_optimizer_shards(files: list[str]) -> bool:
    return f"{OPTIMIZER_DIR}/{DCP_METADATA}" in files


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete `checkpoint_<step>` directory under out_dir, by step."""
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_NAME.match(p.name)
        if m and is_checkpoint(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """The complete checkpoint of out_dir with the highest step, or None."""
    found = checkpoint_dirs(out_dir)
    return str(found[-1][1]) if found else None


def read_file(path: Path, parse, binary: bool = False):
    """`parse` of the file at `path` (its text, or the path itself with `binary`); CheckpointError naming the file
    when it is missing or does not parse."""
    try:
        return parse(path) if binary else parse(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # json/yaml/pickle errors come in many types; all mean the file is damaged
        raise CheckpointError(f"{path}: unreadable ({parse_error(e)})") from None


def parse_error(e: BaseException) -> str:
    """What went wrong parsing a file, in one line that quotes none of it: YAML's and JSON's messages show the
    offending text; torch.load's run over many lines and suggest unpickling without its restrictions."""
    mark = getattr(e, "problem_mark", None)  # yaml's MarkedYAMLError
    if mark is not None:
        return f"{type(e).__name__} at line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(e, json.JSONDecodeError):
        return f"{type(e).__name__} at line {e.lineno}, column {e.colno}"
    if isinstance(e, UnicodeDecodeError):
        return f"{type(e).__name__}: not UTF-8 text"
    if isinstance(e, pickle.UnpicklingError) and (refused := re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))):
        return f"UnpicklingError: it names {refused[1]}, which is not allowed"
    if isinstance(e, pickle.UnpicklingError) and str(e).startswith("Weights only load failed"):
        return "UnpicklingError: not plain tensors and values"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
