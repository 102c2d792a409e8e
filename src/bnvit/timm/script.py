"""Run one of timm's scripts with bnvit's models registered: `python -m bnvit.timm.script SCRIPT [ARGS...]`.

Old model names after `--model` are passed on as current ones, as timm looks cfgs up by name.
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

    Returns:
        0 when the script returns (its `SystemExit` passes through); 2 when no script file is given.

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
