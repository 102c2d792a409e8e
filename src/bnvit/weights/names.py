"""bnvit's model names, `<family>_<size>` (docs/timm.md, "Names"; `patch16` means timm's layout), old ones aliased."""

from __future__ import annotations

import sys

import timm
from timm.models import register_model_deprecations

__all__ = ["RENAMED", "check_name", "current_name", "register_renamed", "registered_names"]

RENAMED: dict[str, str] = {
    "vit_mnist": "vitln_mnist",
    "vit_cifar": "vitln_cifar",
    "timmvit_mnist": "timmvitln_mnist",
    "timmvit_bnffn_mnist": "timmvitbnffn_mnist",
    **{
        f"{family}_{size}_patch16_224": f"{family}_{short}16_224"
        for family in ("vitln", "vitbnffn", "vitbn")
        for size, short in (("tiny", "ti"), ("small", "s"), ("base", "b"))
    },
}
"""Old name -> current name, for every registered model bnvit has renamed."""


def current_name(name: str) -> str:
    """The current name of `name`, tag kept: an old name mapped, any other as given.

    Examples:
        >>> current_name("vit_mnist"), current_name("vit_mnist.bnvit_mnist"), current_name("vitbnffn_mnist")
        ('vitln_mnist', 'vitln_mnist.bnvit_mnist', 'vitbnffn_mnist')
    """
    arch, dot, tag = name.partition(".")
    return RENAMED.get(arch, arch) + dot + tag


def registered_names() -> list[str]:
    """The current names of bnvit's registered models, in `timm.list_models` order.

    Examples:
        >>> names = registered_names()
        >>> "vitln_mnist" in names, "vit_mnist" in names, "resnet18" in names
        (True, False, False)
    """
    return [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("bnvit.")]


def check_name(name: str) -> str:
    """`name`'s current name (tag kept), or a one-line `ValueError` listing the current names.

    Examples:
        >>> check_name("timmvit_bnffn_mnist")
        'timmvitbnffn_mnist'
        >>> check_name("vit_tiny_patch16_224")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown bnvit model 'vit_tiny_patch16_224'; bnvit's models are deit_base_patch16_bnffn_224, ...
    """
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a string, got {type(name).__name__}")
    current = current_name(name)
    names = registered_names()
    if current.partition(".")[0] not in names:
        raise ValueError(f"unknown bnvit model {name!r}; bnvit's models are {', '.join(names)}")
    return current


def register_renamed(module_name: str) -> None:
    """Register with timm the old names of the models `module_name` defines (call it at its end).

    Examples:
        >>> import timm, warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     model = timm.create_model("vit_mnist", depth=1)
        >>> model.pretrained_cfg["architecture"], str(caught[0].message)
        ('vitln_mnist', 'Mapping deprecated model name vit_mnist to current vitln_mnist.')
    """
    module = sys.modules[module_name]
    register_model_deprecations(module_name, {old: new for old, new in RENAMED.items() if hasattr(module, new)})
