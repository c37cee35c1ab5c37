"""Pretrain (or finetune) nanoGPT with Ray Train: the project's main job.

    python pipelines/pretrain.py                                           # the shakespeare_char_cpu preset
    python pipelines/pretrain.py --config debug --train.max_iters=100 --run.num_workers=2
    python pipelines/pretrain.py --config shakespeare_char_cpu --train.max_iters=300 --sample
    python pipelines/pretrain.py --config my.yaml --run.name=r1 --export-nanogpt ckpt.pt --export-hf hf_r1/

    # on a cluster (Ray 2.60 keeps token auth on: the client needs RAY_AUTH_MODE=token)
    ray start --head --dashboard-host=127.0.0.1 --disable-usage-stats
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python pipelines/pretrain.py --config debug --run.out_dir=/abs/path/runs --data.dir=/abs/path/shards

Options: --config <preset name in pipelines/configs/ | file.yaml> (default shakespeare_char_cpu), any
`--section.key=value` override (nanogpt/config.py), --sample[=N] (print N tokens from the best checkpoint at the
end, default 500), --sample-start TEXT, --export-nanogpt PATH (nanoGPT's ckpt.pt of the best checkpoint),
--export-hf DIR (a Hugging Face GPT-2 directory), --address / --num-cpus (which Ray: by default RAY_ADDRESS, a
running cluster, else a local instance). Exit status: 0 done, 2 bad config/data (nothing started), 1 training failed.

Data: `data.dir` is used as is when it holds a manifest that verifies (a damaged shard is an error naming the
file); otherwise the shards are prepared there first from `data.input` with Ray Data (pipelines/prepare.py).

Runs. A run lives in `<run.out_dir>/<run.name>/` (Ray Train's storage_path / name): `checkpoint_<step>/`
directories (the best `run.num_to_keep` by val_loss, plus always the latest), Ray's checkpoint_manager_snapshot.json,
and metrics.jsonl (one JSON line per logged step, written by rank 0; a step logged twice after a restart: the last
line wins). `run.name` defaults to `<preset>-<YYYYmmdd-HHMMSS>`. run.out_dir may be a cloud URI (s3://, gs://);
under `ray job submit` give an absolute path or URI (a relative one lands in the job's temporary working dir).

    model.init_from=scratch (or gpt2*)  a NEW run: its directory must not exist (Ray Train V2 would silently
                                        continue an existing run of that name instead of starting over).
    model.init_from=resume              --run.name=<existing run>: continue that run from its latest checkpoint,
                                        under the same name (Ray restores its checkpoint list), any worker count;
                                        --run.resume_from=<checkpoint dir> (of any run; shared storage on a
                                        cluster): a NEW run (run.name must not exist) starting from that checkpoint.

Either way the model settings must match the checkpoint's. tokens per step (batch_size * block_size *
gradient_accumulation_steps) do not depend on run.num_workers, so a run resumed on another worker count continues
the same optimization; the resumed run makes update <checkpoint step> next, on the same batches.

Failures: with run.max_failures > 0 Ray Train restarts the worker group after a worker dies, and every worker
resumes from the run's latest reported checkpoint (ray.train.get_checkpoint()), bit-exactly on CPU.
"""
# ruff: noqa: E402 -- the two sys.path lines below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

# `python pipelines/pretrain.py` puts pipelines/ first on sys.path, not the repo root, and `ray job submit
# --working-dir .` may run where the package is not installed: make `import nanogpt, pipelines` work either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import contextlib
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nanogpt.checkpoint import CheckpointError, export_hf_dir, export_nanogpt_ckpt, is_checkpoint
from nanogpt.config import Config, ConfigError, load_config
from nanogpt.corpus import CorpusError
from nanogpt.shards import MANIFEST_NAME, Manifest, ShardError, verify
from nanogpt.tokenizers import TokenizerError
from nanogpt.tracking import RUN_ID_KEY, JsonlTracker, MultiTracker, NullTracker, Tracker
from nanogpt.train import TrainContext, micro_steps_per_rank

log = logging.getLogger("nanogpt.pretrain")

PRESET_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "shakespeare_char_cpu"
METRICS_FILE = "metrics.jsonl"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # what Ray Train V2 restores a run from
# Errors that mean "fix the config or the data": reported in one line, exit status 2, nothing started.
USER_ERRORS = (ConfigError, ShardError, CheckpointError, CorpusError, TokenizerError)


@dataclass(frozen=True)
class RunPlan:
    """Where a run lives and what it starts from, decided (and checked) on the driver before Ray starts."""

    name: str
    storage_path: str
    """Ray Train's storage_path: an absolute local directory or a URI."""
    run_dir: str
    """storage_path/name: checkpoints, Ray's snapshot, metrics.jsonl."""
    resume_from: str | None
    """An explicit checkpoint to start from (run.resume_from), or None."""
    continues_run: bool
    """init_from=resume of an existing run: Ray restores run_dir's latest checkpoint."""


@dataclass
class PretrainOutcome:
    plan: RunPlan
    best_checkpoint: str | None
    """Path (or URI) of the checkpoint with the lowest val_loss, None when no checkpoint was reported."""
    best_val_loss: float | None
    best_step: int | None
    latest_checkpoint: str | None
    summary: dict[str, Any]
    """What rank 0's worker function returned (steps, tokens/s, ...)."""
    tracking: dict[str, str] | None = None
    """MLflow: tracking_uri, run_id and, when the best checkpoint was registered, model_uri (models:/name/version)."""


# ------------------------------------------------------------------------------------------ the driver


def pretrain(
    config: Config,
    preset: str | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    fault: dict[str, Any] | None = None,
    collect_step_times: bool = False,
) -> PretrainOutcome:
    """Validate `config`, make sure the shards exist, then train with a TorchTrainer and return where the best
    checkpoint is. Config and data errors (USER_ERRORS) are raised before any trainer starts.

    `fault` (TEST-ONLY fault injection): {"kill_at_step": k, "rank": r, "marker": path, "delay_s": 3.0}: the worker
    of rank r SIGKILLs itself delay_s after update k if `marker` does not exist yet (it creates it first, so the
    restarted worker group runs through). `collect_step_times` (bench only): rank 0 returns the perf_counter time of every update."""
    validate(config)
    plan = plan_run(config, preset)
    data_dir = _resolve_local_path(config.data.dir)
    manifest = _verified_manifest(config, data_dir)

    import ray.train  # only now: the checks above fail in milliseconds, without Ray

    from pipelines.ray_session import init_ray

    init_ray(address=address, num_cpus=num_cpus)
    if manifest is None:
        from pipelines.prepare import prepare

        log.info("no prepared shards in %s: preparing them from %s", data_dir, config.data.input)
        prepare(config.data, data_dir)
        verify(data_dir)
    _warn_if_cluster_too_small(config)

    # The config the workers (and every checkpoint's config.yaml) see: resolved name, storage and data paths, and
    # the tracking store (a relative sqlite path or another environment on a worker would split the run).
    config = config.replace(run__name=plan.name, run__out_dir=plan.storage_path, data__dir=data_dir)
    if config.run.tracker == "mlflow":
        from pipelines.mlflow_tracking import resolve_tracking_uri

        config = config.replace(run__tracking_uri=resolve_tracking_uri(config))
    trainer = build_trainer(config, plan, fault=fault, collect_step_times=collect_step_times)
    log.info("run %s -> %s (%d workers)%s", plan.name, plan.run_dir, config.run.num_workers,
             f", resuming from {plan.resume_from}" if plan.resume_from else
             (", continuing from its latest checkpoint" if plan.continues_run else ""))
    result = trainer.fit()  # raises ray.train.TrainingFailedError when the workers fail beyond run.max_failures
    outcome = _outcome(plan, result, ray.train)
    if config.run.tracker == "mlflow":
        outcome.tracking = finish_tracking(config, outcome)
    return outcome


def validate(config: Config) -> None:
    """Checks that need no Ray and no data: they fail in milliseconds, before anything starts."""
    micro_steps_per_rank(config.train.gradient_accumulation_steps, config.run.num_workers)
    if config.run.use_gpu and config.train.device in ("cpu", "mps"):
        raise ConfigError(f"run.use_gpu=true reserves GPUs but train.device={config.train.device}: use "
                          "--train.device=auto (or cuda), or --run.use_gpu=false")
    if config.train.device == "cuda" and not config.run.use_gpu:
        raise ConfigError("train.device=cuda needs GPU workers: add --run.use_gpu=true")
    if not config.data.dir:
        raise ConfigError("data.dir is not set: the directory of prepared token shards (or where to prepare them "
                          "from data.input), e.g. --data.dir=data/shakespeare_char")
    if _is_uri(config.data.dir):
        raise ConfigError(f"data.dir={config.data.dir}: token shards are memory-mapped, so data.dir must be a "
                          "filesystem path every worker sees (a shared mount on a cluster), not a URI")


def plan_run(config: Config, preset: str | None = None) -> RunPlan:
    """Resolve the run's name and directory and check them against model.init_from (see the module docstring)."""
    rc = config.run
    storage = rc.out_dir if _is_uri(rc.out_dir) else _resolve_local_path(rc.out_dir)
    if not _is_uri(rc.out_dir) and not os.path.isabs(os.path.expanduser(rc.out_dir)) and _in_ray_job():
        log.warning("run.out_dir=%s is relative and this is a Ray job: the run lands in the job's temporary "
                    "working directory %s; pass an absolute path or a URI", rc.out_dir, storage)
    name = rc.name or _unique_name(preset or "run", storage)
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"run.name={name!r} must be a plain directory name")
    run_dir = _join(storage, name)
    exists = _exists(run_dir)
    if config.model.init_from != "resume":
        if rc.resume_from:
            raise ConfigError(f"run.resume_from={rc.resume_from} is only read with model.init_from=resume "
                              f"(model.init_from is {config.model.init_from})")
        if exists:
            raise ConfigError(
                f"run directory {run_dir} already exists and model.init_from={config.model.init_from} starts a new "
                f"run (Ray Train would silently continue the old one instead): pass a new --run.name, delete the "
                f"directory, or continue it with --model.init_from=resume --run.name={name}"
            )
        return RunPlan(name, storage, run_dir, None, False)
    if rc.resume_from:
        source = rc.resume_from if _is_uri(rc.resume_from) else _resolve_local_path(rc.resume_from)
        if not _is_uri(source) and not is_checkpoint(source):
            raise CheckpointError(f"run.resume_from={rc.resume_from}: {source} is not a complete checkpoint "
                                  "directory (no state.json)")
        if exists:
            raise ConfigError(
                f"run.resume_from starts a new run from {rc.resume_from}, but run {name!r} already exists at "
                f"{run_dir} (Ray Train would continue that run instead): pass a new --run.name, or drop "
                "--run.resume_from to continue that run from its latest checkpoint"
            )
        return RunPlan(name, storage, run_dir, source, False)
    if not rc.name:
        raise ConfigError("model.init_from=resume needs --run.name=<an existing run under run.out_dir> (continue it "
                          "from its latest checkpoint) or --run.resume_from=<checkpoint dir> (start a new run from it)")
    if not _exists(_join(run_dir, RAY_SNAPSHOT)):
        raise ConfigError(f"nothing to resume: {run_dir} is not a Ray Train run directory (no {RAY_SNAPSHOT})")
    return RunPlan(name, storage, run_dir, None, True)


def build_trainer(config: Config, plan: RunPlan, *, fault: dict[str, Any] | None = None,
                  collect_step_times: bool = False):
    """The TorchTrainer for `config` (already resolved by pretrain()): one plain dict goes to the workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rc = config.run
    resources = {"CPU": rc.cpus_per_worker}
    if rc.use_gpu:
        resources["GPU"] = rc.gpus_per_worker
    loop_config: dict[str, Any] = {"config": config.to_dict(), "data_dir": config.data.dir,
                                   "resume_from": plan.resume_from, "run_dir": plan.run_dir}
    if fault:
        loop_config["_fault"] = dict(fault)
    if collect_step_times:
        loop_config["_step_times"] = True
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=rc.num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
            failure_config=FailureConfig(max_failures=rc.max_failures),
        ),
    )


# ------------------------------------------------------------------------------------------ the workers


class RayReporter:
    """The loop's Reporter inside Ray Train: every rank calls ray.train.report at the same steps (a barrier);
    rank 0 attaches the checkpoint directory the loop just wrote (Ray copies it to storage before returning)."""

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"checkpoint_{int(metrics['step']):06d}" if checkpoint else None
        ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)


def make_tracker(config: Config, ctx: TrainContext, run_dir: str, resume_dir: str | None = None) -> Tracker:
    """The one place that decides where metrics go. Rank 0 appends to <run_dir>/metrics.jsonl (the worker's working
    directory when the run lives at a URI) and, with run.tracker=mlflow, logs to MLflow: the run recorded in the
    checkpoint it resumes from (after a worker restart or init_from=resume), else a new one. Other ranks: nothing."""
    if ctx.rank != 0:
        return NullTracker()
    directory = os.getcwd() if _is_uri(run_dir) else run_dir
    jsonl = JsonlTracker(os.path.join(directory, METRICS_FILE))
    if config.run.tracker != "mlflow":
        return jsonl
    from pipelines.mlflow_tracking import make_mlflow_tracker

    run_id = _checkpoint_state(resume_dir).get("extra", {}).get(RUN_ID_KEY) if resume_dir else None
    mlflow = make_mlflow_tracker(config, run_id=run_id, world_size=ctx.world_size, device=ctx.device,
                                 manifest=config.data.dir)
    return MultiTracker(jsonl, mlflow)


def finish_tracking(config: Config, outcome: PretrainOutcome) -> dict[str, str] | None:
    """On the driver, after fit(): log the best and the final checkpoint to the job's MLflow run and register the
    best as a new version of run.registered_model. Tracking failures are warnings (the run's result stands)."""
    from pipelines.mlflow_tracking import MlflowTracker, sanitize_model_name

    if outcome.latest_checkpoint is None:
        return None
    with contextlib.ExitStack() as stack:
        final_dir = stack.enter_context(_local_checkpoint(outcome.latest_checkpoint))
        run_id = _checkpoint_state(final_dir).get("extra", {}).get(RUN_ID_KEY)
        if run_id is None:
            log.warning("the final checkpoint records no MLflow run (was the store unreachable all along?): "
                        "checkpoints not logged to MLflow")
            return None
        model_name = sanitize_model_name(config.run.registered_model or config.run.experiment)
        tracker = MlflowTracker.from_config(config, registered_model_name=model_name, system_metrics=False)
        tracker.start(run_id)
        version = None
        if outcome.best_checkpoint is not None:
            tracker.log_checkpoint(stack.enter_context(_local_checkpoint(outcome.best_checkpoint)), "best")
        tracker.log_checkpoint(final_dir, "final")
        if outcome.best_checkpoint is not None:
            version = tracker.register_best()
        tracker.close(loss_curve=False)  # the worker drew the loss curve when it closed the run
    info = {"tracking_uri": tracker.tracking_uri, "run_id": run_id}
    if version is not None:
        info["model_uri"] = f"models:/{model_name}/{version}"
    return info


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """What every Ray Train worker runs: nanogpt.train.train() with Ray's rank, device, DDP and reporting."""
    import ray.train
    import ray.train.torch

    from nanogpt.train import train

    config = Config.from_dict(loop_config["config"])
    context = ray.train.get_context()
    world_size = context.get_world_size()
    ray_device = ray.train.torch.get_device()  # cuda:<local gpu> with use_gpu, else cpu
    device = str(ray_device) if config.train.device in ("auto", "cuda") else config.train.device
    ctx = TrainContext(
        rank=context.get_world_rank(),
        world_size=world_size,
        local_rank=context.get_local_rank(),
        device=device,
        # DDP over gloo (CPU) or nccl; the loop has already put the model on `device`
        wrap_model=functools.partial(ray.train.torch.prepare_model, move_to_device=False) if world_size > 1 else None,
    )
    hooks = [h for h in (_fault_hook(loop_config.get("_fault"), ctx.rank),
                         _StepTimes() if loop_config.get("_step_times") and ctx.rank == 0 else None) if h]
    # After a worker-group restart (FailureConfig) or when continuing a run, Ray hands every rank the run's latest
    # reported checkpoint; otherwise an explicit run.resume_from; otherwise a fresh start.
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(loop_config["resume_from"])
    if checkpoint is None and config.model.init_from == "resume":
        raise CheckpointError(f"model.init_from=resume but Ray has no checkpoint for run {config.run.name}")
    # as_directory: the checkpoint itself when local, else a download that lives until the block ends (the loop
    # reads it completely before its first update)
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_dir:
        tracker = make_tracker(config, ctx, loop_config["run_dir"], resume_dir)
        try:
            result = train(config, loop_config["data_dir"], ctx, RayReporter(), tracker=tracker,
                           resume_from=resume_dir, on_step=_chain(hooks))
        except BaseException:
            tracker.close(status="FAILED")
            raise
        tracker.close()
    if ctx.rank != 0:
        return None
    import torch

    summary = {"start_step": result.start_step, "step": result.step, "best_val_loss": result.best_val_loss,
               "val_loss": result.val_loss, "tokens_per_s": result.tokens_per_s, "num_skipped": result.num_skipped,
               "torch_threads": torch.get_num_threads(), "world_size": world_size}
    for hook in hooks:
        if isinstance(hook, _StepTimes):
            summary["step_times"] = hook.times
    return summary


class _StepTimes:
    """Bench only: perf_counter() after every update, as bench/bench_train.py's run_plain measures it."""

    def __init__(self) -> None:
        self.times: list[tuple[int, float]] = []

    def __call__(self, step: int, metrics: dict) -> None:
        self.times.append((step, time.perf_counter()))


def _fault_hook(fault: dict[str, Any] | None, rank: int) -> Callable[[int, dict], None] | None:
    """TEST-ONLY fault injection (see pretrain(fault=...)): a SIGKILL, like an OOM kill or a lost node."""
    if not fault or rank != fault.get("rank", 1):
        return None
    kill_at, marker = int(fault["kill_at_step"]), Path(fault["marker"])
    # Ray Train's controller collects reports (and so registers checkpoints) at its health-check poll, every 2 s
    # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a worker dying sooner after a report restarts from the checkpoint before.
    # Real failures come minutes after a checkpoint; the default delay lets one poll pass, as they would.
    delay_s = float(fault.get("delay_s", 3.0))

    def kill(step: int, metrics: dict) -> None:
        if step == kill_at and not marker.exists():
            time.sleep(delay_s)
            marker.write_text(f"killed rank {rank} (pid {os.getpid()}) after update {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return kill


def _chain(hooks: list[Callable[[int, dict], None]]) -> Callable[[int, dict], None] | None:
    if not hooks:
        return None

    def on_step(step: int, metrics: dict) -> None:
        for hook in hooks:
            hook(step, metrics)

    return on_step


# ------------------------------------------------------------------------------------------ the command line


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Pretrain nanoGPT with Ray Train.", allow_abbrev=False,
        epilog="Any config field can be set as --section.key=value, e.g. --train.max_iters=100 --run.num_workers=2.",
    )
    parser.add_argument("--config", default=DEFAULT_PRESET,
                        help=f"a preset name in {PRESET_DIR} or a YAML file (default: {DEFAULT_PRESET})")
    parser.add_argument("--sample", nargs="?", type=int, const=500, default=0, metavar="N",
                        help="print N tokens (default 500) sampled from the best checkpoint at the end")
    parser.add_argument("--sample-start", default="\n", help="the sample's prompt (default: a newline)")
    parser.add_argument("--export-nanogpt", metavar="PATH", help="write the best checkpoint as nanoGPT's ckpt.pt")
    parser.add_argument("--export-hf", metavar="DIR", help="write the best checkpoint as a Hugging Face GPT-2 dir")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (same as --run.tracking_uri; default: "
                        "MLFLOW_TRACKING_URI, else <run.out_dir>/mlflow.db)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, a running cluster, else local)")
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance started here")
    args, overrides = parser.parse_known_args(argv)
    if args.tracking_uri:
        overrides.append(f"--run.tracking_uri={args.tracking_uri}")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, overrides, search_dirs=[PRESET_DIR])
        outcome = pretrain(config, preset=Path(args.config).stem, address=args.address, num_cpus=args.num_cpus)
    except USER_ERRORS as e:
        log.error("%s", e)
        return 2
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        log.error("training failed: %s", e)
        return 1
    print(f"run: {outcome.plan.run_dir}")
    s = outcome.summary
    if s.get("tokens_per_s"):
        print(f"updates {s['start_step']}..{s['step']}: {s['tokens_per_s']:,.0f} tokens/s on {s['world_size']} "
              f"worker(s), {s['torch_threads']} torch threads each")
    if outcome.best_checkpoint is None:
        print("no checkpoint was reported")
        return 0
    print(f"best checkpoint: {outcome.best_checkpoint} (step {outcome.best_step}, val loss {outcome.best_val_loss:.4f})")
    if outcome.tracking:
        print(f"MLflow: run {outcome.tracking['run_id']} at {outcome.tracking['tracking_uri']}"
              + (f"; registered {outcome.tracking['model_uri']}" if "model_uri" in outcome.tracking else ""))
    if args.sample or args.export_nanogpt or args.export_hf:
        with _local_checkpoint(outcome.best_checkpoint) as ckpt_dir:
            if args.export_nanogpt:
                print(f"nanoGPT ckpt.pt: {export_nanogpt_ckpt(ckpt_dir, args.export_nanogpt)}")
            if args.export_hf:
                print(f"Hugging Face directory: {export_hf_dir(ckpt_dir, args.export_hf)}")
            if args.sample:
                print(_sample(ckpt_dir, args.sample_start, args.sample))
    return 0


# ------------------------------------------------------------------------------------------ helpers


def _verified_manifest(config: Config, data_dir: str) -> Manifest | None:
    """The shard directory's verified manifest; None when it has none and data.input can make one."""
    if os.path.exists(os.path.join(data_dir, MANIFEST_NAME)):
        manifest = verify(data_dir)  # ShardError names the damaged file
        if manifest.tokenizer.get("name") != config.data.tokenizer:
            raise ConfigError(
                f"data.dir={data_dir} holds {manifest.tokenizer.get('name')} tokens but data.tokenizer="
                f"{config.data.tokenizer}: point data.dir at shards of that tokenizer (or set --data.tokenizer)"
            )
        return manifest
    if not config.data.input:
        raise ShardError(os.path.join(data_dir, MANIFEST_NAME),
                         "missing and data.input is not set: prepare the shards first (pipelines/prepare.py) or "
                         "set --data.input to prepare them here")
    return None


def _outcome(plan: RunPlan, result, ray_train) -> PretrainOutcome:
    scored = [(m.get("val_loss", math.inf), int(m.get("step", -1)), c) for c, m in (result.best_checkpoints or [])
              if m.get("val_loss") is not None]
    best = min(scored, key=lambda t: (t[0], -t[1]), default=None)
    return PretrainOutcome(
        plan=plan,
        best_checkpoint=_uri(best[2]) if best else None,
        best_val_loss=best[0] if best else None,
        best_step=best[1] if best else None,
        latest_checkpoint=_uri(result.checkpoint) if result.checkpoint else None,
        summary=dict(result.return_value or {}),
    )


def _uri(checkpoint) -> str:
    """A local path for a local checkpoint, else scheme://path."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    scheme = {"S3FileSystem": "s3", "GcsFileSystem": "gs"}.get(type(checkpoint.filesystem).__name__, "")
    return f"{scheme}://{checkpoint.path}" if scheme else checkpoint.path


@contextlib.contextmanager
def _local_checkpoint(path: str):
    if not _is_uri(path):
        yield path
        return
    import ray.train

    with ray.train.Checkpoint(path).as_directory() as d:
        yield d


def _checkpoint_state(ckpt_dir: str) -> dict[str, Any]:
    """A checkpoint's state.json (step, best_val_loss, extra); {} when unreadable."""
    import json

    try:
        return json.loads(Path(ckpt_dir, "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _sample(ckpt_dir: str, start: str, max_new_tokens: int) -> str:
    from pipelines.sample import generate_from_checkpoint

    return generate_from_checkpoint(ckpt_dir, start, max_new_tokens=max_new_tokens, num_samples=1)[0]


def _warn_if_cluster_too_small(config: Config) -> None:
    import ray

    rc = config.run
    total = ray.cluster_resources()
    need_cpu = rc.num_workers * rc.cpus_per_worker
    need_gpu = rc.num_workers * rc.gpus_per_worker if rc.use_gpu else 0
    if total.get("CPU", 0) < need_cpu or total.get("GPU", 0) < need_gpu:
        log.warning(
            "the cluster has %s CPUs / %s GPUs now; %d workers need %s CPUs / %s GPUs: training waits until an "
            "autoscaler adds nodes (lower run.num_workers or run.cpus_per_worker on a fixed cluster)",
            total.get("CPU", 0), total.get("GPU", 0), rc.num_workers, need_cpu, need_gpu,
        )


def _unique_name(preset: str, storage: str) -> str:
    base = f"{preset}-{datetime.now():%Y%m%d-%H%M%S}"
    name, n = base, 2
    while _exists(_join(storage, name)):
        name, n = f"{base}-{n}", n + 1
    return name


def _is_uri(path: str | None) -> bool:
    return bool(path) and "://" in path


def _resolve_local_path(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if _is_uri(base) else os.path.join(base, name)


def _exists(path: str) -> bool:
    if not _is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(path)
    return fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound


def _in_ray_job() -> bool:
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by the job supervisor for the entrypoint


if __name__ == "__main__":
    sys.exit(main())
