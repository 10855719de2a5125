"""Tracing without torch.onnx's progress lines and warnings, which are noise to lmexport users."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def errors_only(logger_name: str) -> Iterator[None]:
    """`logger_name` logs errors only inside the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    with errors_only("torch.onnx"), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        yield
