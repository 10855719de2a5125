"""Running exported folders with onnxruntime. Imports only onnxruntime, numpy, jinja2 (chat
templates) and (optionally) tokenizers and Pillow, never torch, so apps can ship it without
PyTorch."""

from .batching import left_pad
from .chat import ChatTemplate, load_chat_template
from .llama import LlamaRunner
from .manifest import read_manifest
from .session import share_threads
from .text import Detokenizer, TextStep
from .tokenizer import load_tokenizer
from .vision import ImageClassifier, Prediction

__all__ = [
    "ChatTemplate",
    "Detokenizer",
    "ImageClassifier",
    "LlamaRunner",
    "Prediction",
    "TextStep",
    "left_pad",
    "load_chat_template",
    "load_tokenizer",
    "read_manifest",
    "share_threads",
]
