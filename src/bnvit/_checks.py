"""Argument checks shared by the public API.

Every check raises `ValueError` (or `TypeError` for a value of the wrong kind) with a
message that names the argument, the value received and what would be valid. Nothing here
uses `assert`: user input is validated even under `python -O`.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any


def positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return `value` if it is an int >= `minimum`; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)


def positive_float(name: str, value: Any) -> float:
    """Return `value` as a float if it is a finite number > 0; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number > 0, got {value!r} ({type(value).__name__})")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def rate(name: str, value: Any) -> float:
    """Return `value` if it is a probability in [0, 1); raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r} ({type(value).__name__})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return `value` if it is one of `choices`; raise otherwise."""
    choices = tuple(choices)
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}; valid choices: {valid}")
    return value


def pair(name: str, value: Any) -> tuple[int, int]:
    """Return an (h, w) pair of positive ints from an int or a 2-sequence; raise otherwise."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
        return positive_int(f"{name}[0]", value[0]), positive_int(f"{name}[1]", value[1])
    size = positive_int(name, value)
    return size, size
