"""The names of bnvit's registered models: one scheme, `<family>_<size>`, and the old names kept as aliases.

| family | what it builds |
|---|---|
| `vitln`, `vitbnffn`, `vitbn` | bnvit's `ViT` (the article's layout): LayerNorm, BatchNorm FFN, BatchNorm only |
| `timmvitln`, `timmvitbnffn` | timm's `VisionTransformer` with timm's `Block` / `bnvit.BNFFNBlock` |
| `dnn`, `dnnbn` | the article's MLPs, without and with BatchNorm |

| size | input |
|---|---|
| `mnist` | 1x28x28, patch 7: the article's configuration |
| `cifar` | 3x32x32, patch 4 |
| `ti16_224`, `s16_224`, `b16_224` | 3x224x224, patch 16, ViT-Ti/S/B widths in bnvit's layout |

timm's own ViT and DeiT sizes with the BatchNorm FFN follow timm's scheme instead, the variant
between the patch and the resolution as in timm's `vit_base_patch16_gap_224`:
`{vit,deit}_{tiny,small,base}_patch16_bnffn_224` is timm's `VisionTransformer` with
`bnvit.BNFFNBlock`, loading the LayerNorm weights of `{vit,deit}_*_patch16_224`. A `patch16`
in a name means timm's layout; bnvit's layout never uses it.

Names bnvit used before this scheme (`RENAMED`) stay registered through timm's own mechanism for
renamed models, `timm.models.register_model_deprecations`: `timm.create_model(old, ...)` builds
the current model with a warning naming it, a tag after the old name carries over
(`vit_mnist.bnvit_mnist`), and `timm.list_models` lists only the current names. bnvit's own
functions that take a model name (`bnvit.weights.hub.model_card`, `shipped_record`, ...) read an old name
as its current one (`current_name`).
"""

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
    """The current name of a model named `name`, tag kept: an old name mapped, any other name as given.

    Examples:
        >>> current_name("vit_mnist"), current_name("vit_mnist.bnvit_mnist"), current_name("vitbnffn_mnist")
        ('vitln_mnist', 'vitln_mnist.bnvit_mnist', 'vitbnffn_mnist')
    """
    arch, dot, tag = name.partition(".")
    return RENAMED.get(arch, arch) + dot + tag


def registered_names() -> list[str]:
    """The current names of bnvit's registered models, as `timm.list_models` orders them (old names not included).

    Examples:
        >>> names = registered_names()
        >>> "vitln_mnist" in names, "vit_mnist" in names, "resnet18" in names
        (True, False, False)
    """
    return [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("bnvit.")]


def check_name(name: str) -> str:
    """`name`'s current name (an old name mapped, a tag kept), or a one-line error listing the current names.

    Raises:
        ValueError: If `name` is not one of bnvit's registered models, current or old.

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
    """Register with timm the old names of the models the module `module_name` defines (call it at its end).

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
