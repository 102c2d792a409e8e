"""`python -m bnvit ...`: the same as the `bnvit` command (see `bnvit.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
