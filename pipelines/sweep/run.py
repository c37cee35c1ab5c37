"""The Ray side of a sweep: the Tuner over pipelines/sweep_trial.run_trial, and what the driver does with the
results (table, CSV, plot, MLflow, the best trial registered). Called by pipelines/tune.py after every check.
The results are the trials' records (pipelines/sweep/outcome.py), not Tune's snapshot, which lags their ends.

    outcome = run_sweep(plan_sweep("lr_shakespeare_char", [], [], None))
    outcome = run_sweep(load_sweep("out/s1"), resume=True)           # Tuner.restore: finished trials stay done
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune

from nanogpt.config import Config
from nanogpt.train.loop import OnStep
from pipelines.sweep.outcome import OUTCOME_FILE, TrialOutcome, outcome_of, read_outcome, write_outcome
from pipelines.sweep.plan import TRIALS_DIR, Sweep
from pipelines.sweep.report import (
    FINISHED,
    MLFLOW_STATUS,
    STOPPED,
    TrialRow,
    best_row,
    plot_loss_vs_lr,
    pretrain_command,
    results_csv,
    retrain_config,
    trial_status,
)
from pipelines.sweep.spec import METRIC, MODE, PRESET_DIR, SweepSpec, base_tokens_per_step, trial_config
from pipelines.sweep.trial import TrialSetup, run_trial, trial_params, trial_run_name
from pipelines.sweep.trial_here import trains_here

log = logging.getLogger(__name__)

# A trial of several workers only drives a TorchTrainer (its workers reserve their own CPUs/GPUs); Tune rejects
# {"cpu": 0}. A one-worker trial trains in its actor, which reserves that worker's share (trial_here.py).
DRIVER_RESOURCES = {"cpu": 0.01}
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
RESULTS_CSV, PLOT_PNG, COMMAND_TXT = "results.csv", "val_loss_vs_lr.png", "best_command.txt"


@dataclass
class SweepOutcome:
    rows: list[TrialRow]
    best: TrialRow | None
    command: str | None
    parent_run_id: str | None = None
    model_uri: str | None = None


def trials_base(base: Config) -> Config:
    """The base config the trials run with, run.lean=auto resolved here: the sweep's driver knows whether it started
    the local instance the trials run on, a trial (in a Tune actor) does not. On such an instance the trials use the
    lean wing, as a job on its own instance does; on a cluster, Ray's public API."""
    if base.run.lean != "auto":
        return base
    from pipelines.ray_adapter.session import started_local_instance

    lean = "on" if started_local_instance() else "off"
    return dataclasses.replace(base, run=dataclasses.replace(base.run, lean=lean))


def run_sweep(sweep: Sweep, *, resume: bool = False, on_step: Sequence[OnStep] = ()) -> SweepOutcome:
    """Run (or, with `resume`, continue) the sweep on the Ray that pipelines/tune.py joined or started; `on_step`
    hooks run on every trial's workers."""
    from pipelines.pretrain import prepare_data

    if sweep.needs_data:
        prepare_data(sweep.base)  # once, before any trial: trials never race to prepare
    parent = _open_parent(sweep)
    setup = TrialSetup(sweep.spec, trials_base(sweep.base), sweep.trials_dir, parent, tuple(on_step))
    tuner = _tuner(sweep, setup, resume)
    try:
        with ctrl_c_stops_tune() as interrupted:
            results = tuner.fit()
    except BaseException as e:  # a second Ctrl-C ends fit() at once: KeyboardInterrupt
        _finish_parent(sweep, parent, {}, {}, {}, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    if interrupted.is_set():
        # Tune stopped the trials, saved its state and returned as if the sweep had ended. It has not: nothing is
        # registered, and the parent is KILLED (as the interrupted trials' runs are), ready for --resume.
        _kill_children(sweep, parent)
        _finish_parent(sweep, parent, {}, {}, {}, "KILLED")
        raise KeyboardInterrupt(sweep.sweep_dir)
    return _report(sweep, parent, trial_rows(sweep, results))


@contextlib.contextmanager
def ctrl_c_stops_tune() -> Iterator[threading.Event]:
    """During the block, a first Ctrl-C is Tune's graceful stop (SIGUSR1: Tune saves its state and fit() returns)
    and sets the event the block gets; a second one raises KeyboardInterrupt. Tune's own SIGINT handler is off
    (TUNE_DISABLE_SIGINT_HANDLER): with it, fit() returns and nothing tells an interrupted sweep from a finished
    one. Outside the main thread (no signals there), the event is never set."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    previous, env = signal.signal(signal.SIGINT, on_sigint), os.environ.get(TUNE_SIGINT_ENV)
    os.environ[TUNE_SIGINT_ENV] = "1"
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        if env is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = env


def trial_actor_resources(base: Config) -> dict[str, float]:
    """What each trial's Tune actor reserves: a one-worker trial's share when it trains there, else a sliver."""
    rc = base.run
    if not trains_here(base):
        return DRIVER_RESOURCES
    return {"cpu": rc.cpus_per_worker, **({"gpu": rc.gpus_per_worker} if rc.use_gpu else {})}


def trial_cpus(base: Config) -> float:
    """The CPUs one trial holds while it runs: its actor's, plus its TorchTrainer's workers' where it has them."""
    rc = base.run
    return trial_actor_resources(base)["cpu"] + (0 if trains_here(base) else rc.num_workers * rc.cpus_per_worker)


def _tuner(sweep: Sweep, setup: TrialSetup, resume: bool):
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), trial_actor_resources(sweep.base))
    if resume:  # load_sweep checked that Tune saved a state to restore
        # finished trials stay finished; unfinished ones run again: those with a record (they ended after Tune's
        # last snapshot) report it again, the others continue from their checkpoints; trials that
        # failed (e.g. diverged) are not retried
        return tune.Tuner.restore(sweep.sweep_dir, trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep.spec),
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, num_samples=sweep.spec.num_samples, search_alg=_search_alg(sweep),
            scheduler=_scheduler(sweep), time_budget_s=sweep.spec.time_budget_s, trial_name_creator=trial_dir_name,
            trial_dirname_creator=trial_dir_name,
        ),
        run_config=tune.RunConfig(name=sweep.name, storage_path=sweep.base.run.out_dir,
                                  callbacks=[TrialRunsCallback(sweep.spec, sweep.base)],
                                  failure_config=tune.FailureConfig(max_failures=trial_retries(sweep.base))),
    )


def trial_retries(base: Config) -> int:
    """Tune's restarts of a failed trial: run.max_failures for a trial that trains in its actor (it continues from
    its checkpoints, as Ray Train's restarted workers would); none for a TorchTrainer, which retries itself."""
    return base.run.max_failures if trains_here(base) else 0


def trial_dir_name(trial) -> str:
    """Tune's name and directory for a trial: the same as its run's (`trial-<trial id>`)."""
    return trial_run_name(trial.trial_id)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's search space, flat by config key: {"optim.learning_rate": tune.loguniform(1e-4, 1e-2), ...}."""
    space: dict[str, Any] = {}
    for d in spec.search:
        if d.kind == "values":
            space[d.key] = tune.grid_search(list(d.args)) if spec.algorithm == "grid" else tune.choice(list(d.args))
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.args)
        else:
            space[d.key] = tune.uniform(*d.args)
    return space


def _search_alg(sweep: Sweep):
    """Grid and random: Tune's variant generator; optuna: TPE. Each limited to the trials the cluster holds at
    once (the generator takes the limit itself: TuneConfig.max_concurrent_trials would be ignored for it)."""
    seed = sweep.base.train.seed  # the same sweep file samples the same trials
    limit = max_concurrent_trials(sweep)
    if sweep.spec.algorithm == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(metric=METRIC, mode=MODE, seed=seed), max_concurrent=limit)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=limit, random_state=seed)


def _scheduler(sweep: Sweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sc = sweep.spec.scheduler
    if sc.name == "fifo":
        return FIFOScheduler()
    grace = sc.grace_period or max(1, sweep.max_t // sc.reduction_factor**3)
    # Time is tokens trained (or optimizer steps): every report counts, but reports come at evals and checkpoints,
    # so their count means nothing. Trials end themselves at max_t (stop_last_trials=False): their fit() returns
    # and closes their MLflow runs.
    return ASHAScheduler(time_attr=sc.time_attr, max_t=sweep.max_t, grace_period=grace,
                         reduction_factor=sc.reduction_factor, stop_last_trials=False)


def max_concurrent_trials(sweep: Sweep) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once, at most the sweep file's limit."""
    import ray

    rc = sweep.base.run
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 0) // trial_cpus(sweep.base))
    if rc.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // (rc.num_workers * rc.gpus_per_worker)))
    if fits < 1:
        log.warning("the cluster cannot hold one trial now (%s); trials wait for an autoscaler", total)
    elif int(total.get("CPU", 0) // (rc.num_workers * rc.cpus_per_worker)) > fits:  # the drivers' slivers
        log.warning("each trial's driver reserves %s CPU, so only %d trials fit at once; a slightly smaller "
                    "run.cpus_per_worker (e.g. 0.95 instead of 1) lets one more run", DRIVER_RESOURCES["cpu"], fits)
    limit = sweep.spec.max_concurrent_trials
    return max(1, min(fits, limit) if limit else fits)


# ------------------------------------------------------------------------------------------ results


def trial_rows(sweep: Sweep, results) -> list[TrialRow]:
    """A row per trial record of the sweep (pipelines/sweep/outcome.py), by trial id: the trials' own word on how
    they ended, never Tune's snapshot, which lags. A trial that ended without a record (stopped by the sweep's time
    budget: Tune calls no callback then) gets one first, from Tune's last result of it."""
    for result in results:
        trial_id = result_trial_id(result)
        run_dir = os.path.join(sweep.trials_dir, trial_run_name(trial_id))
        if read_outcome(run_dir) is None:
            outcome = _outcome_from_tune(sweep.spec, sweep.base, trial_id, result.config, result.metrics or {},
                                         errored=result.error is not None, run_dir=run_dir)
            write_outcome(run_dir, outcome, replace=False)
    outcomes = [read_outcome(os.path.dirname(path)) for path in sorted(glob.glob(
        os.path.join(glob.escape(sweep.trials_dir), trial_run_name("*"), OUTCOME_FILE)))]
    return [_row(sweep, o) for o in outcomes if o is not None]


def result_trial_id(result) -> str:
    """The trial's id from Tune's auto-filled `trial_id` metric (always there, even before a first report), not its
    directory's name: Tune appends a suffix to that when a restored trial is created again over its old directory."""
    return str((result.metrics or {}).get("trial_id") or os.path.basename(result.path).removeprefix("trial-"))


def _outcome_from_tune(spec: SweepSpec, base: Config, trial_id: str, tune_config: dict[str, Any],
                       metrics: dict[str, Any], errored: bool, run_dir: str) -> TrialOutcome:
    """The record of a trial that ended by Tune's word: `metrics` is its last report to Tune."""
    params = trial_params(tune_config, spec)
    max_iters = trial_config(spec, base, params).train.max_iters
    status = trial_status(errored, int(metrics.get("step") or 0), max_iters)
    return outcome_of(trial_id, status, params, metrics, run_dir)


def _row(sweep: Sweep, outcome: TrialOutcome) -> TrialRow:
    config = trial_config(sweep.spec, sweep.base, outcome.params)
    derived = {k: v for k, v in config.to_flat().items() if k in _DERIVED and sweep.base.to_flat()[k] != v}
    run_dir = os.path.join(sweep.trials_dir, trial_run_name(outcome.trial_id))
    return TrialRow(
        trial_id=outcome.trial_id, params={**outcome.params, **derived}, tokens_per_step=base_tokens_per_step(config),
        best_val_loss=outcome.best_val_loss, final_val_loss=outcome.final_val_loss, tokens=outcome.tokens,
        step=outcome.step, max_iters=config.train.max_iters, status=outcome.status, run_dir=run_dir,
        best_checkpoint=os.path.join(run_dir, outcome.best_checkpoint) if outcome.best_checkpoint else None,
    )


_DERIVED = ("train.gradient_accumulation_steps", "train.max_iters", "optim.min_lr")


def _report(sweep: Sweep, parent: str | None, rows: list[TrialRow]) -> SweepOutcome:
    best = best_row(rows)
    command = _best_command(sweep, best) if best else None
    files = _write_results(sweep, rows, command)
    outcome = SweepOutcome(rows, best, command, parent)
    if sweep.base.run.tracker != "mlflow":
        return outcome
    from pipelines.sweep.tracking import register_best_trial

    for row in rows:  # the callback marked the stopped ones already, unless the driver was killed meanwhile
        _mark(sweep.base, row.run_dir, row.status)
    if best is not None:
        outcome.model_uri = register_best_trial(sweep.base, best.run_dir, best.best_checkpoint,
                                                MLFLOW_STATUS[best.status])
    metrics = {"best_val_loss": best.best_val_loss, "num_trials": len(rows)} if best else {"num_trials": len(rows)}
    tags = {"best_trial": best.trial_id, "best_command": command, "registered_model": outcome.model_uri or ""} \
        if best else {}
    _finish_parent(sweep, parent, files, metrics, tags, "FINISHED")
    return outcome


def _mark(base: Config, run_dir: str, status: str) -> None:
    from pipelines.sweep.tracking import mark_trial_run

    try:
        mark_trial_run(base, run_dir, MLFLOW_STATUS[status], early_stopped=status == STOPPED)
    except Exception as e:  # tracking never stops a sweep
        log.warning("could not mark the MLflow run of %s: %s", run_dir, e)


def _best_command(sweep: Sweep, best: TrialRow) -> str:
    """pretrain.py's command line for the best trial's settings, run as a job of its own (retrain_config)."""
    params = {k: v for k, v in best.params.items() if k in sweep.spec.keys}
    config = retrain_config(trial_config(sweep.spec, sweep.base, params), sweep.spec.base, [PRESET_DIR])
    return pretrain_command(sweep.spec.base, config, [PRESET_DIR])


def _write_results(sweep: Sweep, rows: list[TrialRow], command: str | None) -> dict[str, str]:
    """results.csv, the plot and the best command in the sweep directory; {artifact path: local file}."""
    csv_path = os.path.join(sweep.sweep_dir, RESULTS_CSV)
    with open(csv_path, "w") as f:
        f.write(results_csv(rows))
    png_path = os.path.join(sweep.sweep_dir, PLOT_PNG)
    plot_loss_vs_lr(rows, png_path, title=f"sweep {sweep.name}")
    files = {RESULTS_CSV: csv_path, f"plots/{PLOT_PNG}": png_path}
    if command:
        command_path = os.path.join(sweep.sweep_dir, COMMAND_TXT)
        with open(command_path, "w") as f:
            f.write(command + "\n")
        files[COMMAND_TXT] = command_path
    return files


# ------------------------------------------------------------------------------------------ MLflow


def _open_parent(sweep: Sweep) -> str | None:
    if sweep.base.run.tracker != "mlflow":
        return None
    import yaml

    from pipelines.sweep.tracking import open_sweep_run

    spec = sweep.spec
    params = {"sweep.base": spec.base, "sweep.algorithm": spec.algorithm, "sweep.num_samples": spec.num_samples,
              "sweep.scheduler": spec.scheduler.name, "sweep.time_attr": spec.scheduler.time_attr,
              "sweep.batch.keep": spec.batch.keep if spec.batch else "none"}
    params.update({f"sweep.search.{d.key}": f"{d.kind}{list(d.args)}" for d in spec.search})
    return open_sweep_run(sweep.base, sweep.sweep_dir, sweep.name, yaml.safe_dump(sweep.data, sort_keys=False),
                          params)


def _kill_children(sweep: Sweep, parent: str | None) -> None:
    if sweep.base.run.tracker != "mlflow" or parent is None:
        return
    from pipelines.sweep.tracking import kill_running_children

    try:
        kill_running_children(sweep.base, parent)
    except Exception as e:  # tracking never stops a sweep
        log.warning("could not end the interrupted trials' MLflow runs: %s", e)


def _finish_parent(sweep: Sweep, parent: str | None, files: dict[str, str], metrics: dict[str, float],
                   tags: dict[str, str], status: str) -> None:
    if sweep.base.run.tracker != "mlflow":
        return
    from pipelines.sweep.tracking import finish_sweep_run

    finish_sweep_run(sweep.base, parent, sweep.sweep_dir, files, metrics, tags, status)


class TrialRunsCallback(tune.Callback):
    """On the driver, as each trial ends (Tune decides it): the trial's record, unless the trial wrote its own
    (pipelines/sweep/outcome.py): a trial its scheduler stopped is ended mid-run and writes nothing, and Tune's
    snapshot of the decision may come too late for a driver that dies now. Then the MLflow run of a trial that
    did not finish gets its status (KILLED / FAILED) and the sweep.early_stopped tag, instead of staying RUNNING.

    Tune keeps this callback in the sweep's tuner.pkl and restores it as it was, so it holds no path: a trial's
    run directory comes from the trial, which Tune restores into the directory it restores from."""

    def __init__(self, spec: SweepSpec, base: Config) -> None:
        self.spec, self.base = spec, base

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._record(trial, errored=False)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._record(trial, errored=True)

    def _record(self, trial, errored: bool) -> None:
        run_dir = os.path.join(os.path.dirname(trial.path), TRIALS_DIR, trial_run_name(trial.trial_id))
        write_outcome(run_dir, _outcome_from_tune(self.spec, self.base, trial.trial_id, trial.config,
                                                  trial.last_result or {}, errored, run_dir), replace=False)
        recorded = read_outcome(run_dir)
        if self.base.run.tracker == "mlflow" and recorded is not None and recorded.status != FINISHED:
            _mark(self.base, run_dir, recorded.status)  # a finished trial ended its own run
