"""Running exported folders with onnxruntime. Imports only onnxruntime, numpy and (optionally)
tokenizers, never torch, so apps can ship it without PyTorch."""

from .llama import LlamaRunner
from .manifest import read_manifest
from .tokenizer import load_tokenizer

__all__ = ["LlamaRunner", "load_tokenizer", "read_manifest"]
