"""Inference: fold BatchNorms away, compile or script for serving, export to ONNX; imports no training code."""

from ..models.fold import fold_batchnorm
from .deploy import export_onnx, for_inference

__all__ = ["export_onnx", "fold_batchnorm", "for_inference"]
