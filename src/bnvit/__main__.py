"""`python -m bnvit ...`: the same as the `bnvit` command (`_bnvit_cli`, then `bnvit.app.cli`)."""

from __future__ import annotations

import sys

from _bnvit_cli import main

if __name__ == "__main__":
    sys.exit(main())
