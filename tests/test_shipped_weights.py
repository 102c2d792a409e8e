"""The trained weights shipped in the package: they load offline through timm, are verified, and score as stated."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open

import bnvit
from bnvit._io import tensors_sha256
from bnvit.data import DeviceLoader, load_mnist
from bnvit.registry import WEIGHTS_DIR

WEIGHTS = WEIGHTS_DIR / "vitbnffn_mnist.safetensors"


def test_the_shipped_file_carries_its_checksum_and_scores():
    with safe_open(str(WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert metadata["sha256"] == tensors_sha256(state)
    assert float(metadata["clean_test_acc"]) >= 0.99
    assert WEIGHTS.stat().st_size < 4_000_000  # fp32, ~3.6 MB


def test_timm_loads_them_offline_with_the_article_config():
    model = timm.create_model("vitbnffn_mnist", pretrained=True).eval()
    assert model.cfg.depth == 6 and model.cfg.norm == "bn_ffn"
    assert model.pretrained_cfg["tag"] == "bnvit_mnist" and model.pretrained_cfg["notes"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 1, 28, 28))).all()


def test_bnvit_predict_uses_them_without_a_checkpoint(mnist_root, tmp_path):
    images, labels = load_mnist(mnist_root, train=False)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(images[i].numpy()).save(paths[-1])
    run = subprocess.run(
        [sys.executable, "-m", "bnvit", "predict", *map(str, paths), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert [r["digit"] for r in json.loads(run.stdout)] == labels[:3].tolist()


@pytest.mark.slow
def test_the_stated_clean_accuracy_is_what_they_score(mnist_root):
    images, labels = load_mnist(mnist_root, train=False)
    model = timm.create_model("vitbnffn_mnist", pretrained=True)
    result = bnvit.evaluate(model, DeviceLoader(images, labels, batch_size=5000, shuffle=False), device="cpu")
    with safe_open(str(WEIGHTS), framework="pt") as f:
        stated = float(f.metadata()["clean_test_acc"])
    assert result["acc"] == pytest.approx(stated, abs=2e-4)
