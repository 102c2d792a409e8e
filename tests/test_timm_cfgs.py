"""Pretrained cfgs as timm's data pipeline reads them: label names, fixed input size, one-channel images."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_transform, resolve_data_config

import bnvit  # noqa: F401  (registers the models)

MNIST_MODELS = ["vitln_mnist", "vitbnffn_mnist", "vitbn_mnist", "timmvitln_mnist", "timmvitbnffn_mnist", "dnnbn_mnist"]


@pytest.mark.parametrize("name", MNIST_MODELS)
def test_mnist_models_name_their_labels(name):
    cfg = timm.create_model(name, depth=1).pretrained_cfg
    assert cfg["label_names"] == tuple("0123456789")
    assert "label_names" not in timm.create_model(name, depth=1, num_classes=3).pretrained_cfg  # not those labels


@pytest.mark.parametrize("name", ["vitbnffn_mnist", "timmvitbnffn_mnist"])
def test_fixed_input_size_is_true_only_where_the_size_is_fixed(name):
    fixed = timm.create_model(name, depth=1).eval()
    dynamic = timm.create_model(name, depth=1, dynamic_img_size=True).eval()
    assert fixed.pretrained_cfg["fixed_input_size"] is True
    assert dynamic.pretrained_cfg["fixed_input_size"] is False
    assert dynamic(torch.rand(2, 1, 42, 35)).shape == (2, 10)  # it does take another size
    with pytest.raises((ValueError, AssertionError, RuntimeError)):
        fixed(torch.rand(2, 1, 42, 35))


def test_timms_data_pipeline_gives_a_one_channel_model_one_channel_images(tmp_path):
    for label in ("3", "7"):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (28, 28), (40 * i, 200, 90)).save(tmp_path / label / f"{i}.png")  # colour files
    model = timm.create_model("vitbnffn_mnist", pretrained=True).eval()
    config = resolve_data_config(model=model)
    mode = "RGB" if config["input_size"][0] == 3 else "L"  # the rule of timm's train.py / validate.py
    dataset = create_dataset("", root=str(tmp_path), input_img_mode=mode, transform=create_transform(**config))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert mode == "L" and images.shape == (4, 1, 28, 28)
    assert model(images).shape == (4, 10)
