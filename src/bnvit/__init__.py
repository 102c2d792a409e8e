"""bnvit: Vision Transformers with BatchNorm.

The article "Vision Transformer with BatchNorm" puts a BatchNorm inside the transformer's
feed-forward network (`Linear -> BatchNorm -> GELU -> Linear`, no LayerNorm before the FFN)
and finds that the resulting ViTBNFFN trains faster and tolerates higher learning rates
than a standard ViT. This package provides those models, timm builders for them, the
article's data pipeline, a small training helper and the experiments that reproduce it.

Examples:
    >>> import torch
    >>> from bnvit import ViTBNFFN
    >>> model = ViTBNFFN(depth=6)
    >>> model(torch.rand(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._util import device as _device  # noqa: F401  first: sets OpenMP's passive waiting before torch loads
from .inference import export_onnx, fold_batchnorm, for_inference
from .models import (
    MLP,
    Attention,
    BatchNormFFN,
    EncoderBlock,
    FeedForward,
    TokenBatchNorm,
    ViT,
    ViTBN,
    ViTBNFFN,
    ViTConfig,
)
from .timm import BatchNormMlp, BNFFNBlock, to_bn_ffn
from .timm import registry as _registry  # noqa: F401  (registers bnvit's ViTs and MLPs in timm)
from .timm import vision_transformer_bnffn as _timm_vit  # noqa: F401  (registers timmvitln_mnist, timmvitbnffn_mnist)
from .training import Callback, CSVLogger, EpochRecord, History, JSONLLogger, evaluate, fit, recalibrate_bn
from .weights import checkpoint_filter_fn, load_model

try:
    __version__ = version("bnvit")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = [
    "MLP",
    "Attention",
    "BNFFNBlock",
    "BatchNormFFN",
    "BatchNormMlp",
    "CSVLogger",
    "Callback",
    "EncoderBlock",
    "EpochRecord",
    "FeedForward",
    "History",
    "JSONLLogger",
    "TokenBatchNorm",
    "ViT",
    "ViTBN",
    "ViTBNFFN",
    "ViTConfig",
    "__version__",
    "checkpoint_filter_fn",
    "evaluate",
    "export_onnx",
    "fit",
    "fold_batchnorm",
    "for_inference",
    "load_model",
    "recalibrate_bn",
    "to_bn_ffn",
]
