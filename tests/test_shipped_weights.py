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

from bnvit._util.io import tensors_sha256
from bnvit.data import load_mnist
from bnvit.weights.loading import SHIPPED, WEIGHTS_DIR, shipped_record


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_file_carries_its_checksum_and_scores(name):
    """The file's own metadata: the sha256 of its tensors, and the scores its training record states."""
    weights = WEIGHTS_DIR / f"{name}.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert metadata["sha256"] == tensors_sha256(state)
    record = shipped_record(name)
    assert float(metadata["clean_test_acc"]) == record["clean_test_acc"] >= 0.99
    assert float(metadata["augmented_test_acc"]) == record["augmented_test_acc"]
    assert weights.stat().st_size < 4_000_000  # fp32, ~3.6 MB


def test_timm_loads_them_offline_with_the_article_config():
    model = timm.create_model("vitbnffn_mnist", pretrained=True).eval()
    assert model.cfg.depth == 6 and model.cfg.norm == "bn_ffn"
    assert model.pretrained_cfg["tag"] == "bnvit_mnist" and model.pretrained_cfg["notes"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(2, 1, 28, 28))).all()


@pytest.mark.slow
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


def test_the_two_shipped_weights_share_one_recipe():
    # the shipped files compare the architectures like for like: same recipe, seed and precision
    ln, bn = (shipped_record(name) for name in ("vitln_mnist", "vitbnffn_mnist"))
    assert ln["recipe"] == bn["recipe"] and ln["recipe"]["epochs"] == 100
    assert (ln["seed"], ln["precision"]) == (bn["seed"], bn["precision"])
    assert ln["params"] == 893164 and bn["params"] == 893932
