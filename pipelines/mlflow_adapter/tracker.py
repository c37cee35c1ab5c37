"""MLflow behind `nanogpt.tracking.Tracker`: one MLflow run per training job, and a tracking failure never kills
training.

Stores: with no `run.tracking_uri` and no MLFLOW_TRACKING_URI, a local store needing no server,
`sqlite:///<abs run.out_dir>/mlflow.db`, artifacts under `<run.out_dir>/mlartifacts`; otherwise the given URI
(a `mlflow server`, e.g. http://127.0.0.1:5000). Browse a local store with

    mlflow ui --backend-store-uri sqlite:///$PWD/out/mlflow.db

What MLflow 3.17's UI shows of it: experiments tagged `mlflow.experimentKind=custom_model_development` (training
runs, not GenAI) and `mlflow.experiment.primaryMetric.name=val_loss` (its chart first); each run's token dataset
as a dataset input (Dataset column, Datasets filter), MLflow Projects' source tags (Source column: <repo>:<entry
point>), and the registered best checkpoint as a LoggedModel of the run (Models column; the version page links
"Source Run" and "Source Model"). The GenAI / Model training switch at the top left is the browser's own setting
(default GenAI, which opens an experiment on its traces Overview): open `#/experiments/<id>?workflowType=
machine_learning` once, or click "Model training", and the browser keeps it.

On rank 0 of a training job:

    tracker = make_mlflow_tracker(config, run_id=None, world_size=4, device="cuda", manifest=m)  # a new run
    tracker.log_metrics({"train/loss": 2.31}, step=250)       # one log_batch call
    tracker.log_text(sample, "samples/step_000250.txt")
    tracker.log_checkpoint("out/run/checkpoint_000500", kind="best")
    tracker.register_best()                                     # models:/<experiment>-<run name>/<version>
    tracker.close()                                             # flush, loss-curve PNG, run FINISHED

Failure policy: every MLflow call is guarded. While the store is unreachable, metrics are buffered (the last
`max_buffered_points`), params/tags/texts/artifacts are queued (bounded), one warning is logged per outage, and
calls return at once (a circuit breaker retries every `retry_interval_s`); the next successful call flushes the
backlog. Rejected requests (HTTP 4xx: a bad key or value) are dropped with a warning, never retried.

Checkpoint URIs for sampling and evaluation:

    resolve_checkpoint_uri("models:/nanogpt-shakespeare/3", tracking_uri="http://127.0.0.1:5000")  # local dir
    resolve_checkpoint_uri("runs:/<run_id>/checkpoints/best")
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanogpt.checkpoint.files import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    SCALER_FILE,
    CheckpointError,
    is_sharded_checkpoint,
    read_state,
)
from nanogpt.config import Config, RunConfig
from nanogpt.data.shards import MANIFEST_NAME, ShardError, manifest_text
from nanogpt.data.storage import is_uri
from pipelines.mlflow_adapter.store import seed_sqlite_store, sqlite_path
from pipelines.ray_adapter.run_records import RECORDS_DIR

# mlflow is imported where it is used, not here: `import mlflow` costs 1.4-2.3 s on 2 cores, and the driver imports
# this module before training only for resolve_tracking_uri (pure string work); a worker's tracker imports it on its
# own thread (see MlflowTracker).
if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

# MLflow's limits (mlflow/utils/validation.py): per log_batch request, and per param / tag value.
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000

# MLflow's HTTP defaults retry 7 times with exponential backoff and a 120 s timeout: minutes per call against a
# dead server. One immediate retry (urllib3 sleeps only before the second) and a 15 s timeout keep a dead server
# (connection refused) at milliseconds per call and a hung one at 30 s per probe; the circuit breaker then probes
# it every 30 s, doubling up to 5 min while each probe is that slow (measured: tests and a SIGSTOPped server).
# The timeout is per socket operation, so large artifact uploads are not cut short by it. Set only where unset.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}

CHECKPOINT_KINDS = ("best", "final")
# MLflow 3's UI opens an experiment by its kind: without this tag it guesses, and lands on the GenAI traces page
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # ExperimentKind.CUSTOM_MODEL_DEVELOPMENT in the UI bundle
# The UI's chart view puts the experiment's primary metric first (getBaseChartAndSectionConfigs's primaryMetricKey)
PRIMARY_METRIC_TAG = "mlflow.experiment.primaryMetric.name"
PRIMARY_METRIC = "val_loss"
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, PRIMARY_METRIC_TAG: PRIMARY_METRIC}
LOGGED_MODEL_NAME = "checkpoint-best"
_LOCAL_REGISTRY_LOCK = threading.Lock()
# The registered model is weights + config + tokenizer: no pickled optimizer state (optimizer.pt is torch.save), nor
# the run's records that a checkpoint in object storage carries.
FILES_NOT_REGISTERED = (OPTIMIZER_FILE, SCALER_FILE, RECORDS_DIR)


def default_tracking_uri(out_dir: str | os.PathLike) -> str:
    """The local store for a run directory: `sqlite:///<abs out_dir>/mlflow.db` (no server needed)."""
    if is_uri(out_dir):  # s3://, gs://: sqlite cannot live there
        local = Path.cwd()
        log.warning("run.out_dir=%s is not a local path: the MLflow store goes to %s/mlflow.db "
                    "(set run.tracking_uri to use a server)", out_dir, local)
    else:
        local = Path(out_dir).expanduser().resolve()
    return f"sqlite:///{local / 'mlflow.db'}"


def tracking_uri_for(explicit: str | None, out_dir: str | os.PathLike | None = None) -> str:
    """The one rule for which store a command uses: `explicit` (run.tracking_uri, --tracking-uri), else
    MLFLOW_TRACKING_URI, else the local sqlite store of `out_dir` (default: run.out_dir's default, where pretrain
    puts it)."""
    if explicit:
        return explicit
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out_dir or RunConfig().out_dir)


def resolve_tracking_uri(config: Config) -> str:
    """The training job's store (tracking_uri_for its run section). Resolve this on the driver and pass it to
    workers in the config: workers have another cwd, and maybe another environment."""
    return tracking_uri_for(config.run.tracking_uri, config.run.out_dir)


def sanitize_model_name(name: str) -> str:
    """A registered-model name: letters, digits, `_ . -`; anything else becomes `-`."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "nanogpt"


@dataclass
class _Op:
    """A queued non-metric call, replayed in order once the store answers."""

    what: str
    fn: Callable[[], None]


class MlflowTracker:
    """`nanogpt.tracking.Tracker` on MLflow. Call `start(run_id)` first (or use `make_mlflow_tracker`).

    The MLflow calls run, in the order they were made, on a thread of the tracker ("mlflow-tracker"): log_metrics,
    log_params, set_tags, log_text and start(wait=False) return at once, so the training loop never waits for a
    store (a sqlite commit is about 10 ms, more on a busy disk; a server is a round trip; a new sqlite store first
    runs its migrations). Everything that reads the tracker's state (run_id, reachable, num_buffered_points,
    flush, close, register_best) or hands it a file (log_artifact, log_checkpoint) first waits until the calls
    made before it are done, so it sees what a synchronous tracker would. A process that exits without close()
    gets up to 30 s at exit to send what is still queued; a SIGKILL loses it. Call the tracker from one thread
    (rank 0's training loop). MLflow's own system-metrics thread logs beside it through its own client.

    `metrics_interval_s`: metric points wait up to this long to go out together in one log_batch (any other call,
    flush and close send them at once, in order). A training loop logs every few hundred milliseconds, and each
    sqlite commit costs the training a share of the machine beyond its own CPU: the plain loop beside a process
    committing 6 points every 0.65 s, as rank 0 did, took 72.0 against 67.2 ms per step (5 alternating runs).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "nanogpt",
        *,
        run_name: str | None = None,
        registered_model_name: str | None = None,
        run_tags: Mapping[str, str] | None = None,
        owns_run: bool = True,
        revive_run: bool = True,
        system_metrics: bool = True,
        system_metrics_interval_s: float = 10.0,
        retry_interval_s: float = 30.0,
        max_retry_interval_s: float = 300.0,
        failures_before_open: int = 1,
        max_buffered_points: int = 10_000,
        max_queued_calls: int = 1_000,
        metrics_interval_s: float = 0.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.registered_model_name = registered_model_name
        self.run_tags = dict(run_tags or {})
        self.owns_run = owns_run
        # a continued run that has ended is set RUNNING again, except by a training worker's tracker: it writes into
        # the run the driver opened, maybe after the driver has ended it (a helper outliving a killed worker)
        self.revive_run = revive_run
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.retry_interval_s = retry_interval_s
        self.max_retry_interval_s = max_retry_interval_s
        self.failures_before_open = failures_before_open
        self.metrics_interval_s = metrics_interval_s
        # no tqdm bar on the console for each checkpoint MLflow copies (a user's own setting wins)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if tracking_uri.startswith(("http://", "https://")):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        self._client: MlflowClient | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._thread_done = False

        self._run_id: str | None = None
        self._params_logged: dict[str, str] | None = None  # the run's params as far as we know (saves get_run calls)
        self._resume_id: str | None = None
        self._started = False
        self._closing = False
        self._closed = False
        self._disabled = False
        self._metrics: collections.deque[Metric] = collections.deque(maxlen=max_buffered_points)
        self._ops: collections.deque[_Op] = collections.deque(maxlen=max_queued_calls)
        self._dropped_points = 0
        self._metrics_due: float | None = None  # when the oldest buffered point is to be sent
        self._best_dir: Path | None = None
        self._monitor: Any = None
        # circuit breaker
        self._failures = 0
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._interval = retry_interval_s

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> MlflowTracker:
        kwargs.setdefault("run_name", config.run.name)
        return cls(resolve_tracking_uri(config), config.run.experiment, **kwargs)

    # ------------------------------------------------------------------------------------------------ run

    @property
    def client(self) -> MlflowClient:
        """Created at first use, inside a guarded call: a sqlite store connects (and may fail) right away."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            _quiet_mlflow_info_logs()
            seed_sqlite_store(self.tracking_uri)
            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None until the store has answered once."""
        self._wait()
        return self._run_id

    @property
    def reachable(self) -> bool:
        """False while an outage is under way (calls are being buffered)."""
        self._wait()
        return self._down_since is None

    @property
    def num_buffered_points(self) -> int:
        self._wait()
        return len(self._metrics)

    def start(self, run_id: str | None = None, wait: bool = True) -> str | None:
        """Continue run `run_id` (from a checkpoint's state.json extra) or create a run; returns the run id, or None
        when the store is unreachable (the run is then created at the first call that gets through).
        wait=False: return None at once and start the run on the tracker's thread (`run_id` waits for it)."""
        self._submit(lambda: self._start_now(run_id), wait=wait)
        return self._run_id if wait else None

    def _start_now(self, run_id: str | None) -> None:
        self._resume_id = run_id
        self._started = True
        self._ensure_run(force=True)

    # -------------------------------------------------------------------------------- the tracker's thread

    def _submit(self, job: Callable[[], None], wait: bool = False) -> None:
        """Run `job` on the tracker's thread after the jobs before it; with `wait`, return when it is done (raising
        what it raised). On that thread itself, or once the thread has stopped (after close), run it here."""
        if self._thread_done or threading.current_thread() is self._thread:
            job()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
            self._thread.start()
            _LIVE_TRACKERS.add(self)
        if not wait:
            self._jobs.put(job)
            return
        errors: list[BaseException] = []

        def run_and_keep_error() -> None:
            try:
                job()
            except BaseException as e:
                errors.append(e)

        self._jobs.put(run_and_keep_error)
        self._wait()
        if errors:
            raise errors[0]

    def _wait(self) -> None:
        """Return when every job submitted so far is done."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._jobs.join()

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._until_metrics_due())
            except queue.Empty:  # buffered points are due and no call came to take them along
                self._send_due_metrics()
                continue
            try:
                if job is None:
                    return
                job()
            except Exception:  # every MLflow call in a job is guarded: this is a bug, and tracking must not stop
                log.exception("MLflow tracker: a call failed")
            finally:
                self._jobs.task_done()

    def _send_due_metrics(self) -> None:
        try:
            if not self._flush_now():  # the store is down: again when the breaker lets a call through
                self._metrics_due = max(self._retry_at, time.monotonic() + self.metrics_interval_s)
        except Exception:  # as in _work: a bug, and tracking must not stop
            log.exception("MLflow tracker: sending buffered metrics failed")
            self._metrics_due = time.monotonic() + self.metrics_interval_s

    def _stop_thread(self, timeout: float | None = None) -> None:
        """Let the thread finish the jobs queued so far, then stop it (later calls run on the caller's thread)."""
        if self._thread is None or self._thread_done:
            return
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread_done = not self._thread.is_alive()

    def _ensure_run(self, force: bool = False) -> bool:
        if self._run_id is not None:
            return True
        if not self._started:
            log.warning("MlflowTracker used before start(): starting a new run")
            self._started = True
        if self._guarded("start run", self._open_run, force=force) and self._run_id is None:
            # the store answered and refused (e.g. the experiment is deleted): nothing will be recorded
            log.error("MLflow at %s refused to create a run: tracking is off for this job", self.tracking_uri)
            self._disabled = True
            self._ops.clear()
            self._metrics.clear()
        return self._run_id is not None

    def _open_run(self) -> None:
        from mlflow.exceptions import MlflowException

        run = None
        if self._resume_id:
            try:
                run = self.client.get_run(self._resume_id)
            except MlflowException as e:
                if not _is_rejection(e):
                    raise
                log.warning("MLflow run %s is not in %s (%s); starting a new run", self._resume_id,
                            self.tracking_uri, e.message)
        if run is not None:
            if run.info.status != "RUNNING" and self.revive_run:
                self.client.update_run(run.info.run_id, status="RUNNING")
            self._run_id = run.info.run_id
            log.info("MLflow: continuing run %s (%s) at %s", run.info.run_id, run.info.run_name, self.tracking_uri)
        else:
            experiment_id = self._experiment_id()
            run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self.run_tags)
            self._run_id = run.info.run_id
            log.info("MLflow: run %s (%s) in experiment %r at %s", run.info.run_id, run.info.run_name,
                     self.experiment, self.tracking_uri)
        if self.run_name is None:
            self.run_name = run.info.run_name
        self._start_system_metrics(resume=self._resume_id is not None)

    def find_run(self, tag: str, value: str) -> str | None:
        """The newest run of this experiment whose tag `tag` is `value`; None when there is none, or when the
        store is unreachable (guarded like every call)."""
        found: list[str] = []

        def search() -> None:
            experiment = self.client.get_experiment_by_name(self.experiment)
            if experiment is None or "'" in value:  # MLflow's filter language cannot escape a quote
                return
            runs = self.client.search_runs([experiment.experiment_id], f"tags.`{tag}` = '{value}'",
                                           order_by=["attributes.start_time DESC"], max_results=1)
            found.extend(r.info.run_id for r in runs)

        self._guarded(f"find the run tagged {tag}={value}", search)
        return found[0] if found else None

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return self.client.create_experiment(self.experiment, artifact_location=self._artifact_location(),
                                                     tags=EXPERIMENT_TAGS)
            except MlflowException as e:  # another trial created it first
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise e from None
        for key, value in EXPERIMENT_TAGS.items():  # ours from before these tags, or created untagged by someone
            if key not in found.tags:  # a value someone chose (e.g. in the UI) stays
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def _artifact_location(self) -> str | None:
        """Beside a sqlite database, not in the cwd (MLflow's default); a server chooses its own."""
        db = sqlite_path(self.tracking_uri)
        return None if db is None else (db.parent / "mlartifacts" / sanitize_model_name(self.experiment)).as_uri()

    def _start_system_metrics(self, resume: bool) -> None:
        """CPU/memory/disk/network (psutil) and NVIDIA GPU (pynvml) every `system_metrics_interval_s`, as
        `system/...` metrics. Skipped, with one info line, where psutil is missing; never fatal."""
        if not self.system_metrics or self._monitor is not None:
            return
        if importlib.util.find_spec("psutil") is None:  # Ray processes see Ray's vendored psutil
            log.info("MLflow system metrics are off: psutil is not installed (pip install psutil; pynvml for GPUs)")
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self._run_id, sampling_interval=self.system_metrics_interval_s, resume_logging=resume,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except Exception as e:
            log.info("MLflow system metrics are off: %s", e)
            self._monitor = None

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as e:
                log.debug("stopping MLflow system metrics: %s", e)
            self._monitor = None

    # ------------------------------------------------------------------------------------------ Tracker

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params as strings (≤ 6000 chars). On a continued run, keys already logged are not logged again; a key
        whose value changed keeps its first value, and the new one goes to the tag `param_changed.<key>`."""
        values = {str(k): _param_value(k, v) for k, v in params.items()}
        self._submit(lambda: self._queue("log params", lambda: self._log_params_now(values)))

    def _log_params_now(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        if self._params_logged is None:  # once per run (a continued run has params already); then kept up to date
            self._params_logged = dict(self.client.get_run(self._run_id).data.params)
        existing = self._params_logged
        new = [Param(k, v) for k, v in values.items() if k not in existing]
        changed = {f"param_changed.{k}": v for k, v in values.items() if k in existing and existing[k] != v}
        for chunk in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, params=chunk, synchronous=True)
            existing.update((p.key, p.value) for p in chunk)
        if changed:
            log.info("MLflow run %s: params changed since it was created: %s", self._run_id, sorted(changed))
            self._set_tags_now({k: v for k, v in changed.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {str(k): str(v)[:MAX_TAG_VALUE_CHARS] for k, v in tags.items()}
        self._submit(lambda: self._queue("set tags", lambda: self._set_tags_now(values)))

    def _set_tags_now(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, v) for k, v in values.items()]
        for chunk in _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=chunk, synchronous=True)

    def log_dataset(self, manifest: Any, source: str | os.PathLike | None = None, context: str = "training") -> None:
        """The token dataset as the run's MLflow dataset input (the UI's Dataset column and Datasets filter):
        `dataset_input(manifest, source)`. Logging the same dataset again (a resumed run) adds nothing.
        Built on the tracker's thread, like every mlflow import here: that thread may be importing mlflow right
        now, and a second thread importing it meanwhile fails on mlflow's circular imports ("partially
        initialized module 'mlflow.entities'")."""

        def log_now() -> None:
            entity = dataset_input(manifest, source, context)
            if entity is not None:
                self._queue(f"log dataset {entity.dataset.name}", lambda: self.client.log_inputs(self._run_id, [entity]))

        self._submit(log_now)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer the points, then send everything buffered in `log_batch` calls of ≤ 1000 points (on the tracker's
        thread: this returns at once)."""
        timestamp = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                log.warning("metric %r=%r is not a number; not logged", key, value)
                continue
            points.append((str(key), number, timestamp, int(step)))
        self._submit(lambda: self._log_points_now(points))

    def _log_points_now(self, points: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        for key, number, timestamp, step in points:
            if self._disabled:
                return
            if len(self._metrics) == self._metrics.maxlen:
                self._dropped_points += 1
            self._metrics.append(Metric(key, number, timestamp, step))
        if self._metrics_due is None:
            self._metrics_due = time.monotonic() + self.metrics_interval_s
        if time.monotonic() >= self._metrics_due:
            self._flush_now()

    def _until_metrics_due(self) -> float | None:
        """Seconds until the buffered points are due (0: now); None when none wait for a time (none are buffered,
        or each log_metrics sends at once: metrics_interval_s=0)."""
        if not self.metrics_interval_s or not self._metrics or self._metrics_due is None:
            return None
        return max(0.0, self._metrics_due - time.monotonic())

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents, under `artifact_path`. Queued while the store is down (a path
        that is gone by the time it answers is skipped)."""
        src = Path(path)
        if not src.exists():
            log.warning("not logging %s to MLflow: no such file or directory", src)
            return

        def send() -> None:
            if not src.exists():
                log.warning("not logging %s to MLflow: it was removed before the store came back", src)
            elif src.is_dir():
                self.client.log_artifacts(self._run_id, str(src), artifact_path)
            else:
                self.client.log_artifact(self._run_id, str(src), artifact_path)

        # waits: the caller may delete the file once this returns
        self._submit(lambda: self._queue(f"log artifact {src}", send), wait=True)

    def log_text(self, text: str, artifact_file: str) -> None:
        """A text artifact, e.g. the sample generated at an eval: `samples/step_000250.txt`."""
        self._submit(lambda: self._queue(f"log text {artifact_file}",
                                         lambda: self.client.log_text(self._run_id, text, artifact_file)))

    def close(self, status: str = "FINISHED") -> None:
        """Flush what is buffered (one last try even while the breaker is open) and stop system metrics; when this
        tracker owns the run, also log the loss-curve PNG and end the run with `status` (FINISHED | FAILED |
        KILLED). A training worker's tracker does not own the job's run: the driver ends it. Idempotent."""
        try:
            self._submit(lambda: self._close_now(status), wait=True)
        finally:
            self._stop_thread()

    def _close_now(self, status: str) -> None:
        if self._closing or not self._started:
            return
        self._closing = True
        self._retry_at = 0.0
        self._flush_now()
        if self.owns_run and self._run_id is not None and self._down_since is None:
            self._queue("log plots/loss_curve.png", self._loss_curve_job())
        self._stop_system_metrics()
        if self.owns_run and self._run_id is not None and self._down_since is None:
            self._guarded("end run", lambda: self.client.set_terminated(self._run_id, status=status))
        if self._metrics or self._ops:
            log.warning("MLflow at %s stayed unreachable: %d metric points and %d calls were not recorded",
                        self.tracking_uri, len(self._metrics), len(self._ops))
        self._closed = True

    # --------------------------------------------------------------------------------------- checkpoints

    def log_checkpoint(self, path: str | os.PathLike, kind: str = "best", include_optimizer: bool | None = None) -> None:
        """Log a checkpoint directory under `checkpoints/<kind>` (best | final). The optimizer and scaler state
        (torch pickles, large) go with `final` only unless `include_optimizer` says otherwise; `best` is what
        `register_best` registers: safetensors weights, config, tokenizer, manifest, state. A sharded (FSDP)
        checkpoint is logged unsharded (nanogpt.checkpoint.format.consolidate_checkpoint): the same files as DDP's, no
        torch.distributed.checkpoint pickles in the registry."""
        if kind not in CHECKPOINT_KINDS:
            raise ValueError(f"checkpoint kind must be one of {', '.join(CHECKPOINT_KINDS)}, got {kind!r}")
        src = Path(path)
        shards = _is_sharded(src)
        if not (src / MODEL_FILE).is_file() and not shards:
            log.warning("not logging checkpoint %s to MLflow: no model.safetensors in it", src)
            return
        keep_optimizer = (kind == "final") if include_optimizer is None else include_optimizer

        def send() -> None:
            if not src.is_dir():
                log.warning("not logging checkpoint %s to MLflow: it was removed before the store came back", src)
                return
            with tempfile.TemporaryDirectory(prefix="mlflow-ckpt-") as tmp:
                staged = Path(tmp) / kind
                if shards:
                    # imports torch, which only a sharded checkpoint needs here
                    from nanogpt.checkpoint.format import consolidate_checkpoint

                    consolidate_checkpoint(src, staged, with_optimizer=keep_optimizer)
                else:
                    _link_tree(src, staged, skip=() if keep_optimizer else FILES_NOT_REGISTERED)
                self.client.log_artifacts(self._run_id, str(staged), f"checkpoints/{kind}")

        def job() -> None:
            if kind == "best":
                self._best_dir = src
            self._queue(f"log checkpoint {src} as {kind}", send)

        self._submit(job, wait=True)  # waits: the caller may delete the directory once this returns

    def register_best(self, name: str | None = None) -> str | None:
        """Register `checkpoints/best` of this run as a new version of model `name` (default: the
        `registered_model_name` given, else `<experiment>-<run name>`); returns the version, or None (with a
        warning) when it cannot. Load it back with `resolve_checkpoint_uri(f"models:/{name}/{version}")`."""
        versions: list[str | None] = []
        self._submit(lambda: versions.append(self._register_best_now(name)), wait=True)
        return versions[0]

    def _register_best_now(self, name: str | None) -> str | None:
        self._retry_at = 0.0
        if not self._flush_now():  # the best checkpoint may still be queued
            log.warning("MLflow is unreachable: the best checkpoint was not registered")
            return None
        name = sanitize_model_name(name or self.registered_model_name or f"{self.experiment}-{self.run_name}")
        versions: list[str] = []
        self._guarded(f"register model {name}", lambda: versions.append(self._register_now(name)))
        return versions[0] if versions else None

    def _register_now(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        logged = {Path(f.path).name for f in self.client.list_artifacts(self._run_id, "checkpoints/best")}
        if MODEL_FILE not in logged:
            raise MlflowException.invalid_parameter_value(
                f"run {self._run_id} has no checkpoints/best/model.safetensors: call log_checkpoint(dir, 'best') first"
            )
        try:
            self.client.create_registered_model(name, description="nanoGPT checkpoints: model.safetensors + config")
        except MlflowException as e:
            if "ALREADY_EXISTS" not in str(e.error_code):
                raise
        run = self.client.get_run(self._run_id)
        tags = {"run_name": run.info.run_name or ""}
        state = _read_state(self._best_dir)
        if state:
            tags.update({"step": str(state.get("step")), "best_val_loss": str(state.get("best_val_loss"))})
        model_id = self._log_model_now(run, tags, state)
        # Not mlflow.register_model: it wants an MLmodel file; a checkpoint is safetensors + config. As MLflow 3
        # links them: source models:/<model_id> (the version page links the logged model, which links the run).
        version = self._create_model_version(name, model_id, tags)
        self._link_model_version(model_id, name, str(version.version))
        self.client.set_tag(self._run_id, "registered_model", f"models:/{name}/{version.version}")
        log.info("MLflow: registered checkpoints/best of run %s as models:/%s/%s (logged model %s)", self._run_id,
                 name, version.version, model_id)
        return str(version.version)

    def _log_model_now(self, run: Any, tags: Mapping[str, str], state: Mapping[str, Any]) -> str:
        """An MLflow 3 LoggedModel of the run's checkpoints/best (the files copied into the model's artifacts,
        READY), listed among the run's outputs at the checkpoint's step: the runs table's Models column."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus

        step = state.get("step") if isinstance(state.get("step"), int) else 0
        params = {k: str(v) for k, v in state.items() if k in ("step", "best_val_loss")}
        model = self.client.create_logged_model(
            run.info.experiment_id, name=LOGGED_MODEL_NAME, source_run_id=self._run_id, tags=dict(tags),
            params=params or None, model_type="nanogpt-checkpoint",
        )
        try:
            with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
                local = self.client.download_artifacts(self._run_id, "checkpoints/best", tmp)
                self.client.log_model_artifacts(model.model_id, local)
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        except Exception:
            self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.log_outputs(self._run_id, [LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def _create_model_version(self, name: str, model_id: str, tags: Mapping[str, str]) -> Any:
        source = f"models:/{model_id}"
        if sqlite_path(self.tracking_uri) is None and not self.tracking_uri.startswith("file:"):
            return self.client.create_model_version(name, source=source, run_id=self._run_id, tags=tags,
                                                    model_id=model_id)
        # A local registry store resolves models:/<model_id> through the process-wide tracking URI (MLflow
        # 3.17's SqlAlchemyStore.create_model_version), not this client's: point it at our store meanwhile.
        # Not mlflow's _use_tracking_uri: restoring an unset URI unsets MLFLOW_TRACKING_URI in os.environ.
        from mlflow.tracking._tracking_service import utils as tracking_utils

        with _LOCAL_REGISTRY_LOCK:
            before = tracking_utils._tracking_uri
            tracking_utils._tracking_uri = self.tracking_uri
            try:
                return self.client.create_model_version(name, source=source, run_id=self._run_id, tags=tags,
                                                        model_id=model_id)
            finally:
                tracking_utils._tracking_uri = before

    def _link_model_version(self, model_id: str, name: str, version: str) -> None:
        """The logged model's `mlflow.modelVersions` tag (what mlflow.register_model and a server write): the
        Models column and the logged model page show the registered version."""
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        model = self.client.get_logged_model(model_id)
        try:
            linked = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        except ValueError:
            linked = []
        if (name, version) not in [(e.get("name"), str(e.get("version"))) for e in linked]:  # a server wrote it
            entry = {"name": name, "version": int(version)}  # as a server writes it
            self.client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*linked, entry])})

    # -------------------------------------------------------------------------------------- loss curve

    def log_loss_curve(self, artifact_file: str = "plots/loss_curve.png") -> None:
        """A PNG of every `*loss*` metric (train and val) against step, from the run's full history (attempts
        before a restart included)."""
        self._submit(lambda: self._queue(f"log {artifact_file}", self._loss_curve_job(artifact_file)))

    def _loss_curve_job(self, artifact_file: str = "plots/loss_curve.png") -> Callable[[], None]:
        def send() -> None:
            keys = sorted(k for k in self.client.get_run(self._run_id).data.metrics
                          if "loss" in k and not k.startswith("system/"))
            if not keys:
                return
            curves = {k: sorted((m.step, m.value) for m in self.client.get_metric_history(self._run_id, k))
                      for k in keys}
            with tempfile.TemporaryDirectory(prefix="mlflow-plot-") as tmp:
                png = Path(tmp) / Path(artifact_file).name
                plot_loss_curves(curves, png, title=self.run_name or self._run_id or "")
                folder = str(Path(artifact_file).parent)
                self.client.log_artifact(self._run_id, str(png), None if folder == "." else folder)

        return send

    # ----------------------------------------------------------------------------------- the breaker

    def flush(self) -> bool:
        """Send what is queued and buffered; True when nothing is left. Returns at once while the breaker is open."""
        done: list[bool] = []
        self._submit(lambda: done.append(self._flush_now()), wait=True)
        return done[0]

    def _flush_now(self) -> bool:
        if not self._ensure_run():
            return False
        while self._ops:
            if not self._guarded(self._ops[0].what, self._ops[0].fn):
                return False
            self._ops.popleft()
        while self._metrics:
            batch = [self._metrics[i] for i in range(min(MAX_METRICS_PER_BATCH, len(self._metrics)))]
            sent = self._guarded("log metrics", lambda b=batch: self.client.log_batch(self._run_id, metrics=b,
                                                                                       synchronous=True))
            if not sent:
                return False
            for _ in batch:
                self._metrics.popleft()
        self._metrics_due = None
        return True

    def _queue(self, what: str, fn: Callable[[], None]) -> None:
        if self._disabled:
            return
        if self._closed:
            log.warning("MlflowTracker is closed: %s ignored", what)
            return
        if len(self._ops) == self._ops.maxlen:
            log.warning("MLflow call queue is full: dropping %s", self._ops[0].what)
        self._ops.append(_Op(what, fn))
        self._flush_now()

    def _guarded(self, what: str, fn: Callable[[], None], force: bool = False) -> bool:
        """Run `fn`; True when done (or rejected for good: dropped), False when the store is unreachable."""
        now = time.monotonic()
        if self._down_since is not None and now < self._retry_at and not force:
            return False
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:
            if _is_rejection(e):
                log.warning("MLflow rejected %s: %s", what, _short(e))
                return True
            self._on_failure(what, e, time.monotonic() - t0)
            return False
        self._on_success()
        return True

    def _on_failure(self, what: str, error: Exception, seconds: float) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._interval = self.retry_interval_s
            log.warning(
                "MLflow at %s is unreachable (%s: %s). Training goes on; metrics are buffered (last %d points) "
                "and retried every %.0f s.", self.tracking_uri, what, _short(error), self._metrics.maxlen,
                self.retry_interval_s,
            )
        else:
            log.debug("MLflow still unreachable (%s: %s)", what, _short(error))
            if seconds > 1.0:  # a hung server costs a timeout per probe: probe less often
                self._interval = min(self._interval * 2, self.max_retry_interval_s)
        if self._failures >= self.failures_before_open:
            self._retry_at = now + self._interval

    def _on_success(self) -> None:
        if self._down_since is not None:
            log.warning("MLflow at %s is reachable again after %.0f s; sending %d buffered metric points%s",
                        self.tracking_uri, time.monotonic() - self._down_since, len(self._metrics),
                        f" ({self._dropped_points} older points were dropped)" if self._dropped_points else "")
            self._down_since = None
            self._dropped_points = 0
            if self._monitor is not None and not _monitor_alive(self._monitor):  # it stops at its first error
                self._monitor = None
                self._start_system_metrics(resume=True)
        self._failures = 0
        self._retry_at = 0.0


def make_mlflow_tracker(
    config: Config,
    *,
    run_id: str | None = None,
    world_size: int = 1,
    device: Any = "cpu",
    manifest: Any = None,
    entry_point: str | None = None,
    **kwargs: Any,
) -> MlflowTracker:
    """The tracker of a training job, started: run `run_id` continued (None: a new run), the flattened config as
    params, `standard_tags` as tags, the resolved config and the dataset manifest as artifacts.

    Returns at once: importing mlflow, a new sqlite store's migrations and the run's creation (2-5 s on 2 cores)
    happen on the tracker's thread while the worker loads the data and builds the model."""
    tracker = MlflowTracker.from_config(config, **kwargs)
    tracker.start(run_id, wait=False)
    tracker.log_params(config.to_flat())
    tracker.set_tags(standard_tags(config, world_size, device, manifest, entry_point))
    tracker.log_text(config.to_yaml(), "config.yaml")
    manifest_dict = _manifest_dict(manifest)
    if manifest_dict is not None:
        tracker.log_text(json.dumps(manifest_dict, indent=2, sort_keys=True, default=str) + "\n", "data/manifest.json")
        source = manifest if isinstance(manifest, (str, os.PathLike)) else config.data.dir
        tracker.log_dataset(manifest_dict, source)
    return tracker


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
    manifest_dict = _manifest_dict(manifest)
    if manifest_dict is not None:
        tags["data.fingerprint"] = manifest_fingerprint(manifest_dict)
        for key in ("input_fingerprint", "settings_fingerprint", "vocab_size"):
            if key in manifest_dict:
                tags[f"data.{key}"] = str(manifest_dict[key])
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

    manifest_dict = _manifest_dict(manifest)
    if manifest_dict is None:
        return None
    if source is None and isinstance(manifest, (str, os.PathLike)):
        source = manifest
    uri = str(source) if source is not None else ""
    if uri and not is_uri(uri):
        path = Path(uri).expanduser().resolve()
        uri = str(path.parent if path.name == MANIFEST_NAME else path)
    scheme = urllib.parse.urlparse(uri).scheme if is_uri(uri) else ""
    name = (uri.rstrip("/").rsplit("/", 1)[-1] if uri else "") or "dataset"
    tokenizer = manifest_dict.get("tokenizer") or {}
    tokenizer_summary = {k: v for k, v in tokenizer.items() if k != "chars"} if isinstance(tokenizer, Mapping) else tokenizer
    splits = manifest_dict.get("splits") or {}
    schema = {
        "mlflow_colspec": [{"type": "long", "name": "token", "required": True}],
        "dtype": manifest_dict.get("dtype"),
        "vocab_size": manifest_dict.get("vocab_size"),
        "tokenizer": tokenizer_summary,
    }
    profile = {
        "num_tokens": {k: v.get("num_tokens") for k, v in splits.items() if isinstance(v, Mapping)},
        "num_documents": {k: v.get("num_documents") for k, v in splits.items() if isinstance(v, Mapping)},
        "num_shards": {k: len(v.get("shards") or []) for k, v in splits.items() if isinstance(v, Mapping)},
        "vocab_size": manifest_dict.get("vocab_size"),
        "tokenizer": tokenizer_summary.get("name") if isinstance(tokenizer_summary, Mapping) else tokenizer_summary,
    }
    dataset = Dataset(
        name=name,
        digest=manifest_fingerprint(manifest_dict),
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


def plot_loss_curves(curves: Mapping[str, Iterable[tuple[int, float]]], png: str | os.PathLike, title: str = "") -> None:
    """Loss against step, one line per metric, to a PNG (Agg canvas: no pyplot state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, points in curves.items():
        points = [(s, v) for s, v in points if math.isfinite(v)]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=key, marker="o" if len(points) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(png, format="png")


# ---------------------------------------------------------------------------------------- checkpoint URIs


def resolve_checkpoint_uri(uri: str, dst: str | os.PathLike | None = None, tracking_uri: str | None = None) -> str:
    """A local checkpoint directory for `uri`:
    - a local path (or file://): itself;
    - `models:/<name>/<version>`, `models:/<name>@<alias>`, `models:/<name>/latest`, `runs:/<run_id>/<path>`,
      or an artifact-store URI (s3://, mlflow-artifacts:/...): downloaded into `dst` (default: a new temp dir).
    `tracking_uri` (default: tracking_uri_for(None)) is also the registry URI. A sqlite store that does not exist
    is an error: reading a checkpoint never creates a store (a mistyped path would otherwise give an empty one)."""
    scheme = urllib.parse.urlparse(uri).scheme
    if scheme in ("", "file"):
        path = Path(urllib.parse.urlparse(uri).path if scheme else uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {uri} does not exist")
        return str(path.resolve())
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    tracking_uri = tracking_uri_for(tracking_uri)
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        raise FileNotFoundError(f"checkpoint {uri}: there is no MLflow store at {tracking_uri} ({db} does not exist); "
                                "pass --tracking-uri with the store pretrain.py used")
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="nanogpt-ckpt-"))
    try:
        # models:/ is resolved here: MLflow's own resolution reads the global registry URI, not the one passed
        source = _model_version_source(uri, tracking_uri) if scheme == "models" else uri
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
    except MlflowException as e:
        raise FileNotFoundError(f"checkpoint {uri} could not be resolved at {tracking_uri}: {_short(e)}") from e
    if not Path(local).exists() or (Path(local).is_dir() and not any(Path(local).iterdir())):
        raise FileNotFoundError(f"checkpoint {uri} at {tracking_uri} has no files")
    return str(Path(local).resolve())


def _model_version_source(uri: str, registry_uri: str) -> str:
    """`models:/<name>/<version>`, `models:/<name>/latest` or `models:/<name>@<alias>`, each optionally followed by
    `/<path>`: the artifact URI of that model version's files."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    parts = uri.removeprefix("models:/").strip("/").split("/")
    client = MlflowClient(tracking_uri=registry_uri, registry_uri=registry_uri)
    if "@" in parts[0]:
        name, alias = parts[0].split("@", 1)
        version, rest = client.get_model_version_by_alias(name, alias).version, parts[1:]
    elif len(parts) >= 2 and (parts[1].isdigit() or parts[1] == "latest"):
        name, version, rest = parts[0], parts[1], parts[2:]
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MlflowException(f"registered model {name!r} has no versions", error_code="RESOURCE_DOES_NOT_EXIST")
            version = str(max(int(v.version) for v in versions))
    else:
        raise MlflowException.invalid_parameter_value(
            f"{uri}: expected models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>"
        )
    source = client.get_model_version_download_uri(name, str(version))
    return "/".join([source.rstrip("/"), *rest])


# ------------------------------------------------------------------------------------------------ helpers


def _is_rejection(error: Exception) -> bool:
    """A request the store answered and refused (4xx other than timeout/rate limit): retrying will not help."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return 400 <= status < 500 and status not in (408, 429)
    return isinstance(error, (ValueError, TypeError))


def _short(error: Exception, limit: int = 300) -> str:
    from mlflow.exceptions import MlflowException

    text = error.message if isinstance(error, MlflowException) else f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + "..."


def _param_value(key: Any, value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        log.warning("param %s is %d chars; MLflow keeps %d", key, len(text), MAX_PARAM_VALUE_CHARS)
        text = text[:MAX_PARAM_VALUE_CHARS]
    return text


def _chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _is_sharded(checkpoint: Path) -> bool:
    try:
        return is_sharded_checkpoint(checkpoint)
    except CheckpointError:
        return False


def _link_tree(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Hard-link (copy across devices) `src`'s files into `dst`, leaving out the names in `skip`."""
    skip = set(skip)
    for file in src.rglob("*"):
        rel = file.relative_to(src)
        if rel.parts[0] in skip or not file.is_file():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)


def _read_state(checkpoint: Path | None) -> dict[str, Any]:
    """The checkpoint's state.json, {} when there is none or it is unreadable (a tag is then left out)."""
    try:
        return read_state(checkpoint) if checkpoint else {}
    except CheckpointError:
        return {}


def _manifest_dict(manifest: Any) -> dict[str, Any] | None:
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


def _quiet_mlflow_info_logs() -> None:
    """MLflow's INFO lines that tell a training job's console nothing it needs: "Creating initial MLflow database
    tables...", "Updating database tables" (a new sqlite store) and the system-metrics monitor's start/stop lines.
    Their warnings still show. Called where a tracker first imports mlflow (MLflow sets its loggers up on import)."""
    for name in ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor"):
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


# Trackers whose thread is running: at interpreter exit each gets up to 30 s to send what is still queued (a job's
# worker that raised before close(), a script that forgot it). Weak: a dropped tracker is not kept alive by this.
_LIVE_TRACKERS: weakref.WeakSet[MlflowTracker] = weakref.WeakSet()


@atexit.register
def _drain_trackers_at_exit() -> None:
    for tracker in list(_LIVE_TRACKERS):
        tracker._stop_thread(timeout=30.0)


def _monitor_alive(monitor: Any) -> bool:
    thread = getattr(monitor, "_process", None)
    return thread is not None and thread.is_alive()
