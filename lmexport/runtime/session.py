"""onnxruntime sessions with explicit providers and thread counts."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import _pybind_state

from ..errors import LmexportError, first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CHOICES = (*PROVIDERS, "auto")  # auto: CUDA when this onnxruntime can run it, else the CPU
# Errors only: at every load onnxruntime warns that a Llama graph's `logits_to_keep`, an
# initializer callers may override (on purpose), will not be folded as a constant.
QUIET = 3


class _Pool:
    """This process's shared intra-op pool (`share_threads`), and whether it may still be made."""

    threads: int | None = None
    shared = False
    sessions = 0


def share_threads(threads: int | None = None) -> None:
    """Run every later session of this process on one pool of `threads` intra-op threads
    (None: onnxruntime's default, one per core).

    Sessions that take turns, a speculative target and its draft, otherwise each keep threads
    of their own: spinning between runs, they hold the cores the other session needs, and
    without spinning every run waits for its threads to wake. One pool spins for whichever
    session runs next. onnxruntime makes the pool with its environment, so this must come
    before the process's first session (later, onnxruntime accepts the sizes silently and
    makes no pool)."""
    if _Pool.shared or _Pool.sessions:
        raise LmexportError(
            "share_threads must come before this process's first onnxruntime session"
        )
    _check_threads(threads)
    _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
    _Pool.threads, _Pool.shared = threads, True


def _check_threads(threads: int | None) -> None:
    most = 4 * (os.cpu_count() or 1)  # more only queues threads (100000 hung a 2-core machine)
    if threads is not None and not 1 <= threads <= most:
        raise LmexportError(f"threads must be in [1, {most}] (4 per CPU here), got {threads}")


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """Options every session of ours starts from, so that all of them run on the shared pool
    once there is one (onnxruntime then refuses sessions with threads of their own)."""
    _check_threads(threads)
    if _Pool.shared and threads not in (None, _Pool.threads):
        raise LmexportError(
            f"this process's sessions share {_Pool.threads or 'the default'} threads "
            f"(share_threads), not {threads}"
        )
    _Pool.sessions += 1  # onnxruntime's environment exists from the first session on
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    if _Pool.shared:
        options.use_per_session_threads = False
        return options
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(
    model_path: str | Path,
    provider: str = "cpu",
    threads: int | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """A session on `provider`; `threads` sets intra-op threads (None: onnxruntime's default).
    `session_provider` says which one an `auto` session got.

    `spinning=False` stops the intra-op threads from spinning between runs. Spinning saves a
    wake-up when one session runs step after step, but where two sessions take turns (a draft
    and a target) each one's spinning threads hold the cores the other needs: speculative
    SmolLM2-135M on 2 cores went from 25 to 41 tokens/s without it. One pool for both
    (`share_threads`, where `threads` must be None or the pool's and the pool spins) gains
    another ~7%."""
    if provider not in CHOICES:
        raise LmexportError(f"unknown provider {provider!r} (choose from {', '.join(CHOICES)})")
    requested = provider
    if provider == "auto":
        provider = "cuda" if PROVIDERS["cuda"] in ort.get_available_providers() else "cpu"
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise LmexportError(
            f"provider {provider!r} is not available in this onnxruntime "
            f"(has {', '.join(ort.get_available_providers())}; for CUDA install lmexport[cuda])"
        )
    if name == PROVIDERS["cuda"]:
        _preload_cuda_libraries()
    options = session_options(threads, spinning)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # TF32 matmuls (onnxruntime's CUDA default) cost fp32 graphs their 1e-4 parity: ~4e-3 seen.
    cuda_options = {"use_tf32": "0"}
    providers = (
        [name] if name == "CPUExecutionProvider" else [(name, cuda_options), "CPUExecutionProvider"]
    )
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors for unloadable graphs
        raise LmexportError(
            f"{model_path}: onnxruntime cannot load it ({first_line(e, 300)})"
        ) from None
    # onnxruntime-gpu lists CUDA even where it cannot start it (no GPU, driver or CUDA libraries)
    # and then quietly runs on the CPU.
    if name not in session.get_providers() and requested != "auto":
        raise LmexportError(
            f"provider {provider!r} could not start (no usable GPU, driver or CUDA libraries); "
            "use --provider cpu or auto"
        )
    return session


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu finds the CUDA/cuDNN libraries of the `nvidia-*` wheels (what
    `onnxruntime-gpu[cuda,cudnn]` installs) only once they are preloaded; harmless where the
    system already has them. Its notes go to stderr, where they cannot mix with generated text."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(OSError):
            preload()


def session_provider(session: ort.InferenceSession) -> str:
    """'cuda' when the session runs on the CUDA provider, else 'cpu'."""
    return "cuda" if PROVIDERS["cuda"] in session.get_providers() else "cpu"
