"""Argument checks shared by the public API.

Every check raises `ValueError` (or `TypeError` for a value of the wrong kind) with a
message that names the argument, the value received and what would be valid. Nothing here
uses `assert`: user input is validated even under `python -O`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


def state_dict_mismatch(
    expected: Mapping[str, Any], given: Mapping[str, Any], *, ignore: str | None = None
) -> str | None:
    """One line naming how `given` (a checkpoint's state dict) differs from `expected` (a model's), or None.

    Names missing keys, unexpected keys and shape differences, the first few of each, instead of
    torch's multi-line `load_state_dict` report. Keys starting with `ignore` are not compared.

    Examples:
        >>> import torch
        >>> state_dict_mismatch({"w": torch.zeros(2, 3)}, {"w": torch.zeros(4, 3), "x": torch.zeros(1)})
        'unexpected key x; w: checkpoint (4, 3), model (2, 3)'
        >>> state_dict_mismatch({"w": torch.zeros(2)}, {"w": torch.ones(2)}) is None
        True
    """

    def kept(keys: Iterable[str]) -> list[str]:
        return [k for k in keys if ignore is None or not k.startswith(ignore)]

    missing = kept(k for k in expected if k not in given)
    unexpected = kept(k for k in given if k not in expected)
    shapes = [
        f"{k}: checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)}"
        for k in kept(expected)
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = [
        _listed("missing key", missing),
        _listed("unexpected key", unexpected),
        "; ".join(shapes[:3]) + (f"; {len(shapes) - 3} more shapes differ" if len(shapes) > 3 else ""),
    ]
    return "; ".join(p for p in parts if p) or None


def _listed(what: str, keys: list[str]) -> str:
    if not keys:
        return ""
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return f"{len(keys)} {what}s ({', '.join(keys[:3])}{more})" if len(keys) > 1 else f"{what} {keys[0]}"


def first_line(err: BaseException) -> str:
    """The first line of an error's message, or its type's name if it has none.

    For messages shown on one line: torch's unpickling errors, for one, append paragraphs of
    advice that do not apply.

    Examples:
        >>> first_line(ValueError("bad file\\nlong advice"))
        'bad file'
        >>> first_line(KeyError())
        'KeyError'
    """
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
