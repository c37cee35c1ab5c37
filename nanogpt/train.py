"""The training loop: nanoGPT's train.py as one function that runs unchanged in a plain process, under torchrun
and inside a Ray Train worker. What differs between those (rank, world size, device, DDP wrapping, where
checkpoints go) is passed in as a `TrainContext` and a `Reporter`.

    from nanogpt.config import load_config
    from nanogpt.checkpoint import LocalReporter
    from nanogpt.train import TrainContext, resolve_device, train

    cfg = load_config("shakespeare_char_cpu", ["--train.max_iters=200"], search_dirs=["pipelines/configs"])
    ctx = TrainContext(device=resolve_device(cfg.train.device))
    result = train(cfg, "data/shakespeare_char", ctx, LocalReporter("out/run", cfg.run.num_to_keep))

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

import contextlib
import functools
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt import shards
from nanogpt.batches import TokenWindows, global_micro_batch, to_device
from nanogpt.checkpoint import (  # noqa: F401  (LocalReporter, latest_checkpoint: the plain process's Reporter)
    Checkpoint,
    LocalReporter,
    build_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from nanogpt.config import Config, ConfigError, OptimConfig
from nanogpt.metrics import bits_per_byte, perplexity
from nanogpt.model import GPT, GPTConfig
from nanogpt.sampling import sample_text
from nanogpt.tokenizers import TokenizerError, token_byte_lengths, tokenizer_from_dict
from nanogpt.tracking import RUN_ID_KEY, NullTracker, Tracker

log = logging.getLogger(__name__)

# The architecture fields a resumed run must agree on with its checkpoint (dropout and init_from may change).
ARCHITECTURE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm was NaN/inf; raised before the optimizer update, naming the step."""


@dataclass
class TrainContext:
    """Where this copy of the loop runs. A plain process: the defaults, with `device=resolve_device(...)`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    """Resolved, e.g. "cuda:0" (see resolve_device)."""
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    """E.g. Ray's prepare_model. None: DistributedDataParallel when world_size > 1, else no wrapping. When
    world_size > 1 the caller has initialized torch.distributed (Ray Train and torchrun do)."""


class Reporter(Protocol):
    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Called by EVERY rank at the same steps (in Ray it is a barrier); rank 0 passes the checkpoint directory
        it just wrote (the reporter takes it over: train() deletes it after report returns), the others None."""
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


# ------------------------------------------------------------------------------------------ pure pieces


def lr_at(step: int, optim: OptimConfig) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not optim.decay_lr:
        return optim.learning_rate
    # 1) linear warmup for warmup_iters steps ((it+1)/(warmup+1): the first update already has a non-zero lr)
    if step < optim.warmup_iters:
        return optim.learning_rate * (step + 1) / (optim.warmup_iters + 1)
    # 2) if it > lr_decay_iters, return min learning rate
    if step > optim.lr_decay_iters:
        return optim.min_lr
    # 3) in between, use cosine decay down to min learning rate
    decay_ratio = (step - optim.warmup_iters) / (optim.lr_decay_iters - optim.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # coeff ranges 0..1
    return optim.min_lr + coeff * (optim.learning_rate - optim.min_lr)


def micro_steps_per_rank(gradient_accumulation_steps: int, world_size: int) -> int:
    """Micro-batches each rank runs per optimizer step, so that the step's total stays the same on any world size."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if gradient_accumulation_steps % world_size:
        valid = [n for n in range(1, gradient_accumulation_steps + 1) if gradient_accumulation_steps % n == 0]
        raise ConfigError(
            f"train.gradient_accumulation_steps={gradient_accumulation_steps} (micro-batches per optimizer step, "
            f"summed over workers) is not divisible by the {world_size} workers; use a worker count that divides it "
            f"({', '.join(map(str, valid))}) or a multiple of {world_size} as gradient_accumulation_steps"
        )
    return gradient_accumulation_steps // world_size


def resolve_device(device: str) -> str:
    """"auto" -> cuda if available, else mps, else cpu. Asking for an absent accelerator is a ConfigError."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={device} but CUDA is not available; use --train.device=cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={device} but MPS is not available; use --train.device=cpu or auto")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """"auto" -> bfloat16 on a CUDA GPU that supports it, float16 on an older one, float32 elsewhere.
    float16 needs CUDA (its GradScaler); on any other device it is a ConfigError."""
    kind = torch.device(device).type
    if dtype == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "float16" and kind != "cuda":
        raise ConfigError(
            f"train.dtype=float16 needs a CUDA device (loss scaling with GradScaler), not {device}; "
            "use --train.dtype=float32 or bfloat16"
        )
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ConfigError(f"train.dtype must be auto, float32, bfloat16 or float16; got {dtype!r}") from None


def padded_vocab_size(vocab_size: int, multiple: int = 64) -> int:
    """Round up to a multiple of 64 (50257 -> 50304): faster matmuls, the extra logits are never targets."""
    return -(-vocab_size // multiple) * multiple


def default_vocab_size(manifest: shards.Manifest) -> int:
    """model.vocab_size=null: nanoGPT's choice. GPT-2 BPE is padded to 50304; a char vocabulary (its meta.pkl) is
    used as is, so the shakespeare_char recipes reproduce nanoGPT's numbers."""
    if manifest.tokenizer.get("name") == "char":
        return manifest.vocab_size
    return padded_vocab_size(manifest.vocab_size)


def dropout_seed(seed: int, step: int, g: int) -> int:
    """The torch seed for micro-batch g of step `step` (a different stream from the data's, same inputs)."""
    return int(np.random.SeedSequence([seed % 2**63, step, g, 1]).generate_state(1, np.uint64)[0])


# ------------------------------------------------------------------------------------------ the loop


def train(
    config: Config,
    data_dir: str,
    ctx: TrainContext,
    reporter: Reporter,
    tracker: Tracker | None = None,
    resume_from: str | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train (or, with train.eval_only, evaluate) per `config` on the token shards in `data_dir`.

    `resume_from`: a checkpoint directory to continue from (model.init_from=resume is resolved by the caller).
    `on_step(step, metrics)`: called on every rank after each update (or skipped step); keep it cheap.
    Raises ConfigError / shards.ShardError / CheckpointError before step 0, NonFiniteError at a bad step.
    """
    tc, oc = config.train, config.optim
    main = ctx.rank == 0
    tracker = tracker if (tracker is not None and main) else NullTracker()  # rank 0 records; others stay quiet
    device = resolve_device(ctx.device)
    device_type = torch.device(device).type
    dtype = resolve_dtype(tc.dtype, device)
    micro_steps = micro_steps_per_rank(tc.gradient_accumulation_steps, ctx.world_size)

    # data: checked before anything is built (a damaged shard names itself here, not at step 1234). Hashing
    # every byte once per machine is enough: the other ranks check headers, sizes and token counts.
    manifest = shards.verify(data_dir, check_hashes=ctx.local_rank == 0)
    checkpoint = load_checkpoint(resume_from, map_location="cpu") if resume_from else None
    model = _build_model(config, manifest, checkpoint)
    block_size = model.config.block_size
    train_windows = TokenWindows(shards.load_split(data_dir, "train"), block_size)
    val_windows = TokenWindows(shards.load_split(data_dir, "val"), block_size)
    tokens_per_step = tc.batch_size * block_size * tc.gradient_accumulation_steps

    if device_type == "cuda":
        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))
        torch.backends.cuda.matmul.allow_tf32 = True  # allow tf32 on matmul
        torch.backends.cudnn.allow_tf32 = True  # allow tf32 on cudnn
    model.to(device)
    # GradScaler only for float16: bfloat16 has float32's exponent range and needs no loss scaling
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == torch.float16))
    optimizer = model.configure_optimizers(oc.weight_decay, oc.learning_rate, (oc.beta1, oc.beta2), device_type)
    start_step, best_val_loss = 0, math.inf
    if checkpoint is not None:
        if checkpoint.optimizer_state is not None:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        else:
            log.warning("%s has no optimizer state: AdamW starts from zero moments", checkpoint.path)
        if scaler.is_enabled() and checkpoint.scaler_state:
            scaler.load_state_dict(checkpoint.scaler_state)
        start_step, best_val_loss = checkpoint.step, checkpoint.best_val_loss
        if main:
            log.info("resuming from %s at step %d (best val loss %.4f)", checkpoint.path, start_step, best_val_loss)
    raw_model = model
    if tc.compile:
        if main:
            log.info("compiling the model... (takes a ~minute)")
        model = torch.compile(model)
    eval_model = model  # evaluated without the DDP wrapper: ranks may run different numbers of eval batches
    if ctx.wrap_model is not None:
        model = ctx.wrap_model(model)
    elif ctx.world_size > 1:
        model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == "cuda" else None)

    autocast = torch.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    # MFU against the peak of what the matmuls run on: tensor-core TF32 for float32 on CUDA (enabled above)
    mfu_dtype = "tf32" if dtype == torch.float32 else dtype
    # Bits per byte need the tokenizer (the UTF-8 bytes of the evaluated val targets). A worker that cannot load it
    # (GPT-2 BPE with no tiktoken files) still trains: val_bpb is left out, with a warning.
    try:
        tokenizer = tokenizer_from_dict(manifest.tokenizer)
        byte_lengths = token_byte_lengths(tokenizer)
    except TokenizerError as e:
        if tc.sample_tokens > 0:
            raise
        log.warning("no val_bpb: %s", e)
        tokenizer = byte_lengths = None
    if main:
        log.info(
            "tokens per iteration will be: %s (%d workers x %d micro-steps x %d x %d)",
            f"{tokens_per_step:,}", ctx.world_size, micro_steps, tc.batch_size, block_size,
        )
        if checkpoint is None:
            tracker.log_params(config.to_flat())
        tracker.set_tags({
            "num_params": raw_model.get_num_params(), "world_size": ctx.world_size, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "tokens_per_step": tokens_per_step,
            "micro_steps_per_rank": micro_steps,
        })

    def evaluate() -> tuple[float, float, float]:
        """(val_loss, train_loss, val_bpb or None) over the fixed eval windows, this rank's share, (sum, count) all-reduced."""
        model.eval()
        num_windows = tc.eval_iters * tc.batch_size
        # val sum, val count, train sum, train count, val target bytes
        totals = torch.zeros(5, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i, windows in enumerate((val_windows, train_windows)):
                for x, y in windows.eval_batches(num_windows, tc.batch_size, ctx.rank, ctx.world_size):
                    if i == 0 and byte_lengths is not None:
                        totals[4] += float(byte_lengths[y].sum())
                    x, y = to_device(x, y, device)
                    with autocast:
                        _, loss = eval_model(x, y)
                    # the loss is a mean over the batch's B*T targets, all windows T long: B * loss sums the windows'
                    totals[2 * i] += loss.double() * x.size(0)
                    totals[2 * i + 1] += x.size(0)
        _all_reduce_sum(totals, ctx)
        model.train()
        val_sum, val_count, train_sum, train_count, val_bytes = totals.tolist()
        val_loss = val_sum / val_count
        val_bpb = bits_per_byte(val_loss, int(val_count) * block_size, int(val_bytes)) if val_bytes else None
        return val_loss, train_sum / train_count, val_bpb

    step = start_step
    resumed = checkpoint is not None
    losses: list[float] = []
    val_loss = train_loss = None
    val_loss_step = None
    if checkpoint is not None:  # reports before the next eval carry the checkpoint's last val loss
        val_loss, val_loss_step = checkpoint.extra.get("val_loss"), checkpoint.extra.get("val_loss_step")
    last_loss: float | None = None
    num_skipped = 0
    interval_time, interval_steps = 0.0, 0
    total_time, total_steps = 0.0, 0
    model.train()

    while True:
        # ---- evaluate, checkpoint and report the weights after `step` updates (nanoGPT's order: before the update)
        is_last = step >= tc.max_iters
        do_eval = tc.eval_only or (
            (step % tc.eval_interval == 0 or is_last) and not (resumed and step == start_step)  # done before saving
        )
        improved = False
        if do_eval:
            val_loss, train_loss, val_bpb = evaluate()
            val_loss_step = step
            improved = val_loss < best_val_loss
            best_val_loss = min(best_val_loss, val_loss)  # never overwritten by a worse value (unlike nanoGPT)
            if main:
                log.info("step %d: train loss %.4f, val loss %.4f", step, train_loss, val_loss)
                eval_metrics = {
                    "val_loss": val_loss, "train_loss": train_loss, "val_perplexity": perplexity(val_loss),
                    "best_val_loss": best_val_loss, "tokens": step * tokens_per_step,
                }
                if val_bpb is not None:
                    eval_metrics["val_bpb"] = val_bpb
                tracker.log_metrics(eval_metrics, step)
                if tc.sample_tokens > 0:
                    text = sample_text(raw_model, tokenizer, "", tc.sample_tokens, seed=tc.seed, device=device, dtype=dtype)[0]
                    tracker.log_text(text, f"samples/step_{step:06d}.txt")
        if tc.checkpoint_interval > 0:
            do_save = step > start_step and (step % tc.checkpoint_interval == 0 or is_last)
        else:
            do_save = do_eval and step > start_step and (tc.always_save_checkpoint or improved)
        do_save = do_save and not tc.eval_only
        if do_eval or do_save:
            metrics = {"step": step, "best_val_loss": best_val_loss, "tokens": step * tokens_per_step}
            if val_loss is not None:
                metrics.update(val_loss=val_loss, val_loss_step=val_loss_step)
            if last_loss is not None:
                metrics["loss"] = last_loss
            _report(
                reporter, metrics, ctx, do_save,
                functools.partial(
                    save_checkpoint, model=raw_model, optimizer=optimizer, scaler=scaler, step=step,
                    best_val_loss=best_val_loss, config=config, tokenizer=manifest.tokenizer,
                    manifest_json=manifest.to_json(), world_size=ctx.world_size,
                    tokens_seen=step * tokens_per_step,
                    # read at every save: a tracker that was unreachable at the start may have its run by now
                    extra={"val_loss": val_loss, "val_loss_step": val_loss_step, RUN_ID_KEY: tracker.run_id},
                ),
            )
        if tc.eval_only or is_last:
            break

        # ---- one optimizer update: micro_steps micro-batches on this rank, the gradients averaged by DDP
        t0 = time.perf_counter()
        lr = lr_at(step, oc)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        first = global_micro_batch(ctx.rank, 0, micro_steps)
        x, y = to_device(*train_windows.train_batch(tc.seed, step, first, tc.batch_size), device)
        for micro_step in range(micro_steps):
            g = global_micro_batch(ctx.rank, micro_step, micro_steps)
            # Dropout draws from torch's global RNG. Reseeding it from (seed, step, g) makes the masks a function of
            # where the loop is: a resumed run draws exactly the uninterrupted run's masks with no RNG state in
            # the checkpoint, and micro-batch g gets the same masks whatever the number of workers.
            torch.manual_seed(dropout_seed(tc.seed, step, g))
            # only the last micro-step all-reduces the gradients (DDP); the others just accumulate them locally
            last = micro_step == micro_steps - 1
            sync = model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext()
            with sync:
                with autocast:
                    _, loss = model(x, y)
                    scaled = loss / micro_steps  # scale the loss to account for gradient accumulation
                if not last:  # fetch the next micro-batch while the forward pass runs on the GPU (nanoGPT)
                    x, y = to_device(*train_windows.train_batch(tc.seed, step, g + 1, tc.batch_size), device)
                scaler.scale(scaled).backward()
            loss_sum += loss.detach().float()
        scaler.unscale_(optimizer)  # a no-op without float16; clipping and the norm need true gradients
        if oc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), oc.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        # One small all-reduce per step: the loss averaged over ranks, and whether any rank saw a non-finite value,
        # so every rank skips or stops at the same step (a rank leaving alone would hang the others in DDP).
        # With float16, inf gradients are the GradScaler's business (it skips the update and lowers the scale).
        bad = ~torch.isfinite(loss_sum)
        if not scaler.is_enabled():
            bad = bad | ~torch.isfinite(grad_norm)
        stats = torch.stack([loss_sum / micro_steps, bad.float(), grad_norm.float()])
        _all_reduce_sum(stats, ctx)
        step_loss, num_bad, norm = stats.tolist()
        step_loss /= ctx.world_size
        norm /= ctx.world_size  # the same on every rank (the gradients are all-reduced)
        step_metrics = {"loss": step_loss, "lr": lr, "grad_norm": norm}
        if num_bad > 0:
            num_skipped += 1
            optimizer.zero_grad(set_to_none=True)
            scaler.update()  # float16: a NaN/inf gradient lowers the loss scale
            if num_skipped > tc.max_nonfinite_skips:
                raise NonFiniteError(
                    f"step {step}: non-finite loss {step_loss} or gradient norm {norm}; stopped before the optimizer "
                    f"update (the weights are those after {step} updates). train.max_nonfinite_skips="
                    f"{tc.max_nonfinite_skips} lets a run skip such steps; lower optim.learning_rate or use bfloat16 "
                    "if it keeps happening"
                )
            if main:
                log.warning(
                    "step %d: non-finite loss %s or gradient norm %s: update skipped (%d of %d allowed)",
                    step, step_loss, norm, num_skipped, tc.max_nonfinite_skips,
                )
            losses.append(math.nan)
            step_metrics["skipped"] = 1.0
        else:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)  # flush the gradients as soon as we can, no need for this memory
            losses.append(step_loss)
            last_loss = step_loss
        dt = time.perf_counter() - t0
        interval_time += dt
        interval_steps += 1
        if step > start_step:  # the first step of a call pays for warm-up (and compilation)
            total_time += dt
            total_steps += 1

        if step % tc.log_interval == 0 and main:
            step_time = interval_time / interval_steps
            tokens_per_s = tokens_per_step / step_time
            mfu = raw_model.estimate_mfu(tc.batch_size * micro_steps, step_time, device=device, dtype=mfu_dtype)
            mfu_text = "n/a" if mfu is None else f"{mfu * 100:.2f}%"
            log.info("iter %d: loss %.4f, time %.2fms, mfu %s", step, step_loss, step_time * 1000, mfu_text)
            log_metrics = {**step_metrics, "step_time_ms": step_time * 1000, "tokens_per_s": tokens_per_s}
            if mfu is not None:
                log_metrics["mfu"] = mfu
            tracker.log_metrics(log_metrics, step)
            interval_time, interval_steps = 0.0, 0
        if on_step is not None:
            on_step(step, {**step_metrics, "step_time_ms": dt * 1000})
        step += 1

    return TrainResult(
        step=step,
        start_step=start_step,
        best_val_loss=best_val_loss,
        val_loss=val_loss,
        train_loss=train_loss,
        losses=losses,
        tokens_per_s=tokens_per_step * total_steps / total_time if total_time > 0 else None,
        num_skipped=num_skipped,
    )


# ------------------------------------------------------------------------------------------ helpers


def _build_model(config: Config, manifest: shards.Manifest, checkpoint: Checkpoint | None) -> GPT:
    """The model to train, on the CPU: from the checkpoint, from scratch, or from GPT-2 weights."""
    mc = config.model
    if checkpoint is not None:
        _check_same_architecture(config, checkpoint)
        if checkpoint.tokenizer is not None and checkpoint.tokenizer != manifest.tokenizer:
            raise ConfigError(
                f"checkpoint {checkpoint.path} was trained on tokens of a different tokenizer "
                f"({_describe_tokenizer(checkpoint.tokenizer)}) than this dataset's "
                f"({_describe_tokenizer(manifest.tokenizer)}); its token ids would mean other text"
            )
        model = build_model(checkpoint, dropout=mc.dropout)
    elif mc.init_from == "scratch":
        vocab_size = mc.vocab_size if mc.vocab_size is not None else default_vocab_size(manifest)
        torch.manual_seed(config.train.seed)  # the same initial weights on every rank (DDP broadcasts them anyway)
        model = GPT(GPTConfig(
            n_layer=mc.n_layer, n_head=mc.n_head, n_embd=mc.n_embd, block_size=mc.block_size,
            vocab_size=vocab_size, dropout=mc.dropout, bias=mc.bias,
        ))
    elif mc.init_from == "resume":
        raise ConfigError("model.init_from=resume needs a checkpoint: pass resume_from (the run's latest checkpoint)")
    else:  # gpt2, gpt2-medium, ... or a local Hugging Face directory
        log.info("initializing from OpenAI GPT-2 weights: %s", mc.init_from)
        model = GPT.from_pretrained(mc.init_from, dict(dropout=mc.dropout))
        if mc.block_size < model.config.block_size:
            model.crop_block_size(mc.block_size)  # model surgery: fewer learned positions
    if model.config.vocab_size < manifest.vocab_size:
        raise ConfigError(
            f"the model's vocabulary has {model.config.vocab_size} tokens but the dataset's tokenizer "
            f"({manifest.tokenizer.get('name')}) has {manifest.vocab_size}: set model.vocab_size >= "
            f"{manifest.vocab_size} (or null to use the dataset's: {default_vocab_size(manifest)})"
        )
    return model


def _check_same_architecture(config: Config, checkpoint: Checkpoint) -> None:
    saved, current = checkpoint.config.model, config.model
    diff = [f for f in ARCHITECTURE_FIELDS if getattr(saved, f) != getattr(current, f)]
    if diff:
        was = ", ".join(f"model.{f}={getattr(saved, f)}" for f in diff)
        now = ", ".join(f"model.{f}={getattr(current, f)}" for f in diff)
        raise ConfigError(
            f"checkpoint {checkpoint.path} was trained with {was} but this config has {now}; resume with the "
            "checkpoint's model settings, or start a new run"
        )


def _describe_tokenizer(d: dict) -> str:
    return f"{d.get('name')}, {d.get('vocab_size')} tokens"


def _report(reporter: Reporter, metrics: dict, ctx: TrainContext, save: bool, write: Callable[[Path], Path]) -> None:
    """Rank 0 writes the checkpoint (when `save`) into a fresh temporary directory and hands it to the reporter;
    every rank reports, so a reporter that is a barrier (Ray) sees all of them at the same step."""
    if not (save and ctx.rank == 0):
        reporter.report(metrics, None)
        return
    tmp_root = Path(tempfile.mkdtemp(prefix="nanogpt-ckpt-"))
    try:
        ckpt_dir = write(tmp_root / f"checkpoint_{int(metrics['step']):06d}")
        reporter.report(metrics, str(ckpt_dir))
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def _all_reduce_sum(tensor: torch.Tensor, ctx: TrainContext) -> None:
    if ctx.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
