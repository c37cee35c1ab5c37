"""A sweep against the same trials run one after another: the wall time of an 8-trial learning-rate sweep of the CPU
recipe (pipelines/tune.py, ASHA on tokens, one Ray instance with 2 CPUs) and of the same 8 trial configs as 8
separate `pipelines/pretrain.py` jobs run one after another (each starting its own Ray with 2 CPUs), in one run.

    .venv/bin/python bench/bench_tune.py --input ../shared/data/tinyshakespeare/input.txt
    .venv/bin/python bench/bench_tune.py --data-dir data/shakespeare_char --trials 8 --iters 250

The trials: shakespeare_char_cpu for --iters steps (evals every --iters/5), learning rates log-spaced over
1e-4..1e-2 (a grid, so both sides train the same configs), min_lr = lr/10, one worker at 0.95 CPU each (so the
sweep runs 2 trials at a time on 2 CPUs, each training in its Tune actor (pipelines/sweep/trial_here.py); one torch thread each). ASHA stops the worst half at each rung (grace: one fifth of the run).
The serial jobs run every trial to the end, as separate jobs would. MLflow is off on both sides (--mlflow turns it
on for both): this measures Ray, Tune and the early stopping, not the tracking store. Each side is timed from its
process start to its exit, so both pay their Python imports and Ray start-up.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/...` from the repo root

from pipelines.sweep.report import pretrain_command  # noqa: E402
from pipelines.sweep.spec import PRESET_DIR, base_config, check_trials, parse_sweep  # noqa: E402

BASE = "shakespeare_char_cpu"


def sweep_data(num_trials: int, iters: int, lrs: list[float]) -> dict:
    eval_interval = max(iters // 5, 1)
    return {
        "base": BASE,
        "overrides": {"train": {"max_iters": iters, "eval_interval": eval_interval},
                      "optim": {"lr_decay_iters": iters, "warmup_iters": max(iters // 20, 1)},
                      # 0.95, as the sweep presets: two trials at a time on 2 CPUs (one-worker trials need no driver's 0.01)
                      "run": {"cpus_per_worker": 0.95}},
        "search": {"optim.learning_rate": {"values": lrs}},
        "algorithm": "grid",
        "scheduler": {"name": "asha", "time_attr": "tokens", "grace_period": eval_interval * 768,
                      "reduction_factor": 2},
        "min_lr_ratio": 0.1,
    }


def log_spaced(low: float, high: float, n: int) -> list[float]:
    return [float(f"{low * (high / low) ** (i / max(n - 1, 1)):.3g}") for i in range(n)]


def timed(cmd: list[str], log_path: Path) -> float:
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} exited with {result.returncode}; see {log_path}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="Tiny Shakespeare's input.txt (char shards are prepared under --out)")
    what.add_argument("--data-dir", help="prepared char-level shards")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--iters", type=int, default=250)
    parser.add_argument("--out", help="working directory (default: a new temp dir)")
    parser.add_argument("--mlflow", action="store_true", help="track both sides in MLflow (a local sqlite store)")
    args = parser.parse_args()

    out = Path(args.out or tempfile.mkdtemp(prefix="bench_tune-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = [f"--data.dir={args.data_dir or out / 'shakespeare_char'}"]
    if args.input:
        data.append(f"--data.input={args.input}")
    common = [*data, "--run.tracker=" + ("mlflow" if args.mlflow else "none")]
    spec_data = sweep_data(args.trials, args.iters, log_spaced(1e-4, 1e-2, args.trials))
    sweep_file = out / "bench_sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec_data))
    spec = parse_sweep(spec_data)
    trial_configs = check_trials(spec, base_config(spec, [*common, f"--run.out_dir={out / 'serial'}"]))

    if args.input:  # prepare the shards first, so neither side pays for it
        timed([sys.executable, "pipelines/prepare.py", "--preset", "shakespeare_char", "--input", args.input,
               "--out", str(out / "shakespeare_char"), "--address", "local", "--num-cpus", "2"], out / "prepare.log")

    # --address local: a fresh local Ray for each side, never a cluster someone else started on this machine
    ray_args = ["--address", "local", "--num-cpus", "2"]
    sweep_s = timed([sys.executable, "pipelines/tune.py", "--sweep", str(sweep_file), "--name", "sweep", *ray_args,
                     f"--run.out_dir={out / 'sweeps'}", *common], out / "sweep.log")
    serial_s = 0.0
    for i, config in enumerate(trial_configs):
        command = shlex.split(pretrain_command(BASE, config, [PRESET_DIR]))[1:]
        serial_s += timed([sys.executable, *command, f"--run.name=serial-{i}", *ray_args], out / f"serial-{i}.log")
    report(out, len(trial_configs), sweep_s, serial_s)


def report(out: Path, num_trials: int, sweep_s: float, serial_s: float) -> None:
    table = (out / "sweeps" / "sweep" / "results.csv").read_text().splitlines()
    stopped = sum(line.endswith("stopped early") for line in table)
    print(f"{num_trials} trials of {BASE} (logs and runs in {out})")
    print(f"  sweep (pipelines/tune.py, ASHA, 2 CPUs, {stopped} stopped early): {sweep_s:8.1f} s")
    print(f"  the same trials as {num_trials} pretrain.py jobs, one after another: {serial_s:8.1f} s")
    print(f"  ratio sweep / serial: {sweep_s / serial_s:.2f}")


if __name__ == "__main__":
    main()
