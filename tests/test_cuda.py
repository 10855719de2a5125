"""Providers: CUDA with the KV cache bound on the GPU where onnxruntime-gpu has one (skipped
elsewhere), the one-line refusal and the `auto` fallback where it has none.
`scripts/gpu_check.py` runs the fuller check (float32 and float16 exports) on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lmexport.runtime import LlamaRunner, left_pad

from helpers import assert_bad_input, run

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDAExecutionProvider")
without_cuda = pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA")
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1], [8, 2, 8, 1, 8]]


@without_cuda
def test_cuda_refused_in_one_line(tiny_folder: Path) -> None:
    assert_bad_input(
        ["generate", str(tiny_folder), "--ids", "1,2", "--provider", "cuda"], "'cuda'", "cuda]"
    )


@without_cuda
def test_auto_falls_back_to_cpu_and_says_so(tiny_folder: Path) -> None:
    code, out, err = run("generate", str(tiny_folder), "--ids", "1,2", "--provider", "auto")
    assert code == 0 and err == "lmexport: CUDA is not available here; running on the CPU\n"
    assert out == run("generate", str(tiny_folder), "--ids", "1,2")[1]
    assert LlamaRunner.load(tiny_folder, provider="auto").provider == "cpu"


def test_unknown_provider(tiny_folder: Path) -> None:
    assert_bad_input(["generate", str(tiny_folder), "--ids", "1", "--provider", "tpu"], "tpu")


@needs_cuda
def test_cuda_cache_stays_on_device(tiny_folder: Path) -> None:
    """Teacher-forced over a padded batch: CUDA (bound cache) logits within 1e-4 of the CPU's
    at every step, the cache on the GPU, and the same greedy tokens."""
    cpu = LlamaRunner.load(tiny_folder)
    gpu = LlamaRunner.load(tiny_folder, provider="cuda")
    assert gpu.provider == "cuda" and gpu.io_binding
    ids, mask = left_pad(PROMPTS)
    bound = gpu.device_cache(len(ids))
    past = None
    step_ids = ids
    for _ in range(9):
        expected, past = cpu.forward(step_ids, mask, past)
        assert np.abs(bound.step(step_ids, mask) - expected).max() <= 1e-4
        step_ids = expected[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
    assert bound.past is not None and all(v.device_name() == "cuda" for v in bound.past)
    expected_tokens = cpu.generate(PROMPTS, 24, eos_token_id=[])
    assert np.array_equal(gpu.generate(PROMPTS, 24, eos_token_id=[]), expected_tokens)
