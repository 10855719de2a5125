"""How far a quantized Llama graph strays from its float one: both run in onnxruntime over the
same fixed prompts, teacher-forced (every position scores the prompt's own next token), and
compared position by position by top-1 agreement and KL(float ‖ quantized)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from ..onnx_files import save_onnx
from ..runtime.session import session_options
from ..verify.metrics import kl_divergence, top1_agreement

# With a tokenizer the prompts are text; without one, seeded random ids of PROMPT_LENGTH.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog, and the dog, annoyed, goes back to sleep.",
    "In 1969 the first humans walked on the Moon. The mission was called Apollo 11 and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
    "Photosynthesis is the process by which green plants use sunlight to make glucose from",
    "Dear customer, thank you for your order. Unfortunately the item you asked for is",
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is",
    "To make a simple bread you need flour, water, salt and yeast. First, mix the flour with",
    "Question: What is the boiling point of water at sea level?\nAnswer: It is 100 degrees",
)
PROMPT_LENGTH = 48
SEED = 0
ONNX_SIZE_LIMIT = 2**31 - 1  # protobuf's limit on a model serialized in one piece


def prompt_set(
    vocab_size: int, tokenizer: Any = None, context: int | None = None
) -> tuple[list[np.ndarray], str]:
    """The fixed prompts as id rows, each cut to the model's `context` (a short-context
    model's graph refuses longer ones), and a line that says what they are."""
    if tokenizer is not None:
        rows = [np.array(tokenizer.encode(text).ids, dtype=np.int64) for text in PROMPTS]
        rows = [r[r < vocab_size][:context] for r in rows]
        return [r for r in rows if len(r) >= 2], f"{len(PROMPTS)} fixed English/code texts"
    rng = np.random.default_rng(SEED)
    length = PROMPT_LENGTH if context is None else min(PROMPT_LENGTH, context)
    rows = [rng.integers(0, vocab_size, PROMPT_LENGTH, dtype=np.int64)[:length] for _ in PROMPTS]
    return rows, f"{len(rows)} x {length} random ids (seed {SEED}); no tokenizer"


class _Session:
    """A session over an in-memory graph (through a temporary file when it is too large)."""

    def __init__(self, model: onnx.ModelProto, threads: int | None) -> None:
        options = session_options(threads)
        providers = ["CPUExecutionProvider"]
        if model.ByteSize() < ONNX_SIZE_LIMIT:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.onnx"
                save_onnx(model, path, "model.onnx.data")
                self.session = ort.InferenceSession(str(path), options, providers)
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past")]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
        for i in self.past:  # [batch, kv_heads, 0, head_dim]: a prefill
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        return np.asarray(self.session.run(["logits"], feeds)[0][0], dtype=np.float32)


def measure_accuracy(
    reference: onnx.ModelProto,
    quantized: onnx.ModelProto,
    vocab_size: int,
    tokenizer: Any = None,
    threads: int | None = None,
    context: int | None = None,
) -> dict[str, Any]:
    """Top-1 agreement and mean KL (nats) of `quantized` against `reference` over every
    position of the fixed prompts (cut to `context`, the model's max_position_embeddings)."""
    rows, about = prompt_set(vocab_size, tokenizer, context)
    ref_session = _Session(reference, threads)
    ref = [ref_session.logits(r) for r in rows]
    del ref_session
    quant_session = _Session(quantized, threads)
    got = [quant_session.logits(r) for r in rows]
    a, b = np.concatenate(ref), np.concatenate(got)
    return {
        "top1_agreement": round(top1_agreement(a, b), 6),
        "kl": round(kl_divergence(a, b), 6),
        "prompts": len(rows),
        "positions": int(a.shape[0]),
        "inputs": about,
    }
