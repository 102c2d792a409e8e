"""Run one of timm's scripts with bnvit's models registered: `python -m bnvit.timm.script SCRIPT [ARGS...]`.

timm's `train.py`, `validate.py`, `benchmark.py`, `onnx_export.py` and `inference.py` find models
by name in timm's registry; bnvit's names are there once `bnvit` is imported. This runs `SCRIPT`
as `python SCRIPT ARGS...` would (as `__main__`, with `sys.argv` and `sys.path[0]` set as Python
sets them), after that import:

    python -m bnvit.timm.script ../timm/validate.py --model vitbnffn_mnist --pretrained \\
        --dataset torch/mnist --data-dir $BNVIT_DATA

The timm package the script uses is the one bnvit registered its models in (the installed one),
even when the script sits in a timm checkout with its own `timm/` folder beside it. A model named
by an old name (`--model vit_mnist`, see `bnvit.weights.names`) is passed on by its current name, so
that timm's scripts find its pretrained cfg (timm looks a cfg up under the name it is given).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

__all__ = ["main"]

MODEL_FLAGS = ("--model", "-m")

USAGE = "usage: python -m bnvit.timm.script SCRIPT [ARGS...]  (SCRIPT: timm's train.py, validate.py, ...)"


def main(argv: list[str] | None = None) -> int:
    """Run the timm script `argv[0]` with the arguments `argv[1:]`, bnvit's models registered.

    Args:
        argv: The script's path and its arguments (default: `sys.argv[1:]`).

    Returns:
        0 when the script returns; its `SystemExit` passes through, as from `python SCRIPT`.
        2 (with a one-line message) when no script is given or it is not a file.

    Examples:
        >>> main([])
        usage: python -m bnvit.timm.script SCRIPT [ARGS...]  (SCRIPT: timm's train.py, validate.py, ...)
        2
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        print(f"bnvit.timm.script: no script at {script}; {USAGE}", file=sys.stderr)
        return 2
    # Registering is the point of this module: timm (and bnvit's entry points in it) is imported
    # here, before the script's directory goes first on sys.path, so a checkout's timm/ folder
    # beside the script cannot shadow the timm the models were registered in.
    from . import registry, vision_transformer_bnffn  # noqa: F401

    sys.argv = [str(script), *current_model_names(argv[1:])]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def current_model_names(args: list[str]) -> list[str]:
    """`args` with an old model name after `--model`/`-m` (or in `--model=NAME`) replaced by its current one.

    Examples:
        >>> current_model_names(["--model", "vit_mnist", "--pretrained"])  # says so on stderr
        ['--model', 'vitln_mnist', '--pretrained']
        >>> current_model_names(["--model=vitbnffn_mnist", "-b", "64"])
        ['--model=vitbnffn_mnist', '-b', '64']
    """
    from ..weights.names import current_name

    def renamed(name: str) -> str:
        new = current_name(name)
        if new != name:
            print(f"bnvit.timm.script: model {name} is now called {new}", file=sys.stderr)
        return new

    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if eq and flag in MODEL_FLAGS:
            out[i] = f"{flag}={renamed(value)}"
        elif arg in MODEL_FLAGS and i + 1 < len(out):
            out[i + 1] = renamed(out[i + 1])
    return out


if __name__ == "__main__":
    sys.exit(main())
