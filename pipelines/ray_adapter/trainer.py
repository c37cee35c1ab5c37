"""The Ray Train side of a training job: the TorchTrainer for a resolved config, and what each worker runs.

    trainer = build_trainer(config, plan, tracking_run_id=run_id)   # pipelines/pretrain.py and Tune trials alike
    result = trainer.fit()

The trainer is Ray's TorchTrainer, built from public configs only, unless run.lean picks the wing's
(pipelines/ray_adapter/lean_switch.py).

Every worker runs `nanogpt.train.loop.train()` with Ray's rank, device and reporting; nothing else differs from a plain
process. `on_step` hooks (callables `hook(step, metrics)`, pickled to the workers) run on every rank after each
update: a place for a benchmark's timer or a test's fault, outside production code.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nanogpt.checkpoint.files import CheckpointError, check_committed, checkpoint_dirs
from nanogpt.config import Config
from nanogpt.data.shard_cache import local_shards
from nanogpt.data.storage import is_uri, join
from nanogpt.tracking import JsonlTracker, MultiTracker, NullTracker, Tracker
from nanogpt.user_errors import USER_ERRORS
from pipelines.ray_adapter.run_records import LocalRecords
from pipelines.ray_adapter.runs import METRICS_FILE, RunPlan, newer_checkpoint

if TYPE_CHECKING:
    from nanogpt.train.loop import OnStep, TrainResult

log = logging.getLogger(__name__)


def build_trainer(config: Config, plan: RunPlan, *, tracking_run_id: str | None = None,
                  on_step: Sequence[OnStep] = (), callbacks: Sequence[Any] = ()):
    """The trainer for `config` (resolved by the driver: run name, storage, data and tracking paths): Ray's
    TorchTrainer, or the lean wing's where run.lean says so (pipelines/ray_adapter/lean_switch.py). Checkpoints are
    kept by val_loss; one plain dict goes to the workers. `callbacks`: Ray Train callbacks, e.g. a sweep trial's
    report to Tune (pipelines/sweep/trial.py, tune_reports)."""
    parts = {"train_loop_config": worker_config(config, plan, tracking_run_id, on_step),
             "scaling_config": scaling_config(config), "run_config": run_config(config, plan, callbacks)}
    controller = wing_controller(config)
    if controller is not None:
        from pipelines.ray_adapter.lean.trainer import lean_trainer

        return lean_trainer(train_loop_per_worker, config.train.parallel, controller=controller, **parts)
    from ray.train.torch import TorchTrainer

    return TorchTrainer(train_loop_per_worker, **parts)


def wing_controller(config: Config) -> str | None:
    """Where the lean wing's trainer for `config`, built in this process, runs Ray Train's controller
    (controller_place); None where the job takes Ray's public TorchTrainer (run.lean, and every elastic job)."""
    from pipelines.ray_adapter.lean_switch import wing_on
    from pipelines.ray_adapter.session import serves_state_api, started_local_instance

    own_instance = started_local_instance()
    if config.run.elastic or not wing_on(config.run.lean, own_instance):
        return None
    return controller_place(own_instance and not serves_state_api())


def controller_place(own_instance_without_state_api: bool) -> str:
    """Where the wing's trainer runs Ray Train's controller (pipelines/ray_adapter/lean/trainer.py): in the driver of
    a job's own instance without the State API; in the calling actor (a sweep trial), as the actor Ray would start
    for it would be its child anyway; else in an actor of its own, as Ray does."""
    import ray

    if own_instance_without_state_api:
        return "driver"
    return "here" if ray.get_runtime_context().get_actor_id() is not None else "actor"


def worker_config(config: Config, plan: RunPlan, tracking_run_id: str | None,
                  on_step: Sequence[OnStep] = ()) -> dict[str, Any]:
    """The one plain dict every worker gets (train_loop_per_worker's argument)."""
    return {"config": config.to_dict(), "resume_from": plan.resume_from, "run_dir": plan.run_dir,
            "tracking_run_id": tracking_run_id, "on_step": list(on_step)}


def scaling_config(config: Config):
    from ray.train import ScalingConfig

    rc = config.run
    resources = {"CPU": rc.cpus_per_worker, **({"GPU": rc.gpus_per_worker} if rc.use_gpu else {})}
    if rc.elastic:  # Ray Train's elastic group: starts with what fits in [min, max], regrows every resize_interval_s
        return ScalingConfig(num_workers=(rc.min_workers, rc.num_workers), use_gpu=rc.use_gpu,
                             resources_per_worker=resources, elastic_resize_monitor_interval_s=rc.resize_interval_s)
    return ScalingConfig(num_workers=rc.num_workers, use_gpu=rc.use_gpu, resources_per_worker=resources)


GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's wait for a worker group's placement group (60 s by default), the variable its timeout error names;
Ray Train hands it from the driver's environment to its controller."""


@contextlib.contextmanager
def group_start_timeout(config: Config):
    """Around `fit()` of an elastic job: Ray Train waits run.group_start_timeout_s for the group of the size it chose,
    then chooses again from a fresh look at the cluster, as its elastic policy is built to (a lost node is listed
    for a while after it died). Left as it is for a fixed group, which may be waiting for an autoscaler, and where
    the user set the variable."""
    if not config.run.elastic or GROUP_START_TIMEOUT_ENV in os.environ:
        yield
        return
    os.environ[GROUP_START_TIMEOUT_ENV] = str(float(config.run.group_start_timeout_s))
    try:
        yield
    finally:
        os.environ.pop(GROUP_START_TIMEOUT_ENV, None)


def run_config(config: Config, plan: RunPlan, callbacks: Sequence[Any] = ()):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from pipelines.ray_adapter.end_on_user_error import EndRunOnUserError

    rc = config.run
    return RunConfig(
        name=plan.name,
        storage_path=plan.storage_path,
        checkpoint_config=CheckpointConfig(
            num_to_keep=rc.num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
        # run.max_failures retries what may pass on another try; a config or data error never does
        failure_config=FailureConfig(max_failures=rc.max_failures),
        callbacks=[EndRunOnUserError(), *callbacks],
        # Ray Train's own INFO lines on the console (resource requests, the worker group, each checkpoint):
        # off, like the rest of Ray's chatter; warnings and errors stay, and Ray's log files keep everything.
        logging_config=LoggingConfig(log_level="WARNING"),
    )


class RayReporter:
    """The loop's Reporter inside Ray Train: every rank calls ray.train.report at the same steps (a barrier);
    rank 0 attaches the checkpoint directory the loop just wrote (Ray copies it to storage before returning).
    Under FSDP every rank attaches its part (its shards; rank 0's also the metadata and state.json): Ray uploads
    each rank's directory into the same checkpoint directory in storage and registers it once all have reported.
    `records`: rank 0's of a run in object storage, put into each checkpoint it reports (pipelines/ray_adapter/run_records.py)."""

    def __init__(self, run_dir: str, records: LocalRecords | None = None) -> None:
        self.run_dir, self.records = run_dir, records

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        if checkpoint_dir and self.records is not None:
            self.records.add_to_checkpoint(checkpoint_dir)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        name = f"checkpoint_{int(metrics['step']):06d}" if checkpoint else None
        ray.train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=name)
        if name and ray.train.get_context().get_world_rank() == 0:
            log.info("saved checkpoint to %s", join(self.run_dir, name))


def quiet_ray_train_logs() -> None:
    """Ray Train's worker lines that tell a nanoGPT user nothing leave its console and files (QuietTrainLogs),
    through the handlers Ray Train gives its public `ray.train` logger in every worker."""
    for handler in logging.getLogger("ray.train").handlers:
        if not any(isinstance(f, QuietTrainLogs) for f in handler.filters):
            handler.addFilter(QuietTrainLogs())


class QuietTrainLogs(logging.Filter):
    """Drops Ray Train's INFO line of every report on every rank ("Reporting training result 3: ..."), which
    LoggingConfig does not reach (its logger is named by a file path, not `ray.train...`), and its "Error in training
    function" traceback of a config or data error (USER_ERRORS, logged while it is handled), which the driver
    reports in one line. Should Ray reword them, they show again: nothing else depends on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and record.getMessage().startswith("Reporting training result"):
            return False
        return not (record.name.startswith("ray.train") and isinstance(sys.exc_info()[1], USER_ERRORS))


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """What every Ray Train worker runs; rank 0 returns a summary of the run."""
    import ray.train

    quiet_ray_train_logs()
    config = Config.from_dict(loop_config["config"])
    rank, run_dir = ray.train.get_context().get_world_rank(), loop_config["run_dir"]
    resume_from = _resume_source(config, loop_config.get("resume_from"), run_dir)
    records = LocalRecords.fetch(run_dir, resume_from) if rank == 0 and is_uri(run_dir) else None
    # then rank 0's MLflow helper process, which imports and connects while this process sets up
    tracker = make_worker_tracker(config, rank, run_dir, loop_config.get("tracking_run_id"), records)
    try:
        result = _train(config, loop_config, tracker, resume_from, records)
    except USER_ERRORS as e:
        tracker.close(status="FAILED")
        # it names the key or file, and ends the run (pipelines/ray_adapter/end_on_user_error.py): logged without the loop's frames
        raise e.with_traceback(None) from None
    except BaseException:
        tracker.close(status="FAILED")
        raise
    tracker.close()
    return result


def _train(config: Config, loop_config: dict[str, Any], tracker: Tracker, resume_from: str | None,
           records: LocalRecords | None) -> dict[str, Any] | None:
    import ray.train
    import ray.train.torch

    from nanogpt.train.loop import TrainContext, train

    context = ray.train.get_context()
    ray_device = ray.train.torch.get_device()  # cuda:<local gpu> with use_gpu, else cpu
    ctx = TrainContext(
        rank=context.get_world_rank(), world_size=context.get_world_size(), local_rank=context.get_local_rank(),
        device=str(ray_device) if config.train.device in ("auto", "cuda") else config.train.device,
        shards_hashed=True,  # by the driver, once per launch (or, in object storage, by each node as it downloads)
    )
    hooks, run_dir = loop_config.get("on_step") or [], loop_config["run_dir"]
    data_dir = local_shards(config.data.dir, config.data.cache_dir)  # s3://...: this node's verified copy
    if ctx.rank != 0:  # as nanoGPT's master_process: one rank describes the model and the run (warnings stay)
        logging.getLogger("nanogpt").setLevel(logging.WARNING)
    with _resume_dir(resume_from, run_dir) as resume_dir:
        result = train(config, data_dir, ctx, RayReporter(run_dir, records), tracker=tracker,
                       resume_from=resume_dir, on_step=all_of(hooks))
    return run_summary(result, ctx.world_size) if ctx.rank == 0 else None


def run_summary(result: TrainResult, world_size: int) -> dict[str, Any]:
    """What rank 0 returns from a run (PretrainOutcome.summary; a sweep trial's record starts from it)."""
    import torch

    return {"start_step": result.start_step, "step": result.step, "best_val_loss": result.best_val_loss,
            "val_loss": result.val_loss, "tokens_per_s": result.tokens_per_s, "num_skipped": result.num_skipped,
            "torch_threads": torch.get_num_threads(), "world_size": world_size}


def all_of(hooks: Sequence[OnStep]) -> OnStep | None:
    """One on_step that runs `hooks` in order; None for none."""
    if not hooks:
        return None

    def on_step(step: int, metrics: dict) -> None:
        for hook in hooks:
            hook(step, metrics)

    return on_step


def _resume_source(config: Config, resume_from: str | None, run_dir: str) -> str | None:
    """The checkpoint this worker starts from, a local path or a URI (None: a fresh start): the newer of the plan's
    resume_from and the checkpoint Ray hands every rank (the latest its snapshot lists when a run continues, the
    latest reported after a worker-group restart under FailureConfig). A snapshot lags the checkpoints in storage
    when the driver died before recording them; the plan then names the newest complete one."""
    import ray.train

    reported = ray.train.get_checkpoint()
    source = newer_checkpoint(_reported_path(reported, run_dir) if reported is not None else None, resume_from)
    if source is None and config.model.init_from == "resume":
        raise CheckpointError(f"model.init_from=resume but Ray has no checkpoint for run {config.run.name}")
    return source


@contextlib.contextmanager
def _resume_dir(source: str | None, run_dir: str):
    """The checkpoint `source` as a local directory for the block (None: a fresh start). A reported checkpoint
    whose copy in storage was cut short (not committed) gives way to the run's newest committed one."""
    from pipelines.mlflow_adapter.checkpoint_uris import local_checkpoint_dir

    if source is None:
        yield None
        return
    # remote: one download per node, shared by its ranks (Ray's as_directory let a late rank rewrite the files
    # another rank was reading); the loop reads the checkpoint whole at start
    with local_checkpoint_dir(source) as d:
        yield committed_or_newest(d, run_dir)


def _reported_path(checkpoint, run_dir: str) -> str:
    """Where a checkpoint Ray reported lives: a local path, or its URI under the run's directory in storage."""
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    return join(run_dir, os.path.basename(checkpoint.path.rstrip("/")))


def committed_or_newest(checkpoint_dir: str, run_dir: str) -> str:
    """`checkpoint_dir` when it is committed; else the newest committed checkpoint of the (local) run directory
    older than it, with a warning; else CheckpointError naming what is wrong with it."""
    try:
        check_committed(checkpoint_dir)
        return checkpoint_dir
    except CheckpointError as e:
        damaged = e
    older = [p for s, p in checkpoint_dirs(run_dir) if str(p) != str(checkpoint_dir)] if not is_uri(run_dir) else []
    if not older:
        raise damaged
    log.warning("%s; resuming from %s, the newest complete checkpoint", damaged, older[-1])
    return str(older[-1])


def make_worker_tracker(config: Config, rank: int, run_dir: str, run_id: str | None,
                        records: LocalRecords | None) -> Tracker:
    """Where a worker's metrics go. Rank 0: metrics.jsonl (and params.json, tags.json) in the run directory, or,
    when the run lives at a URI, in `records`' local directory (copied into each checkpoint and, at the end, into
    the run's directory) and, with run.tracker=mlflow, the job's MLflow run `run_id` (opened by the driver, which
    also ends it). Other ranks: nothing."""
    if rank != 0:
        return NullTracker()
    stored = [records.upload_at_close()] if records is not None else []  # after the JSON tracker: the closed files
    jsonl = JsonlTracker(os.path.join(records.local_dir if records is not None else run_dir, METRICS_FILE))
    jsonl.log_params(config.to_flat())
    if config.run.tracker != "mlflow":
        return MultiTracker(jsonl, *stored)
    from pipelines.mlflow_adapter.job_run import start_worker_tracker
    from pipelines.mlflow_adapter.tracker_process import ProcessTracker

    # in a helper process: MLflow's import and store run on another core while this one builds the model
    mlflow = ProcessTracker(functools.partial(start_worker_tracker, config, run_dir, run_id))
    return MultiTracker(jsonl, mlflow, *stored)
