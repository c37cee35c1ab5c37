"""When the loop does what: the learning rate at a step, and whether a step is evaluated or checkpointed.

Pure functions of the step and the config, so each is table-tested (tests/test_schedule.py) like torchtitan's
scheduler. `step` counts optimizer updates: the decisions at step s are about the weights after s updates.
"""

from __future__ import annotations

import math

from nanogpt.config import OptimConfig, TrainConfig


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


def should_eval(step: int, train: TrainConfig, start_step: int = 0, resumed: bool = False) -> bool:
    """Every eval_interval steps (step 0 included, as nanoGPT) and at max_iters; always with eval_only. A resumed
    run does not redo the eval of the step it resumed at: the checkpoint was saved right after it."""
    if train.eval_only:
        return True
    if resumed and step == start_step:
        return False
    return step % train.eval_interval == 0 or step >= train.max_iters


def should_save(step: int, train: TrainConfig, start_step: int = 0, evaluated: bool = False,
                improved: bool = False) -> bool:
    """Whether to checkpoint the weights after `step` updates. Never the starting point of this call (nothing
    new to save) and never with eval_only. With checkpoint_interval, every that many steps and at max_iters;
    otherwise at each eval (always_save_checkpoint) or at the evals that improved the best val loss."""
    if train.eval_only or step <= start_step:
        return False
    if train.checkpoint_interval > 0:
        return step % train.checkpoint_interval == 0 or step >= train.max_iters
    return evaluated and (train.always_save_checkpoint or improved)
