"""The one typed loader (nanogpt/typed_loader.py): training configs and sweep files are read by it alike."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanogpt.config import ConfigError, TrainConfig
from nanogpt.typed_loader import checked, integer_at_least, load_fields, one_of, optional
from pipelines.sweep.spec import BatchRule, Scheduler, parse_sweep

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Job:
    name: str = checked(one_of(("a", "b")))
    workers: int | None = checked(optional(integer_at_least(1)), None)
    rate: float = 0.5
    shards: tuple = ()


def test_fields_are_checked_by_their_own_check_or_their_type():
    assert load_fields(Job, {"name": "a", "rate": 1, "workers": 2}) == Job("a", 2, 1.0)
    assert load_fields(Job, {"name": "b", "rate": "1e-3"}).rate == 1e-3  # YAML 1.1 reads 1e-3 as a string
    cases = [
        ({"name": "c"}, "job.yaml: name='c' must be one of a, b"),
        ({}, "job.yaml: name=None must be one of a, b"),  # required and absent: its check names it
        ({"name": "a", "workers": 0}, "job.yaml: workers=0 must be an integer >= 1"),
        ({"name": "a", "rate": "fast"}, "job.yaml: rate must be float, got 'fast' (str)"),
        ({"name": "a", "rate": float("nan")}, "job.yaml: rate must be a finite number, got nan"),
        ({"name": "a", "rat": 1}, "job.yaml: unknown key 'rat'; did you mean 'rate'? (known: name, workers, rate, shards)"),
        (["name"], "job.yaml: must be a mapping of name, workers, rate, shards; got ['name'] (list)"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError) as e:
            load_fields(Job, data, "job.yaml")
        assert str(e.value) == message


def test_an_instance_keeps_what_the_data_leaves_out():
    base = TrainConfig(batch_size=4, max_iters=10)
    got = load_fields(base, {"max_iters": 20}, "cli", prefix="train.", noun="config key")
    assert (got.batch_size, got.max_iters) == (4, 20)
    with pytest.raises(ConfigError, match=r"^cli: train.batch_size must be positive, got 0$"):  # __post_init__'s
        load_fields(base, {"batch_size": 0}, "cli", prefix="train.", noun="config key")
    with pytest.raises(ConfigError, match=r"^cli: unknown config key 'train.max_iter'; did you mean 'train.max_iters'\?"):
        load_fields(base, {"max_iter": 3}, "cli", prefix="train.", noun="config key")


def test_sweep_parts_are_dataclasses_the_loader_builds():
    spec = parse_sweep({"base": "debug", "search": {"optim.learning_rate": {"values": [1e-3]}},
                        "scheduler": {"name": "asha", "grace_period": 5},
                        "batch": {"keep": "token_budget", "token_budget": 4096}})
    assert spec.scheduler == load_fields(Scheduler, {"name": "asha", "grace_period": 5})
    assert spec.batch == BatchRule("token_budget", token_budget=4096) and spec.batch.amount == 4096
    with pytest.raises(ConfigError, match=r"scheduler \(fifo\): unknown key 'time_attr' \(known: name\)"):
        parse_sweep({"base": "debug", "search": {"optim.learning_rate": {"values": [1e-3]}},
                     "scheduler": {"name": "fifo", "time_attr": "step"}})


def test_only_the_loader_matches_keys_and_reads_type_hints():
    """One typed loader: no other module suggests the nearest key (difflib) or checks values against the fields'
    type hints (typing.get_type_hints); sweep files used to have a loader of their own."""
    loader = ROOT / "nanogpt" / "typed_loader.py"
    offenders = [
        str(path.relative_to(ROOT)) for path in sorted([*ROOT.glob("nanogpt/**/*.py"), *ROOT.glob("pipelines/**/*.py")])
        if path != loader and re.search(r"\bdifflib\b|get_type_hints|get_close_matches", path.read_text())
    ]
    assert offenders == []
