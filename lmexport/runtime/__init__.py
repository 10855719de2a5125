"""Running exported folders with onnxruntime. Imports only onnxruntime, numpy and (optionally)
tokenizers and Pillow, never torch, so apps can ship it without PyTorch."""

from .llama import LlamaRunner
from .manifest import read_manifest
from .tokenizer import load_tokenizer
from .vision import ImageClassifier, Prediction

__all__ = ["ImageClassifier", "LlamaRunner", "Prediction", "load_tokenizer", "read_manifest"]
