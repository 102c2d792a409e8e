"""The public surface survives reorganisations: every name bnvit, bnvit.training and bnvit.data exported
before the package was split by role is still exported and still resolves (new names may be added)."""

from __future__ import annotations

import importlib

import pytest

BEFORE_THE_SPLIT = {
    "bnvit": [
        "Attention", "BNFFNBlock", "BatchNormFFN", "BatchNormMlp", "CSVLogger", "Callback", "EncoderBlock",
        "EpochRecord", "FeedForward", "History", "JSONLLogger", "MLP", "TokenBatchNorm", "ViT", "ViTBN",
        "ViTBNFFN", "ViTConfig", "__version__", "checkpoint_filter_fn", "evaluate", "export_onnx", "fit",
        "fold_batchnorm", "for_inference", "load_model", "recalibrate_bn", "to_bn_ffn",
    ],
    "bnvit.training": [
        "CSVLogger", "Callback", "EpochRecord", "FolderLockedError", "History", "JSONLLogger", "MLflowLogger",
        "PRECISIONS", "StepRecord", "TensorBoardLogger", "TrainState", "cpu_has_fast_bf16", "evaluate", "fit",
        "recalibrate_bn", "resolve_device", "resolve_precision",
    ],
    "bnvit.data": [
        "AugmentParams", "DeviceLoader", "ENV_VAR", "MNISTDataset", "MNIST_FILES", "TEST_METHODS", "apply_augment",
        "article_transform", "augment_batch", "augment_matrices", "augmented_test_set", "cache_dir",
        "find_mnist_root", "load_image", "load_mnist", "mnist_files", "mnist_loaders", "prepare_digit", "read_idx",
        "sample_augment_params",
    ],
}  # fmt: skip


@pytest.mark.parametrize("module", sorted(BEFORE_THE_SPLIT))
def test_every_public_name_is_still_exported(module):
    mod = importlib.import_module(module)
    missing = sorted(set(BEFORE_THE_SPLIT[module]) - set(mod.__all__))
    assert not missing, f"{module}.__all__ lost {missing}"
    unresolved = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not unresolved, f"{module}.__all__ names what it does not define: {unresolved}"


def test_the_top_level_names_are_the_models_and_tools_not_other_layers():
    import bnvit

    assert bnvit.ViTBNFFN.__module__ == "bnvit.models.vit" and bnvit.fit.__module__ == "bnvit.training.loop"
    assert bnvit.BNFFNBlock.__module__ == "bnvit.timm.blocks" and bnvit.load_model.__module__ == "bnvit.weights.loading"
