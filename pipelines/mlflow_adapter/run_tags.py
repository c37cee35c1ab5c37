"""What a run records about where it came from, for the MLflow UI and for comparing runs: the source (MLflow
Projects' tags, git), package versions, world size and device, and the token dataset as a dataset input.

    tags = standard_tags(config, world_size=4, device="cuda", manifest="data/shakespeare_char")
    entity = dataset_input(manifest_dict(manifest), source="data/shakespeare_char")   # an mlflow DatasetInput

MLflow 3.17's UI opens an experiment by its kind and charts its primary metric first: EXPERIMENT_TAGS says both.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nanogpt.config import Config
from nanogpt.data.shards import MANIFEST_NAME, ShardError, manifest_text
from nanogpt.data.storage import is_uri

log = logging.getLogger(__name__)

# MLflow 3's UI opens an experiment by its kind: without this tag it guesses, and lands on the GenAI traces page
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # ExperimentKind.CUSTOM_MODEL_DEVELOPMENT in the UI bundle
# The UI's chart view puts the experiment's primary metric first (getBaseChartAndSectionConfigs's primaryMetricKey)
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
PRIMARY_METRIC = "val_loss"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, PRIMARY_METRIC_TAG: PRIMARY_METRIC}


def standard_tags(config: Config, world_size: int, device: Any, manifest: Any = None,
                  entry_point: str | None = None) -> dict[str, str]:
    """Where and on what a run trained: source (`source_tags`), package versions, world size, device, dataset
    fingerprint. `device`: "cuda" / torch.device; `manifest`: a Manifest, its dict, or a path to manifest.json or
    its dir; `entry_point`: the script that ran (default: sys.argv[0])."""
    tags = {
        "world_size": str(world_size),
        "python": platform.python_version(),
        "preset.name": str(config.run.name or ""),
        "model.init_from": config.model.init_from,
    }
    for package in ("torch", "ray", "mlflow", "numpy", "tiktoken"):
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    tags.update(source_tags(entry_point))
    device_type = str(device).split(":")[0]
    tags["device.type"] = device_type
    if device_type == "cuda":
        try:
            import torch

            tags["device.name"] = torch.cuda.get_device_name()
            tags["device.local_count"] = str(torch.cuda.device_count())
        except Exception as e:  # no driver in this process: keep the type only
            log.debug("no CUDA details: %s", e)
    else:
        tags["device.name"] = platform.processor() or platform.machine()
        tags["device.local_count"] = str(os.cpu_count() or 1)
    data = manifest_dict(manifest)
    if data is not None:
        tags["data.fingerprint"] = manifest_fingerprint(data)
        for key in ("input_fingerprint", "settings_fingerprint", "vocab_size"):
            if key in data:
                tags[f"data.{key}"] = str(data[key])
    return tags


def source_tags(entry_point: str | None = None) -> dict[str, str]:
    """The tags MLflow Projects set, which the UI's Source and Version columns render ("<repo>:<entry point>",
    the commit linked when the remote is on GitHub/GitLab): mlflow.source.type=PROJECT, mlflow.source.name (the
    git remote URL, else the checkout's path), mlflow.project.entryPoint (`entry_point`, default sys.argv[0],
    relative to the checkout), mlflow.source.git.commit/branch/repoURL; plus git.commit and git.dirty."""
    root = Path(__file__).resolve().parents[2]
    tags = {"mlflow.source.type": "PROJECT"}
    commit, dirty = _git_commit(root)
    remote = _without_credentials(_git(root, "config", "--get", "remote.origin.url"))
    top = _git(root, "rev-parse", "--show-toplevel") if commit else None
    tags["mlflow.source.name"] = remote or top or str(root)
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
    if commit:
        tags.update({"git.commit": commit, "mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()})
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":  # HEAD: detached, no branch
            tags["mlflow.source.git.branch"] = branch
    if entry_point is None:
        entry_point = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else None
    if entry_point:
        path = Path(entry_point).resolve()
        base = Path(top) if top else root
        tags["mlflow.project.entryPoint"] = str(path.relative_to(base)) if path.is_relative_to(base) else entry_point
    return tags


def dataset_input(manifest: Any, source: str | os.PathLike | None = None, context: str = "training") -> Any:
    """An mlflow.entities.DatasetInput for a token dataset: name = the data directory's name, digest = the
    manifest fingerprint, source = {"uri": the directory or URI} of type "local" or the URI's scheme, schema =
    the token column (mlflow_colspec, which the UI renders) with dtype, vocab size and tokenizer, profile = the
    splits' token and document counts. None when the manifest is unreadable."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    data = manifest_dict(manifest)
    if data is None:
        return None
    if source is None and isinstance(manifest, (str, os.PathLike)):
        source = manifest
    uri = str(source) if source is not None else ""
    if uri and not is_uri(uri):
        path = Path(uri).expanduser().resolve()
        uri = str(path.parent if path.name == MANIFEST_NAME else path)
    scheme = urllib.parse.urlparse(uri).scheme if is_uri(uri) else ""
    name = (uri.rstrip("/").rsplit("/", 1)[-1] if uri else "") or "dataset"
    tokenizer = data.get("tokenizer") or {}
    tokenizer_summary = {k: v for k, v in tokenizer.items() if k != "chars"} if isinstance(tokenizer, Mapping) else tokenizer
    splits = data.get("splits") or {}
    schema = {
        "mlflow_colspec": [{"type": "long", "name": "token", "required": True}],
        "dtype": data.get("dtype"),
        "vocab_size": data.get("vocab_size"),
        "tokenizer": tokenizer_summary,
    }
    profile = {
        "num_tokens": {k: v.get("num_tokens") for k, v in splits.items() if isinstance(v, Mapping)},
        "num_documents": {k: v.get("num_documents") for k, v in splits.items() if isinstance(v, Mapping)},
        "num_shards": {k: len(v.get("shards") or []) for k, v in splits.items() if isinstance(v, Mapping)},
        "vocab_size": data.get("vocab_size"),
        "tokenizer": tokenizer_summary.get("name") if isinstance(tokenizer_summary, Mapping) else tokenizer_summary,
    }
    dataset = Dataset(
        name=name,
        digest=manifest_fingerprint(data),
        source_type=scheme or "local",
        source=json.dumps({"uri": uri}),
        schema=json.dumps(schema, default=str),
        profile=json.dumps(profile, default=str),
    )
    return DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])


def manifest_fingerprint(manifest: Mapping[str, Any]) -> str:
    """sha256 (16 hex) of the manifest without what changes between identical preparations (timings, date)."""
    stable = {k: v for k, v in manifest.items() if k not in ("stats", "created_at")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_dict(manifest: Any) -> dict[str, Any] | None:
    """The dataset manifest as a dict: from a Manifest, a dict, or a path to manifest.json or its directory (local
    or a URI); None, with a warning, when it cannot be read."""
    if manifest is None:
        return None
    if hasattr(manifest, "to_dict"):
        return manifest.to_dict()
    if isinstance(manifest, Mapping):
        return dict(manifest)
    directory = str(manifest).removesuffix(MANIFEST_NAME).rstrip("/") or "."
    try:
        return json.loads(manifest_text(directory))  # a directory or a URI (s3://...)
    except (ShardError, OSError, ValueError) as e:
        log.warning("dataset manifest %s unreadable: %s", manifest, e)
        return None


def _without_credentials(url: str | None) -> str | None:
    """https://user:token@host/x -> https://host/x (a remote URL may carry a token; tags are readable by all)."""
    if not url or "://" not in url:
        return url
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _git(directory: Path, *args: str) -> str | None:
    """`git -C directory args...`'s output, or None (not a checkout, no such config, git missing)."""
    try:
        done = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def _git_commit(directory: Path) -> tuple[str | None, bool]:
    """(HEAD commit, whether tracked files have changes) of the checkout holding `directory`; (None, False) when
    it is not a git checkout or git is missing."""
    try:
        head = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        return head or None, bool(status)
    except (OSError, subprocess.SubprocessError):
        return None, False
