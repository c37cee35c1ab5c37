"""Pretrain (or finetune) nanoGPT with Ray Train: the project's main job.

    python pipelines/pretrain.py                                           # the shakespeare_char_cpu preset
    python pipelines/pretrain.py --config debug --train.max_iters=100 --run.num_workers=2
    python pipelines/pretrain.py --config shakespeare_char_cpu --train.max_iters=300 --sample
    python pipelines/pretrain.py --config my.yaml --run.name=r1 --export-nanogpt ckpt.pt --export-hf hf_r1/

    # on a cluster (Ray 2.60 keeps token auth on: the client needs RAY_AUTH_MODE=token)
    ray start --head --dashboard-host=127.0.0.1 --disable-usage-stats
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/pretrain.py --config debug --run.out_dir=/abs/path/runs --data.dir=/abs/path/shards

Options: --config <preset name in pipelines/configs/ | file.yaml> (default shakespeare_char_cpu), any
`--section.key=value` override (nanogpt/config.py), --sample[=N] (print N tokens from the best checkpoint at the
end, default 500), --sample-start TEXT, --export-nanogpt PATH (nanoGPT's ckpt.pt of the best checkpoint),
--export-hf DIR (a Hugging Face GPT-2 directory), --export-checkpoint DIR (the best checkpoint unsharded: an
FSDP run's as model.safetensors + optimizer.pt), --address / --num-cpus (which Ray: by default RAY_ADDRESS, a
running cluster, else a local instance). Exit status: 0 done, 2 bad config/data (found before anything starts, or by
a worker: a shard damaged in the store), 1 training failed.

The job, in order, on the driver: check the config, the run's name and storage (pipelines/ray_adapter/runs.py: an ASCII name,
an existing bucket that answers), hash the shards in `data.dir` (a damaged shard is an error naming the file) and
check what the config asks of them (model.vocab_size, block_size, the checkpoint to resume from: its model shape
and tokenizer, and the batches' memory against this machine's: nanogpt/train/batch_memory.py), all before Ray starts;
start or join Ray (a cluster's nodes: their memory is checked now); prepare the shards from `data.input` with Ray
Data when `data.dir` holds none yet (once, before any trainer, then checked as above); open the job's MLflow run
(pipelines/mlflow_adapter/job_run.py); fit the TorchTrainer (pipelines/ray_adapter/trainer.py); log and register the best checkpoint and
end the MLflow run.

A run lives in `<run.out_dir>/<run.name>/`: `checkpoint_<step>/` directories (the best `run.num_to_keep` by
val_loss, plus always the latest), Ray's checkpoint_manager_snapshot.json, and metrics.jsonl (one JSON line per
logged step, written by rank 0; a step logged twice after a restart: the last line wins). run.out_dir may be a
cloud URI (s3://, gs://); under `ray job submit` give an absolute path or URI. See pipelines/ray_adapter/runs.py for
model.init_from=scratch|resume and run.resume_from. Tokens per step (batch_size * block_size *
gradient_accumulation_steps) do not depend on run.num_workers, so a run resumed on another worker count continues
the same optimization; the resumed run makes update <checkpoint step> next, on the same batches.

Failures: with run.max_failures > 0 Ray Train restarts the worker group after a worker dies, and every worker
resumes from the run's latest reported checkpoint (ray.train.get_checkpoint()), bit-exactly on CPU. A worker's
config or data error (pipelines/ray_adapter/user_errors.py) is never retried: the run ends at once and the driver reports it in
one line, exit status 2 (pipelines/ray_adapter/end_on_user_error.py).
"""
# ruff: noqa: E402 -- the two sys.path lines below must run before the project imports

from __future__ import annotations

import sys
from pathlib import Path

# `python pipelines/pretrain.py` puts pipelines/ first on sys.path, not the repo root, and `ray job submit
# --working-dir .` may run where the package is not installed: make `import nanogpt, pipelines` work either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nanogpt.config import Config, ConfigError, load_config
from nanogpt.data.shards import MANIFEST_NAME, Manifest, ShardError, load_manifest, store_error, verify
from nanogpt.data.storage import StorageError, exists, is_uri, join, list_names, resolve_local
from nanogpt.train.batch_geometry import check_worker_range
from nanogpt.train.batch_memory import check_batch_memory, machine_memory
from nanogpt.train.model_fit import check_resumable_dir, check_vocab_size
from nanogpt.user_errors import USER_ERRORS  # "fix the config or the data": one line, exit status 2
from pipelines.mlflow_adapter.checkpoint_uris import local_checkpoint_dir
from pipelines.ray_adapter.runs import RunPlan, check_writable, plan_run
from pipelines.ray_adapter.user_errors import user_error_of

if TYPE_CHECKING:
    from nanogpt.train.loop import OnStep

log = logging.getLogger("nanogpt.pretrain")

PRESET_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_PRESET = "shakespeare_char_cpu"
WorkerMemory = tuple[int, str]  # the memory a worker can have, in bytes, and where: ("this machine", ...)


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


def pretrain(config: Config, preset: str | None = None, *, address: str | None = None, num_cpus: int | None = None,
             on_step: Sequence[OnStep] = ()) -> PretrainOutcome:
    """Train `config` with a TorchTrainer and return where the best checkpoint is. Config and data errors
    (USER_ERRORS) are raised before Ray starts, except what needs shards prepared here or a cluster's nodes (then
    before the trainer starts). `on_step`: hooks run on every worker after each update."""
    validate(config)
    plan = plan_run(config, preset)
    config = config.replace(run__name=plan.name, run__out_dir=plan.storage_path,
                            data__dir=resolve_local(config.data.dir))
    manifest, memory = check_before_ray(config, plan, address)
    if config.run.tracker == "mlflow":
        from pipelines.mlflow_adapter.store import resolve_tracking_uri

        # resolved here: the workers have another cwd, and maybe another environment
        config = config.replace(run__tracking_uri=resolve_tracking_uri(config))
    # With the shards there, the MLflow run opens (imports, store set-up: seconds) while Ray starts.
    with _JobRunOpener(config, plan, early=manifest is not None) as opener:
        from pipelines.ray_adapter.session import init_ray

        init_ray(address=address, num_cpus=num_cpus, lean=config.run.lean)
        check_with_ray(config, plan, manifest, memory)
        run_id = opener.run_id()
    return fit(config, plan, run_id, on_step)


class _JobRunOpener:
    """The job's MLflow run (run.tracker=mlflow), opened on a thread from the start of the block when `early`, else
    when asked. A block left by an error before the workers start discards a run it created: a job that never
    trained leaves no run in the UI."""

    def __init__(self, config: Config, plan: RunPlan, early: bool) -> None:
        self.config, self.plan, self.future, self.pool = config, plan, None, None
        if early and config.run.tracker == "mlflow":
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(1, thread_name_prefix="open-mlflow-run")
            self.future = self.pool.submit(self._open)

    def _open(self) -> str | None:
        from pipelines.mlflow_adapter.job_run import open_job_run

        return open_job_run(self.config, self.plan)

    def run_id(self) -> str | None:
        if self.config.run.tracker != "mlflow":
            return None
        return self.future.result() if self.future is not None else self._open()

    def __enter__(self) -> _JobRunOpener:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is None:
            return
        self.pool.shutdown(wait=True)
        if exc_type is not None and not self.plan.continues_run and self.future.exception() is None:
            from pipelines.mlflow_adapter.job_run import discard_job_run

            discard_job_run(self.config, self.future.result())


def fit(config: Config, plan: RunPlan, run_id: str | None, on_step: Sequence[OnStep] = (), *,
        callbacks: Sequence[Any] = (), log_checkpoints: bool = True) -> PretrainOutcome:
    """Build the TorchTrainer, fit it, and finish the job's MLflow run (FAILED when the workers failed).
    `callbacks`: Ray Train callbacks (a sweep trial's report to Tune). `log_checkpoints=False` ends the MLflow
    run without logging or registering checkpoints (a sweep registers only its best trial's)."""
    import ray.train

    from pipelines.ray_adapter.trainer import build_trainer, group_start_timeout

    trainer = build_trainer(config, plan, tracking_run_id=run_id, on_step=on_step, callbacks=callbacks)
    rc = config.run
    workers = f"{rc.min_workers} to {rc.num_workers} workers, elastic" if rc.elastic else f"{rc.num_workers} workers"
    log.info("run %s -> %s (%s)%s", plan.name, plan.run_dir, workers,
             f", resuming from {plan.resume_from}" if plan.resume_from else
             (", continuing from its latest checkpoint" if plan.continues_run else ""))
    try:
        with group_start_timeout(config):
            result = trainer.fit()  # raises TrainingFailedError when the workers fail beyond run.max_failures
    except ray.train.TrainingFailedError as e:
        end_job_run(config, plan, run_id, "FAILED")
        user_error = user_error_of(e)  # a worker's config or data error: ended the run at once, not retried
        if user_error is not None:
            raise user_error from None
        raise
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C: Ray Train's SIGINT handler (or Ray's daemons, which the terminal's SIGINT stops too) ends fit()
        # with SystemExit. The run is not left RUNNING in the UI: KILLED, as MLflow marks an interrupted run.
        end_job_run(config, plan, run_id, "KILLED")
        raise KeyboardInterrupt(plan.name) from None
    outcome = _outcome(plan, result)
    if config.run.tracker == "mlflow":
        from pipelines.mlflow_adapter.job_run import finish_job_run

        best, latest = (outcome.best_checkpoint, outcome.latest_checkpoint) if log_checkpoints else (None, None)
        outcome.tracking = finish_job_run(config, plan, run_id, best, latest)
    return outcome


def end_job_run(config: Config, plan: RunPlan, run_id: str | None, status: str) -> None:
    """End the job's MLflow run with `status`, logging no checkpoint (the loss curve is drawn)."""
    if config.run.tracker == "mlflow":
        from pipelines.mlflow_adapter.job_run import finish_job_run

        finish_job_run(config, plan, run_id, None, None, status=status)


def check_before_ray(config: Config, plan: RunPlan, address: str | None) -> tuple[Manifest | None, WorkerMemory | None]:
    """Every check of the data and of what the config asks of it that needs no Ray. Returns the shards' manifest
    (None: data.input is to be prepared) and the memory a worker can have (None: only a cluster's nodes will tell)."""
    manifest = check_data(config)
    if manifest is not None:
        check_resume(config, plan, manifest)
    memory = worker_memory(config, address)
    if manifest is not None and memory is not None:
        check_batch_memory(config, manifest.vocab_size, *memory)
    return manifest, memory


def check_with_ray(config: Config, plan: RunPlan, manifest: Manifest | None, memory: WorkerMemory | None) -> None:
    """With Ray up, before any trainer starts: the worker group fits the nodes; the shards of data.input are prepared
    and checked as shards found on disk are; the batches' memory is checked against the nodes when the driver could
    not know them before."""
    check_resources(config)
    if manifest is None:
        manifest = prepare_data(config)
        _check_manifest(config, manifest)
        check_resume(config, plan, manifest)
        if memory is not None:
            check_batch_memory(config, manifest.vocab_size, *memory)
    if memory is None and (cluster := cluster_worker_memory(config)) is not None:
        check_batch_memory(config, manifest.vocab_size, *cluster)


def validate(config: Config) -> None:
    """Checks that need no Ray and no data: they fail in milliseconds, before anything starts."""
    rc, tc = config.run, config.train
    check_worker_range(tc.gradient_accumulation_steps, rc.min_workers or rc.num_workers, rc.num_workers, tc.parallel)
    if config.run.use_gpu and config.train.device in ("cpu", "mps"):
        raise ConfigError(f"run.use_gpu=true reserves GPUs but train.device={config.train.device}: use "
                          "--train.device=auto (or cuda), or --run.use_gpu=false")
    if config.train.device == "cuda" and not config.run.use_gpu:
        raise ConfigError("train.device=cuda needs GPU workers: add --run.use_gpu=true")
    if not config.data.dir:
        raise ConfigError("data.dir is not set: the directory of prepared token shards (or where to prepare them "
                          "from data.input), e.g. --data.dir=data/shakespeare_char")


def check_data(config: Config) -> Manifest | None:
    """The shards' manifest, every shard hashed against it (the one hash of this launch: the workers check
    headers and sizes only); None when data.dir has no shards yet and data.input can make them."""
    try:
        return _check_data(config)
    except StorageError as e:  # data.dir in object storage, and the store did not answer
        raise store_error(e) from None


def _check_data(config: Config) -> Manifest | None:
    data_dir = config.data.dir
    remote = is_uri(data_dir)
    if exists(join(data_dir, MANIFEST_NAME)):
        # In object storage each node hashes the shards as it downloads them (nanogpt/data/shard_cache.py).
        manifest = load_manifest(data_dir) if remote else verify(data_dir)  # ShardError names the damaged file
        _check_manifest(config, manifest)
        return manifest
    if not remote and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise ConfigError(f"data.dir={data_dir} is a file: point it at a directory of prepared token shards (or an "
                          "empty or new directory to prepare data.input into)")
    if not config.data.input:
        raise ShardError(join(data_dir, MANIFEST_NAME),
                         "missing and data.input is not set: prepare the shards first (pipelines/prepare.py) or "
                         "set --data.input to prepare them here")
    if not remote:
        check_writable(data_dir, "data.dir")  # the shards of data.input are to be prepared there
    if list_names(data_dir) if remote else (os.path.isdir(data_dir) and any(os.scandir(data_dir))):
        # never replace someone's files (a killed prepare of another corpus) with shards of data.input
        raise ShardError(join(data_dir, MANIFEST_NAME),
                         f"missing, but {data_dir} is not empty (an interrupted prepare?): finish it with "
                         f"`python pipelines/prepare.py --out {data_dir} --input <the same corpus>`, or point "
                         "--data.dir at a new directory to prepare data.input there")
    return None


def _check_manifest(config: Config, manifest: Manifest) -> None:
    if manifest.tokenizer.get("name") != config.data.tokenizer:
        raise ConfigError(
            f"data.dir={config.data.dir} holds {manifest.tokenizer.get('name')} tokens but data.tokenizer="
            f"{config.data.tokenizer}: point data.dir at shards of that tokenizer (or set --data.tokenizer)"
        )
    if config.model.init_from == "scratch" and config.model.vocab_size is not None:
        check_vocab_size(config.model.vocab_size, manifest)
    _check_windows_fit(config, manifest)


def check_resume(config: Config, plan: RunPlan, manifest: Manifest) -> None:
    """The checkpoint the run starts from has the config's model shape and the dataset's tokenizer (from its
    records: the weights are read by the workers). A continued run in object storage has no resume_from: its
    workers check the checkpoint Ray hands them, and a mismatch ends the run without a retry."""
    if plan.resume_from is not None:
        check_resumable_dir(plan.resume_from, config, manifest.tokenizer)


def worker_memory(config: Config, address: str | None) -> WorkerMemory | None:
    """The memory a worker can have, as far as the driver knows before it starts Ray: the nodes
    of the Ray this process is connected to already (a test's, a notebook's), else this machine when the job is
    to start a local instance here; None when it is to join a cluster, whose nodes are known once Ray is up."""
    from pipelines.ray_adapter.session import ray_is_up, starts_local_instance

    if ray_is_up():
        return cluster_worker_memory(config)
    return (machine_memory(), "this machine") if starts_local_instance(address) else None


def cluster_worker_memory(config: Config) -> WorkerMemory | None:
    """The memory of the largest node that holds a worker, by Ray's account of its memory (its heap and its
    object store); None when no node holds one yet (an autoscaler is to add them)."""
    import ray

    need = {"CPU": config.run.cpus_per_worker, **({"GPU": config.run.gpus_per_worker} if config.run.use_gpu else {})}
    sizes = [res.get("memory", 0) + res.get("object_store_memory", 0) for node in ray.nodes() if node["Alive"]
             for res in [node["Resources"]] if all(res.get(k, 0) >= v for k, v in need.items())]
    return (int(max(sizes)), "the largest node that can hold a worker") if sizes else None


def _check_windows_fit(config: Config, manifest: Manifest) -> None:
    """A training window is block_size + 1 tokens of one shard: every split needs a shard that long. Checked
    before the model (whose position table grows with block_size) is built anywhere."""
    if config.model.init_from not in ("scratch", "resume"):
        return  # a pretrained model brings its own block size (cropped to at most model.block_size)
    block_size = config.model.block_size
    for split, info in manifest.splits.items():
        longest = max((shard.num_tokens for shard in info.shards), default=0)
        if longest <= block_size:
            raise ConfigError(
                f"model.block_size={block_size} needs windows of {block_size + 1} tokens, but the longest {split} "
                f"shard in {config.data.dir} holds {longest}: use a smaller --model.block_size (or more data)"
            )


def prepare_data(config: Config) -> Manifest:
    """Tokenize data.input into data.dir with Ray Data: a step of the driver, run once before any trainer."""
    from pipelines.prepare import prepare

    log.info("no prepared shards in %s: preparing them from %s", config.data.dir, config.data.input)
    return prepare(config.data, config.data.dir)


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
    parser.add_argument("--export-checkpoint", metavar="DIR",
                        help="write the best checkpoint unsharded (model.safetensors + optimizer.pt), e.g. an FSDP one")
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
    except KeyboardInterrupt as e:
        name = e.args[0] if e.args else "<the run's name, logged above>"
        log.error("interrupted: the run's checkpoints are kept; continue it with the same command and "
                  "--model.init_from=resume --run.name=%s", name)
        return 130
    _print_outcome(outcome)
    if outcome.best_checkpoint is not None and (args.sample or args.export_nanogpt or args.export_hf
                                                or args.export_checkpoint):
        _export_and_sample(outcome.best_checkpoint, args)
    return 0


def _export_and_sample(checkpoint: str, args: argparse.Namespace) -> None:
    """What --export-checkpoint, --export-nanogpt, --export-hf and --sample ask of the best checkpoint."""
    from nanogpt.checkpoint.format import consolidate_checkpoint
    from nanogpt.checkpoint.hf_dir import export_hf_dir
    from nanogpt.checkpoint.nanogpt_ckpt import export_nanogpt_ckpt
    from nanogpt.sampling import generate_from_checkpoint

    with local_checkpoint_dir(checkpoint) as ckpt_dir:
        if args.export_checkpoint:
            print(f"unsharded checkpoint: {consolidate_checkpoint(ckpt_dir, args.export_checkpoint)}")
        if args.export_nanogpt:
            print(f"nanoGPT ckpt.pt: {export_nanogpt_ckpt(ckpt_dir, args.export_nanogpt)}")
        if args.export_hf:
            print(f"Hugging Face directory: {export_hf_dir(ckpt_dir, args.export_hf)}")
        if args.sample:
            print(generate_from_checkpoint(ckpt_dir, args.sample_start, max_new_tokens=args.sample)[0])


def _print_outcome(outcome: PretrainOutcome) -> None:
    print(f"run: {outcome.plan.run_dir}")
    s = outcome.summary
    if s.get("tokens_per_s"):
        print(f"updates {s['start_step']}..{s['step']}: {s['tokens_per_s']:,.0f} tokens/s on {s['world_size']} "
              f"worker(s), {s['torch_threads']} torch threads each")
    if outcome.best_checkpoint is None:
        print("no checkpoint was reported")
        return
    print(f"best checkpoint: {outcome.best_checkpoint} (step {outcome.best_step}, val loss {outcome.best_val_loss:.4f})")
    if outcome.tracking:
        print(f"MLflow: run {outcome.tracking['run_id']} at {outcome.tracking['tracking_uri']}"
              + (f"; registered {outcome.tracking['model_uri']}" if "model_uri" in outcome.tracking else ""))


# ------------------------------------------------------------------------------------------ helpers


def _outcome(plan: RunPlan, result) -> PretrainOutcome:
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


def check_resources(config: Config) -> None:
    """The worker group must fit on the cluster's nodes. On a local instance this process started (it can never
    grow) a group that does not fit is a ConfigError: Ray would wait for it forever. On a cluster an autoscaler
    may add nodes: a warning."""
    import ray

    rc = config.run
    need = {"CPU": rc.cpus_per_worker, **({"GPU": rc.gpus_per_worker} if rc.use_gpu else {})}
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    fits = sum(min(int(res.get(k, 0) // v) for k, v in need.items()) for res in nodes)
    least = rc.min_workers if rc.elastic else rc.num_workers  # an elastic group starts with what fits
    if fits >= least:
        return
    have = ", ".join(f"{res.get('CPU', 0):g} CPUs / {res.get('GPU', 0):g} GPUs" for res in nodes)
    asked = f"run.min_workers={least}" if rc.elastic else f"run.num_workers={least}"
    message = (f"{asked} workers of {rc.cpus_per_worker:g} CPUs"
               + (f" and {rc.gpus_per_worker:g} GPUs" if rc.use_gpu else "")
               + f" each: the cluster's nodes ({have}) hold {fits}")
    from pipelines.ray_adapter.session import started_local_instance

    if started_local_instance():
        raise ConfigError(f"{message}, and this local Ray instance cannot grow: lower run.num_workers or "
                          "run.cpus_per_worker (or give Ray more with --num-cpus)")
    log.warning("%s: training waits until an autoscaler adds nodes", message)


if __name__ == "__main__":
    sys.exit(main())
