"""bnvit as a timm citizen: entry points and pretrained configs, the one builder, the BN-FFN timm block.

`import bnvit` registers every model here in timm's registry (`timm.create_model("vitbnffn_mnist")`).
Inside this package `import timm` still means timm itself (absolute imports).
"""

from .blocks import BatchNormMlp, BNFFNBlock, name_bn_ffn, to_bn_ffn

__all__ = ["BNFFNBlock", "BatchNormMlp", "name_bn_ffn", "to_bn_ffn"]
