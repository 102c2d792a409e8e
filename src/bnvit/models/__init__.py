"""The article's models as plain `nn.Module`s; nothing here imports the rest of bnvit."""

from .attention import Attention
from .batchnorm import TokenBatchNorm
from .blocks import BatchNormFFN, EncoderBlock, FeedForward, PatchEmbed
from .config import ViTConfig
from .dnn import MLP
from .fold import fold_batchnorm
from .vit import ViT, ViTBN, ViTBNFFN

__all__ = [
    "MLP",
    "Attention",
    "BatchNormFFN",
    "EncoderBlock",
    "FeedForward",
    "PatchEmbed",
    "TokenBatchNorm",
    "ViT",
    "ViTBN",
    "ViTBNFFN",
    "ViTConfig",
    "fold_batchnorm",
]
