"""Where a training run lives and what it starts from, decided (and checked) on the driver before Ray starts.

A run is `<run.out_dir>/<run.name>/` (Ray Train's storage_path / name). Ray Train V2 silently continues an existing
run of the same name, so whether a name may exist is decided here from model.init_from:

    model.init_from=scratch (or gpt2*)  a NEW run: its directory must hold no run. What a run refused before its
                                        first step leaves there (Ray's storage marker, rank 0's params and an
                                        empty metrics.jsonl) is none: the name can be used again.
    model.init_from=resume              --run.name=<existing run>: continue it from its newest complete
                                        checkpoint (Ray restores its checkpoint list); --run.resume_from=<checkpoint
                                        dir>: a NEW run starting from that checkpoint.

A continued run starts from the newest COMPLETE checkpoint in its directory (nanogpt/checkpoint/files.py), not
from the latest that Ray's snapshot lists: Ray records a checkpoint in its snapshot only at the controller's next
poll after the upload, so a driver killed meanwhile (`kill -9`) leaves complete checkpoints the snapshot does not
know. The plan names that checkpoint, and each worker starts from the newer of it and what Ray hands it
(`newer_checkpoint`). A run in object storage continues from its snapshot's latest.

Run names are ASCII letters, digits and `. _ - + =`: Ray Train puts the name in its metrics' tags, which take
ASCII only (`résumé` crashed the controller), and in storage paths. A run in object storage needs its bucket to
exist and the store to answer: both are checked here, before Ray starts.

Names left to us are `<preset>-<YYYYmmdd-HHMMSS>-<4 random hex>`: unique even when two jobs (sweep trials) start
in the same second.

A sweep's trial (pipelines/sweep/trial.py) is the exception: its name is fixed by its Tune trial id, and whenever
its directory holds a Ray Train run it continues it (plan_trial_run): a trial restarted by Tune, or by a resumed
sweep, picks up its own checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from nanogpt.checkpoint.files import CHECKPOINT_NAME, CheckpointError, is_checkpoint, latest_checkpoint
from nanogpt.config import Config, ConfigError
from nanogpt.data.storage import (
    REACH_HINT,
    StorageError,
    exists,
    is_uri,
    join,
    list_entries,
    resolve_local,
    size,
)
from nanogpt.tracking import PARAMS_FILE, TAGS_FILE

log = logging.getLogger(__name__)

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # what Ray Train V2 restores a run from
METRICS_FILE = "metrics.jsonl"  # rank 0's metrics, one JSON line per logged step, in the run directory
# What a run refused before its first step (a shard damaged in the store, a bad config found by a worker) leaves in
# its directory: Ray Train's storage check, rank 0's params and tags, and a metrics.jsonl with no line.
RECORDS_OF_NO_STEP = frozenset({".validate_storage_marker", PARAMS_FILE, TAGS_FILE, METRICS_FILE})
RUN_NAME = re.compile(r"^[A-Za-z0-9_+=][A-Za-z0-9._+=-]*$")


@dataclass(frozen=True)
class RunPlan:
    name: str
    storage_path: str
    """Ray Train's storage_path: an absolute local directory or a URI."""
    run_dir: str
    """storage_path/name: checkpoints, Ray's snapshot, metrics.jsonl."""
    resume_from: str | None
    """The checkpoint to start from unless Ray hands the workers a newer one: run.resume_from, or the newest
    complete checkpoint of a continued run (local storage). None otherwise."""
    continues_run: bool
    """init_from=resume of an existing run (the same name, the same MLflow run): Ray restores its snapshot's
    checkpoint list, and the workers start from the newer of its latest and resume_from."""


def plan_run(config: Config, preset: str | None = None) -> RunPlan:
    """Resolve the run's name and directory and check them against model.init_from (see the module docstring)."""
    rc = config.run
    storage = resolve_local(rc.out_dir)
    if not is_uri(rc.out_dir) and not os.path.isabs(os.path.expanduser(rc.out_dir)) and _in_ray_job():
        log.warning("run.out_dir=%s is relative and this is a Ray job: the run lands in the job's temporary "
                    "working directory %s; pass an absolute path or a URI", rc.out_dir, storage)
    if rc.name is not None:
        check_run_name(rc.name, "run.name")  # a name made here (unique_name) is one already
    if not is_uri(storage):
        check_writable(storage, "run.out_dir")
        return _plan(config, preset, storage)
    try:
        check_bucket(storage, "run.out_dir")
        return _plan(config, preset, storage)
    except StorageError as e:  # the store did not answer (at the first request, or a later one)
        raise ConfigError(f"run.out_dir={rc.out_dir}: the store did not answer: {e.reason}; {REACH_HINT}") from None


def _plan(config: Config, preset: str | None, storage: str) -> RunPlan:
    rc = config.run
    name = rc.name or unique_name(preset or "run", storage)
    run_dir = join(storage, name)
    if config.model.init_from != "resume":
        return _plan_new_run(config, name, storage, run_dir)
    if rc.resume_from:
        return _plan_branch(config, name, storage, run_dir)
    if not rc.name:
        raise ConfigError("model.init_from=resume needs --run.name=<an existing run under run.out_dir> (continue it "
                          "from its latest checkpoint) or --run.resume_from=<checkpoint dir> (start a new run from it)")
    newest = None if is_uri(run_dir) else latest_checkpoint(run_dir)
    if exists(join(run_dir, RAY_SNAPSHOT)):
        return RunPlan(name, storage, run_dir, newest, True)
    # Ray records a run's checkpoints in its snapshot; when the storage failed before it wrote one, the run's
    # committed checkpoints are still there to continue from
    if newest is None:
        raise ConfigError(f"nothing to resume: {run_dir} has no Ray Train snapshot ({RAY_SNAPSHOT}) and no complete "
                          "checkpoint; start from a checkpoint with --run.resume_from=<checkpoint dir>")
    log.warning("%s has no %s: continuing from its newest complete checkpoint, %s", run_dir, RAY_SNAPSHOT, newest)
    return RunPlan(name, storage, run_dir, newest, True)


def newer_checkpoint(reported: str | None, planned: str | None) -> str | None:
    """The checkpoint a worker starts from: `reported` (what Ray hands it) unless `planned` (the plan's
    resume_from) is a later `checkpoint_<step>`. Ray's is the latest of this run's after a worker-group restart; the
    plan's is newer when Ray's snapshot lagged the checkpoints on disk (a driver killed before it recorded them)."""
    if reported is None or planned is None:
        return reported or planned
    return planned if _checkpoint_step(planned) > _checkpoint_step(reported) else reported


def _checkpoint_step(path: str) -> int:
    """The step in a `checkpoint_<step>` directory's name; -1 for another name (a run.resume_from export)."""
    match = CHECKPOINT_NAME.match(os.path.basename(path.rstrip("/")))
    return int(match.group(1)) if match else -1


def check_run_name(name: str, key: str) -> None:
    """ConfigError naming `key` unless `name` is a plain ASCII directory name (see the module docstring)."""
    if not RUN_NAME.match(name):
        raise ConfigError(f"{key}={name!r} may hold only ASCII letters, digits and . _ - + = (not first: . or -): "
                          "Ray Train puts it in its metrics' tags (ASCII only) and in storage paths")


def check_bucket(uri: str, key: str) -> None:
    """The bucket of `uri` (s3://bucket/...) exists; ConfigError naming `key` when it does not, StorageError when
    the store does not answer. Ray Train would otherwise fail inside its storage set-up, after Ray started."""
    scheme, rest = uri.split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    if scheme in ("s3", "gs") and not exists(bucket):
        raise ConfigError(f"{key}={uri}: the bucket {bucket} does not exist (create it, or fix the URI)")


def _plan_new_run(config: Config, name: str, storage: str, run_dir: str) -> RunPlan:
    if config.run.resume_from:
        raise ConfigError(f"run.resume_from={config.run.resume_from} is only read with model.init_from=resume "
                          f"(model.init_from is {config.model.init_from})")
    if holds_a_run(run_dir):
        raise ConfigError(
            f"run directory {run_dir} already exists and model.init_from={config.model.init_from} starts a new "
            f"run (Ray Train would silently continue the old one instead): pass a new --run.name, delete the "
            f"directory, or continue it with --model.init_from=resume --run.name={name}"
        )
    return RunPlan(name, storage, run_dir, None, False)


def _plan_branch(config: Config, name: str, storage: str, run_dir: str) -> RunPlan:
    """init_from=resume with run.resume_from: a new run starting from another run's checkpoint."""
    source = resolve_local(config.run.resume_from)
    if not is_uri(source) and not is_checkpoint(source):
        raise CheckpointError(f"run.resume_from={config.run.resume_from}: {source} is not a complete checkpoint "
                              "directory (no state.json)")
    if holds_a_run(run_dir):
        raise ConfigError(
            f"run.resume_from starts a new run from {config.run.resume_from}, but run {name!r} already exists at "
            f"{run_dir} (Ray Train would continue that run instead): pass a new --run.name, or drop "
            "--run.resume_from to continue that run from its latest checkpoint"
        )
    return RunPlan(name, storage, run_dir, source, False)


def holds_a_run(run_dir: str) -> bool:
    """Whether `run_dir` holds anything of a run beyond what one refused before its first step leaves
    (RECORDS_OF_NO_STEP): a checkpoint, Ray's snapshot, a logged step, or any other file."""
    if not exists(run_dir):
        return False
    names = list_entries(run_dir) if is_uri(run_dir) else os.listdir(run_dir)
    if not set(names) <= RECORDS_OF_NO_STEP:
        return True
    metrics = join(run_dir, METRICS_FILE)
    if METRICS_FILE in names and (size(metrics) if is_uri(run_dir) else os.path.getsize(metrics)):
        return True
    log.info("%s holds only what a run refused before its first step leaves (%s): the new run starts there",
             run_dir, ", ".join(names) or "nothing")
    return False


def check_writable(directory: str, key: str) -> None:
    """`directory` can be created (or exists) and written, checked without creating anything: the nearest
    existing ancestor must be a writable directory. ConfigError naming `key` and the path that is in the way."""
    path = Path(directory)
    while not path.exists():
        if path.parent == path:
            break
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"{key}={directory}: {path} is a file, so the directory cannot be created there")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={directory}: {path} is not writable")


def plan_trial_run(config: Config) -> RunPlan:
    """A sweep trial's run, `<run.out_dir>/<run.name>` (both set by the sweep driver): new the first time, continued
    from its newest complete checkpoint when the trial runs again. A sweep lives on a filesystem
    (pipelines/sweep/plan.py); a one-worker trial writes no Ray snapshot (pipelines/sweep/trial_here.py)."""
    storage = resolve_local(config.run.out_dir)
    run_dir = join(storage, config.run.name)
    newest = latest_checkpoint(run_dir)
    return RunPlan(config.run.name, storage, run_dir, newest, newest is not None or exists(join(run_dir, RAY_SNAPSHOT)))


def unique_name(preset: str, storage: str) -> str:
    """`<preset>-<time>-<random>`: the random part keeps jobs started in the same second apart. 32 bits: the check
    below sees only runs already on disk, not another job naming its run at this moment (at 16 bits, 50 names in one
    second collided about once in 50 tries)."""
    preset = re.sub(r"[^A-Za-z0-9._+=-]", "_", preset).lstrip(".-") or "run"  # a file `my résumé.yaml`
    while True:
        name = f"{preset}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(4)}"
        if not exists(join(storage, name)):
            return name


def _in_ray_job() -> bool:
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by the job supervisor for the entrypoint
