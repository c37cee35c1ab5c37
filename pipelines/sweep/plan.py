"""A sweep planned and checked on the driver before Ray starts: its spec, its base config (paths and tracking URI
resolved), its directory, and the state file that `pipelines/tune.py --resume <sweep dir>` reads back.

    sweep = plan_sweep("lr_shakespeare_char", ["--sweep.num_samples=4"], ["--train.max_iters=200"], name="s1")
    sweep = load_sweep("out/s1")                                   # the sweep in out/s1, for Tuner.restore

Everything that can be wrong with a sweep file or a trial's config raises here (ConfigError / ShardError naming
the key, value or file), so a bad sweep exits with status 2 before any Ray process exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanogpt.config import Config, ConfigError
from nanogpt.data.storage import is_uri, resolve_local
from pipelines.pretrain import check_data, validate
from pipelines.ray_adapter.runs import unique_name
from pipelines.sweep.spec import SweepSpec, base_config, check_trials, max_time, parse_sweep, read_sweep_file

STATE_FILE = "sweep.yaml"
TRIALS_DIR = "trials"  # in the sweep directory: one Ray Train run per trial


@dataclass
class Sweep:
    name: str
    sweep_dir: str
    data: dict[str, Any]
    """The sweep file's data, with the --sweep.* changes: what sweep.yaml keeps."""
    config_args: list[str]
    """The --section.key=value arguments, with the resolved paths appended (a resume reads the same data)."""
    spec: SweepSpec
    base: Config
    max_t: int
    """The scheduler's time axis (tokens or steps) at the end of the longest trial."""
    needs_data: bool
    """No shards in data.dir yet: the driver prepares them (once) before the first trial."""
    num_corner_trials: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trials_dir(self) -> str:
        return os.path.join(self.sweep_dir, TRIALS_DIR)


def plan_sweep(sweep_file: str, sweep_args: Sequence[str], config_args: Sequence[str], name: str | None) -> Sweep:
    """A new sweep from a sweep file: checked whole, its directory must not exist yet."""
    data = read_sweep_file(sweep_file, sweep_args)
    sweep = _plan(data, list(config_args), name, default_name=Path(sweep_file).stem, source=f"sweep {sweep_file}")
    if os.path.exists(sweep.sweep_dir):
        raise ConfigError(f"sweep directory {sweep.sweep_dir} already exists: pass a new --name, or continue that "
                          f"sweep with --resume {sweep.sweep_dir}")
    os.makedirs(sweep.sweep_dir)
    state = {"name": sweep.name, "sweep": sweep.data, "config_args": sweep.config_args}
    _write_whole(Path(sweep.sweep_dir, STATE_FILE), yaml.safe_dump(state, sort_keys=False))
    return sweep


def load_sweep(sweep_dir: str) -> Sweep:
    """The sweep in `sweep_dir` as it was planned (its sweep.yaml), checked again. The directory is the sweep: a
    copied or renamed one resumes as itself, its trials and Tune's state read and written there."""
    sweep_dir = os.path.normpath(resolve_local(sweep_dir))
    path = Path(sweep_dir, STATE_FILE)
    if not path.is_file():
        raise ConfigError(f"--resume {sweep_dir}: not a sweep directory (no {STATE_FILE})")
    state = read_sweep_state(path)
    out_dir, name = os.path.split(sweep_dir)
    sweep = _plan(state["sweep"], [*state["config_args"], f"--run.out_dir={out_dir}"], name, default_name=name,
                  source=f"sweep {path}")
    from ray.tune import Tuner

    if not Tuner.can_restore(sweep_dir):
        raise ConfigError(f"--resume {sweep_dir}: Tune saved no experiment state there yet (the sweep stopped in "
                          "its first seconds); start it again under a new --name")
    return sweep


def read_sweep_state(path: Path) -> dict[str, Any]:
    """sweep.yaml of a sweep directory: {name, sweep: <the sweep file's data>, config_args: [...]}; ConfigError
    naming the file when it is damaged or empty."""
    try:
        state = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"--resume: {path} is unreadable ({' '.join(str(e).split())}): the sweep's plan is lost; "
                          "start the sweep again under a new --name") from None
    if (not isinstance(state, dict) or not isinstance(state.get("sweep"), dict)
            or not isinstance(state.get("config_args"), list)
            or not all(isinstance(a, str) for a in state["config_args"])):
        raise ConfigError(f"--resume: {path} is damaged or empty (it must hold sweep: <the sweep file> and "
                          "config_args: [...]): the sweep's plan is lost; start the sweep again under a new --name")
    return state


def _write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plan(data: dict[str, Any], config_args: list[str], name: str | None, default_name: str, source: str) -> Sweep:
    spec = parse_sweep(data, source)
    base = base_config(spec, config_args, source)
    base = _resolved(base)
    configs = check_trials(spec, base, source)
    for config in configs:  # the trials, not the base: a batch rule derives the accumulation the base may lack
        validate(config)
    max_t = max_time(spec, configs)
    _check_scheduler(spec, max_t, source)
    manifest = check_data(base)  # hashes every shard: a damaged one is named before Ray starts
    name = name or unique_name(default_name, base.run.out_dir)
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"--name {name!r} must be a plain directory name")
    resolved = [f"--data.dir={base.data.dir}", f"--run.out_dir={base.run.out_dir}"]
    if base.run.tracker == "mlflow":
        resolved.append(f"--run.tracking_uri={base.run.tracking_uri}")
    return Sweep(name=name, sweep_dir=os.path.join(base.run.out_dir, name), data=data,
                 config_args=[*config_args, *resolved], spec=spec, base=base, max_t=max_t,
                 needs_data=manifest is None, num_corner_trials=len(configs))


def _resolved(base: Config) -> Config:
    """Absolute paths and the tracking URI, as every trial (another process, another cwd) must see them."""
    if is_uri(base.run.out_dir):
        raise ConfigError(f"run.out_dir={base.run.out_dir}: a sweep's directory holds Tune's experiment state, which "
                          "the driver restores from; give a filesystem path (a shared mount on a cluster)")
    base = base.replace(run__out_dir=resolve_local(base.run.out_dir),
                        data__dir=resolve_local(base.data.dir) if base.data.dir else None)
    if base.run.tracker == "mlflow":
        from pipelines.mlflow_adapter.store import resolve_tracking_uri

        base = base.replace(run__tracking_uri=resolve_tracking_uri(base))
    return base


def _check_scheduler(spec: SweepSpec, max_t: int, source: str) -> None:
    if spec.scheduler.name == "asha" and max_t < 1:
        raise ConfigError(f"{source}: the trials end at 0 {spec.scheduler.time_attr} (train.max_iters=0): ASHA "
                          "needs trials that train; give train.max_iters >= 1")
    grace = spec.scheduler.grace_period
    if spec.scheduler.name == "asha" and grace is not None and grace >= max_t:
        raise ConfigError(f"{source}: scheduler.grace_period={grace} must be below the longest trial's "
                          f"{max_t:,} {spec.scheduler.time_attr}: ASHA would never stop a trial")
