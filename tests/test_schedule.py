"""lr_at checked at every step against values worked out by hand (torchtitan's test_lr_scheduler style).

Schedule under test: learning_rate 1.0, min_lr 0.1, warmup_iters 4, lr_decay_iters 8.
  warmup (nanoGPT's (it+1)/(warmup+1)):  step 0..3 -> 1/5, 2/5, 3/5, 4/5
  cosine, decay_ratio = (step-4)/4:       step 4 -> 1.0 (ratio 0), 5 -> 0.1 + 0.9*(1+cos(pi/4))/2,
                                          6 -> 0.1 + 0.9*0.5 = 0.55, 7 -> 0.1 + 0.9*(1-cos(pi/4))/2, 8 -> 0.1
  after lr_decay_iters:                   min_lr
"""

import math

import pytest

from nanogpt.config import OptimConfig
from nanogpt.train import lr_at

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
