"""onnxruntime sessions with explicit providers and thread counts."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from ..errors import LmexportError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def create_session(
    model_path: str | Path, provider: str = "cpu", threads: int | None = None
) -> ort.InferenceSession:
    """A session on `provider`; `threads` sets intra-op threads (None: onnxruntime's default)."""
    if provider not in PROVIDERS:
        raise LmexportError(f"unknown provider {provider!r} (choose from {', '.join(PROVIDERS)})")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise LmexportError(
            f"provider {provider!r} is not available in this onnxruntime "
            f"(has {', '.join(ort.get_available_providers())}; for CUDA install lmexport[cuda])"
        )
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for unloadable graphs
        raise LmexportError(
            f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0]})"
        ) from None
