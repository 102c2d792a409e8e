"""bnvit as a timm citizen: entry points, pretrained cfgs, the builder, the BN-FFN block (`import timm` is timm's)."""

from .blocks import BatchNormMlp, BNFFNBlock, name_bn_ffn, to_bn_ffn

__all__ = ["BNFFNBlock", "BatchNormMlp", "name_bn_ffn", "to_bn_ffn"]
