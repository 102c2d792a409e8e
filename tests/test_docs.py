"""Every code snippet in README.md and docs/ is run here, so the documentation cannot rot.

What is collected: each Markdown file (`README.md`, `docs/**/*.md`) is split into fenced code
blocks, including blocks indented inside admonitions or lists.

* `python` (or `py`) blocks are executed: one test per page, the page's blocks in order in
  one shared namespace, so a later block can use the names an earlier one defined. `pycon`
  blocks run through `doctest` in the same namespace. Each page runs in an empty temporary
  working folder (whatever a snippet writes lands there), with a private cache folder
  (`XDG_CACHE_HOME`) and `MPLBACKEND=Agg`. Tracebacks point at the page's own line numbers.
  Snippets must therefore be real and fast: tiny data, depth 1-2, `progress=False`,
  `device="cpu"`. (`ruff format`, run by `.ci/run`, formats these blocks too.)
* Snippets that need files a checkout does not hold are marked with an HTML comment on the
  line right above the fence, invisible on the rendered page:
  `<!-- needs: BNVIT_DATA -->` (real MNIST, found through the `BNVIT_DATA` environment
  variable, as in `conftest.py`), `<!-- needs: BNVIT_REFERENCE -->` (the article's reference
  checkpoints; the test sets `BNVIT_REFERENCE` to the folder `conftest.py` uses, so the
  snippet reads it from the environment), `<!-- needs: BNVIT_TIMM_CHECKOUT -->` (a clone of
  timm, whose scripts are not in the timm package), or several names separated by spaces. When
  the data is absent, the page's blocks up to that one still run and the rest of the page is
  skipped with a reason naming the variable.
* `bash` / `sh` / `shell` blocks marked `<!-- run -->` on the line above the fence (or
  `<!-- run; needs: BNVIT_REFERENCE -->`) are executed, as a newcomer would type them: with
  `bash -e` from the root of the clone, with `bnvit` and `python` on the `PATH` running this
  checkout's code, `BNVIT_DATA` / `BNVIT_REFERENCE` set as for the Python snippets, and a private
  cache folder. A block that needs `BNVIT_TIMM_CHECKOUT` also gets `$TIMM` (the checkout) and
  `$IMAGES` (a tiny image folder in timm's layout: `train/<class>/*.png`,
  `validation/<class>/*.png`), the two paths its page tells the reader to substitute. They must
  be cheap (seconds to a minute) and write nothing into the clone (`mktemp -d` gives a folder
  inside the test's own temporary folder). When a `text` block follows one directly, it is the
  block's expected output, compared line by line.
* Other `bash` / `sh` / `shell` / `console` blocks are not executed (they install packages or
  train for minutes). Their commands (split at `&&`, `;`, `|` and line ends, `VAR=value` prefixes
  dropped) are checked instead:
  - `python <path>.py ...` and `torchrun ... <path>.py ...`: the script must exist; for
    `examples/*.py` the flags are parsed by the example's real argument parser (for a sweep,
    `bnvit.experiments.cli.build_parser` of its `EXPERIMENT`, and turned into the sweep's settings
    and grid), so a renamed or invalid flag fails here;
  - `bnvit ...`: parsed with `_bnvit_cli.build_parser()`;
  - `pip install ...` lines are not checked here: `.ci/run` runs the README's install
    commands on a fresh clone;
  - anything else (`cd`, `pytest`, `mkdocs`, ...) is left as written.

Why this file and not a maintained plugin: pytest-markdown-docs and Sybil run a page's Python
blocks (Sybil also doctest-style blocks and skips), which is the first bullet above. Neither
checks a shell command's flags against the real argument parsers, runs marked shell blocks in
the clone and compares their output, nor skips the rest of a page on a missing data variable;
those are most of what this file does, and its Python-block runner is the shared part that
would remain to be written around either plugin.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

import _bnvit_cli
from bnvit.experiments import cli as experiments
from conftest import REFERENCE_CHECKPOINTS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON = {"python", "py", "python3"}
PYCON = {"pycon"}
SHELL = {"bash", "sh", "shell", "console"}
NEEDS = re.compile(r"^\s*<!--\s*(?:run;\s*)?needs:\s*([A-Z_ ]+?)\s*-->\s*$")
RUN = re.compile(r"^\s*<!--\s*run(?:;\s*needs:\s*[A-Z_ ]+?)?\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the first code line
    lang: str
    code: str
    needs: tuple[str, ...]  # environment variables naming data the block needs
    run: bool = False  # a shell block marked <!-- run -->: executed by test_marked_shell_blocks_run


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, dedented, with their first line number."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = len(match["indent"]), match["fence"], match["lang"].lower()
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        needs = NEEDS.match(previous)
        body, j = [], i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence)) and lines[j].strip().strip(fence[0]) == ""
        ):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{page}:{i + 1}: code fence {fence} is never closed")
        code = "\n".join(body) + "\n"
        blocks.append(
            Block(page, i + 2, lang, code, tuple(needs[1].split()) if needs else (), bool(RUN.match(previous)))
        )
        i = j + 1
    return blocks


def _pages_with(langs: set[str]) -> list:
    return [
        pytest.param(page, id=str(page.relative_to(ROOT)))
        for page in PAGES
        if any(b.lang in langs for b in code_blocks(page))
    ]


# ----------------------------------------------------------------------------- python


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory) -> Path:
    """One private cache folder for all pages: the frozen augmented test set is computed once."""
    return tmp_path_factory.mktemp("docs-cache")


def _missing(needs: str) -> str | None:
    """Why the data a block needs is absent, or None if it is there."""
    if needs == "BNVIT_DATA":
        value = os.environ.get("BNVIT_DATA")
        if not value:
            return "BNVIT_DATA is not set; set it to a folder with MNIST/raw/ to run this snippet"
        if not (Path(value) / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file():
            raise FileNotFoundError(f"BNVIT_DATA={value} has no MNIST/raw/t10k-images-idx3-ubyte")
        return None
    if needs == "BNVIT_REFERENCE":
        if not REFERENCE_CHECKPOINTS.is_dir():
            return f"the reference checkpoints are not at {REFERENCE_CHECKPOINTS} (set BNVIT_REFERENCE)"
        return None
    if needs == "BNVIT_TIMM_CHECKOUT":
        value = os.environ.get("BNVIT_TIMM_CHECKOUT")
        if not value:
            return "BNVIT_TIMM_CHECKOUT is not set; set it to a clone of timm (its scripts) to run this snippet"
        if not (Path(value) / "train.py").is_file():
            raise FileNotFoundError(f"BNVIT_TIMM_CHECKOUT={value} has no train.py: it is not a clone of timm")
        return None
    raise ValueError(f"unknown <!-- needs: {needs} --> marker; valid: BNVIT_DATA, BNVIT_REFERENCE, BNVIT_TIMM_CHECKOUT")


@pytest.mark.parametrize("page", _pages_with(PYTHON | PYCON))
def test_python_snippets_run(page: Path, tmp_path, docs_cache, monkeypatch):
    if os.environ.get("BNVIT_DATA"):  # the snippets run in another folder: keep a relative path valid
        monkeypatch.setenv("BNVIT_DATA", str(Path(os.environ["BNVIT_DATA"]).resolve()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(docs_cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("BNVIT_REFERENCE", str(REFERENCE_CHECKPOINTS))
    namespace: dict = {"__name__": "__docs__"}
    for block in code_blocks(page):
        if block.lang not in PYTHON | PYCON:
            continue
        for needs in block.needs:
            if reason := _missing(needs):
                pytest.skip(f"{page.relative_to(ROOT)}:{block.line}: {reason}")
        if block.lang in PYCON:
            test = doctest.DocTestParser().get_doctest(block.code, namespace, page.name, str(page), block.line - 1)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test, clear_globs=False)
            assert not runner.failures, f"{page}:{block.line}: {runner.failures} doctest example(s) failed"
            continue
        # Pad with blank lines so tracebacks give the line numbers of the Markdown file.
        code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
        exec(code, namespace)


# ----------------------------------------------------------------------------- shell


def shell_commands(code: str) -> list[list[str]]:
    """The simple commands of a shell snippet, as token lists (comments and assignments dropped)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in {"&&", "||", ";", "|", "&"}:
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    cleaned = []
    for tokens in commands:
        while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):
            tokens = tokens[1:]
        if tokens:
            cleaned.append(tokens)
    return cleaned


def _load_example(path: Path):
    spec = importlib.util.spec_from_file_location(f"docs_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parse(parser, flags: list[str], what: str, where: str):
    try:
        return parser.parse_args(flags)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            return None
        pytest.fail(f"{where}: `{what} {shlex.join(flags)}` is rejected by its argument parser")


def check_example_flags(script: Path, flags: list[str], where: str) -> None:
    """Parse `flags` with the example's own parser (and build a sweep's settings and grid from them)."""
    module = _load_example(script)
    experiment = getattr(module, "EXPERIMENT", None)
    if experiment is None:  # a plain script with its own parser
        _parse(module.build_parser(), flags, script.name, where)
        return
    args = _parse(experiments.build_parser(experiment), flags, script.name, where)
    if args is None:
        return
    try:
        experiments._settings_from_args(experiment, args)
        experiments._grid_from_args(experiment, args)
    except (ValueError, TypeError) as err:
        pytest.fail(f"{where}: `{script.name} {shlex.join(flags)}`: {err}")


def _script_and_flags(tokens: list[str]) -> tuple[str, list[str]] | None:
    """`python x.py flags` or `torchrun [options] x.py flags` -> (x.py, flags)."""
    if tokens[0] in {"python", "python3"} and len(tokens) > 1 and tokens[1].endswith(".py"):
        return tokens[1], tokens[2:]
    if tokens[0] == "torchrun":
        scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
        if scripts:
            return tokens[scripts[0]], tokens[scripts[0] + 1 :]
    return None


@pytest.mark.parametrize("page", _pages_with(SHELL))
def test_shell_snippets_are_valid(page: Path):
    for block in code_blocks(page):
        if block.lang not in SHELL:
            continue
        for tokens in shell_commands(block.code):
            if tokens[0] == "$":  # a `console` prompt
                tokens = tokens[1:]
            where = f"{page.relative_to(ROOT)}:{block.line}"
            script = _script_and_flags(tokens)
            if script is not None:
                path = ROOT / script[0]
                assert path.is_file(), f"{where}: {script[0]} does not exist"
                if path.parent.name == "examples":
                    check_example_flags(path, script[1], where)
            elif tokens[0] == "bnvit":
                _parse(_bnvit_cli.build_parser(), tokens[1:], "bnvit", where)


# ----------------------------------------------------------------------------- shell blocks that run


def _marked_runs() -> list:
    """`(page, block, expected output or None)` for every shell block marked `<!-- run -->`."""
    params = []
    for page in PAGES:
        blocks = code_blocks(page)
        for i, block in enumerate(blocks):
            if not block.run:
                continue
            assert block.lang in {"bash", "sh", "shell"}, f"{page}:{block.line}: only shell blocks run"
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            expected = None
            if following is not None and following.lang == "text" and _adjacent(page, block, following):
                expected = following.code
            params.append(pytest.param(block, expected, id=f"{page.relative_to(ROOT)}:{block.line}"))
    return params


def _adjacent(page: Path, block: Block, following: Block) -> bool:
    """Whether only blank lines separate the end of `block` from the fence of `following`."""
    lines = page.read_text(encoding="utf-8").splitlines()
    end = block.line - 1 + block.code.count("\n")  # the closing fence of `block`, 0-based
    return all(not line.strip() for line in lines[end + 1 : following.line - 2])


@pytest.fixture(scope="module")
def commands_path(tmp_path_factory) -> str:
    """A PATH whose `bnvit` and `python` run this checkout with the Python running the tests."""
    folder = tmp_path_factory.mktemp("bin")
    src = ROOT / "src"
    front = f'exec "{sys.executable}" -c "import sys; from _bnvit_cli import main; sys.exit(main())" "$@"'
    scripts = {"bnvit": front, "python": f'exec "{sys.executable}" "$@"'}
    for name, line in scripts.items():
        (folder / name).write_text(f'#!/bin/sh\nexport PYTHONPATH="{src}${{PYTHONPATH:+:$PYTHONPATH}}"\n{line}\n')
        (folder / name).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.slow
@pytest.mark.parametrize(("block", "expected"), _marked_runs())
def test_marked_shell_blocks_run(block: Block, expected: str | None, commands_path, tmp_path):
    for needs in block.needs:
        if reason := _missing(needs):
            pytest.skip(f"{block.page.relative_to(ROOT)}:{block.line}: {reason}")
    env = {
        **os.environ,
        "PATH": commands_path,
        "BNVIT_REFERENCE": str(REFERENCE_CHECKPOINTS),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "MPLBACKEND": "Agg",
        "PYTHONWARNINGS": "ignore",
    }
    if os.environ.get("BNVIT_DATA"):
        env["BNVIT_DATA"] = str(Path(os.environ["BNVIT_DATA"]).resolve())
    if "BNVIT_TIMM_CHECKOUT" in block.needs:
        env["TIMM"] = str(Path(os.environ["BNVIT_TIMM_CHECKOUT"]).resolve())
        env["IMAGES"] = str(tiny_image_folder(tmp_path / "images"))
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")  # what the block writes with mktemp lands in the test's folder
    before = _tree(ROOT)
    done = subprocess.run(
        ["bash", "-e", "-c", block.code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    where = f"{block.page.relative_to(ROOT)}:{block.line}"
    assert done.returncode == 0, f"{where}: exit status {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    if expected is not None:
        assert done.stdout.strip().splitlines() == expected.strip().splitlines(), f"{where}: other output"
    assert _tree(ROOT) == before, f"{where}: the commands wrote into the clone"


def tiny_image_folder(root: Path, per_class: tuple[int, int] = (4, 2)) -> Path:
    """Two classes of 32x32 PNGs in timm's folder layout, `per_class` images each in `train/` and `validation/`.

    Class `0` is dark noise, class `1` bright noise: enough for timm's `train.py` to run an epoch on.
    """
    generator = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "validation"), per_class, strict=True):
        for label in (0, 1):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 128, (32, 32, 3), generator=generator, dtype=torch.uint8) + 127 * label
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


def _tree(root: Path) -> set[str]:
    """The files of the clone outside .git, build outputs and caches: what a documented command must not add."""
    skip = {".git", ".venv", "site", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "runs"}
    return {str(p.relative_to(root)) for p in root.rglob("*") if not skip & set(p.relative_to(root).parts)}


# ----------------------------------------------------------------------------- navigation

LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)")


def test_every_page_is_reachable_from_the_index():
    """Following the Markdown links from docs/index.md reaches every page of docs/."""
    docs = ROOT / "docs"
    seen, todo = set(), [docs / "index.md"]
    while todo:
        page = todo.pop()
        if page in seen or not page.is_file():
            continue
        seen.add(page)
        todo += [(page.parent / link).resolve() for link in LINK.findall(page.read_text(encoding="utf-8"))]
    missing = sorted(str(p.relative_to(docs)) for p in docs.rglob("*.md") if p.resolve() not in seen)
    assert not missing, f"pages no link from docs/index.md leads to: {missing}"


def test_the_index_links_every_top_level_page():
    docs = ROOT / "docs"
    linked = set(LINK.findall((docs / "index.md").read_text(encoding="utf-8")))
    missing = sorted(p.name for p in docs.glob("*.md") if p.name != "index.md" and p.name not in linked)
    assert not missing, f"docs/index.md does not link {missing}"


def test_the_readme_and_installation_give_the_same_cpu_only_pytorch_command():
    """README.md and docs/installation.md give one CPU-only PyTorch command, and CI follows the default path."""
    cpu = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    for page in (ROOT / "README.md", ROOT / "docs" / "installation.md"):
        commands = [" ".join(t) for b in code_blocks(page) if b.lang in SHELL for t in shell_commands(b.code)]
        assert cpu in commands, f"{page.name} does not give the CPU-only PyTorch command: {cpu}"
        assert "pip install -e ." in commands, f"{page.name}: no default install"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "download.pytorch.org" not in ci  # CI reaches package registries only
    assert 'pip install -e ".[test]" && pytest' in ci


# ----------------------------------------------------------------------------- timm's scripts


def test_a_timm_checkout_need_skips_without_one_and_refuses_a_wrong_one(monkeypatch, tmp_path):
    monkeypatch.delenv("BNVIT_TIMM_CHECKOUT", raising=False)
    assert "BNVIT_TIMM_CHECKOUT is not set" in _missing("BNVIT_TIMM_CHECKOUT")
    monkeypatch.setenv("BNVIT_TIMM_CHECKOUT", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"BNVIT_TIMM_CHECKOUT=.* has no train.py"):
        _missing("BNVIT_TIMM_CHECKOUT")
    (tmp_path / "train.py").write_text("")
    assert _missing("BNVIT_TIMM_CHECKOUT") is None


def test_the_timm_walkthrough_is_a_block_the_tests_run():
    """docs/timm-blocks.md's commands, LayerNorm weights to a folded ONNX file, run with a timm checkout."""
    page = ROOT / "docs" / "timm-blocks.md"
    runs = [b for b in code_blocks(page) if b.run and "BNVIT_TIMM_CHECKOUT" in b.needs]
    assert len(runs) == 1, f"{page.name}: {len(runs)} blocks marked <!-- run; needs: BNVIT_TIMM_CHECKOUT -->"
    commands = [" ".join(tokens) for tokens in shell_commands(runs[0].code)]
    train = [c for c in commands if c.startswith("python -m bnvit.timm.script $TIMM/train.py")]
    assert train and "--pretrained --pretrained-path" in train[0] and "--data-dir $IMAGES" in train[0], commands
    export = [c for c in commands if c.startswith("python -m bnvit.timm.script $TIMM/onnx_export.py")]
    assert export and "--reparam" in export[0], commands
    assert "BatchNormalization" in commands[-1], commands
