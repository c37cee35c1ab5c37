"""The main job (pipelines/pretrain.py: Ray Train + MLflow) against the loops it wraps, side by side under the same
machine load: per-step time, and how long the command takes before its first training step.

    .venv/bin/python bench/bench_main_job.py --input ../shared/data/tinyshakespeare/input.txt --iters 300 --repeat 5
    NANOGPT_TINYSHAKESPEARE=../shared/data/tinyshakespeare/input.txt .venv/bin/python bench/bench_main_job.py
    .venv/bin/python bench/bench_main_job.py --data-dir data/shakespeare_char --lean on --no-local-mode -- --run.tracker=none

Each round runs, one after the other, in this order and the next round in the reverse order (so a change in machine
load hits them all):
  (a) nanoGPT's train.py inner loop (bench/bench_train.py's run_nanogpt_loop), in this process;
  (b) the plain nanogpt.train.loop.train loop, one process, no Ray (bench/bench_train.py's run_plain), in this process;
  (c) `python pipelines/pretrain.py --config shakespeare_char_cpu --train.max_iters=N --data.dir=... --run.out_dir=
      <fresh temp dir> --run.lean=on` as a subprocess, MLflow on (the preset's default: a new sqlite store each time),
      plus any arguments given after `--`: the lean wing (pipelines/ray_adapter/lean/);
  (d) the same with --run.lean=off: Ray's public API only (the stock TorchTrainer, a local instance with the dashboard);
  (e) the same, public, through bench/local_mode_job.py: Ray Train's local mode (ScalingConfig(num_workers=0)), the
      training function in the driver process. `--lean` picks which of (c) and (d) run, `--no-local-mode` drops (e).
All of them train the shakespeare_char_cpu preset for --iters updates in total, the first --warmup of them untimed.

ms/step is the MEAN time per update over the timed updates of a run (evaluations excluded), and the table shows
the median of that over the --repeat runs. The ratios come twice: of those medians, and the median of each round's
own ratio (its runs are minutes apart at most, so the machine's drift over the bench weighs less). (a) and (b) time
every update in the process that runs it. The main jobs are timed from outside, by the wall-clock arrival of their
per-interval log lines (`iter N: loss ..., time X ms` is printed by rank 0 every train.log_interval updates): the
time between two such lines over the updates between them, summed over the intervals that hold no evaluation.
That covers everything the worker does per step, tracking calls included. "loop timer" is the mean of the
same lines' own `time X ms` (the loop's perf_counter mean over the interval, which leaves out the logging and
tracking done at the interval's end).

Where a main job's CPU goes while it trains: the cores its training worker (in local mode: the driver) kept busy
from the first timed `iter` line to the last one, and the cores the rest of the job took meanwhile (Ray's daemons
and actors, the MLflow helper, the driver; the processes under the command, by kind, from /proc). On a 2-core machine
the worker's two threads need both cores, so whatever the rest takes comes out of its steps; nanoGPT's loop and (b)
run alone. Beside the cores, how often a second the rest woke up (its threads' voluntary context switches) and how
often the worker's threads were pre-empted (their involuntary ones): each wake-up on such a machine pre-empts a
compute thread, and the other one waits for it at the next barrier, so a wake-up costs more than the CPU it uses.

Start-up of a main job: seconds from starting the command to the arrival of milestone lines: Ray ready (ray.init
done), fit starts (the driver's "run ... ->" line), the first worker line, MLflow run ready (the worker's "MLflow:
run" line), model built ("tokens per iteration"), step-0 eval done, the first update done ("iter 0", the figure
called "to first step"), the last update's line, the command's exit. Log lines reach the driver through Ray's log
monitor: allow about 0.1 s of delay on each. Beside each milestone: how many cores the whole machine kept busy since
the one before (/proc/stat). A stretch near 1.0 on a 2-core machine is one process working while the rest wait for
it (imports, mostly): only doing less there shortens it; a stretch near 2.0 is work running side by side.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/...` from the repo root

from bench.bench_train import prepare_char_shards, run_nanogpt_loop, run_plain  # noqa: E402
from nanogpt.config import Config, load_config  # noqa: E402

log = logging.getLogger("bench_main_job")

REPO = Path(__file__).resolve().parents[1]
PRESET = "shakespeare_char_cpu"
ITER_LINE = re.compile(r"iter (\d+): loss \S+, time ([\d.]+)ms")
HELPER = "-m pipelines.mlflow_adapter.tracker_process"  # _label of an MLflow helper process
NANOGPT, PLAIN = "(a) nanoGPT's loop", "(b) plain nanogpt.train.loop"
# (name, pattern of the first line that marks it), in the order they happen
MILESTONES = [
    ("Ray ready", re.compile(r"Ray ready:")),
    ("fit starts", re.compile(r"nanogpt\.pretrain: run \S+ ->")),
    ("first worker line", re.compile(r"\(RayTrainWorker pid=")),
    ("MLflow run ready", re.compile(r"RayTrainWorker.*MLflow: (run|continuing run) ")),
    ("model built", re.compile(r"tokens per iteration will be")),
    ("step-0 eval done", re.compile(r"step 0: train loss")),
    ("first update done", re.compile(r"iter 0: loss")),
]


class BusyCores:
    """Samples how many cores the whole machine keeps busy (/proc/stat, Linux), every `interval` seconds, on a
    thread: `between(t0, t1)` is the mean over that span of the run (seconds from `start`). It shows which stretches
    of the start-up run on one core (one process working while the others wait for it) and which fill them all."""

    def __init__(self, start: float, interval: float = 0.25) -> None:
        self.start, self.interval, self.samples = start, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> BusyCores:
        if os.path.exists("/proc/stat"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _sample(self) -> None:
        before = _cpu_times()
        while not self._stop.wait(self.interval):
            after = _cpu_times()
            total, idle = after[0] - before[0], after[1] - before[1]
            cores = (os.cpu_count() or 1) * (1 - idle / total) if total else 0.0
            self.samples.append((time.perf_counter() - self.start, cores))
            before = after

    def between(self, t0: float, t1: float) -> float | None:
        inside = [cores for t, cores in self.samples if t0 < t <= t1 + self.interval / 2]
        return statistics.fmean(inside) if inside else None


def _cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the machine since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


class ProcUse(NamedTuple):
    """What one process has used so far: CPU seconds, and its threads' context switches. A voluntary one is a thread
    going to sleep (each is followed by a wake-up); an involuntary one is a thread pre-empted by another."""

    label: str
    cpu_s: float
    wakeups: int = 0
    preempted: int = 0


def _tree_cpu(root: int) -> dict[int, ProcUse]:
    """What process `root` and every process under it have used so far (Linux /proc): {pid: ProcUse}.
    Ray's processes descend from the driver (gcs_server, raylet, log monitor) or from the raylet (workers, actors).
    The MLflow helpers started since `root` count too: they are detached from the tree (pipelines/mlflow_adapter/tracker_process.py)."""
    hz = os.sysconf("SC_CLK_TCK")
    parent, use, started = {}, {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:  # exited meanwhile
            continue
        parent[int(entry)] = int(fields[1])
        use[int(entry)] = ProcUse(_label(argv), (int(fields[11]) + int(fields[12])) / hz)
        started[int(entry)] = int(fields[19])
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    tree |= {pid for pid, u in use.items() if u.label == HELPER and started[pid] >= started.get(root, 0)}
    return {pid: use[pid]._replace(**_switches(pid)) for pid in tree if pid in use}


def _switches(pid: int) -> dict[str, int]:
    """The context switches of all of a process's threads so far: {"wakeups": voluntary, "preempted": involuntary}."""
    total = {"wakeups": 0, "preempted": 0}
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else ():
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                status = dict(line.split(":", 1) for line in f if "ctxt_switches" in line)
        except OSError:  # the thread ended meanwhile
            continue
        total["wakeups"] += int(status.get("voluntary_ctxt_switches", 0))
        total["preempted"] += int(status.get("nonvoluntary_ctxt_switches", 0))
    return total


def _label(argv: list[str]) -> str:
    """`ray::TrainController`, `raylet`, `log_monitor.py`, `-m pipelines.mlflow_adapter.tracker_process`,
    `ray-dashboard-NodeHead-0`: what a process is."""
    if argv[0].startswith(("ray::", "ray-dashboard-")):  # a title Ray set: `ray-dashboard-NodeHead-0 (python ...)`
        return argv[0].split()[0].split(".")[0]
    if "-m" in argv[:3]:
        return "-m " + argv[argv.index("-m") + 1]
    scripts = [a for a in argv[1:4] if a.endswith(".py")]
    return os.path.basename(scripts[0] if scripts else argv[0]) or "?"


def _cpu_split(before: dict[int, ProcUse], after: dict[int, ProcUse], seconds: float,
               worker: str = "ray::RayTrainWorker") -> dict:
    """What each kind of process of the job used between two _tree_cpu snapshots `seconds` apart: the training
    worker(s), the processes labelled `worker` (cores, and how often a second their threads were pre-empted), and
    the rest (Ray's processes, the MLflow helper, the driver) by label (cores, and wake-ups a second)."""
    rest: dict[str, float] = {}
    rest_wakeups: dict[str, float] = {}
    worker_cores = worker_preempted = 0.0
    for pid, now in after.items():
        then = before.get(pid, ProcUse(now.label, 0.0))
        if now.label == worker:
            worker_cores += (now.cpu_s - then.cpu_s) / seconds
            worker_preempted += (now.preempted - then.preempted) / seconds
        else:
            rest[now.label] = rest.get(now.label, 0.0) + (now.cpu_s - then.cpu_s) / seconds
            rest_wakeups[now.label] = rest_wakeups.get(now.label, 0.0) + (now.wakeups - then.wakeups) / seconds
    return {"worker": worker_cores, "worker_preempted": worker_preempted, "rest_by_kind": rest,
            "rest_wakeups_by_kind": rest_wakeups}


class MainJob(NamedTuple):
    """One way to run the main job: its name in the tables, the script (from the repository root) and its own
    arguments, and the label (_label) of the process that trains."""

    name: str
    script: str
    args: tuple[str, ...]
    worker: str


def main_jobs(lean: list[str], local_mode: bool) -> list[MainJob]:
    """The main job's arms: the lean wing on and off (`lean`), and Ray Train's local mode."""
    jobs = [MainJob(f"({'c' if s == 'on' else 'd'}) main job, lean {s}", "pipelines/pretrain.py", (f"--run.lean={s}",),
                    "ray::RayTrainWorker") for s in ("on", "off") if s in lean]
    if local_mode:
        jobs.append(MainJob("(e) main job, local mode", "bench/local_mode_job.py", (), "local_mode_job.py"))
    return jobs


def run_main_job(job: MainJob, data_dir: Path, out_dir: Path, iters: int, warmup: int, config: Config,
                 extra: list[str], echo: bool = False) -> dict:
    """Run the main job as a subprocess; time its steps and milestones from its output (see the module docstring)."""
    cmd = [sys.executable, str(REPO / job.script), "--config", PRESET, f"--train.max_iters={iters}",
           f"--data.dir={data_dir}", f"--run.out_dir={out_dir}", *job.args, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # line by line through the pipe, or the arrival times mean nothing
    lines: list[tuple[float, str]] = []
    # CPU of the job's processes over its timed updates: from the first timed `iter` line to the last one
    first_timed = -(-warmup // config.train.log_interval) * config.train.log_interval
    last_logged = (iters - 1) // config.train.log_interval * config.train.log_interval
    snapshots: dict[int, tuple[float, dict]] = {}
    proc_fs = os.path.isdir("/proc")  # Linux
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            if proc_fs and (m := ITER_LINE.search(line)) and int(m.group(1)) in (first_timed, last_logged):
                snapshots.setdefault(int(m.group(1)), (time.perf_counter(), _tree_cpu(proc.pid)))
            if echo:
                print(f"{lines[-1][0]:7.2f} | {lines[-1][1]}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with BusyCores(start) as busy:
        code = proc.wait()
    total = time.perf_counter() - start
    reader.join(timeout=10)
    if code != 0:
        tail = "\n".join(text for _, text in lines[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {code}:\n{tail}")

    milestones: dict[str, float] = {}
    for t, text in lines:
        for name, pattern in MILESTONES:
            if name not in milestones and pattern.search(text):
                milestones[name] = t
    iter_lines = [(t, int(m.group(1)), float(m.group(2))) for t, text in lines if (m := ITER_LINE.search(text))]
    if not iter_lines:
        raise RuntimeError(f"no `iter N:` lines in the output of {' '.join(cmd)}")
    milestones["last update done"] = iter_lines[-1][0]
    milestones["command exits"] = total
    # busy cores from the previous milestone (the command's start for the first) to each one
    times = [0.0, *milestones.values()]
    cores = {name: busy.between(t0, t1) for name, t0, t1 in zip(milestones, times, times[1:])}

    tc = config.train
    evals = set(range(0, iters + 1, tc.eval_interval)) | {iters}
    span = steps = 0.0
    loop_ms = []
    for (t0, s0, _), (t1, s1, ms) in zip(iter_lines, iter_lines[1:]):
        # the interval (s0, s1] holds updates s0+1 .. s1; evaluation e runs just before update e
        if s0 + 1 < warmup or any(s0 < e <= s1 for e in evals):
            continue
        span += t1 - t0
        steps += s1 - s0
        loop_ms.append(ms)
    if not steps:
        raise RuntimeError("no timed interval: raise --iters or lower --warmup")
    cpu = None
    if first_timed in snapshots and last_logged in snapshots and last_logged > first_timed:
        (t0, before), (t1, after) = snapshots[first_timed], snapshots[last_logged]
        cpu = _cpu_split(before, after, t1 - t0, worker=job.worker)
    return {"mean_ms_per_iter": span / steps * 1000, "cpu": cpu, "loop_ms_per_iter": statistics.fmean(loop_ms),
            "iters_timed": int(steps), "milestones": milestones, "busy_cores": cores, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="prepared char shards of Tiny Shakespeare")
    parser.add_argument("--input", default=os.environ.get("NANOGPT_TINYSHAKESPEARE"),
                        help="Tiny Shakespeare input.txt (default: $NANOGPT_TINYSHAKESPEARE)")
    parser.add_argument("--iters", type=int, default=300, help="updates per run, warm-up included (default 300)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first updates (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every arm (default 3)")
    parser.add_argument("--lean", default="on,off", type=lambda v: [s for s in v.split(",") if s],
                        help="the main job's run.lean arms, of on,off (default both)")
    parser.add_argument("--no-local-mode", dest="local_mode", action="store_false",
                        help="leave out the main job in Ray Train's local mode")
    parser.add_argument("--echo", action="store_true", help="print the main jobs' output as it arrives")
    parser.add_argument("extra", nargs="*", help="after `--`: more arguments for pipelines/pretrain.py")
    args = parser.parse_args()
    if set(args.lean) - {"on", "off"}:
        parser.error(f"--lean takes on, off or on,off; got {','.join(args.lean)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("nanogpt").setLevel(logging.WARNING)

    config = load_config(PRESET, [], search_dirs=[REPO / "pipelines" / "configs"])
    load_before = os.getloadavg()
    jobs = main_jobs(args.lean, args.local_mode)
    with tempfile.TemporaryDirectory(prefix="bench-main-") as tmp:
        if args.data_dir:
            data_dir = Path(args.data_dir).resolve()
        elif args.input:
            data_dir = prepare_char_shards(Path(args.input).read_text(encoding="utf-8"), Path(tmp) / "data")
        else:
            parser.error("pass --data-dir, --input or set NANOGPT_TINYSHAKESPEARE")
        timed = args.iters - args.warmup
        bench = {
            NANOGPT: lambda i: run_nanogpt_loop(config, data_dir, timed, warmup=args.warmup),
            PLAIN: lambda i: run_plain(config, data_dir, timed, warmup=args.warmup),
            **{job.name: functools.partial(lambda job, i: run_main_job(
                job, data_dir, Path(tmp) / f"runs{i}-{job.name[1]}", args.iters, args.warmup, config, args.extra,
                echo=args.echo), job) for job in jobs},
        }
        runs: dict[str, list[dict]] = {name: [] for name in bench}
        for i in range(args.repeat):  # alternate, so a change in machine load hits them all: a b c ..., then ... c b a
            for name in list(bench) if i % 2 == 0 else reversed(bench):
                runs[name].append(bench[name](i))
            log.info("round %d/%d: %s", i + 1, args.repeat, ", ".join(
                f"{name.split()[0]} {r[-1]['mean_ms_per_iter']:.1f}" for name, r in runs.items()) + " ms/step")

    log.info("torch %s, %d torch threads here, %d CPUs, load average %.2f before, %.2f after; %d updates per run, "
             "the first %d untimed; main job args: %s", torch.__version__, torch.get_num_threads(), os.cpu_count(),
             load_before[0], os.getloadavg()[0], args.iters, args.warmup, " ".join(args.extra) or "(preset)")
    _log_steps(runs, [job.name for job in jobs])
    for job in jobs:
        _log_cpu_split(job.name, [r["cpu"] for r in runs[job.name] if r["cpu"]])
    _log_start_up({job.name: runs[job.name] for job in jobs})


def _median(runs: dict[str, list[dict]], name: str, key: str) -> float:
    return statistics.median(r[key] for r in runs[name])


def _log_steps(runs: dict[str, list[dict]], main_names: list[str]) -> None:
    """ms/step of every arm (median, and each run), the main jobs' loop timers, and the ratios."""
    log.info("%-34s %14s   %s", "", "ms/step median", "each run")
    for name, results in runs.items():
        log.info("%-34s %14.1f   %s", name, _median(runs, name, "mean_ms_per_iter"),
                 " ".join(f"{r['mean_ms_per_iter']:.1f}" for r in results))
    for name in main_names:
        log.info("%-34s %14.1f   %s", f"{name.split()[0]} loop timer", _median(runs, name, "loop_ms_per_iter"),
                 " ".join(f"{r['loop_ms_per_iter']:.1f}" for r in runs[name]))
    pairs = [(f"{name.split()[0]} / {bottom.split()[0]}", name, bottom) for name in main_names
             for bottom in (PLAIN, NANOGPT)] + [("(b) / (a)", PLAIN, NANOGPT)]
    log.info("ratios of the medians: " + "   ".join(
        f"{label}: {_median(runs, top, 'mean_ms_per_iter') / _median(runs, bottom, 'mean_ms_per_iter'):.3f}x"
        for label, top, bottom in pairs))
    # each round's own ratio, its runs minutes apart at most: less of the machine's drift between rounds
    log.info("median of each round's ratio: " + "   ".join(
        f"{label}: {statistics.median(t['mean_ms_per_iter'] / b['mean_ms_per_iter'] for t, b in zip(runs[top], runs[bottom])):.3f}x"
        for label, top, bottom in pairs))


def _log_start_up(main_runs: dict[str, list[dict]]) -> None:
    """Each main job's milestones: seconds from the command's start (median), the cores busy since the milestone
    before (median), and the seconds of each run."""
    log.info("start-up: seconds from the command's start (median), the cores busy since the milestone before "
             "(median; %d on this machine), and the seconds of each run:", os.cpu_count())
    names = [name for name, _ in MILESTONES] + ["last update done", "command exits"]
    for job, runs in main_runs.items():
        log.info(" %s", job)
        for name in names:
            values = [r["milestones"].get(name) for r in runs]
            cores = [c for r in runs if (c := r["busy_cores"].get(name)) is not None]
            log.info("  %-20s %6s %12s   %s", name, _median_text(values), f"{statistics.median(cores):.2f} cores"
                     if cores else "-", " ".join("-" if v is None else f"{v:.1f}" for v in values))
        log.info("  to first step: %.1f s (median), command total: %.1f s (median)",
                 statistics.median(r["milestones"]["first update done"] for r in runs),
                 statistics.median(r["total_s"] for r in runs))


def _log_cpu_split(job: str, splits: list[dict]) -> None:
    """How many cores the training worker had during the timed updates, and what the rest of the job took: cores,
    and wake-ups (each of which, on a machine the worker's threads fill, pre-empts one of them)."""
    if not splits:
        return
    total, top = _median_by_kind(splits, "rest_by_kind")
    log.info("%s, its processes during the timed updates (cores, median): training worker %.3f, the rest %.3f (%s)",
             job, statistics.median(s["worker"] for s in splits), total, ", ".join(f"{k} {v:.3f}" for k, v in top))
    total, top = _median_by_kind(splits, "rest_wakeups_by_kind")
    log.info("  and a second: the training worker's threads pre-empted %.0f times, the rest woke %.0f times (%s)",
             statistics.median(s["worker_preempted"] for s in splits), total, ", ".join(f"{k} {v:.0f}" for k, v in top))


def _median_by_kind(splits: list[dict], key: str, most: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """The median over the runs of split[key]'s total, and of each kind's value: the `most` largest kinds."""
    kinds = {kind for split in splits for kind in split[key]}
    by_kind = {kind: statistics.median(s[key].get(kind, 0.0) for s in splits) for kind in kinds}
    total = statistics.median(sum(s[key].values()) for s in splits)
    return total, sorted(by_kind.items(), key=lambda item: -item[1])[:most]


def _median_text(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.1f}" if known else "-"


if __name__ == "__main__":
    main()
