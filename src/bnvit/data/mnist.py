"""Where MNIST lives (`MNIST/raw/` under `root`, `$BNVIT_DATA` or `cache_dir()`) and a small IDX reader."""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["ENV_VAR", "MNIST_FILES", "cache_dir", "find_mnist_root", "load_mnist", "mnist_files", "read_idx"]

ENV_VAR = "BNVIT_DATA"
"""Environment variable naming the data root when no `root` argument is given."""

MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""`{train: (images file, labels file)}` inside `<root>/MNIST/raw`."""

_IDX_UINT8 = 0x08
_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension
_NUM_CLASSES = 10

_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def cache_dir() -> Path:
    """The user cache folder of bnvit: `$XDG_CACHE_HOME/bnvit`, by default `~/.cache/bnvit`.

    Examples:
        >>> cache_dir().name
        'bnvit'
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "bnvit"


def _as_path(name: str, value: object) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {value!r} ({type(value).__name__})")
    return Path(value).expanduser()


def find_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The data root to use: `root`, else `$BNVIT_DATA`, else `cache_dir`; not checked here (`load_mnist` is).

    Examples:
        >>> find_mnist_root("/data").as_posix()
        '/data'
    """
    if root is not None:
        return _as_path("root", root)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return cache_dir()


def mnist_files(root: str | os.PathLike | None = None, *, train: bool) -> tuple[Path, Path]:
    """The images and labels files of one split under `root` (uncompressed, else `.gz`).

    Examples:
        >>> [p.name for p in mnist_files("/data", train=False)]
        ['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte']
    """
    raw = find_mnist_root(root) / "MNIST" / "raw"
    paths = []
    for name in MNIST_FILES[_check_train(train)]:
        path = raw / name
        if not path.is_file() and (raw / f"{name}.gz").is_file():
            path = raw / f"{name}.gz"
        paths.append(path)
    return paths[0], paths[1]


def _check_train(train: object) -> bool:
    if not isinstance(train, bool):
        raise TypeError(
            f"train must be a bool (True: the 60,000 training images, False: the 10,000 test images), got {train!r}"
        )
    return train


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise ValueError(f"{path} is not a readable gzip file ({error}); delete it and download it again") from error


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Read a uint8 IDX file (optionally `.gz`) as a read-only array; `ndim`: the dimensions it must have.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: Not a uint8 IDX header, not `ndim` dimensions, or a truncated or corrupt file.

    Examples:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     path = Path(folder) / "tiny-idx1-ubyte"
        ...     _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))  # header, shape (3,), data
        ...     read_idx(path, ndim=1)
        array([7, 8, 9], dtype=uint8)
    """
    path = _as_path("path", path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than the 4-byte IDX header")
    zero, dtype, dims = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype != _IDX_UINT8:
        magic = int.from_bytes(data[:4], "big")
        raise ValueError(
            f"{path} has magic number 0x{magic:08x}, not a uint8 IDX file "
            f"(expected 0x{_IDX_UINT8 << 8 | (ndim or dims):08x}); is it the right file, or corrupt?"
        )
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path} has {dims} dimensions (magic 0x{_IDX_UINT8 << 8 | dims:08x}), expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = int(np.prod(shape, dtype=np.int64))
    found = len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {what}: its header gives shape {shape} = {expected} bytes of data, the file holds {found}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _layout_hint(root: Path, train: bool) -> str:
    """A hint when the files sit one level off the expected `<root>/MNIST/raw` layout."""
    name = MNIST_FILES[train][0]

    def has(folder: Path) -> bool:
        return (folder / name).is_file() or (folder / f"{name}.gz").is_file()

    if root.name == "raw" and root.parent.name == "MNIST" and has(root):
        return f" The files are in {root} itself: pass root={str(root.parent.parent)!r}."
    if root.name == "MNIST" and has(root / "raw"):
        return f" The files are in {root / 'raw'}: pass root={str(root.parent)!r}."
    if has(root):
        return f" The files are directly in {root}: move them into {root / 'MNIST' / 'raw'}."
    return ""


def _missing_message(root: Path, train: bool, missing: list[Path], searched: str) -> str:
    raw = root / "MNIST" / "raw"
    return (
        f"MNIST {'training' if train else 'test'} files not found: looked for {' and '.join(MNIST_FILES[train])} "
        f"(or .gz) in {raw} ({searched}); missing: {', '.join(p.name for p in missing)}.{_layout_hint(root, train)} "
        f"Fix: pass root= a folder holding MNIST/raw/, set {ENV_VAR}=<that folder>, "
        f"or pass download=True to fetch MNIST into {root} with torchvision."
    )


def _download(root: Path, train: bool) -> None:
    try:
        from torchvision.datasets import MNIST  # deferred: costly import, needed only to download

        MNIST(root=str(root), train=train, download=True)
    except Exception as error:  # offline, unreachable mirror, read-only folder, ...
        raise FileNotFoundError(
            f"MNIST is not in {root / 'MNIST' / 'raw'} and downloading it there failed: {error}. "
            f"Copy the four files there by hand, or point {ENV_VAR} or root= at a folder that has them."
        ) from error


def load_mnist(
    root: str | os.PathLike | None = None, *, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST split as tensors, cached in memory (shared: clone before editing in place).

    Args:
        root: Folder holding `MNIST/raw/`; `None` looks it up (`find_mnist_root`).
        train: The 60,000 training images, else the 10,000 test images.
        download: Fetch missing files with torchvision.

    Returns:
        `(images, labels)`: uint8 `(N, 28, 28)` and int64 `(N,)`.

    Raises:
        FileNotFoundError: The files are missing; the message says where and how to fix it.
        ValueError: A file is truncated or corrupt.

    Examples:
        >>> images, labels = load_mnist(train=False)  # doctest: +SKIP
        >>> images.shape, images.dtype, labels.dtype  # doctest: +SKIP
        (torch.Size([10000, 28, 28]), torch.uint8, torch.int64)
    """
    train = _check_train(train)
    searched = (
        "from the root argument"
        if root is not None
        else (f"from ${ENV_VAR}" if os.environ.get(ENV_VAR) else f"the user cache folder; ${ENV_VAR} is not set")
    )
    root = find_mnist_root(root)
    paths = mnist_files(root, train=train)
    missing = [p for p in paths if not p.is_file()]
    if missing and download:
        _download(root, train)
        paths = mnist_files(root, train=train)
        missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(_missing_message(root, train, missing, searched))

    stats = [p.stat() for p in paths]
    key = (*(str(p.resolve()) for p in paths), *((s.st_mtime_ns, s.st_size) for s in stats))
    if key not in _cache:
        _cache[key] = _read_split(*paths)
    return _cache[key]


def _read_split(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path} holds images of shape {images.shape[1:]}, MNIST images are (28, 28)")
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            f"the two files are from different splits or one is corrupt"
        )
    if len(labels) and labels.max() >= _NUM_CLASSES:
        bad = int(np.argmax(labels >= _NUM_CLASSES))
        raise ValueError(
            f"{labels_path} holds label {int(labels[bad])} at index {bad}; MNIST labels are 0-{_NUM_CLASSES - 1}"
        )
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
