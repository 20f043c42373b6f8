"""Value checks for config dataclasses and user-facing keyword arguments.

Every check raises one kind of error with one sentence shape, naming the field and what is
allowed:

    ValueError: grad_accum must be an integer >= 1, got 0
    ValueError: top_p must be in (0, 1] (1 = off), got 1.5
    ValueError: config field 'dtype' must be one of ('bfloat16', 'float16', 'float32'), got 'int8'

`field` is the name as the user wrote it (a dataclass field, a keyword, or a label such as
"config field 'hidden_size'"); the command line shows the same words, since a flag's value
reaches the same dataclass. Booleans are never accepted as numbers, and numbers must be finite.

Left out: type coercion (a string "3" is not an integer here; argparse converts flags before
they arrive) and checks that relate several fields — those stay with the dataclass that owns
them, written with `require`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

__all__ = ["require", "check_int", "check_number", "check_choice", "check_bool", "is_int", "is_number"]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, field: str, allowed: str, value: Any) -> None:
    """Raise `ValueError("{field} must be {allowed}, got {value!r}")` unless `ok`."""
    if not ok:
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_fmt(high)}"
    return ""


def _within(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def check_int(field: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    """An int (not a bool) in [low, high] (either bound may be None)."""
    allowed = " ".join(p for p in ("an integer", _bounds(low, high, False, False)) if p)
    require(is_int(value) and _within(value, low, high, False, False), field, allowed, value)


def check_number(field: str, value: Any, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, note: str = "") -> None:
    """A finite number within the bounds (closed unless `low_open`/`high_open`); `note` adds a
    reason in parentheses."""
    bounds = _bounds(low, high, low_open, high_open)
    allowed = bounds if low is not None and high is not None else \
        " ".join(p for p in ("a number" if bounds else "a finite number", bounds) if p)
    if note:
        allowed += f" ({note})"
    require(is_number(value) and _within(value, low, high, low_open, high_open), field, allowed, value)


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    require(value in choices, field, f"one of {choices}", value)


def check_bool(field: str, value: Any) -> None:
    require(isinstance(value, bool), field, "true or false", value)
