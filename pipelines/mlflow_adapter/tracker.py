"""MLflow behind `nanogpt.tracking.Tracker`: what rank 0 and the driver log through, one MLflow run per training job,
and a tracking failure never kills training.

    tracker = MlflowTracker(tracking_uri, "nanogpt", run_name="shakespeare")
    tracker.start(run_id=None)                                  # a new run (or continue run_id)
    tracker.log_metrics({"train/loss": 2.31}, step=250)         # returns at once
    tracker.log_text(sample, "samples/step_000250.txt")
    tracker.close()                                             # flush, loss-curve PNG, run FINISHED

The job's tracker, with its params and tags, comes from job_run.py; its checkpoints and the registry are
registry.py's; the store (a local sqlite file or a server) is store.py's.

Failure policy: every MLflow call is guarded. While the store is unreachable, metrics are buffered (the last
`max_buffered_points`), params/tags/texts/artifacts are queued (bounded), one warning is logged per outage, and
calls return at once (a circuit breaker, breaker.py, retries every `retry_interval_s`); the next successful call
flushes the backlog. Rejected requests (HTTP 4xx: a bad key or value) are dropped with a warning, never retried.

mlflow is imported where it is used, on the tracker's thread: its import takes seconds of CPU (bench/NOTES.md), and
the driver imports this package before training for pure string work.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from nanogpt.config import Config
from pipelines.mlflow_adapter.backlog import Backlog
from pipelines.mlflow_adapter.breaker import CircuitBreaker, is_rejection, short_error
from pipelines.mlflow_adapter.loss_curve import LOSS_CURVE_FILE, log_loss_curve
from pipelines.mlflow_adapter.run_tags import EXPERIMENT_TAGS, dataset_input
from pipelines.mlflow_adapter.serial_executor import SerialExecutor
from pipelines.mlflow_adapter.store import local_artifact_location, resolve_tracking_uri, seed_sqlite_store
from pipelines.mlflow_adapter.system_metrics import monitor_alive, start_system_metrics, stop_system_metrics

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow's limits (mlflow/utils/validation.py): per log_batch request, and per param / tag value.
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000

# MLflow's HTTP defaults retry 7 times with exponential backoff and a 120 s timeout: minutes per call against a
# dead server. One immediate retry (urllib3 sleeps only before the second) and a 15 s timeout keep a dead server
# (connection refused) at milliseconds per call and a hung one at 30 s per probe; the circuit breaker then probes
# it every 30 s, doubling up to 5 min while each probe is that slow. The timeout is per socket operation, so large
# artifact uploads are not cut short by it. Set only where unset.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}


class MlflowTracker:
    """`nanogpt.tracking.Tracker` on MLflow. Call `start(run_id)` first (or use job_run.make_mlflow_tracker).

    The MLflow calls run, in the order they were made, on the tracker's one thread (serial_executor.py: a
    ThreadPoolExecutor of one worker): log_metrics, log_params, set_tags, log_text and start(wait=False) return
    at once, so the training loop never waits for a store. Everything that reads the tracker's state (run_id,
    reachable, num_buffered_points, flush, close, call) or hands it a file (log_artifact) first waits until the
    calls made before it are done, so it sees what a synchronous tracker would. A process that exits without
    close() still runs what is queued (the executor's exit hook; the breaker keeps a dead store to one probe); a
    SIGKILL loses it. Call the tracker from one thread (rank 0's training loop). MLflow's own system-metrics thread
    logs beside it through its own client.

    `metrics_interval_s`: metric points wait up to this long to go out together in one log_batch (any other call,
    flush and close send them at once, in order; a timer sends them when no call comes). Each commit to a store
    costs the training a share of the machine beyond its own CPU (bench/NOTES.md).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "nanogpt",
        *,
        run_name: str | None = None,
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
        self.run_tags = dict(run_tags or {})
        self.owns_run = owns_run
        # a continued run that has ended is set RUNNING again, except by a training worker's tracker: it writes into
        # the run the driver opened, maybe after the driver has ended it (a helper outliving a killed worker)
        self.revive_run = revive_run
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.metrics_interval_s = metrics_interval_s
        self.breaker = CircuitBreaker(retry_interval_s, max_retry_interval_s, failures_before_open)
        # no tqdm bar on the console for each checkpoint MLflow copies (a user's own setting wins)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if tracking_uri.startswith(("http://", "https://")):
            for key, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
        self._client: MlflowClient | None = None
        self._thread = SerialExecutor("mlflow-tracker")

        self._run_id: str | None = None
        self._params_logged: dict[str, str] | None = None  # the run's params as far as we know (saves get_run calls)
        self._resume_id: str | None = None
        self._started = False
        self._closing = False
        self._closed = False
        self._disabled = False
        self._backlog = Backlog(max_buffered_points, max_queued_calls)
        self._metrics_due: float | None = None  # when the oldest buffered point is to be sent
        self._monitor: Any = None

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
        return not self.breaker.down

    @property
    def num_buffered_points(self) -> int:
        self._wait()
        return len(self._backlog.points)

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
            self._backlog.clear()
        return self._run_id is not None

    def _open_run(self) -> None:
        from mlflow.exceptions import MlflowException

        run = None
        if self._resume_id:
            try:
                run = self.client.get_run(self._resume_id)
            except MlflowException as e:
                if not is_rejection(e):
                    raise
                log.warning("MLflow run %s is not in %s (%s); starting a new run", self._resume_id,
                            self.tracking_uri, e.message)
        if run is not None:
            if run.info.status != "RUNNING" and self.revive_run:
                self.client.update_run(run.info.run_id, status="RUNNING")
            self._run_id = run.info.run_id
            log.info("MLflow: continuing run %s (%s) at %s", run.info.run_id, run.info.run_name, self.tracking_uri)
        else:
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name, tags=self.run_tags)
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
                return self.client.create_experiment(
                    self.experiment, artifact_location=local_artifact_location(self.tracking_uri, self.experiment),
                    tags=EXPERIMENT_TAGS)
            except MlflowException as e:  # another trial created it first
                found = self.client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise e from None
        for key, value in EXPERIMENT_TAGS.items():  # ours from before these tags, or created untagged by someone
            if key not in found.tags:  # a value someone chose (e.g. in the UI) stays
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def _start_system_metrics(self, resume: bool) -> None:
        if self.system_metrics and self._monitor is None:
            self._monitor = start_system_metrics(self._run_id, self.tracking_uri, self.system_metrics_interval_s,
                                                 resume)

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
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            chunk = new[i : i + MAX_PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(self._run_id, params=chunk, synchronous=True)
            existing.update((p.key, p.value) for p in chunk)
        if changed:
            log.info("MLflow run %s: params changed since it was created: %s", self._run_id, sorted(changed))
            self._set_tags_now(changed)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        values = {str(k): str(v)[:MAX_TAG_VALUE_CHARS] for k, v in tags.items()}
        self._submit(lambda: self._queue("set tags", lambda: self._set_tags_now(values)))

    def _set_tags_now(self, values: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, v) for k, v in values.items()]
        for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._run_id, tags=tags[i : i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True)

    def log_dataset(self, manifest: Any, source: str | os.PathLike | None = None, context: str = "training") -> None:
        """The token dataset as the run's MLflow dataset input (the UI's Dataset column and Datasets filter):
        `run_tags.dataset_input(manifest, source)`. Logging the same dataset again (a resumed run) adds nothing.
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

        if self._disabled:
            return
        self._backlog.add_points(Metric(*point) for point in points)
        if self._metrics_due is None:
            self._send_points_at(time.monotonic() + self.metrics_interval_s)
        if time.monotonic() >= self._metrics_due:
            self._flush_now()

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

    def call(self, what: str, fn: Callable[[MlflowClient, str], T], last_try: bool = False) -> T | None:
        """`fn(client, run_id)` on the tracker's thread, once everything logged before it has been sent (the driver's
        calls at the end of a job, e.g. registry.py's). Its result; None, with a warning, when the store is
        unreachable or refused it. `last_try`: one try even while the breaker is open, as close() makes."""
        results: list[T] = []

        def job() -> None:
            if last_try:
                self.breaker.probe_next()
            done = self._flush_now() and self._guarded(what, lambda: results.append(fn(self.client, self._run_id)))
            if not done:
                log.warning("MLflow at %s is unreachable: %s was not done", self.tracking_uri, what)

        self._submit(job, wait=True)
        return results[0] if results else None

    def close(self, status: str = "FINISHED") -> None:
        """Flush what is buffered (one last try even while the breaker is open) and stop system metrics; when this
        tracker owns the run, also log the loss-curve PNG and end the run with `status` (FINISHED | FAILED |
        KILLED). A training worker's tracker does not own the job's run: the driver ends it. Idempotent."""
        try:
            self._submit(lambda: self._close_now(status), wait=True)
        finally:
            self._thread.stop()

    def _close_now(self, status: str) -> None:
        if self._closing or not self._started:
            return
        self._closing = True
        self.breaker.probe_next()
        self._flush_now()
        if self.owns_run and self._run_id is not None and not self.breaker.down:
            self._queue(f"log {LOSS_CURVE_FILE}",
                        lambda: log_loss_curve(self.client, self._run_id, self.run_name or self._run_id or ""))
        if self._monitor is not None:
            stop_system_metrics(self._monitor)
            self._monitor = None
        if self.owns_run and self._run_id is not None and not self.breaker.down:
            self._guarded("end run", lambda: self.client.set_terminated(self._run_id, status=status))
        if self._backlog:
            log.warning("MLflow at %s stayed unreachable: %d metric points and %d calls were not recorded",
                        self.tracking_uri, len(self._backlog.points), len(self._backlog.calls))
        self._closed = True

    # ----------------------------------------------------------------------- the backlog and the breaker

    def flush(self) -> bool:
        """Send what is queued and buffered; True when nothing is left. Returns at once while the breaker is open."""
        done: list[bool] = []
        self._submit(lambda: done.append(self._flush_now()), wait=True)
        return done[0]

    def _flush_now(self) -> bool:
        if not self._ensure_run():
            return False
        sent = self._backlog.send(self._guarded, lambda batch: self.client.log_batch(self._run_id, metrics=batch,
                                                                                     synchronous=True))
        if sent:
            self._metrics_due = None
        return sent

    def _queue(self, what: str, fn: Callable[[], None]) -> None:
        if self._disabled:
            return
        if self._closed:
            log.warning("MlflowTracker is closed: %s ignored", what)
            return
        self._backlog.add_call(what, fn)
        self._flush_now()

    def _guarded(self, what: str, fn: Callable[[], None], force: bool = False) -> bool:
        """Run `fn`; True when done (or rejected for good: dropped), False when the store is unreachable."""
        if not self.breaker.allows(force):
            return False
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:
            if is_rejection(e):
                log.warning("MLflow rejected %s: %s", what, short_error(e))
                return True
            self._on_failure(what, e, time.monotonic() - t0)
            return False
        self._on_success()
        return True

    def _on_failure(self, what: str, error: Exception, seconds: float) -> None:
        if self.breaker.record_failure(seconds):
            log.warning(
                "MLflow at %s is unreachable (%s: %s). Training goes on; metrics are buffered (last %d points) "
                "and retried every %.0f s.", self.tracking_uri, what, short_error(error),
                self._backlog.points.maxlen, self.breaker.retry_interval_s,
            )
        else:
            log.debug("MLflow still unreachable (%s: %s)", what, short_error(error))

    def _on_success(self) -> None:
        outage_s = self.breaker.record_success()
        if outage_s is None:
            return
        dropped = self._backlog.dropped_points
        log.warning("MLflow at %s is reachable again after %.0f s; sending %d buffered metric points%s",
                    self.tracking_uri, outage_s, len(self._backlog.points),
                    f" ({dropped} older points were dropped)" if dropped else "")
        self._backlog.dropped_points = 0
        if self._monitor is not None and not monitor_alive(self._monitor):  # it stops at its first error
            self._monitor = None
            self._start_system_metrics(resume=True)

    # -------------------------------------------------------------------------------- the tracker's thread

    def _submit(self, job: Callable[[], None], wait: bool = False) -> None:
        self._thread.run(job, wait=wait)

    def _wait(self) -> None:
        self._thread.wait()

    def _send_points_at(self, due: float) -> None:
        """Have the buffered points sent at `due` (time.monotonic()) unless a call takes them along first."""
        self._metrics_due = due
        if self.metrics_interval_s:  # else each log_metrics sends at once; while the store is down, the next call
            self._thread.run_at(due, self._send_due_points)

    def _send_due_points(self) -> None:
        if not self._backlog.points or self._metrics_due is None or time.monotonic() < self._metrics_due:
            return  # sent meanwhile, or a later time is set
        if not self._flush_now():  # the store is down: again when the breaker lets a call through
            self._send_points_at(max(self.breaker.retry_at, time.monotonic() + self.metrics_interval_s))


def _param_value(key: Any, value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VALUE_CHARS:
        log.warning("param %s is %d chars; MLflow keeps %d", key, len(text), MAX_PARAM_VALUE_CHARS)
        text = text[:MAX_PARAM_VALUE_CHARS]
    return text


def _quiet_mlflow_info_logs() -> None:
    """MLflow's INFO lines that tell a training job's console nothing it needs: "Creating initial MLflow database
    tables...", "Updating database tables" (a new sqlite store) and the system-metrics monitor's start/stop lines.
    Their warnings still show. Called where a tracker first imports mlflow (MLflow sets its loggers up on import)."""
    for name in ("mlflow.store.db.utils", "mlflow.system_metrics.system_metrics_monitor"):
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
