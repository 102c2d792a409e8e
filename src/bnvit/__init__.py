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

from . import mlp as _mlp  # noqa: F401  (registers dnn_mnist, dnnbn_mnist)
from . import registry as _registry  # noqa: F401  (registers the timm builders)
from . import timmvit as _timmvit  # noqa: F401  (registers timmvitln_mnist, timmvitbnffn_mnist)
from .convert import checkpoint_filter_fn
from .deploy import export_onnx, for_inference
from .fuse import fold_batchnorm
from .layers import Attention, BatchNormFFN, EncoderBlock, FeedForward, TokenBatchNorm
from .loading import load_model
from .mlp import MLP
from .timm_blocks import BatchNormMlp, BNFFNBlock, to_bn_ffn
from .training import Callback, CSVLogger, EpochRecord, History, JSONLLogger, evaluate, fit, recalibrate_bn
from .vit import ViT, ViTBN, ViTBNFFN, ViTConfig

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
