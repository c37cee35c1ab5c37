"""The one typed loader: plain data (a YAML mapping, command-line values) read into frozen dataclasses, so that a
training config (nanogpt/config.py) and a sweep file (pipelines/sweep/spec.py) fail the same way, in one line that
names where the value came from, the key, the nearest valid key, and the value with its type.

    train = load_fields(TrainConfig(), {"batch_size": 8}, "my.yaml", prefix="train.", noun="config key")
    scheduler = load_fields(Scheduler, {"name": "asha"}, "sweep file: scheduler (asha)")

Each value is checked by its field: by the field's own check when it declares one (`checked(...)`, e.g. one of
the stock checks at the end of this module, or one that turns a nested mapping into its dataclass), else by its
type hint (`typed_value`). Rules that tie several fields together stay in each dataclass's `__post_init__`,
raising ConfigError; the loader adds where the data came from. Nothing is exec'd or eval'd.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
Check = Callable[[Any, str], Any]
"""A field's own check: (value, key) -> the value to store, or ConfigError naming the key."""
_CHECK = "check"  # the field metadata entry that holds a Check


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message says which and why."""


def checked(check: Check, default: Any = dataclasses.MISSING,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose values `check` validates and converts, in place of its type hint."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_CHECK: check})


def load_fields(target: type[T] | T, data: Mapping[str, Any], where: str = "", *, prefix: str = "",
                known: Sequence[str] | None = None, noun: str = "key") -> T:
    """`target` (a dataclass; or an instance, whose fields missing from `data` are kept) with `data`'s values.

    Every key must be one of `known` (default: every field); keys are named `prefix + key` in errors. A field
    without a default that `data` lacks is checked as None, so its check says what is missing. Any ConfigError,
    from a check or from `__post_init__`, is raised again prefixed with `where`."""
    try:
        return _load(target, data, prefix, known, noun)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def _load(target: Any, data: Mapping[str, Any], prefix: str, known: Sequence[str] | None, noun: str) -> Any:
    cls = target if isinstance(target, type) else type(target)
    fields = dataclasses.fields(cls)
    names = list(known) if known is not None else [f.name for f in fields]
    if not isinstance(data, Mapping):
        raise ConfigError(f"must be a mapping of {', '.join(names)}; got {data!r} ({type(data).__name__})")
    check_known(data, names, noun, prefix)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields:
        if f.name in data:
            raw = data[f.name]
        elif cls is target and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raw = None  # required and absent: its check names it
        else:
            continue
        check = f.metadata.get(_CHECK)
        key = prefix + f.name
        values[f.name] = check(raw, key) if check is not None else typed_value(raw, hints[f.name], key)
    return cls(**values) if cls is target else dataclasses.replace(target, **values)


def check_known(keys: Iterable[Any], known: Sequence[str], noun: str = "key", prefix: str = "") -> None:
    """ConfigError naming the first of `keys` that is not in `known`, the nearest one that is, and all of them."""
    for key in keys:
        if key not in known:
            hint = nearest(str(key), known)
            raise ConfigError(f"unknown {noun} '{prefix}{key}'" + (f"; did you mean '{prefix}{hint}'?" if hint else "")
                              + f" (known: {', '.join(known)})")


def nearest(word: str, choices: Sequence[str]) -> str | None:
    """The choice closest to a misspelt `word`, if one is close enough to be what was meant."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def typed_value(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the type hint `tp` (int, float, bool, str, their unions with None): ints widen to
    floats, and '1e-3' is a float (YAML 1.1 reads it as a string); no number may be inf or nan."""
    allowed = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    if value is None and type(None) in allowed:
        return None
    for t in allowed:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), key)
        if t is float and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue
            return _finite(number, key)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"{key} must be {names}, got {value!r} ({type(value).__name__})")


def _finite(value: float, key: str) -> float:
    """No config number is meant to be inf or nan (a learning rate of nan would train nothing, silently)."""
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return value


# ------------------------------------------------------------------------------------------ stock checks
# For `checked(...)` fields; each names the key and the value as `key=value must be ...`.


def one_of(allowed: Sequence[str]) -> Check:
    def check(value: Any, key: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} must be one of {', '.join(allowed)}")
        return value
    return check


def integer_at_least(minimum: int) -> Check:
    def check(value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
        return value
    return check


def positive_number(value: Any, key: str) -> float:
    if not is_finite_number(value) or float(value) <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive finite number")
    return float(value)


def fraction(value: Any, key: str) -> float:
    if not is_finite_number(value) or not 0 <= float(value) <= 1:
        raise ConfigError(f"{key}={value!r} must be a number in [0, 1]")
    return float(value)


def optional(check: Check) -> Check:
    """`check`, with null allowed (and kept)."""
    return lambda value, key: None if value is None else check(value, key)


def is_finite_number(value: Any) -> bool:
    """A finite number, or a string of one (YAML 1.1 reads 1e-4 as a string); YAML's .nan and .inf are floats,
    and would pass every comparison check unnoticed."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
