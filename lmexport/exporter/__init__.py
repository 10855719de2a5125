"""PyTorch → ONNX export (imports torch)."""

from .convert import DTYPES, TARGETS, convert

__all__ = ["DTYPES", "TARGETS", "convert"]
