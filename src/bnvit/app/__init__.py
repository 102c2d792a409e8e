"""What a person runs: the `bnvit` command's work (`cli`) and the drawing demo (`demo`).

The command's argument parser is the top-level module `_bnvit_cli` (standard library only, so that
`bnvit --help` answers before torch is imported); it imports `bnvit.app.cli` once the arguments
are valid, and nothing here imports it back.
"""
