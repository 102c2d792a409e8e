"""timm's own scripts run bnvit's models with no extra flags, through `python -m bnvit.timm.script`.

Needs a timm checkout (the scripts are not in the timm package): set `BNVIT_TIMM_CHECKOUT` to one
(`git clone https://github.com/huggingface/pytorch-image-models`); skipped otherwise. `--device cpu`
and small sizes are the only flags added, as for timm's own models on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bnvit.timm.script import main

CHECKOUT = Path(os.environ.get("BNVIT_TIMM_CHECKOUT", "")) if os.environ.get("BNVIT_TIMM_CHECKOUT") else None
SRC = Path(__file__).resolve().parents[1] / "src"
needs_checkout = pytest.mark.skipif(
    CHECKOUT is None or not (CHECKOUT / "train.py").is_file(), reason="set BNVIT_TIMM_CHECKOUT to a timm checkout"
)


def _run(script: str, *args: str, cwd: Path, extra_path: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SRC), extra_path) if p), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bnvit.timm.script", str(CHECKOUT / script), *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A tiny MNIST-like image folder in timm's layout: train/ and validation/, one folder per class."""
    from bnvit.data import load_mnist

    try:
        images, labels = load_mnist(train=False)
    except (FileNotFoundError, ValueError):
        pytest.skip("MNIST not found: set BNVIT_DATA")
    root = tmp_path_factory.mktemp("mnist_folder")
    for split in ("train", "validation"):
        for i in range(32):
            folder = root / split / str(int(labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i].numpy()).save(folder / f"{i}.png")
    return root


def test_main_refuses_a_missing_script(tmp_path, capsys):
    assert main([str(tmp_path / "train.py")]) == 2
    assert f"no script at {tmp_path / 'train.py'}" in capsys.readouterr().err


def test_main_runs_the_script_as_main_with_bnvit_registered(tmp_path):
    script = tmp_path / "probe.py"
    out = tmp_path / "out.json"
    script.write_text(
        "import sys, json, timm\n"
        "m = timm.create_model('vitbnffn_mnist', depth=1)\n"
        f"json.dump([__name__, sys.argv[1:], m.pretrained_cfg['input_size']], open({str(out)!r}, 'w'))\n"
    )
    assert main([str(script), "--flag", "x"]) == 0
    assert json.loads(out.read_text()) == ["__main__", ["--flag", "x"], [1, 28, 28]]


def test_an_old_model_name_reaches_the_script_by_its_current_name(tmp_path, capsys):
    # timm's scripts resolve a pretrained cfg under the name they are given; under an old name
    # (a deprecated alias in timm's registry) they would find none, so the name is passed on renamed
    script = tmp_path / "probe.py"
    out = tmp_path / "out.json"
    script.write_text(
        "import argparse, json, timm\n"
        "p = argparse.ArgumentParser(); p.add_argument('--model', '-m')\n"
        "name = p.parse_args().model\n"
        "args = timm.models.resolve_model_input_args(name)\n"
        "m = timm.create_model(pretrained=True, **args)\n"
        f"json.dump([name, m.pretrained_cfg['tag']], open({str(out)!r}, 'w'))\n"
    )
    for given in (["--model", "vit_mnist"], ["--model=vit_mnist"], ["-m", "vit_mnist"]):
        assert main([str(script), *given]) == 0
        assert json.loads(out.read_text()) == ["vitln_mnist", "bnvit_mnist"]
        assert "model vit_mnist is now called vitln_mnist" in capsys.readouterr().err
    assert main([str(script), "--model", "vitbnffn_mnist"]) == 0
    assert json.loads(out.read_text())[0] == "vitbnffn_mnist" and capsys.readouterr().err == ""


@pytest.mark.slow
@needs_checkout
def test_train_with_timms_pool_and_batchnorm_flags(image_folder, tmp_path):
    args = ["--model", "vitbnffn_mnist", "--data-dir", str(image_folder), "--device", "cpu", "--epochs", "1"]
    args += ["--batch-size", "16", "--workers", "0", "--warmup-epochs", "0", "--output", str(tmp_path)]
    _run("train.py", *args, "--gp", "avg", "--bn-momentum", "0.05", "--bn-eps", "1e-4", cwd=tmp_path)


@pytest.mark.slow
@needs_checkout
def test_validate_benchmark_onnx_export_and_inference(image_folder, tmp_path):
    done = _run(
        "validate.py",
        *("--model", "vitbnffn_mnist", "--pretrained", "--data-dir", str(image_folder), "--device", "cpu"),
        *("--workers", "0", "--batch-size", "16"),
        cwd=tmp_path,
    )
    assert "Acc@1" in done.stdout + done.stderr
    bench = ("--model", "vitbnffn_mnist", "--device", "cpu", "--bench", "inference", "--batch-size", "4")
    _run("benchmark.py", *bench, "--num-warm-iter", "1", "--num-bench-iter", "5", cwd=tmp_path)
    _run("onnx_export.py", str(tmp_path / "model.onnx"), "--model", "vitbnffn_mnist", "--check-forward", cwd=tmp_path)
    assert (tmp_path / "model.onnx").is_file()
    pytest.importorskip("pandas", reason="timm's inference.py needs pandas")
    args = ("--model", "vitbnffn_mnist", "--pretrained", "--data-dir", str(image_folder / "validation"))
    _run("inference.py", *args, "--device", "cpu", "--workers", "0", "--results-dir", str(tmp_path), cwd=tmp_path)


@pytest.mark.slow
@needs_checkout
def test_validate_pretrained_on_the_mnist_test_set(tmp_path):
    """timm's validate.py --pretrained on the 10,000 MNIST test images, as an image folder: >= 99.5% top-1."""
    from bnvit.data import load_mnist

    try:
        images, labels = load_mnist(train=False)
    except (FileNotFoundError, ValueError):
        pytest.skip("MNIST not found: set BNVIT_DATA")
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "data" / "validation" / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy()).save(folder / f"{i:05d}.png")
    args = ("--model", "vitbnffn_mnist", "--pretrained", "--data-dir", str(tmp_path / "data"), "--device", "cpu")
    done = _run("validate.py", *args, "--workers", "0", "--batch-size", "500", cwd=tmp_path)
    results = json.loads(done.stdout.split("--result\n", 1)[1])  # validate.py prints its results as JSON last
    assert results["model"] == "vitbnffn_mnist" and results["top1"] >= 99.5, results


@pytest.mark.slow
@needs_checkout
@pytest.mark.parametrize("name", ["vitbnffn_mnist"])  # onnx_export.py loads pretrained weights: the shipped ones
def test_reparam_in_onnx_export_leaves_no_batchnorm_node(name, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "model.onnx"
    _run("onnx_export.py", str(path), "--model", name, "--reparam", cwd=tmp_path)
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.slow
@needs_checkout
def test_validate_with_reparam_and_a_timm_layout_name(image_folder, tmp_path):
    common = ("--data-dir", str(image_folder), "--device", "cpu", "--workers", "0", "--batch-size", "16")
    done = _run("validate.py", "--model", "vitbnffn_mnist", "--pretrained", "--reparam", *common, cwd=tmp_path)
    assert "Acc@1" in done.stdout + done.stderr
    bench = ("--model", "vit_tiny_patch16_bnffn_224", "--model-kwargs", "depth=1", "img_size=32", "--img-size", "32")
    bench += ("--reparam", "--device", "cpu", "--bench", "inference", "--batch-size", "2")
    _run("benchmark.py", *bench, "--num-warm-iter", "1", "--num-bench-iter", "5", cwd=tmp_path)
