"""Graph optimisations of `lmexport optimize`: onnxscript rewrite rules, one fusion per file."""

from __future__ import annotations

from .command import optimize_file
from .pipeline import optimize_model
from .report import Fusion, Report

__all__ = ["Fusion", "Report", "optimize_file", "optimize_model"]
