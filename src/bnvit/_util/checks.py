"""Argument checks shared by the public API: one-line `ValueError` / `TypeError`, never `assert`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn


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
    """One line on how state dict `given` differs from `expected`, or None; keys starting with `ignore` skipped.

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
    """The first line of an error's message (or its type's name), for one-line reports.

    Examples:
        >>> first_line(ValueError("bad file\\nlong advice"))
        'bad file'
        >>> first_line(KeyError())
        'KeyError'
    """
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def non_negative_float(name: str, value: Any) -> float:
    """Return `value` as a float if it is a finite number >= 0; raise otherwise.

    Examples:
        >>> non_negative_float("weight_decay", 0.05)
        0.05
        >>> non_negative_float("weight_decay", float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: weight_decay must be a finite number >= 0, got nan
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number >= 0, got {value!r} ({type(value).__name__})")
    if not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


# ----------------------------------------------------------------------------- weights and training set-ups


def check_bn_statistics(weights: Mapping[str, Any] | nn.Module, source: str) -> None:
    """Refuse BatchNorm running statistics no BatchNorm can hold (non-finite, or a negative variance).

    Args:
        weights: A state dict or a module.
        source: What the weights are, for the message.

    Raises:
        ValueError: One line naming `source` and the offending tensors.

    Examples:
        >>> check_bn_statistics({"bn.running_var": torch.ones(3)}, "model.pt")
        >>> check_bn_statistics({"bn.running_var": torch.tensor([1.0, -2.0])}, "model.pt")
        Traceback (most recent call last):
        ...
        ValueError: model.pt holds impossible BatchNorm statistics: bn.running_var has 1 negative value (min -2); \
a running variance is finite and >= 0, a running mean finite: the weights are damaged or were edited
    """
    items = weights.named_buffers() if isinstance(weights, nn.Module) else weights.items()
    problems = []
    for name, value in items:
        leaf = name.rpartition(".")[2]
        if leaf not in ("running_var", "running_mean") or not isinstance(value, torch.Tensor):
            continue
        if not value.is_floating_point() or value.numel() == 0:
            continue
        value = value.detach()
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            problems.append(f"{name} has {bad} non-finite value{'s' * (bad > 1)}")
        elif leaf == "running_var" and bool((value < 0).any()):
            negative = int((value < 0).sum())
            problems.append(f"{name} has {negative} negative value{'s' * (negative > 1)} (min {float(value.min()):g})")
    if problems:
        more = f"; and {len(problems) - 2} more tensors" if len(problems) > 2 else ""
        raise ValueError(
            f"{source} holds impossible BatchNorm statistics: {'; '.join(problems[:2])}{more}; a running variance is "
            "finite and >= 0, a running mean finite: the weights are damaged or were edited"
        )


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of `model` that training would change; raise if there are none.

    Examples:
        >>> trainable_parameters(nn.Linear(2, 2).requires_grad_(False))
        Traceback (most recent call last):
        ...
        ValueError: the model has 2 parameter tensors and every one is frozen (requires_grad=False): \
there is nothing to train; unfreeze some with param.requires_grad_(True)
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters: there is nothing to train")
    if not trainable:
        raise ValueError(
            f"the model has {len(params)} parameter tensors and every one is frozen (requires_grad=False): there is "
            "nothing to train; unfreeze some with param.requires_grad_(True)"
        )
    return trainable


def finite_hyperparameters(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Return `optimizer` if every number in its parameter groups is finite; refused before any step.

    Examples:
        >>> opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=float("inf"))
        >>> finite_hyperparameters(opt)
        Traceback (most recent call last):
        ...
        ValueError: the optimizer's lr is inf (parameter group 0); every hyperparameter must be a finite number
    """
    for index, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key == "params":
                continue
            for number in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(number, torch.Tensor) and number.numel() == 1:
                    number = number.item()
                if isinstance(number, Real) and not isinstance(number, bool) and not math.isfinite(number):
                    raise ValueError(
                        f"the optimizer's {key} is {value!r} (parameter group {index}); every hyperparameter must be "
                        "a finite number"
                    )
    return optimizer
