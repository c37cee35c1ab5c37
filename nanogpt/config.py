"""Configuration as data: one frozen dataclass per section, nested in `Config`.

Precedence is CLI > file > defaults. A preset is a YAML file of sections:

    model: {n_layer: 4, n_head: 4}
    train: {batch_size: 12}

and overrides are `--section.key=value` strings (nanoGPT's flat `--key=value` works where the key names one field
in exactly one section). Values are parsed as YAML scalars and type-checked against the field; unknown keys and
wrong types raise `ConfigError` naming the key (and the nearest valid key): nanogpt/typed_loader.py, the loader that
sweep files go through too. Nothing is exec'd or eval'd.

    cfg = load_config("shakespeare_char_cpu", ["--train.max_iters=100", "--dropout=0.1"], search_dirs=[...])
    cfg.to_flat()  # {"model.n_layer": 4, ...}: the same dict feeds YAML, the CLI, Tune and MLflow params
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanogpt.typed_loader import ConfigError, check_known, load_fields, nearest


@dataclass(frozen=True)
class ModelConfig:
    """The GPT architecture (nanoGPT's GPTConfig fields) and where the weights come from."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int | None = None
    """None: the dataset's vocabulary; GPT-2 BPE's 50257 is padded to 50304 (a multiple of 64, faster matmuls),
    a char vocabulary is used as is (nanoGPT's meta.pkl behaviour)."""
    dropout: float = 0.0
    """0 for pretraining, 0.1+ for finetuning (nanoGPT's advice)."""
    bias: bool = False
    """Bias in Linear and LayerNorm layers: True like GPT-2; False (nanoGPT train.py's default) is a bit better and
    faster. Pretrained GPT-2 weights always have biases."""
    init_from: str = "scratch"
    """scratch | resume | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF GPT-2 directory."""

    def __post_init__(self) -> None:
        _positive(self, "n_layer", "n_head", "n_embd", "block_size")
        if self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be positive or null, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class DataConfig:
    """Where token shards live, and how `pipelines/prepare.py` makes them from a corpus."""

    dir: str | None = None
    """Directory of prepared shards (train_*.bin, val_*.bin, manifest.json), or a URI (s3://, gs://) of one: each
    node then keeps a verified copy in cache_dir (nanogpt/data/shard_cache.py)."""
    cache_dir: str | None = None
    """Where a node keeps its copy of shards read from a URI data.dir; None: ~/.cache/nanogpt-ray/shards."""
    input: str | None = None
    """Corpus: path, glob, directory, hf:<name>[:<config>], s3://... or gs://..., or `tinyshakespeare`."""
    tokenizer: str = "gpt2"
    """gpt2 (tiktoken BPE) | char (vocabulary built from the corpus)."""
    val_fraction: float = 0.1
    split: str = "tail"
    """tail: the last val_fraction of the text is val (nanoGPT's Shakespeare); random: per document, seeded."""
    seed: int = 2357
    shard_size: int = 100_000_000
    """Tokens per shard file."""
    text_field: str = "text"
    """The jsonl field, parquet column or Hugging Face column holding the text."""
    separator: str | None = None
    """Split .txt files into documents on this string; None: one file is one document."""
    append_eot: bool = False
    """Append GPT-2's <|endoftext|> after each document (nanoGPT's openwebtext does)."""
    encoding_errors: str = "auto"
    """auto | replace | fail: what to do with bytes that are not UTF-8. auto: replace them by U+FFFD with a
    warning, but fail a file where more than 1% of the bytes are (binary, or not UTF-8); replace: always replace
    (with the warning); fail: any such byte is an error. Errors and warnings name the file and byte offset."""
    dedup: bool = True
    """Drop every document whose text is exactly that of an earlier one (by content hash, in corpus order): copies
    of a file, or of a document, would otherwise put the same text in train and val. false keeps them."""
    num_blocks: int | None = None
    """Ray Data parallelism override; None lets Ray choose. The output does not depend on it."""

    def __post_init__(self) -> None:
        _one_of(self, "tokenizer", ("gpt2", "char"))
        _one_of(self, "split", ("tail", "random"))
        _one_of(self, "encoding_errors", ("auto", "replace", "fail"))
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        _positive(self, "shard_size")
        if self.num_blocks is not None:
            _positive(self, "num_blocks")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and the cosine learning-rate schedule with linear warmup."""

    learning_rate: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600_000
    """Should be ~max_iters (Chinchilla)."""
    min_lr: float = 6e-5
    """Should be ~learning_rate / 10 (Chinchilla)."""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be positive, got {self.learning_rate}")
        if self.decay_lr and not 0 <= self.min_lr <= self.learning_rate:
            raise ConfigError(f"optim.min_lr={self.min_lr} must be in [0, learning_rate={self.learning_rate}]")
        if self.warmup_iters < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_iters, optim.grad_clip and optim.weight_decay must be >= 0")
        if self.decay_lr and self.lr_decay_iters <= self.warmup_iters:
            raise ConfigError(
                f"optim.lr_decay_iters={self.lr_decay_iters} must exceed optim.warmup_iters={self.warmup_iters}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """The loop: batch geometry, evaluation, precision, checkpoints."""

    batch_size: int = 12
    """Micro-batch size per worker (sequences)."""
    gradient_accumulation_steps: int = 40
    """Micro-batches per optimizer step summed over all workers (nanoGPT's 5 * 8): tokens per step =
    batch_size * block_size * gradient_accumulation_steps, whatever the number of workers."""
    max_iters: int = 600_000
    eval_interval: int = 2000
    eval_iters: int = 200
    log_interval: int = 1
    eval_only: bool = False
    always_save_checkpoint: bool = True
    """Checkpoint at every eval; False: only when val loss improves."""
    checkpoint_interval: int = 0
    """Checkpoint every N steps; 0: at every eval."""
    dtype: str = "auto"
    """auto (bfloat16 on CUDA when supported, else float16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16."""
    compile: bool = False
    """torch.compile the model (PyTorch 2)."""
    seed: int = 1337
    device: str = "auto"
    """auto | cpu | cuda | mps."""
    max_nonfinite_skips: int = 0
    """Skip up to this many steps whose loss or gradient norm is NaN/inf; 0 stops at the first."""
    sample_tokens: int = 0
    """Generate this many tokens at each eval as a text sample (0: none)."""
    parallel: str = "ddp"
    """How workers share the model. ddp: every worker holds the whole model and AdamW state (16 bytes per parameter
    in float32: 25 GB for GPT-2 XL) and gradients are all-reduced; fsdp: FSDP2, parameters, gradients and AdamW
    state sharded over the workers (1/N each), an all-gather per transformer block in every forward and backward;
    its checkpoints are sharded (torch.distributed.checkpoint). fsdp needs torch.distributed (Ray Train, torchrun),
    also on one worker, and bfloat16 or float32. See README "DDP or FSDP"."""

    def __post_init__(self) -> None:
        _positive(self, "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval")
        if self.max_iters < 0 or self.checkpoint_interval < 0 or self.max_nonfinite_skips < 0:
            raise ConfigError("train.max_iters, checkpoint_interval and max_nonfinite_skips must be >= 0")
        _one_of(self, "dtype", ("auto", "float32", "bfloat16", "float16"))
        _one_of(self, "device", ("auto", "cpu", "cuda", "mps"))
        _one_of(self, "parallel", ("ddp", "fsdp"))
        if self.parallel == "fsdp" and self.dtype == "float16":
            raise ConfigError("train.parallel=fsdp trains in bfloat16 or float32, not train.dtype=float16 (its loss "
                              "scaler would see only each worker's shard of the gradients): use --train.dtype=bfloat16")


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives, on how many workers, and where it is tracked."""

    name: str | None = None
    """Run name; None: <preset>-<timestamp>. An existing name is resumed only with model.init_from=resume."""
    out_dir: str = "out"
    """Ray Train storage path: a local directory or a cloud URI (s3://, gs://)."""
    resume_from: str | None = None
    """With init_from=resume: a checkpoint directory; None: the latest checkpoint of run.name."""
    num_workers: int = 1
    """Training workers (ranks); with run.min_workers, the most an elastic job grows to."""
    min_workers: int | None = None
    """Below run.num_workers: an elastic job. It goes on with as few as this many workers when nodes are lost
    (a restart from the last checkpoint, with the same tokens per step) and grows back to run.num_workers when
    they return. None: a fixed group of run.num_workers."""
    resize_interval_s: float = 60.0
    """Elastic jobs: how often Ray Train looks for room to grow the group (seconds; each growth is a restart)."""
    group_start_timeout_s: float = 20.0
    """Elastic jobs: how long Ray Train waits for the worker group of the size it chose before it looks at the
    cluster again and chooses anew (seconds). Right after a node is lost the cluster still lists it, and under Ray's
    60 s (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, which wins when set) a shrinking job stood still for a minute; a
    start that times out is retried, never counted against run.max_failures."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    """Ray Train restarts the worker group from the last checkpoint up to this many times (-1: forever)."""
    num_to_keep: int | None = 2
    """Checkpoints kept besides the best; None keeps all."""
    tracker: str = "mlflow"
    """mlflow | none (metrics.jsonl in the run directory is written either way)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None: MLFLOW_TRACKING_URI, else a local sqlite store, <out_dir>/mlflow.db."""
    experiment: str = "nanogpt"
    registered_model: str | None = None
    """The MLflow registered model that each run's best checkpoint becomes a version of; None: the experiment name."""
    lean: str | bool = "auto"
    """Ray's private speed-ups for a one-worker job on a small machine (pipelines/ray_adapter/lean/): auto (only on a
    local Ray instance the job itself started), on (wherever they apply), off (Ray's public API only)."""

    def __post_init__(self) -> None:
        if isinstance(self.lean, bool):  # YAML reads a bare on/off as true/false
            object.__setattr__(self, "lean", "on" if self.lean else "off")
        _one_of(self, "lean", ("auto", "on", "off"))
        _positive(self, "num_workers", "cpus_per_worker")
        self._check_elastic()
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ConfigError("run.gpus_per_worker must be positive when run.use_gpu is true")
        if self.max_failures < -1:
            raise ConfigError(f"run.max_failures must be >= -1, got {self.max_failures}")
        _one_of(self, "tracker", ("mlflow", "none"))
        if self.num_to_keep is not None and self.num_to_keep < 1:
            raise ConfigError(f"run.num_to_keep must be >= 1 or null, got {self.num_to_keep}")

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def _check_elastic(self) -> None:
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ConfigError(f"run.min_workers={self.min_workers} must be between 1 and run.num_workers="
                              f"{self.num_workers} (or null for a fixed group)")
        if not (self.resize_interval_s >= 0 and math.isfinite(self.resize_interval_s)):
            raise ConfigError(f"run.resize_interval_s must be a finite number >= 0, got {self.resize_interval_s}")
        if not (self.group_start_timeout_s > 0 and math.isfinite(self.group_start_timeout_s)):
            raise ConfigError("run.group_start_timeout_s must be a finite number > 0, got "
                              f"{self.group_start_timeout_s}")
        if not self.elastic:
            return
        if self.max_failures == 0:
            raise ConfigError(f"run.min_workers={self.min_workers} makes the job elastic, but run.max_failures=0 ends "
                              "it at the first lost node: set run.max_failures=-1 (restart as often as nodes go) or "
                              "a positive limit")
        if self.lean == "on":
            raise ConfigError("run.lean=on cannot apply to an elastic job (run.min_workers < run.num_workers): elastic "
                              "jobs use Ray's public API only; use run.lean=auto or off")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, section in self.to_dict().items() for k, v in section.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> Config:
        """Build from nested {section: {key: value}} or flat {"section.key": value}; unknown keys are errors."""
        return _apply(cls(), _nest(d, source), source)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> Config:
        return cls.from_dict(flat, source="flat config")

    def replace(self, **flat: Any) -> Config:
        """A copy with `section__key=value` or `{"section.key": value}` changes, validated like any config."""
        changes = {k.replace("__", "."): v for k, v in flat.items()}
        return _apply(self, _nest(changes, "replace()"), "replace()")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig, "run": RunConfig}


def field_names(section: str) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def load_config(
    name_or_path: str | Path | None = None,
    overrides: typing.Sequence[str] = (),
    search_dirs: typing.Sequence[str | Path] = (),
) -> Config:
    """Defaults, then a YAML preset (a path, or a name looked up as <dir>/<name>.yaml), then CLI overrides."""
    cfg = Config()
    if name_or_path is not None:
        path = find_preset(name_or_path, search_dirs)
        cfg = _apply(cfg, _read_yaml(path), str(path))
    return apply_overrides(cfg, overrides)


def find_preset(name_or_path: str | Path, search_dirs: typing.Sequence[str | Path] = ()) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidates = [Path(d) / f"{name_or_path}.yaml" for d in search_dirs]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted({p.stem for d in search_dirs if Path(d).is_dir() for p in Path(d).glob("*.yaml")})
    hint = nearest(str(name_or_path), known)
    raise ConfigError(
        f"no preset named {name_or_path!r} (looked in {', '.join(str(d) for d in search_dirs) or 'nowhere'})"
        + (f"; did you mean {hint!r}?" if hint else "")
        + (f" Known presets: {', '.join(known)}" if known else "")
    )


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply `--section.key=value` (or nanoGPT's flat `--key=value`) strings."""
    changes: dict[str, dict[str, Any]] = {}
    for arg in overrides:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"override {arg!r} must look like --section.key=value")
        key, raw = arg[2:].split("=", 1)
        section, name = resolve_key(key.replace("-", "_"))
        changes.setdefault(section, {})[name] = _parse_scalar(raw)
    return _apply(cfg, changes, "command line")


def resolve_key(key: str) -> tuple[str, str]:
    """'train.batch_size' -> ('train', 'batch_size'); a flat 'batch_size' resolves when exactly one section has it."""
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            hint = nearest(section, list(SECTIONS))
            raise ConfigError(f"unknown config section {section!r} in {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))
        check_known([name], field_names(section), "config key", prefix=f"{section}.")
        return section, name
    owners = [s for s in SECTIONS if key in field_names(s)]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: use one of {', '.join(f'{s}.{key}' for s in owners)}")
    every = [f"{s}.{n}" for s in SECTIONS for n in field_names(s)]
    hint = nearest(key, every) or nearest(key, [n for s in SECTIONS for n in field_names(s)])
    raise ConfigError(f"unknown config key {key!r}" + (f"; did you mean {hint!r}?" if hint else ""))


# ----------------------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of sections (model, data, optim, train, run)")
    return _nest(data, str(path))


def _nest(d: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Accept nested sections, 'section.key' flat keys, or nanoGPT-style bare keys; return nested."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in d.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section {key!r} must be a mapping, got {type(value).__name__}")
            out.setdefault(key, {}).update(value)  # its keys are checked as the section loads
        else:
            try:
                section, name = resolve_key(str(key))
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None
            out.setdefault(section, {})[name] = value
    return out


def _apply(cfg: Config, changes: dict[str, dict[str, Any]], source: str) -> Config:
    sections = {
        section: load_fields(getattr(cfg, section), values, source, prefix=f"{section}.", noun="config key")
        for section, values in changes.items()
    }
    return dataclasses.replace(cfg, **sections)


def _parse_scalar(raw: str) -> Any:
    """CLI values are YAML scalars: 3e-4 -> float, true -> bool, null -> None, anything else a string."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) or value is None or isinstance(value, (bool, int, float)):
        return value
    return raw  # lists/maps are not config values: keep the text, the type check will name the key


def _positive(obj: Any, *names: str) -> None:
    section = _section_name(obj)
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{section}.{n} must be positive, got {getattr(obj, n)}")


def _one_of(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{_section_name(obj)}.{name} must be one of {', '.join(allowed)}; got {value!r}")


def _section_name(obj: Any) -> str:
    return {v: k for k, v in SECTIONS.items()}.get(type(obj), type(obj).__name__)
