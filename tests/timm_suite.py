"""Run timm's own model tests (`tests/test_models.py` of a timm checkout) on bnvit's registered models.

    python tests/timm_suite.py PATH/TO/pytorch-image-models [more pytest arguments]

timm's test module chooses its models with `timm.list_models(...)` when it is imported. Here that
function answers with bnvit's models only (all of them, and the shipped weights' tagged names where
timm asks for pretrained or tagged names), reading timm's filters as they are meant for bnvit:

* every test gets every bnvit model, whatever its module or family: the tests over timm's
  "non-standard" transformers (`NON_STD_FILTERS`), over the modules with `forward_intermediates`
  (`FEAT_INTER_FILTERS`), and also those that exclude the transformers, since bnvit's models
  give `features_only=True` feature maps in NCHW (`test_model_forward_features`,
  `test_model_features_pretrained`);
* every other exclusion filter is applied to the names as timm writes it.

Deselected, with the reason: TorchScript (the models use einops, which TorchScript cannot compile;
docs/timm.md), `test_model_default_cfgs` (the convolutional networks' cfg checks, which timm's own
ViTs skip too: they run `test_model_default_cfgs_non_std`, as bnvit's models do), and the tests
that are not about a registered model (naflexvit's and others' own checks).

Not part of the default test run (it needs a timm checkout, which the package does not ship); the
file is named so that pytest does not collect it.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

import pytest
import timm


def _names(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def non_std_filters(test_file: Path) -> set[str]:
    """timm's NON_STD_FILTERS (its transformer and MLP-like families), read from the test file itself."""
    for node in ast.parse(test_file.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NON_STD_FILTERS" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise ValueError(f"{test_file} defines no NON_STD_FILTERS list; this script reads timm 1.0's test_models.py")


DESELECTED = {
    "test_model_forward_torchscript": "TorchScript cannot compile einops",
    "test_model_forward_fx_torchscript": "TorchScript cannot compile einops",
    "test_model_default_cfgs": "timm's convolutional checks; transformers run test_model_default_cfgs_non_std",
}


class BnvitOnly:
    """A pytest plugin: timm.list_models answers with bnvit's models, before timm's tests import it."""

    def __init__(self, families: set[str]) -> None:
        self.families = families

    def pytest_configure(self, config) -> None:
        import bnvit  # noqa: F401  (registers the models)

        real = timm.list_models
        bnvit_models = {n for n in real() if timm.models.model_entrypoint(n).__module__.startswith("bnvit.")}
        self.models = bnvit_models

        def list_models(
            filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False, include_tags=None
        ):
            names = real(pretrained=pretrained, include_tags=include_tags, name_matches_cfg=name_matches_cfg)
            names = [n for n in names if n.split(".")[0] in bnvit_models]
            filters = [f for f in _names(filter) if f not in self.families]
            excludes = [f for f in _names(exclude_filters) if f not in self.families]
            if filters:
                names = [n for n in names if any(fnmatch.fnmatch(n, f) for f in filters)]
            return [n for n in names if not any(fnmatch.fnmatch(n, f) for f in excludes)]

        timm.list_models = list_models

    def pytest_collection_modifyitems(self, config, items) -> None:
        keep, drop = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            name = str(params.get("model_name", "")).split(".")[0]
            test = item.originalname if hasattr(item, "originalname") else item.name
            (keep if name in self.models and test not in DESELECTED else drop).append(item)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_report_header(self, config) -> list[str]:
        reasons = [f"  {test}: {why}" for test, why in DESELECTED.items()]
        return [f"bnvit: timm's model tests on its {len(self.models)} models; deselected:", *reasons]


def main(argv: list[str]) -> int:
    if not argv or not (Path(argv[0]) / "tests" / "test_models.py").is_file():
        given = argv[0] if argv else "nothing"
        print(f"usage: python tests/timm_suite.py TIMM_CHECKOUT [pytest args]; {given} has no tests/test_models.py")
        return 2
    test_file = Path(argv[0]).resolve() / "tests" / "test_models.py"
    args = [str(test_file), "-p", "no:cacheprovider", "--rootdir", str(test_file.parents[1])]
    args += ["-W", "ignore::pytest.PytestUnknownMarkWarning", *argv[1:]]  # timm registers its marks in its pyproject
    return pytest.main(args, plugins=[BnvitOnly(non_std_filters(test_file))])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
