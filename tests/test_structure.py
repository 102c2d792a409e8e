"""The shape of the package, read from its source: one-way imports, functions that fit on a screen, short modules.

The packages are the layers (docs/architecture.md draws the picture). Each imports only those
`ALLOWED` lists for it, which are all below it:

    app                 what a person runs: the command's work, the demo
    experiments         the reproduction harness
    training            the loop and what a run needs; imports models and data
    data                MNIST, augmentation, loaders; imports only _util
    timm                entry points, pretrained cfgs, the one builder, the BN-FFN timm block
    weights, inference  weight files in and out; folding and export (never training)
    models              the article's modules as plain nn.Modules
    _util               atomic writes and the lock, argument checks, devices and precision

Every import counts, including those inside functions: a deferred import is still a dependency.
A module over 500 lines is doing more than one job: split it by job.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "bnvit"

# What each package may import from bnvit besides itself: the layers below it.
ALLOWED: dict[str, set[str]] = {
    "_util": set(),
    "models": {"_util"},
    "inference": {"_util", "models"},
    "weights": {"_util", "models"},
    "timm": {"_util", "models", "weights"},
    "data": {"_util"},
    "training": {"_util", "models", "data"},
    "experiments": {"_util", "models", "inference", "weights", "timm", "data", "training"},
}
ALLOWED["app"] = set(ALLOWED) | {"app"}
ALLOWED["top"] = set(ALLOWED) | {"top"}  # the package's face (`__init__`, `__main__`) re-exports every layer
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _group(module: str) -> str:
    head = module.split(".")[0]
    return head if head in ALLOWED else "top"


def _imports(path: Path) -> set[str]:
    """bnvit modules that `path` imports, anywhere in the file, resolved to module names."""
    module = _module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if module == "":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name[len("bnvit.") :] for a in node.names if a.name.startswith("bnvit.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and (node.module == "bnvit" or node.module.startswith("bnvit.")):
                    base = node.module[len("bnvit") :].lstrip(".")
                else:
                    continue
            else:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if _exists(candidate) else base)
    return {m for m in found if m != module}


def _exists(module: str) -> bool:
    path = SRC.joinpath(*module.split(".")) if module else SRC
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def test_imports_flow_one_way():
    upward = []
    for module, imported in sorted(_graph().items()):
        if module == "":
            continue  # bnvit/__init__.py re-exports the public API from every layer
        mine = _group(module)
        for target in sorted(imported):
            if target == "" and mine != "top":
                upward.append(f"{module} ({mine}) imports the bnvit package itself, which imports every layer")
            elif target and _group(target) != mine and _group(target) not in ALLOWED[mine]:
                upward.append(f"{module} ({mine}) imports {target} ({_group(target)})")
    assert not upward, "imports against the layering:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def _function_lengths():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                    doc = body[0]
                    if isinstance(doc.value.value, str):
                        lines -= doc.end_lineno - doc.lineno + 1
                yield f"{path.relative_to(SRC)}:{node.lineno} {node.name}", lines


def test_functions_fit_on_a_screen():
    long = [f"{name}: {lines} lines" for name, lines in _function_lengths() if lines > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstrings not counted):\n  " + "\n  ".join(long)


def _module_lengths() -> dict[str, int]:
    return {str(path.relative_to(SRC)): len(path.read_text().splitlines()) for path in sorted(SRC.rglob("*.py"))}


def test_modules_hold_one_job():
    long = [f"{name}: {lines} lines" for name, lines in _module_lengths().items() if lines > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job):\n  " + "\n  ".join(long)


def test_the_checks_see_what_they_check():
    """The graph is not empty and knows the layers: a broken parser would make the tests above pass vacuously."""
    graph = _graph()
    assert {"models.vit", "models.blocks", "training.loop", "_util.device", "app.cli"} <= set(graph)
    assert "models.blocks" in graph["models.vit"]
    assert "_util.device" in graph["training.loop"]
    assert {_group(m) for m in graph} == set(ALLOWED)
    lengths = dict(_function_lengths())
    assert len(lengths) > 100
    modules = _module_lengths()
    assert len(modules) > 50 and modules["models/vit.py"] > 100 and modules["training/loop.py"] > 100


def test_the_package_face_is_a_handful_of_modules():
    """Everything but the package's face lives in a subpackage named by its role."""
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], top


@pytest.mark.parametrize(
    ("importer", "target", "ok"),
    [
        ("models.vit", "training.loop", False),
        ("inference.deploy", "training", False),
        ("models.blocks", "timm.blocks", False),
        ("data.mnist", "models.vit", False),
        ("weights.loading", "timm.registry", False),
        ("timm.registry", "weights.loading", True),
        ("experiments.sweep", "training", True),
    ],
)
def test_layer_rules(importer, target, ok):
    assert (_group(target) in ALLOWED[_group(importer)]) is ok
