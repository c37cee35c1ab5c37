"""A sweep file, read and checked: the typed spec that pipelines/tune.py runs, and each trial's config. No Ray.

A sweep file (pipelines/configs/sweeps/*.yaml) is data:

    base: shakespeare_char_cpu          # the training preset every trial starts from (pipelines/configs/)
    overrides: {train: {max_iters: 500}, run: {cpus_per_worker: 1}}    # applied to it, before the CLI's
    search:                             # config keys -> {values: [...]} | {loguniform: [lo, hi]} | {uniform: [lo, hi]}
      optim.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
      train.batch_size: {values: [8, 16, 32]}
    algorithm: random                   # grid (every key by values) | random | optuna (TPE)
    num_samples: 8                      # trials (grid: repeats of the whole grid)
    scheduler: {name: asha, time_attr: tokens, grace_period: 96000, reduction_factor: 2}   # or {name: fifo}
    batch: {keep: tokens_per_step}      # or {keep: token_budget, token_budget: 3072000}; see below
    min_lr_ratio: 0.1                   # optim.min_lr = ratio x each trial's learning rate (nanoGPT's lr/10)
    max_concurrent_trials: null         # null: as many as the cluster's CPUs/GPUs hold
    time_budget_s: null                 # stop the whole sweep after this many seconds

`batch` changes what train.batch_size (the micro-batch, in sequences) means in the search space:
  keep: tokens_per_step   gradient_accumulation_steps is derived so that tokens per optimizer step stay at
                          `tokens_per_step` (default: the base's); only memory and speed differ between trials.
  keep: token_budget      gradient_accumulation_steps stays; tokens per step grow with the batch, and max_iters
                          shrinks so that every trial trains on `token_budget` tokens (default: the base's
                          max_iters x tokens per step). Warmup, decay, eval and checkpoint intervals keep their
                          fraction of the run, so evals fall at the same token counts in every trial.
The arithmetic is nanogpt/train/batch_geometry.py. Everything here raises ConfigError naming the key and value.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from nanogpt.config import Config, ConfigError, apply_overrides, find_preset, load_config, resolve_key
from nanogpt.train.batch_geometry import (
    accumulation_for_tokens,
    check_worker_range,
    rescale_steps,
    steps_for_tokens,
    tokens_per_step,
)
from nanogpt.typed_loader import (
    checked,
    fraction,
    integer_at_least,
    is_finite_number,
    load_fields,
    one_of,
    optional,
    positive_number,
)

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"
SWEEP_DIR = PRESET_DIR / "sweeps"
METRIC, MODE = "val_loss", "min"  # all-reduced over ranks by the loop (nanogpt/train/loop.py)

ALGORITHMS = ("grid", "random", "optuna")
DISTRIBUTIONS = ("values", "loguniform", "uniform")
SCHEDULER_KEYS = {"asha": ("name", "time_attr", "grace_period", "reduction_factor"), "fifo": ("name",)}
TIME_ATTRS = ("tokens", "step")
BATCH_KEYS = {"tokens_per_step": ("keep", "tokens_per_step"), "token_budget": ("keep", "token_budget")}
# what a trial may not sweep: where it lives and its data (prepared once, by the driver, for every trial)
FIXED_SECTIONS = ("run", "data")
SCHEDULE_STEPS = ("optim.warmup_iters", "optim.lr_decay_iters", "train.eval_interval", "train.checkpoint_interval")


# ------------------------------------------------------------------------------------------ the spec


def _mapping(value: Any, key: str, example: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}={value!r} must be a mapping, e.g. {example}")
    return value


@dataclass(frozen=True)
class Dimension:
    key: str
    """A config key, `section.name`."""
    kind: str
    """values | loguniform | uniform"""
    args: tuple
    """The values, or (low, high)."""


@dataclass(frozen=True)
class Scheduler:
    name: str = "fifo"
    time_attr: str = checked(one_of(TIME_ATTRS), "tokens")
    grace_period: int | None = checked(optional(integer_at_least(1)), None)
    """In time_attr units; None: max_t / reduction_factor**3 (three rungs)."""
    reduction_factor: int = checked(integer_at_least(2), 2)


@dataclass(frozen=True)
class BatchRule:
    keep: str
    """tokens_per_step | token_budget"""
    tokens_per_step: int | None = checked(optional(integer_at_least(1)), None)
    token_budget: int | None = checked(optional(integer_at_least(1)), None)

    @property
    def amount(self) -> int | None:
        """The kept quantity (tokens_per_step or token_budget); None: the base config's."""
        return self.tokens_per_step if self.keep == "tokens_per_step" else self.token_budget


def _scheduler(value: Any, key: str) -> Scheduler:
    value = _mapping(value or {"name": "fifo"}, key, "{name: asha}")
    name = one_of(tuple(SCHEDULER_KEYS))(value.get("name"), f"{key}.name")
    return load_fields(Scheduler, value, f"{key} ({name})", known=SCHEDULER_KEYS[name])


def _batch_rule(value: Any, key: str) -> BatchRule:
    value = _mapping(value, key, "{keep: tokens_per_step}")
    keep = one_of(tuple(BATCH_KEYS))(value.get("keep"), f"{key}.keep")
    return load_fields(BatchRule, value, f"{key} (keep: {keep})", known=BATCH_KEYS[keep])


def _base(value: Any, key: str) -> str:
    if not value:
        raise ConfigError(f"{key} is missing: the training preset every trial starts from, e.g. "
                          f"{key}: shakespeare_char_cpu")
    return str(value)


def _search(value: Any, key: str) -> tuple[Dimension, ...]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{key}={value!r}: the search space is empty; give at least one config key, "
                          "e.g. search: {optim.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}}")
    return tuple(_dimension(k, v, f"{key}.{k}") for k, v in value.items())


def _dimension(key: str, value: Any, where: str) -> Dimension:
    try:
        section, name = resolve_key(str(key))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if section in FIXED_SECTIONS:
        raise ConfigError(f"{where}: {section}.* cannot be swept (the driver decides where trials live and "
                          "prepares their data once); set it in overrides or on the command line")
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}={value!r} must be one of {{values: [...]}}, {{loguniform: [low, high]}}, "
                          "{uniform: [low, high]}")
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}.{kind}={args!r} must be a non-empty list")
    if kind != "values":
        if len(args) != 2 or not all(is_finite_number(a) for a in args) or not float(args[0]) < float(args[1]):
            raise ConfigError(f"{where}.{kind}={args!r} must be [low, high]: finite numbers with low < high")
        if kind == "loguniform" and float(args[0]) <= 0:
            raise ConfigError(f"{where}.loguniform={args!r}: the low end must be positive")
        args = [float(a) for a in args]
    return Dimension(f"{section}.{name}", kind, tuple(args))


def _flat_overrides(value: Any, key: str) -> dict[str, Any]:
    """Flat `section.key` -> value, from sections ({train: {max_iters: 5}}) or flat keys; checked when applied."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={value!r} must be a mapping of config sections or section.key")
    flat: dict[str, Any] = {}
    for section, item in value.items():
        if isinstance(item, dict):
            flat.update({f"{section}.{k}": v for k, v in item.items()})
        else:
            flat[str(section)] = item
    return flat


@dataclass(frozen=True)
class SweepSpec:
    """A sweep file, typed: every field is checked as nanogpt/typed_loader.py reads the file (`parse_sweep`)."""

    base: str = checked(_base)
    search: tuple[Dimension, ...] = checked(_search)
    overrides: dict[str, Any] = checked(_flat_overrides, default_factory=dict)
    """Flat `section.key` -> value, applied to the base preset."""
    algorithm: str = checked(one_of(ALGORITHMS), "random")
    num_samples: int = checked(integer_at_least(1), 1)
    scheduler: Scheduler = checked(_scheduler, Scheduler())
    batch: BatchRule | None = checked(optional(_batch_rule), None)
    min_lr_ratio: float | None = checked(optional(fraction), None)
    max_concurrent_trials: int | None = checked(optional(integer_at_least(1)), None)
    time_budget_s: float | None = checked(optional(positive_number), None)

    def __post_init__(self) -> None:
        if self.algorithm == "grid":
            for d in self.search:
                if d.kind != "values":
                    raise ConfigError(f"search.{d.key}: algorithm grid needs a list of values ({{values: [...]}}), "
                                      f"got {d.kind}; use algorithm: random or optuna to sample it")

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.search]


KEYS = tuple(f.name for f in fields(SweepSpec))


# ------------------------------------------------------------------------------------------ reading


def read_sweep_file(name_or_path: str | Path, cli: Sequence[str] = ()) -> dict[str, Any]:
    """The sweep file's data (a name in pipelines/configs/sweeps/ or a path), with `--sweep.KEY=VALUE` changes
    (e.g. --sweep.num_samples=4, --sweep.scheduler.grace_period=50000,
    --sweep.search.optim.learning_rate='{values: [1e-3, 3e-3]}')."""
    path = find_preset(name_or_path, [SWEEP_DIR])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"sweep file {path} must be a mapping with the keys {', '.join(KEYS)}")
    for arg in cli:
        _apply_cli(data, arg)
    return data


def _apply_cli(data: dict[str, Any], arg: str) -> None:
    if not arg.startswith("--sweep.") or "=" not in arg:
        raise ConfigError(f"sweep override {arg!r} must look like --sweep.KEY=VALUE")
    key, raw = arg.removeprefix("--sweep.").split("=", 1)
    parts = key.split(".")
    if parts[0] == "search" and len(parts) >= 3:  # search keys are themselves dotted: section.name
        parts = ["search", ".".join(parts[1:3]), *parts[3:]]
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"sweep override {arg!r}: sweep.{part} is not a mapping")
    node[parts[-1]] = yaml.safe_load(raw)


def parse_sweep(data: Mapping[str, Any], source: str = "sweep file") -> SweepSpec:
    """The typed spec of a sweep file's data; unknown keys, empty search spaces and bad values are errors."""
    return load_fields(SweepSpec, data, source)


# ------------------------------------------------------------------------------------------ configs


def base_config(spec: SweepSpec, cli_overrides: Sequence[str] = (), source: str = "sweep file") -> Config:
    """The config every trial starts from: the base preset, the sweep file's overrides, then the CLI's."""
    config = load_config(spec.base, search_dirs=[PRESET_DIR])
    try:
        config = config.replace(**spec.overrides)
    except ConfigError as e:
        raise ConfigError(f"{source}: overrides: {e}") from None
    return apply_overrides(config, cli_overrides)


def trial_config(spec: SweepSpec, base: Config, params: Mapping[str, Any]) -> Config:
    """The config of the trial with sampled `params` ({"optim.learning_rate": 3e-4, ...}): the values, then
    min_lr_ratio and the batch rule's derived keys."""
    changes = dict(params)
    if spec.min_lr_ratio is not None:
        changes["optim.min_lr"] = spec.min_lr_ratio * float(changes.get("optim.learning_rate",
                                                                        base.optim.learning_rate))
    config = base.replace(**changes)
    if spec.batch is None:
        return config
    if spec.batch.keep == "tokens_per_step":
        return _keep_tokens_per_step(config, base, spec.batch.amount)
    return _keep_token_budget(config, base, spec.batch.amount)


def _keep_tokens_per_step(config: Config, base: Config, amount: int | None) -> Config:
    target = amount or base_tokens_per_step(base)
    accumulation = accumulation_for_tokens(target, config.train.batch_size, config.model.block_size,
                                           config.run.num_workers, config.train.parallel)
    return config.replace(train__gradient_accumulation_steps=accumulation)


def _keep_token_budget(config: Config, base: Config, amount: int | None) -> Config:
    budget = amount or base.train.max_iters * base_tokens_per_step(base)
    tc = config.train
    step_tokens = tokens_per_step(tc.batch_size, config.model.block_size, tc.gradient_accumulation_steps)
    try:
        max_iters = steps_for_tokens(budget, step_tokens)
    except ConfigError as e:
        raise ConfigError(f"batch.token_budget={budget:,} with train.batch_size={tc.batch_size}: {e}") from None
    flat = base.to_flat()
    changes = {key: rescale_steps(flat[key], base.train.max_iters, max_iters) for key in SCHEDULE_STEPS}
    if not config.optim.decay_lr:
        changes.pop("optim.lr_decay_iters")
    return config.replace(**{"train.max_iters": max_iters, **changes})


def base_tokens_per_step(config: Config) -> int:
    tc = config.train
    return tokens_per_step(tc.batch_size, config.model.block_size, tc.gradient_accumulation_steps)


def corner_params(spec: SweepSpec) -> Iterator[dict[str, Any]]:
    """Every combination of the listed values and of each range's two ends: the trials to check before Ray starts
    (a config valid at both ends of a range is valid inside it for every check made here)."""
    axes = [d.args for d in spec.search]
    for combo in itertools.product(*axes):
        yield dict(zip(spec.keys, combo))


def check_trials(spec: SweepSpec, base: Config, source: str = "sweep file") -> list[Config]:
    """Build the corner trials' configs (see corner_params): every error names the trial's values."""
    _check_batch_rule(spec, source)
    configs = []
    for params in corner_params(spec):
        try:
            config = trial_config(spec, base, params)
            rc, tc = config.run, config.train
            if rc.elastic:  # Tune reserves each trial's resources up front: a trial's group is fixed
                raise ConfigError(f"run.min_workers={rc.min_workers} makes a job elastic, which a sweep's trials "
                                  f"are not: drop it (each trial runs on run.num_workers={rc.num_workers})")
            check_worker_range(tc.gradient_accumulation_steps, rc.num_workers, rc.num_workers, tc.parallel)
        except ConfigError as e:
            where = ", ".join(f"{k}={v}" for k, v in params.items())
            raise ConfigError(f"{source}: the trial with {where}: {e}") from None
        configs.append(config)
    return configs


def _check_batch_rule(spec: SweepSpec, source: str) -> None:
    if spec.batch is None:
        return
    swept = {d.key: d for d in spec.search}
    size = swept.get("train.batch_size")
    if size is None or size.kind != "values":
        raise ConfigError(f"{source}: batch.keep={spec.batch.keep} needs train.batch_size in the search space as "
                          "a list of values, e.g. train.batch_size: {values: [4, 8, 16]}")
    derived = (["train.gradient_accumulation_steps"] if spec.batch.keep == "tokens_per_step"
               else ["train.max_iters", *SCHEDULE_STEPS])
    for key in derived:
        if key in swept:
            raise ConfigError(f"{source}: search.{key}: batch.keep={spec.batch.keep} derives {key} from the batch "
                              "size; remove it from the search space")


def max_time(spec: SweepSpec, configs: Sequence[Config]) -> int:
    """The scheduler's time axis at the end of the longest trial: tokens (or steps) of its last update."""
    if spec.scheduler.time_attr == "step":
        return max(c.train.max_iters for c in configs)
    return max(c.train.max_iters * base_tokens_per_step(c) for c in configs)
