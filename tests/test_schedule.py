"""lr_at, should_eval and should_save checked step by step against values worked out by hand (torchtitan's test_lr_scheduler style).

Schedule under test: learning_rate 1.0, min_lr 0.1, warmup_iters 4, lr_decay_iters 8.
  warmup (nanoGPT's (it+1)/(warmup+1)):  step 0..3 -> 1/5, 2/5, 3/5, 4/5
  cosine, decay_ratio = (step-4)/4:       step 4 -> 1.0 (ratio 0), 5 -> 0.1 + 0.9*(1+cos(pi/4))/2,
                                          6 -> 0.1 + 0.9*0.5 = 0.55, 7 -> 0.1 + 0.9*(1-cos(pi/4))/2, 8 -> 0.1
  after lr_decay_iters:                   min_lr
"""

import math

import pytest

from nanogpt.config import OptimConfig, TrainConfig
from nanogpt.train.schedule import lr_at, should_eval, should_save

C = math.cos(math.pi / 4)  # sqrt(2)/2
SCHEDULE = OptimConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=4, lr_decay_iters=8)
EXPECTED = [
    0.2, 0.4, 0.6, 0.8,        # warmup: (step + 1) / 5
    1.0,                        # end of warmup: the peak
    0.1 + 0.45 * (1 + C),       # 0.7682...
    0.55,                       # middle of the decay: halfway between peak and min_lr
    0.1 + 0.45 * (1 - C),       # 0.2318...
    0.1,                        # lr_decay_iters: min_lr
    0.1, 0.1, 0.1,              # after: min_lr
]


@pytest.mark.parametrize("step,expected", list(enumerate(EXPECTED)))
def test_lr_at_every_step(step, expected):
    assert lr_at(step, SCHEDULE) == pytest.approx(expected, rel=1e-12)


def test_lr_far_after_decay_is_min_lr():
    assert lr_at(10**6, SCHEDULE) == 0.1


def test_no_warmup_starts_at_peak():
    optim = OptimConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=0, lr_decay_iters=2)
    assert [lr_at(s, optim) for s in range(4)] == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_decay_lr_false_is_constant():
    optim = OptimConfig(learning_rate=3e-4, min_lr=1e-5, warmup_iters=4, lr_decay_iters=8, decay_lr=False)
    assert [lr_at(s, optim) for s in range(12)] == [3e-4] * 12


def test_nanogpt_shakespeare_char_values():
    # nanoGPT's train_shakespeare_char: lr 1e-3, warmup 100, decay to 1e-4 at 5000
    optim = OptimConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=5000)
    assert lr_at(0, optim) == pytest.approx(1e-3 / 101)
    assert lr_at(99, optim) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, optim) == pytest.approx(1e-3)
    assert lr_at(2550, optim) == pytest.approx(0.55e-3)
    assert lr_at(5000, optim) == pytest.approx(1e-4)
    assert lr_at(5001, optim) == 1e-4


# ------------------------------------------------------------------------------------------ eval and save steps
# max_iters 10, eval_interval 4: nanoGPT evaluates at 0, 4, 8 and (ours) at the end, 10.

EVERY_4 = TrainConfig(max_iters=10, eval_interval=4)


@pytest.mark.parametrize("step,start,resumed,expected", [
    (0, 0, False, True),     # step 0 is evaluated, as nanoGPT does
    (1, 0, False, False),
    (4, 0, False, True),
    (8, 0, False, True),
    (9, 0, False, False),
    (10, 0, False, True),    # max_iters, not a multiple of eval_interval: the final eval
    (4, 4, True, False),     # resumed at 4: evaluated (and saved) just before the checkpoint was written
    (8, 4, True, True),
    (0, 0, True, False),     # resumed from a step-0 checkpoint: same rule
])
def test_should_eval(step, start, resumed, expected):
    assert should_eval(step, EVERY_4, start, resumed) is expected


def test_eval_only_evaluates_the_starting_point():
    assert should_eval(7, TrainConfig(eval_only=True), start_step=7, resumed=True)


@pytest.mark.parametrize("train,step,start,evaluated,improved,expected", [
    (EVERY_4, 0, 0, True, True, False),                    # the starting point: nothing new to save
    (EVERY_4, 4, 0, True, False, True),                    # always_save_checkpoint (the default): every eval
    (EVERY_4, 5, 0, False, False, False),                  # no eval, no checkpoint_interval
    (TrainConfig(max_iters=10, eval_interval=4, always_save_checkpoint=False), 4, 0, True, False, False),
    (TrainConfig(max_iters=10, eval_interval=4, always_save_checkpoint=False), 8, 0, True, True, True),
    (TrainConfig(max_iters=10, checkpoint_interval=3), 3, 0, False, False, True),   # interval, no eval needed
    (TrainConfig(max_iters=10, checkpoint_interval=3), 4, 0, True, True, False),    # an eval does not save
    (TrainConfig(max_iters=10, checkpoint_interval=3), 10, 0, True, False, True),   # max_iters always
    (TrainConfig(max_iters=10, checkpoint_interval=3), 3, 3, False, False, False),  # resumed at 3
    (TrainConfig(max_iters=10, eval_only=True), 4, 0, True, True, False),           # eval_only never saves
])
def test_should_save(train, step, start, evaluated, improved, expected):
    assert should_save(step, train, start, evaluated, improved) is expected
