"""Digit pictures to MNIST images (`bnvit.data.prepare_digit`) and the `bnvit predict` command."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

import _bnvit_cli
import bnvit
from _bnvit_cli import build_parser, main
from bnvit.data import load_image, load_mnist, prepare_digit
from bnvit.weights.calibration import shipped_temperature
from conftest import ROOT

N_PHOTOS = 20
VIT_CHECKPOINT = "FinOptAug1_ViT_30.pth"


def photo(digit: torch.Tensor, rng: np.random.Generator, size: tuple[int, int] = (200, 150)) -> Image.Image:
    """An MNIST digit as a photo of dark ink on light paper: enlarged, off-centre, tinted, lit unevenly, noisy.

    The 28x28 digit is inverted (ink dark, paper light grey, levels drawn at random), upscaled to
    100-139 pixels, placed at a random offset in a `size` (width, height) RGB picture with a
    left-to-right brightness gradient, a warm tint and Gaussian noise (sigma 8 of 255).
    """
    width, height = size
    side = int(rng.integers(100, 140))
    ink = np.asarray(Image.fromarray(digit.numpy()).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255
    coverage = np.zeros((height, width), np.float32)
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    coverage[top : top + side, left : left + side] = ink
    paper, pen = rng.uniform(190, 225), rng.uniform(25, 70)
    gray = paper + np.linspace(-12, 12, width)[None, :] - coverage * (paper - pen)
    rgb = np.stack([gray, gray * 0.98, gray * 0.93], axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def mnist_test(mnist_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    return load_mnist(mnist_root, train=False)


@pytest.fixture(scope="module")
def vit(reference_checkpoints: Path) -> bnvit.ViT:
    return bnvit.load_model(reference_checkpoints / VIT_CHECKPOINT)


def _predict(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(images).argmax(1)


def _longer_side(image: torch.Tensor) -> int:
    rows, cols = (image[0] > 0).any(1).nonzero(), (image[0] > 0).any(0).nonzero()
    return max(int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1))


def _centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    image = image[0]
    index = torch.arange(28, dtype=torch.float32)
    mass = image.sum()
    return float((image.sum(1) * index).sum() / mass), float((image.sum(0) * index).sum() / mass)


# ---------------------------------------------------------------------- prepare_digit on real digits


def test_photos_of_mnist_digits_are_recognized(mnist_test, vit):
    """20 real test digits as photos: the ViT reads them after prepare_digit, not without it.

    On the same 20 digits as they are in MNIST, the reference ViT is right 18 times out of 20
    (it reads test images 8 and 18, a 5 and a 3, as a 6 and a 9, with probabilities 0.77 and
    0.84); after the photo treatment and prepare_digit it must be right at least 18 times, while
    the photos merely resized to 28x28 (no inversion, no centring) are mostly misread.
    """
    images, labels = mnist_test
    digits, truth = images[:N_PHOTOS], labels[:N_PHOTOS]
    rng = np.random.default_rng(0)
    photos = [photo(d, rng) for d in digits]
    assert photos[0].size == (200, 150) and photos[0].mode == "RGB"

    raw_correct = int((_predict(vit, digits.float().div(255).unsqueeze(1)) == truth).sum())
    prepared = torch.stack([prepare_digit(p) for p in photos])
    assert prepared.shape == (N_PHOTOS, 1, 28, 28) and prepared.dtype == torch.float32
    prepared_correct = int((_predict(vit, prepared) == truth).sum())
    naive = torch.stack(
        [torch.from_numpy(np.asarray(p.convert("L").resize((28, 28)), np.float32) / 255) for p in photos]
    )
    naive_correct = int((_predict(vit, naive.unsqueeze(1)) == truth).sum())

    summary = f"as in MNIST {raw_correct}/20, photos prepared {prepared_correct}/20, photos resized {naive_correct}/20"
    assert raw_correct == 18, summary
    assert prepared_correct >= 18, summary
    assert naive_correct <= 10, summary


def test_an_mnist_digit_comes_out_nearly_unchanged(mnist_test, vit):
    images, _ = mnist_test
    digits = images[:200]
    prepared = torch.stack([prepare_digit(d) for d in digits])
    original = digits.float().div(255).unsqueeze(1)
    assert (prepared - original).abs().mean() < 0.01
    assert torch.equal(_predict(vit, prepared), _predict(vit, original))


def test_the_mnist_geometry(mnist_test):
    """Longer side 20 pixels, centre of mass at (14, 14), wherever and however large the digit was."""
    images, _ = mnist_test
    rng = np.random.default_rng(1)
    for digit in images[:5]:
        x = prepare_digit(photo(digit, rng, size=(320, 240)))
        assert _longer_side(x) == 20
        com_y, com_x = _centre_of_mass(x)
        assert abs(com_y - 14) <= 0.5 and abs(com_x - 14) <= 0.5
        assert float(x.max()) == 1.0 and float(x.min()) == 0.0


def test_dark_on_light_equals_light_on_dark(mnist_test):
    digit = Image.fromarray(mnist_test[0][7].numpy()).resize((84, 84), Image.BILINEAR)
    light_on_dark = prepare_digit(digit)
    dark_on_light = prepare_digit(ImageOps.invert(digit))
    assert (light_on_dark - dark_on_light).abs().max() < 0.02
    assert float(light_on_dark[0, 0, 0]) == 0.0  # the background is dark in both


def test_aspect_ratio_is_kept():
    tall = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(tall).rectangle([90, 20, 110, 180], fill=0)  # 21 x 161: a "1"
    x = prepare_digit(tall)[0] > 0.5
    rows, cols = x.any(1).nonzero(), x.any(0).nonzero()
    assert int(rows.max() - rows.min() + 1) == 20
    assert 2 <= int(cols.max() - cols.min() + 1) <= 4  # 20 * 21 / 161 = 2.6
    wide = Image.new("L", (300, 100), 0)
    ImageDraw.Draw(wide).rectangle([10, 40, 290, 60], fill=255)
    x = prepare_digit(wide)[0] > 0.5
    cols = x.any(0).nonzero()
    assert int(cols.max() - cols.min() + 1) == 20


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK"])
def test_any_image_mode(mode, mnist_test):
    base = Image.fromarray(255 - mnist_test[0][0].numpy()).resize((112, 112), Image.BILINEAR)  # dark on white
    expected = prepare_digit(base)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(base, np.uint16) * 257).astype(np.uint16))
        assert image.mode.startswith("I;16")
    elif mode == "RGBA":  # dark ink on a transparent background, as drawing programs save it
        image = Image.new("RGBA", base.size, (0, 0, 0, 0))
        image.putalpha(ImageOps.invert(base))
    elif mode == "LA":
        image = base.convert("LA")
    else:
        image = base.convert(mode)
    x = prepare_digit(image)
    tolerance = 0.35 if mode == "1" else 0.05  # a binary image loses the grey levels
    assert (x - expected).abs().mean() < tolerance / 5 and (x - expected).abs().max() <= max(tolerance, 0.2)


def test_arrays_and_paths(tmp_path, mnist_test):
    digit = mnist_test[0][3]
    expected = prepare_digit(Image.fromarray(digit.numpy()))
    torch.testing.assert_close(prepare_digit(digit), expected)
    torch.testing.assert_close(prepare_digit(digit.numpy()), expected)
    torch.testing.assert_close(prepare_digit(digit.float().div(255)[None]), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(prepare_digit(digit.numpy()[..., None]), expected)
    Image.fromarray(digit.numpy()).save(tmp_path / "digit.png")
    torch.testing.assert_close(prepare_digit(tmp_path / "digit.png"), expected)
    torch.testing.assert_close(prepare_digit(str(tmp_path / "digit.png")), expected)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("L", (60, 30), 255)
    ImageDraw.Draw(image).rectangle([5, 12, 55, 18], fill=0)  # a horizontal bar
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    assert load_image(tmp_path / "rotated.jpg").size == (30, 60)
    x = prepare_digit(tmp_path / "rotated.jpg")[0] > 0
    rows, cols = x.any(1).nonzero(), x.any(0).nonzero()
    assert int(rows.max() - rows.min() + 1) == 20 and int(cols.max() - cols.min() + 1) < 10  # now vertical


def test_bad_images(tmp_path):
    with pytest.raises(ValueError, match="blank"):
        prepare_digit(Image.new("L", (50, 50), 200))
    with pytest.raises(ValueError, match=r"\(28, 28, 3\)"):
        prepare_digit(np.zeros((28, 28, 3), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        prepare_digit(torch.full((28, 28), float("nan")))
    with pytest.raises(TypeError, match="list"):
        prepare_digit([[0, 1], [1, 0]])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        prepare_digit(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        prepare_digit(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png"):
        prepare_digit(tmp_path / "notes.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"truncated\.png"):
        prepare_digit(tmp_path / "truncated.png")


# ---------------------------------------------------------------------- bnvit predict


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory, mnist_test) -> list[tuple[Path, int]]:
    """Two photo-like PNGs (a 7 and a 2 of the test set) and a grayscale PNG (a 1), with their labels."""
    folder = tmp_path_factory.mktemp("digits")
    images, labels = mnist_test
    rng = np.random.default_rng(2)
    files = []
    for i in (0, 1):
        path = folder / f"photo_{i}.png"
        photo(images[i], rng).save(path)
        files.append((path, int(labels[i])))
    path = folder / "scan.png"
    Image.fromarray(255 - images[2].numpy()).resize((90, 90)).save(path)
    files.append((path, int(labels[2])))
    return files


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "bnvit", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
def test_bnvit_predict_end_to_end(digit_files, reference_checkpoints):
    checkpoint = str(reference_checkpoints / VIT_CHECKPOINT)
    paths = [str(p) for p, _ in digit_files]
    done = _run("predict", *paths, "--checkpoint", checkpoint)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(digit_files)
    for line, (path, label) in zip(lines, digit_files, strict=True):
        assert line.startswith(f"{path}: {label}  (top 3: {label} ")


def test_predict_json(digit_files, reference_checkpoints, capsys):
    path, label = str(digit_files[0][0]), digit_files[0][1]
    checkpoint = str(reference_checkpoints / VIT_CHECKPOINT)
    assert main(["predict", path, "--checkpoint", checkpoint, "--json", "--top-k", "2", "--device", "cpu"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["file"] == path and result["digit"] == label
    assert result["top_k"][0] == {"digit": label, "probability": result["probability"]} and len(result["top_k"]) == 2
    assert result["top_k"][1]["probability"] <= result["probability"]
    assert len(result["probabilities"]) == 10 and abs(sum(result["probabilities"]) - 1) < 1e-5
    assert result["probability"] == max(result["probabilities"])


def test_the_console_script_is_the_light_front():
    """pyproject.toml points `bnvit` at `_bnvit_cli:main`, and python -m bnvit runs it."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    scripts = dict(re.findall(r'^(\S+) = "(.+)"$', section, flags=re.M))  # tomllib is Python >= 3.11 only
    assert scripts == {"bnvit": "_bnvit_cli:main"}
    module, _, name = scripts["bnvit"].partition(":")
    assert getattr(importlib.import_module(module), name) is main
    assert main is _bnvit_cli.main and build_parser is _bnvit_cli.build_parser


def test_the_wheel_ships_the_front_and_the_type_marker():
    """What `pip install bnvit` puts in site-packages: the package (with py.typed) and the front module."""
    build = (ROOT / "pyproject.toml").read_text().split("[tool.hatch.build.targets.wheel]\n", 1)[1]
    assert re.search(r'^packages = \["src/bnvit", "src/_bnvit_cli.py"\]$', build, flags=re.M)
    assert (ROOT / "src" / "bnvit" / "py.typed").is_file() and (ROOT / "src" / "_bnvit_cli.py").is_file()


@pytest.mark.slow
def test_bnvit_predict_error_exit_code(tmp_path, digit_files, reference_checkpoints):
    """A bad file among good ones: its own line on stderr, the others classified, exit status 2."""
    (tmp_path / "notes.png").write_text("not an image")
    (path, label), (other, other_label) = digit_files[0], digit_files[1]
    done = _run(
        "predict",
        str(path),
        str(tmp_path / "notes.png"),
        str(other),
        "--checkpoint",
        str(reference_checkpoints / VIT_CHECKPOINT),
    )
    assert done.returncode == 2
    (error,) = done.stderr.strip().splitlines()
    assert error.startswith(f"bnvit predict: error: image {tmp_path / 'notes.png'}: ") and "not an image file" in error
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(path), str(other)]
    assert lines[0].startswith(f"{path}: {label} ") and lines[1].startswith(f"{other}: {other_label} ")


def test_predict_in_process_with_every_reference_checkpoint(digit_files, reference_checkpoints, capsys):
    paths = [str(p) for p, _ in digit_files]
    for name in ("FinOptAug1_ViT_30.pth", "VITBNFFN_d5_15.pth", "FinOptAug1_ViTBNFFN_30.pth"):
        assert main(["predict", *paths, "--checkpoint", str(reference_checkpoints / name), "--top-k", "1"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        predicted = [int(line.split(": ")[1].split()[0]) for line in lines]
        assert sum(p == label for p, (_, label) in zip(predicted, digit_files, strict=True)) >= 2, (name, lines)


def test_predict_errors_name_the_file(tmp_path, digit_files, reference_checkpoints, capsys):
    image = str(digit_files[0][0])
    good = str(reference_checkpoints / VIT_CHECKPOINT)
    (tmp_path / "notes.png").write_text("not an image")
    torch.save(bnvit.MLP(norm="bn").state_dict(), tmp_path / "mlp.pth")
    torch.save(bnvit.ViT(depth=1, num_classes=5).state_dict(), tmp_path / "five.pth")
    torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
    cases = [
        (
            ["predict", str(tmp_path / "notes.png"), str(tmp_path / "gone.png"), "--checkpoint", good],
            [
                "image " + str(tmp_path / "notes.png") + ": ",
                "not an image file",
                "image " + str(tmp_path / "gone.png"),
                "not found",
            ],
        ),
        (["predict", image, "--checkpoint", str(tmp_path / "missing.pth")], ["missing.pth: file not found"]),
        (
            ["predict", image, str(tmp_path / "gone.png"), "--checkpoint", str(tmp_path / "missing.pth")],
            ["image " + str(tmp_path / "gone.png"), "missing.pth: file not found"],
        ),
        (["predict", image, "--checkpoint", image], ["photo_0.png: not a PyTorch checkpoint file"]),
        (["predict", image, "--checkpoint", str(tmp_path / "mlp.pth")], ["mlp.pth: not a bnvit or reference ViT"]),
        (["predict", image, "--checkpoint", str(tmp_path / "five.pth")], ["five.pth: holds a model", "5 classes"]),
        (["predict", image, "--checkpoint", str(tmp_path / "no_weights.pth")], ["no_weights.pth", "state dict"]),
        (["predict", image, "--checkpoint", good, "--top-k", "11"], ["--top-k 11", "1 to 10"]),
        (["predict", image, "--checkpoint", good, "--device", "tpu9"], ["--device", "'tpu9'"]),
    ]
    for argv, needles in cases:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        for needle in needles:
            assert needle in captured.err, (needle, captured.err)


@pytest.mark.parametrize("argv", [[], ["predict"], ["predict", "a.png", "--checkpoint", "c.pth", "--top-k", "0"]])
def test_usage_errors_exit_with_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: bnvit" in capsys.readouterr().err


def test_without_a_checkpoint_the_shipped_weights_classify(tmp_path, capsys):
    """`--checkpoint` may be omitted: the trained weights shipped with bnvit are used."""
    missing = tmp_path / "missing.png"
    assert main(["predict", str(missing)]) == 2
    assert f"image {missing}" in capsys.readouterr().err


def test_the_parser_accepts_the_documented_command():
    args = build_parser().parse_args(["predict", "a.png", "b.jpg", "--checkpoint", "m.pth", "--top-k", "5", "--json"])
    assert (args.images, args.checkpoint, args.top_k, args.json, args.device) == (
        ["a.png", "b.jpg"],
        "m.pth",
        5,
        True,
        "cpu",
    )


def test_bnvit_list_names_every_registered_model_and_its_weights(capsys):
    assert main(["list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert len(rows) == 25 and {"dnn_mnist", "vitbn_b16_224", "timmvitbnffn_mnist"} <= set(rows)
    assert rows["vit_tiny_patch16_bnffn_224"]["params"] == 5731240  # timm's vit_tiny_patch16_224, BatchNorm FFN
    assert rows["vitln_mnist"]["params"] == 893164 and rows["vitbnffn_mnist"]["params"] == 893932
    assert rows["vitbnffn_mnist"]["trained_weights"] and not rows["vitbn_mnist"]["trained_weights"]
    assert rows["vitbnffn_mnist"]["config"]["norm"] == "bn_ffn"
    assert rows["timmvitln_mnist"]["config"] == dict(norm="ln", depth=6, dim=64, heads=4, patch_size=7)
    assert rows["timmvitbnffn_mnist"]["config"]["norm"] == "bn_ffn"


# ---------------------------------------------------------------------- a command line that answers at once

HEAVY = ("torch", "timm", "torchvision", "bnvit", "numpy", "PIL")
WHAT_IS_IMPORTED = """
import sys
import _bnvit_cli
try:
    _bnvit_cli.main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
print("\\nimported:", " ".join(m for m in {heavy!r} if m in sys.modules), "exit:", code)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["reproduce", "--help"],
        ["list", "--help"],
        ["predict", "--help"],
        ["calibrate", "--help"],
        ["demo", "--help"],
        ["predict"],  # argument errors too
        ["reproduce", "nope"],
        ["predict", "a.png", "--top-k", "zero"],
        ["frobnicate"],
    ],
)
def test_help_and_argument_errors_import_neither_torch_nor_timm(argv):
    """The console script parses before it imports: no torch, timm or bnvit for help and bad arguments."""
    code = WHAT_IS_IMPORTED.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    last = done.stdout.strip().splitlines()[-1]
    assert last == f"imported:  exit: {0 if argv[-1] in ('--help', '--version') else 2}", (last, done.stderr)


def test_reproduce_help_lists_every_experiment(capsys):
    from bnvit.experiments import COMPARE_DEPTHS, COMPARE_LR, DNN_BATCHNORM, LR_WINDOW

    with pytest.raises(SystemExit) as exit_:
        main(["reproduce", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    scripts = {"depths": COMPARE_DEPTHS, "lr": COMPARE_LR, "mlp": DNN_BATCHNORM, "lr-window": LR_WINDOW}
    for what, experiment in scripts.items():
        (line,) = [line for line in out.splitlines() if line.startswith(f"  {what} ")]
        example = ROOT / line.rsplit("(", 1)[1].rstrip(")")
        assert example.is_file() and f"EXPERIMENT = {experiment.name.upper()}" in example.read_text(), line
    assert "  all " in out and "examples/reproduce.py" in out
    assert set(_bnvit_cli.REPRODUCE) == {*scripts, "all"}


def test_reproduce_without_an_experiment_names_what_is_missing(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["reproduce"])
    assert exit_.value.code == 2
    assert "the following arguments are required: WHAT\n" in capsys.readouterr().err


# ---------------------------------------------------------------------- files that are not pictures of digits


@pytest.mark.slow
def test_a_fifo_is_refused_without_blocking(tmp_path, digit_files):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"pipe\.png is not a regular file \(a named pipe\)"):
        load_image(fifo)
    code = "import sys, _bnvit_cli; sys.exit(_bnvit_cli.main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, "predict", str(fifo), str(digit_files[0][0]), "--top-k", "1"],
        capture_output=True,
        text=True,
        timeout=120,  # a blocking open would hang here until the timeout
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"bnvit predict: error: image {fifo}: {fifo} is not a regular file (a named pipe); "
        + ("expected an image file")
    )
    assert done.stdout.startswith(f"{digit_files[0][0]}: {digit_files[0][1]}  (top 1: ")


def _huge_png(path: Path, side: int) -> None:
    """A real `side` x `side` grayscale PNG of zeros, written row by row (a few hundred KB for 13000)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)  # filter byte 0, then the row
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    _huge_png(path, 13_000)  # 169 million pixels, 2.5 GB once decoded as RGB float
    assert path.stat().st_size < 1_000_000
    with pytest.warns(Image.DecompressionBombWarning), Image.open(path) as image:  # PIL itself only warns
        assert image.size == (13_000, 13_000)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("decoded before its size was checked")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    with pytest.raises(ValueError, match=r"huge\.png is 13000x13000 pixels \(169,000,000\); at most 50,000,000"):
        load_image(path)
    with pytest.raises(ValueError, match="at most 100"):
        load_image(path, max_pixels=100)
    with pytest.raises(ValueError, match="max_pixels must be a positive int"):
        load_image(path, max_pixels=0)


def test_several_files_each_error_on_its_own_line_the_rest_classified(tmp_path, digit_files, capsys):
    """Missing, folder, not an image, blank: four lines on stderr; the two digits on stdout; exit status 2."""
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (40, 40), 128).save(tmp_path / "blank.png")
    (tmp_path / "folder.png").mkdir()
    (good, label), (other, other_label) = digit_files[0], digit_files[2]
    bad = [tmp_path / name for name in ("gone.png", "folder.png", "notes.png", "blank.png")]
    argv = ["predict", str(bad[0]), str(good), str(bad[1]), str(bad[2]), str(other), str(bad[3]), "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert [line.split(": ")[1] for line in errors] == ["error"] * 4
    assert [line.split(": ", 2)[2].split(":")[0] for line in errors] == [f"image {path}" for path in bad]
    results = json.loads(captured.out)
    assert [r["file"] for r in results] == [str(bad[0]), str(good), str(bad[1]), str(bad[2]), str(other), str(bad[3])]
    assert [r.get("digit") for r in results] == [None, label, None, None, other_label, None]
    assert [f"bnvit predict: error: {r['error']}" for r in results if "error" in r] == errors


# ---------------------------------------------------------------------- calibrated probabilities


@pytest.fixture(scope="module")
def clean_test_digits(tmp_path_factory, mnist_test) -> tuple[list[str], list[int]]:
    """The first 30 MNIST test digits as PNG files, as they are in MNIST."""
    folder = tmp_path_factory.mktemp("clean")
    images, labels = mnist_test
    paths = []
    for i in range(30):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(images[i].numpy()).save(paths[-1])
    return paths, labels[:30].tolist()


def test_clean_test_digits_get_calibrated_probabilities(clean_test_digits, capsys):
    """The shipped weights are right on all 30 and say so: at least 99% for most, not label smoothing's 91%."""
    paths, labels = clean_test_digits
    assert main(["predict", *paths, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["digit"] for r in results] == labels
    t = shipped_temperature("vitbnffn_mnist")
    assert all(r["temperature"] == t for r in results) and 0.3 < t < 0.7
    confident = sorted(r["probability"] for r in results)
    assert confident[len(confident) // 2] > 0.995 and confident[3] > 0.95, confident

    assert main(["predict", *paths, "--json", "--temperature", "1"]) == 0  # the raw softmax, as before calibration
    raw = json.loads(capsys.readouterr().out)
    assert [r["digit"] for r in raw] == labels
    assert all(0.8 < r["probability"] < 0.93 for r in raw), sorted(r["probability"] for r in raw)
    for r, c in zip(raw, results, strict=True):  # one temperature for all: same order of the ten classes
        assert np.argsort(r["probabilities"]).tolist() == np.argsort(c["probabilities"]).tolist()


def test_text_output_shows_the_calibrated_probability(clean_test_digits, capsys):
    paths, labels = clean_test_digits
    assert main(["predict", paths[0], "--top-k", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(
        rf"{re.escape(paths[0])}: {labels[0]}  \(top 2: {labels[0]} (99\.\d|100\.0)%, \d [\d.]+%\)", line
    )


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "warm"])
def test_a_bad_temperature_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "a.png", "--temperature", value])
    assert exit_.value.code == 2 and "--temperature" in capsys.readouterr().err


# ---------------------------------------------------------------------- raster images only


def _document(kind: str) -> bytes:
    """An EPS or PDF as PIL writes it, or a hand-written PostScript program."""
    if kind == "PS":
        return b"%!PS\n/Times-Roman findfont 12 scalefont setfont 72 72 moveto (7) show showpage\n"
    buffer = io.BytesIO()
    Image.new("RGB" if kind == "PDF" else "L", (32, 32), 255).save(buffer, format=kind)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("kind", "named"), [("EPS", "an EPS file"), ("PS", "a PostScript file"), ("PDF", "a PDF file")]
)
def test_postscript_and_pdf_are_refused_before_any_interpreter_runs(
    tmp_path, monkeypatch, digit_files, capsys, kind, named
):
    from PIL import EpsImagePlugin

    def no_interpreter(*args, **kwargs):
        raise AssertionError("PIL's EPS reader was reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", no_interpreter)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_interpreter)
    path = tmp_path / "digit.png"  # the name does not matter, the bytes do
    path.write_bytes(_document(kind))
    with pytest.raises(
        ValueError, match=rf"digit\.png is {named}, read by an interpreter.*use PNG, JPEG, GIF, BMP, TIFF"
    ):
        load_image(path)
    good, label = digit_files[2]
    assert main(["predict", str(path), str(good), "--top-k", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and f"image {path}: {path} is {named}" in captured.err
    assert captured.out.startswith(f"{good}: {label}  ")


def test_only_the_listed_raster_formats_are_tried(monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        Image, "open", lambda fp, mode="r", formats=None: opened.append(formats) or real_open(fp, mode, formats)
    )
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    buffer.seek(0)
    from bnvit.data.digits import RASTER_FORMATS, open_raster

    open_raster(buffer, "x.png").load()
    assert opened == [RASTER_FORMATS] and "EPS" not in RASTER_FORMATS and "PDF" not in RASTER_FORMATS


def test_a_float_tiff_with_huge_values_is_classified(tmp_path):
    """A mode-F TIFF at +-3e38 (near float32's limit): the contrast stretch must not overflow to 'no digit'."""
    canvas = np.zeros((60, 60), np.float32)
    canvas[10:50, 28:33] = 1.0  # a "1"
    expected = prepare_digit(canvas)
    Image.fromarray(np.where(canvas > 0, 3e38, -3e38).astype(np.float32), "F").save(tmp_path / "huge.tif")
    torch.testing.assert_close(prepare_digit(tmp_path / "huge.tif"), expected)
    torch.testing.assert_close(prepare_digit(canvas.astype(np.float64) * 1e300), expected)
    torch.testing.assert_close(prepare_digit(torch.from_numpy(canvas).long() * (1 << 62)), expected)
    with pytest.raises(ValueError, match="NaN or infinite"):
        prepare_digit(np.where(canvas > 0, np.inf, 0))


def test_a_file_name_with_a_newline_prints_on_one_line(tmp_path, digit_files, capsys):
    good, label = digit_files[2]
    tricky = tmp_path / "two\nlines.png"
    tricky.write_bytes(good.read_bytes())
    missing = tmp_path / "gone\n\x1b[2J.png"
    assert main(["predict", str(tricky), str(missing), "--top-k", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and captured.out.startswith(f"{tmp_path}/two\\nlines.png: {label}  ")
    assert captured.err.count("\n") == 1 and "gone\\n\\x1b[2J.png" in captured.err


# ---------------------------------------------------------------------- many files


def test_predict_streams_the_files_in_fixed_size_batches(clean_test_digits, tmp_path, monkeypatch, capsys):
    """7 files (one unreadable) with --batch-size 3: batches of 3, 2 and 1 images; the same answers as in one batch."""
    import bnvit.app.cli as cli
    import bnvit.app.predict

    paths, labels = clean_test_digits
    (tmp_path / "notes.png").write_text("not an image")
    files = [*paths[:4], str(tmp_path / "notes.png"), *paths[4:6]]
    batches: list[int] = []
    real = bnvit.app.predict.for_inference

    def recording(model):
        model = real(model)
        model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
        return model

    monkeypatch.setattr(bnvit.app.predict, "for_inference", recording)
    assert main(["predict", *files, "--json", "--batch-size", "3"]) == 2
    out = capsys.readouterr().out
    streamed = json.loads(out)
    assert out == json.dumps(streamed, indent=2) + "\n"  # the same text as printing the whole list
    assert batches == [3, 2, 1]
    assert [r.get("digit") for r in streamed] == [*labels[:4], None, *labels[4:6]]
    batches.clear()
    whole = cli.predict(files, batch_size=len(files))
    assert batches == [6]
    for a, b in zip(streamed, whole, strict=True):
        assert a.keys() == b.keys() and a.get("error") == b.get("error")
        np.testing.assert_allclose(a.get("probabilities", []), b.get("probabilities", []), atol=1e-6)
    assert main(["predict", "--json", paths[0], "--batch-size", "1"]) == 0 and json.loads(capsys.readouterr().out)
    with pytest.raises(cli.CommandError, match="--batch-size 0"):
        cli.predict(files, batch_size=0)


# ---------------------------------------------------------------------- not one digit


def _one_digit_check():
    """examples/one_digit_check.py, which generates the pictures that are not one digit."""
    spec = importlib.util.spec_from_file_location("one_digit_check", ROOT / "examples" / "one_digit_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pictures_that_are_not_one_digit_are_answered_as_guesses(tmp_path, mnist_test, clean_test_digits, capsys):
    """A two-digit number: the model's guess, marked, exit status 3; uniform noise: no digit found (status 2)."""
    images, labels = mnist_test
    number = np.concatenate([images[0].numpy(), np.zeros((28, 4), np.uint8), images[1].numpy()], axis=1)
    Image.fromarray(number).save(tmp_path / "number.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90)).astype(np.uint8)).save(tmp_path / "noise.png")
    clean = clean_test_digits[0][0]
    files = [clean, str(tmp_path / "number.png")]
    assert main(["predict", *files, "--top-k", "1"]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{clean}: {labels[0]}  (top 1: ")
    assert re.fullmatch(
        rf"{re.escape(files[1])}: not one digit \(2 separate marks side by side, like a number\); "
        r"the model's guess: \d  \(top 1: \d [\d.]+%\)",
        lines[1],
    )
    assert main(["predict", *files, "--json"]) == 3
    results = json.loads(capsys.readouterr().out)
    assert [r["one_digit"] for r in results] == [True, False]
    assert results[0]["not_one_digit"] is None and "like a number" in results[1]["not_one_digit"]
    assert all(0 <= r["digit"] <= 9 for r in results)  # the guess is still there
    # Noise has no ink that stands out from its background once the background is removed: no digit at all.
    assert main(["predict", *files, str(tmp_path / "noise.png")]) == 2  # bad input wins
    captured = capsys.readouterr()
    assert f"{tmp_path / 'noise.png'}: no digit found" in captured.out + captured.err


def test_the_one_digit_check_on_mnist_and_on_generated_non_digits(mnist_test):
    """A small sample of the measurement in docs/weights.md: few clean digits flagged, most non-digits."""
    from bnvit.data import one_digit_problem

    check = _one_digit_check()
    images, _ = mnist_test
    flagged = [one_digit_problem(prepare_digit(images[i].numpy())) for i in range(0, 10_000, 100)]
    assert sum(f is not None for f in flagged) <= 2, [f for f in flagged if f]  # 100 digits, at most 2%
    for k, kind in enumerate(check.KINDS):
        rng, said = np.random.default_rng([7, k]), 0
        for _ in range(12):
            try:  # flagged as not one digit, or refused as holding no digit: either says it plainly
                said += one_digit_problem(prepare_digit(check.non_digit(kind, rng, images))) is not None
            except ValueError as err:
                said += "no digit" in str(err) or "blank" in str(err)
        floor = 0.5 if kind == "texture" else 0.75  # textures are the weak kind (docs/weights.md)
        assert said >= floor * 12, (kind, said)


# ---------------------------------------------------------------------- shipped weights by name


def test_predict_passes_the_model_name_on(clean_test_digits):
    """`predict(model=...)` (the function, not only the command) uses the named shipped weights."""
    from bnvit.app.predict import predict

    paths, labels = clean_test_digits
    results = predict(paths[:2], model="vitln_mnist")
    assert [r["digit"] for r in results] == labels[:2]
    assert all(r["temperature"] == shipped_temperature("vitln_mnist") for r in results)


def test_shipped_weights_are_chosen_by_name(clean_test_digits, tmp_path, capsys):
    """`--model vitln_mnist` and `--checkpoint vitln_mnist`: the second shipped weights, at their own temperature."""
    paths, labels = clean_test_digits
    assert main(["predict", *paths[:3], "--model", "vitln_mnist", "--json"]) == 0
    by_model = json.loads(capsys.readouterr().out)
    assert [r["digit"] for r in by_model] == labels[:3]
    assert all(r["temperature"] == shipped_temperature("vitln_mnist") for r in by_model)
    assert shipped_temperature("vitln_mnist") != shipped_temperature("vitbnffn_mnist")
    assert main(["predict", *paths[:3], "--checkpoint", "vitln_mnist", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_model
    assert main(["predict", paths[0], "--model", "vitbnffn_mnist", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["predict", paths[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == default
    assert main(["predict", paths[0], "--model", "vit_tiny"]) == 2
    err = capsys.readouterr().err
    assert "--model 'vit_tiny': no weights ship with bnvit" in err and "vitln_mnist" in err
    assert main(["predict", paths[0], "--model", "vitln_mnist", "--checkpoint", "x.pth"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_calibrate_takes_a_shipped_name_and_writes_nothing(tmp_path, monkeypatch, capsys, mnist_root):
    """A shipped name is read as its weights (not a missing file); the shipped model makes no mistake on
    these 200 training images, so the fit is refused as having too few errors, and nothing is written."""
    monkeypatch.setenv("BNVIT_DATA", str(mnist_root))  # absolute: the test changes directory
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "vitln_mnist", "--images", "59800:60000", "--json"]) == 2
    err = capsys.readouterr().err
    assert "too few errors to fit a temperature" in err and "nothing was written" in err
    assert "not found" not in err
    assert list(tmp_path.iterdir()) == []
