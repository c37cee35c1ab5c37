"""The training loop: nanoGPT's train.py as one function that runs unchanged in a plain process, under torchrun
and inside a Ray Train worker. What differs between those (rank, world size, device, DDP wrapping, where
checkpoints go) is passed in as a `TrainContext` and a `Reporter`.

    from nanogpt.config import load_config
    from nanogpt.train.local_reporter import LocalReporter
    from nanogpt.train.loop import TrainContext, train

    cfg = load_config("shakespeare_char_cpu", ["--train.max_iters=200"], search_dirs=["pipelines/configs"])
    result = train(cfg, "data/shakespeare_char", TrainContext(), LocalReporter("out/run", cfg.run.num_to_keep))

The loop is short: each piece is a module of its own. init_from.py builds the model, devices.py resolves device
and dtype, parallel.py wraps the model (DDP, or FSDP from fsdp.py per train.parallel) and writes its checkpoints,
step.py makes one update and holds the non-finite policy, evaluation.py the one evaluation, schedule.py says when
to evaluate and save (and the learning rate).

Steps. `step` counts optimizer updates. Everything recorded at step s describes the weights after s updates:
the eval at s, the checkpoint at s (state.json "step": s), and the training metrics of update s (its loss was
computed on those weights, with lr_at(s)). A run makes updates 0 .. max_iters-1 and evaluates at every multiple of
eval_interval (step 0 included, as nanoGPT) and at max_iters. Resuming from the checkpoint at step s makes update
s next, with the same data, learning rate and dropout masks as the uninterrupted run: batches and dropout RNG are
pure functions of (seed, step, micro-batch), so no iterator or RNG state is stored.

Metrics, logged to the tracker on rank 0 with the step as above:
  every log_interval steps   loss (the update's training loss: mean over its micro-batches and over ranks),
                             lr, grad_norm (global norm before clipping), step_time_ms and tokens_per_s (mean over
                             the steps since the last log, evals excluded), mfu (fraction of the GPU's peak; absent
                             on CPU or an unknown GPU)
  every eval                 val_loss and train_loss (mean loss over a FIXED set of eval_iters * batch_size windows
                             of each split, split across ranks and all-reduced: the same whatever the world size),
                             val_perplexity, best_val_loss, tokens (tokens trained on so far), and val_bpb (bits per
                             byte: the val loss over the UTF-8 bytes of the same windows' targets)
Reports (`Reporter.report`) go out from every rank at every eval and every checkpoint step, with step, val_loss,
val_loss_step (the step val_loss was measured at), best_val_loss, tokens and, after step 0, loss.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from nanogpt.checkpoint.format import Checkpoint, CheckpointRecord, load_checkpoint
from nanogpt.config import Config
from nanogpt.data import shards
from nanogpt.data.windows import TokenWindows
from nanogpt.metrics import perplexity
from nanogpt.model import GPT
from nanogpt.sampling import sample_text
from nanogpt.scratch import scratch_dir
from nanogpt.tokenizers import Tokenizer, TokenizerError, token_byte_lengths, tokenizer_from_dict
from nanogpt.tracking import NullTracker, Tracker
from nanogpt.train.batch_geometry import check_worker_range, rank_micro_batches
from nanogpt.train.devices import Precision
from nanogpt.train.evaluation import evaluate_windows
from nanogpt.train.init_from import initial_model
from nanogpt.train.parallel import Strategy, strategy_for
from nanogpt.train.schedule import lr_at, should_eval, should_save
from nanogpt.train.step import (
    NonFiniteError,
    NonFinitePolicy,
    StepStats,
    apply_update,
    compute_gradients,
    read_stats,
)

log = logging.getLogger(__name__)

OnStep = Callable[[int, dict], None]
"""on_step(step, metrics): called on every rank after each update (or skipped step); keep it cheap."""


@dataclass
class TrainContext:
    """Where this copy of the loop runs. A plain process: the defaults. When world_size > 1 the caller has
    initialized torch.distributed (Ray Train and torchrun do)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str | None = None
    """E.g. "cuda:0" (Ray's device for this worker); None: config.train.device, resolved here."""
    shards_hashed: bool = False
    """True when the launcher has hashed the shards against their manifest already (a Ray driver does, once per
    launch): the loop then checks headers and sizes only. Otherwise local rank 0 hashes them before step 0."""


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Called by EVERY rank at the same steps (in Ray it is a barrier). With a checkpoint, rank 0 passes the
        directory it just wrote and the others None (DDP), or every rank passes its part of a sharded checkpoint,
        the files disjoint, for the reporter to merge into one directory (FSDP). The reporter takes the directory
        over: train() deletes it after report returns."""
        ...


@dataclass
class TrainResult:
    step: int
    """Optimizer updates the model has had at the end (max_iters after a full run)."""
    start_step: int
    best_val_loss: float
    val_loss: float | None
    """The last eval's; when this call evaluated nothing, the resumed checkpoint's (or None)."""
    train_loss: float | None
    losses: list[float] = field(default_factory=list)
    """The training loss of every update this call made: losses[i] is update start_step + i (NaN if skipped)."""
    tokens_per_s: float | None = None
    """Training throughput of this call, evals and the first (warm-up/compile) step excluded."""
    num_skipped: int = 0


# ------------------------------------------------------------------------------------------ the loop


def train(
    config: Config,
    data_dir: str,
    ctx: TrainContext,
    reporter: Reporter,
    tracker: Tracker | None = None,
    resume_from: str | None = None,
    on_step: OnStep | None = None,
) -> TrainResult:
    """Train (or, with train.eval_only, evaluate) per `config` on the token shards in `data_dir`.

    `resume_from`: a checkpoint directory to continue from (model.init_from=resume is resolved by the caller).
    The shards are verified before anything is built (hashed too, unless ctx.shards_hashed). Raises ConfigError / ShardError / CheckpointError before step 0, NonFiniteError at a bad step.
    """
    run = _Run.build(config, data_dir, ctx, reporter, tracker, resume_from)
    state = run.start_state()
    tc = config.train
    policy = NonFinitePolicy(tc.max_nonfinite_skips)
    meter = Throughput(run.tokens_per_step)
    while True:
        evaluated = should_eval(state.step, tc, state.start_step, state.resumed)
        improved = run.evaluate(state) if evaluated else False
        saving = should_save(state.step, tc, state.start_step, evaluated, improved)
        if evaluated or saving:
            run.report(state, saving)
        if tc.eval_only or state.step >= tc.max_iters:
            break
        t0 = time.perf_counter()
        stats = run.update(state.step, policy)
        dt = time.perf_counter() - t0
        state.record(stats)
        meter.add(dt, first=state.step == state.start_step)
        if state.step % tc.log_interval == 0 and run.main:
            run.log_interval(state.step, stats, meter.take_interval())
        if on_step is not None:
            on_step(state.step, {**run.step_metrics(state.step, stats), "step_time_ms": dt * 1000})
        state.step += 1
    return state.result(meter.tokens_per_s(), policy.num_skipped)


@dataclass
class LoopState:
    """What the loop knows between steps (all of it a function of the checkpoint it started from and the steps
    since): nothing here needs saving beyond what a checkpoint holds."""

    step: int
    start_step: int
    resumed: bool
    best_val_loss: float = math.inf
    val_loss: float | None = None
    val_loss_step: int | None = None
    train_loss: float | None = None
    last_loss: float | None = None
    losses: list[float] = field(default_factory=list)

    def record(self, stats: StepStats) -> None:
        self.losses.append(stats.loss if stats.finite else math.nan)
        if stats.finite:
            self.last_loss = stats.loss

    def report_metrics(self, tokens_per_step: int) -> dict[str, float]:
        metrics = {"step": self.step, "best_val_loss": self.best_val_loss, "tokens": self.step * tokens_per_step}
        if self.val_loss is not None:
            metrics.update(val_loss=self.val_loss, val_loss_step=self.val_loss_step)
        if self.last_loss is not None:
            metrics["loss"] = self.last_loss
        return metrics

    def result(self, tokens_per_s: float | None, num_skipped: int) -> TrainResult:
        return TrainResult(step=self.step, start_step=self.start_step, best_val_loss=self.best_val_loss,
                           val_loss=self.val_loss, train_loss=self.train_loss, losses=self.losses,
                           tokens_per_s=tokens_per_s, num_skipped=num_skipped)


class Throughput:
    """Step times: the mean over each log interval, and tokens/s over the call without its first step (which
    pays for warm-up and compilation)."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.interval_time, self.interval_steps = 0.0, 0
        self.total_time, self.total_steps = 0.0, 0

    def add(self, dt: float, first: bool) -> None:
        self.interval_time += dt
        self.interval_steps += 1
        if not first:
            self.total_time += dt
            self.total_steps += 1

    def take_interval(self) -> float:
        """The mean step time since the last call, in seconds; starts a new interval."""
        mean = self.interval_time / self.interval_steps
        self.interval_time, self.interval_steps = 0.0, 0
        return mean

    def tokens_per_s(self) -> float | None:
        return self.tokens_per_step * self.total_steps / self.total_time if self.total_time > 0 else None


# ------------------------------------------------------------------------------------------ what the loop runs on


@dataclass
class _Run:
    """Everything train() builds before step 0, and the loop's actions on it."""

    config: Config
    strategy: Strategy
    precision: Precision
    manifest: shards.Manifest
    raw_model: GPT
    eval_model: torch.nn.Module
    """Compiled (when asked) but never DDP-wrapped: ranks may run different numbers of eval batches. Under FSDP the
    same sharded module as `model` (evaluation then pads the ranks to the same number of forwards)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_windows: TokenWindows
    val_windows: TokenWindows
    micro_steps: int
    """Micro-batches this rank runs per step (ranks may differ by one: batch_geometry.rank_micro_batches)."""
    tokenizer: Tokenizer | None
    byte_lengths: np.ndarray | None
    reporter: Reporter
    tracker: Tracker
    start_step: int = 0
    best_val_loss: float = math.inf
    resumed: bool = False
    resumed_val: tuple[float | None, int | None] = (None, None)
    resizes: int = 0
    """How many times the run has continued on a world size other than its checkpoint's (carried in each one)."""

    @property
    def main(self) -> bool:
        return self.strategy.rank == 0

    @property
    def tokens_per_step(self) -> int:
        tc = self.config.train
        return tc.batch_size * self.raw_model.config.block_size * tc.gradient_accumulation_steps

    @classmethod
    def build(cls, config: Config, data_dir: str, ctx: TrainContext, reporter: Reporter, tracker: Tracker | None,
              resume_from: str | None) -> _Run:
        tc, oc = config.train, config.optim
        precision = Precision.resolve(ctx.device or tc.device, tc.dtype)
        check_worker_range(tc.gradient_accumulation_steps, ctx.world_size, ctx.world_size, tc.parallel)
        micro_steps = len(rank_micro_batches(tc.gradient_accumulation_steps, ctx.world_size, ctx.rank))
        # data first: a damaged shard names itself here, not at step 1234
        manifest = shards.verify(data_dir, check_hashes=not ctx.shards_hashed and ctx.local_rank == 0)
        checkpoint = load_checkpoint(resume_from, map_location="cpu") if resume_from else None
        model = initial_model(config, manifest, checkpoint)
        block_size = model.config.block_size
        windows = {split: TokenWindows(shards.load_split(data_dir, split), block_size) for split in ("train", "val")}
        precision.activate()
        model.to(precision.device)
        strategy = strategy_for(ctx.rank, ctx.world_size, precision.device, tc.parallel, precision.dtype)
        if tc.compile and ctx.rank == 0:
            log.info("compiling the model... (takes a ~minute)")
        eval_model = torch.compile(model) if tc.compile else model
        wrapped = strategy.wrap(eval_model).train()
        # the optimizer over the wrapped model's parameters, built after wrapping (FSDP2 needs that order)
        optimizer = model.configure_optimizers(oc.weight_decay, oc.learning_rate, (oc.beta1, oc.beta2),
                                               precision.device_type)
        scaler = torch.amp.GradScaler(precision.device_type, enabled=precision.needs_loss_scaling)
        tokenizer, byte_lengths = _tokenizer_for_bpb(manifest, need_tokenizer=tc.sample_tokens > 0)
        run = cls(config=config, strategy=strategy, precision=precision, manifest=manifest, raw_model=model,
                  eval_model=eval_model, model=wrapped, optimizer=optimizer, scaler=scaler,
                  train_windows=windows["train"], val_windows=windows["val"], micro_steps=micro_steps,
                  tokenizer=tokenizer, byte_lengths=byte_lengths, reporter=reporter,
                  tracker=tracker if (tracker is not None and ctx.rank == 0) else NullTracker())
        if checkpoint is not None:
            run.restore(checkpoint)
        if run.main:
            run.announce()
        return run

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint: optimizer and loss-scaler state, step, best and last val loss."""
        if not self.strategy.load_optimizer_state(self.raw_model, self.optimizer, checkpoint):
            log.warning("%s has no optimizer state: AdamW starts from zero moments", checkpoint.path)
        if self.scaler.is_enabled() and checkpoint.scaler_state:
            self.scaler.load_state_dict(checkpoint.scaler_state)
        self.resumed, self.start_step, self.best_val_loss = True, checkpoint.step, checkpoint.best_val_loss
        # reports before the next eval carry the checkpoint's last val loss
        self.resumed_val = (checkpoint.extra.get("val_loss"), checkpoint.extra.get("val_loss_step"))
        previous = int(checkpoint.state.get("world_size") or 1)
        self.resizes = int(checkpoint.extra.get("resizes") or 0) + (previous != self.strategy.world_size)
        if self.main:
            log.info("resuming from %s at step %d (best val loss %.4f)", checkpoint.path, self.start_step,
                     self.best_val_loss)
            if previous != self.strategy.world_size:
                log.info("%s", resize_line(previous, self.strategy.world_size, self.start_step, self.tokens_per_step))

    def announce(self) -> None:
        """Rank 0: the step's geometry to the log, and what only this process knows as tags to the tracker (the
        config is the caller's to log as params: it knows whether the run is new)."""
        tc = self.config.train
        log.info("tokens per iteration will be: %s (%s x %d x %d)", f"{self.tokens_per_step:,}",
                 split_text(tc.gradient_accumulation_steps, self.strategy.world_size), tc.batch_size,
                 self.raw_model.config.block_size)
        self.tracker.set_tags({
            "num_params": self.raw_model.get_num_params(), "world_size": self.strategy.world_size,
            "device": self.precision.device, "dtype": str(self.precision.dtype).removeprefix("torch."),
            "tokens_per_step": self.tokens_per_step, "micro_steps_per_rank": self.micro_steps,
            "resizes": self.resizes,
        })

    def start_state(self) -> LoopState:
        val_loss, val_loss_step = self.resumed_val
        return LoopState(step=self.start_step, start_step=self.start_step, resumed=self.resumed,
                         best_val_loss=self.best_val_loss, val_loss=val_loss, val_loss_step=val_loss_step)

    # -------------------------------------------------------------------------------------- the loop's actions

    def evaluate(self, state: LoopState) -> bool:
        """Val and train loss of the weights after state.step updates (nanoGPT's order: before the update);
        True when the val loss improved on the best. A non-finite val loss stops the run before it is saved."""
        tc = self.config.train
        common = dict(num_windows=tc.eval_iters * tc.batch_size, batch_size=tc.batch_size,
                      precision=self.precision, strategy=self.strategy)
        val = evaluate_windows(self.eval_model, self.val_windows, byte_lengths=self.byte_lengths, **common)
        train = evaluate_windows(self.eval_model, self.train_windows, **common)
        if not math.isfinite(val.loss):
            raise NonFiniteError(f"step {state.step}: the val loss is {val.loss}: the weights diverged; stopped "
                                 "without saving them (the last checkpoint stays the latest); lower "
                                 "optim.learning_rate")
        improved = val.loss < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, val.loss)  # never overwritten by a worse value (nanoGPT is)
        state.val_loss, state.val_loss_step, state.train_loss = val.loss, state.step, train.loss
        if self.main:
            log.info("step %d: train loss %.4f, val loss %.4f", state.step, train.loss, val.loss)
            metrics = {"val_loss": val.loss, "train_loss": train.loss, "val_perplexity": perplexity(val.loss),
                       "best_val_loss": state.best_val_loss, "tokens": state.step * self.tokens_per_step}
            if val.bits_per_byte is not None:
                metrics["val_bpb"] = val.bits_per_byte
            self.tracker.log_metrics(metrics, state.step)
        if tc.sample_tokens > 0 and (self.main or self.strategy.collective_forward):
            # under FSDP every rank takes part in the forwards (the same seed: the same tokens); rank 0 logs them
            text = sample_text(self.raw_model, self.tokenizer, "", tc.sample_tokens, seed=tc.seed,
                               device=self.precision.device, dtype=self.precision.dtype)[0]
            self.tracker.log_text(text, f"samples/step_{state.step:06d}.txt")  # a NullTracker off rank 0
        return improved

    def report(self, state: LoopState, save: bool) -> None:
        """Every rank reports (a reporter may be a barrier); with `save`, every rank first writes its part of the
        checkpoint (DDP: rank 0 the whole of it; FSDP: every rank its shards) into a scratch directory of its own
        and hands it over with the report (a rank killed meanwhile leaves it to the next one's reclaim)."""
        metrics = state.report_metrics(self.tokens_per_step)
        if not save:
            self.reporter.report(metrics, None)
            return
        record = CheckpointRecord(
            model_args=self.raw_model.config, config=self.config, step=state.step, best_val_loss=state.best_val_loss,
            tokenizer=self.manifest.tokenizer, manifest_json=self.manifest.to_json(),
            extra={"val_loss": state.val_loss, "val_loss_step": state.val_loss_step, "resizes": self.resizes},
            world_size=self.strategy.world_size, tokens_seen=state.step * self.tokens_per_step,
            scaler_state=self.scaler.state_dict() if self.scaler.is_enabled() else None,
        )
        tmp_root = scratch_dir("staging")
        try:
            part = self.strategy.save_checkpoint(tmp_root / f"checkpoint_{state.step:06d}", self.raw_model,
                                                 self.optimizer, record)
            self.reporter.report(metrics, str(part) if part is not None else None)
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)

    def update(self, step: int, policy: NonFinitePolicy) -> StepStats:
        """One optimizer update at lr_at(step), or a skipped one (see NonFinitePolicy)."""
        tc = self.config.train
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr_at(step, self.config.optim)
        stats = read_stats(compute_gradients(
            self.model, self.optimizer, self.train_windows, step, seed=tc.seed, batch_size=tc.batch_size,
            accumulation=tc.gradient_accumulation_steps, strategy=self.strategy, precision=self.precision, scaler=self.scaler,
            grad_clip=self.config.optim.grad_clip,
        ), self.strategy.world_size)
        policy.check(step, stats, log_warning=self.main)
        apply_update(self.optimizer, self.scaler, stats)
        return stats

    def step_metrics(self, step: int, stats: StepStats) -> dict[str, float]:
        metrics = {"loss": stats.loss, "lr": lr_at(step, self.config.optim), "grad_norm": stats.grad_norm}
        if not stats.finite:
            metrics["skipped"] = 1.0
        return metrics

    def log_interval(self, step: int, stats: StepStats, step_time: float) -> None:
        """Rank 0, every log_interval steps: nanoGPT's `iter` line, and the step's metrics to the tracker."""
        tc = self.config.train
        mfu = self.raw_model.estimate_mfu(tc.batch_size * self.micro_steps, step_time, device=self.precision.device,
                                          dtype=self.precision.mfu_dtype)
        mfu_text = "n/a" if mfu is None else f"{mfu * 100:.2f}%"
        log.info("iter %d: loss %.4f, time %.2fms, mfu %s", step, stats.loss, step_time * 1000, mfu_text)
        metrics = {**self.step_metrics(step, stats), "step_time_ms": step_time * 1000,
                   "tokens_per_s": self.tokens_per_step / step_time, "world_size": self.strategy.world_size}
        if mfu is not None:
            metrics["mfu"] = mfu
        self.tracker.log_metrics(metrics, step)


def split_text(accumulation: int, world_size: int) -> str:
    """How a step's micro-batches fall on the workers, for the geometry line: "2 workers x 4 micro-steps", or
    "8 micro-steps over 3 workers (3, 3, 2)" when the split is uneven."""
    counts = [len(rank_micro_batches(accumulation, world_size, rank)) for rank in range(world_size)]
    if len(set(counts)) == 1:
        return f"{world_size} workers x {counts[0]} micro-steps"
    return f"{accumulation} micro-steps over {world_size} workers ({', '.join(map(str, counts))})"


def resize_line(before: int, after: int, step: int, tokens_per_step: int) -> str:
    """The console line of a run that continues on another number of workers (an elastic job's resize)."""
    why = "fewer workers than before: a node was lost" if after < before else "more workers available"
    return (f"resized {before} -> {after} workers at step {step} ({why}); {tokens_per_step:,} tokens per step "
            "unchanged")


def _tokenizer_for_bpb(manifest: shards.Manifest, need_tokenizer: bool) -> tuple[Tokenizer | None, np.ndarray | None]:
    """The dataset's tokenizer and its tokens' UTF-8 byte lengths, for val_bpb. A worker that cannot load it
    (GPT-2 BPE with no tiktoken files) still trains, with a warning and no val_bpb, unless it must sample."""
    try:
        tokenizer = tokenizer_from_dict(manifest.tokenizer)
        return tokenizer, token_byte_lengths(tokenizer)
    except TokenizerError as e:
        if need_tokenizer:
            raise
        log.warning("no val_bpb: %s", e)
        return None, None
