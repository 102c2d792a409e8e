"""OpenMP waits passively in bnvit's processes, so training survives a core taken by another program.

`bnvit._util.device` puts `OMP_WAIT_POLICY=PASSIVE` in the environment before torch is imported
(OpenMP reads it once, when torch loads it) unless the variable is set already. The speed itself is
measured in `benchmarks/busy_core.py`, never asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

# Records the environment at the moment torch is first imported, then imports what the test names.
PROBE = r"""
import importlib.abc, json, os, sys
seen = {}

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        return None

sys.meta_path.insert(0, Watch())
__import__(sys.argv[1])
print(json.dumps({"at_torch_import": seen.get("policy"), "after": os.environ.get("OMP_WAIT_POLICY")}))
"""


def _probe(module: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), environ.get("PYTHONPATH", "")])
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, module], env=environ, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_bnvit_sets_passive_waiting_before_torch_loads():
    assert _probe("bnvit") == {"at_torch_import": "PASSIVE", "after": "PASSIVE"}


def test_a_policy_already_set_is_kept():
    assert _probe("bnvit", OMP_WAIT_POLICY="ACTIVE") == {"at_torch_import": "ACTIVE", "after": "ACTIVE"}


def test_the_test_suite_runs_with_passive_waiting():
    """conftest.py imports bnvit before torch, so this very process waits passively."""
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"
    from bnvit._util.device import TORCH_LOADED_FIRST

    assert TORCH_LOADED_FIRST is False
