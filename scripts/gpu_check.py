"""The CUDA path on a GPU machine: llama-tiny exported (ort target) in float32 and float16, run on
CUDA with the KV cache bound on the device, against the CPU on the same inputs.

    pip install torch==2.13.0 -e ".[dev,cuda]"
    python scripts/gpu_check.py [--steps 32] [--workdir DIR]

For each dtype: teacher-forced logits of a left-padded batch of 3 prompts (prefill + decode
steps, both runtimes fed the CPU's greedy tokens), where the bound cache lives, and greedy tokens
of the batch. fp32 passes at max abs diff <= 1e-4 and identical tokens; fp16 (GPU fp16 kernels
against the CPU's) at teacher-forced top-1 agreement >= 99%, with its max diff and token
agreement reported. Prints one line per dtype; exit code 1 when one fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import lmexport
from lmexport.runtime import LlamaRunner, left_pad

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1], [8, 2, 8, 1, 8]]


def compare(folder: Path, dtype: str, steps: int) -> tuple[bool, str]:
    cpu = LlamaRunner.load(folder, provider="cpu")
    gpu = LlamaRunner.load(folder, provider="cuda")
    if gpu.provider != "cuda" or not gpu.io_binding:
        return False, f"{dtype}: session runs on {gpu.provider}, io_binding={gpu.io_binding}"
    ids, mask = left_pad(PROMPTS)
    bound = gpu.device_cache(len(ids))
    past = None
    step_ids = ids
    max_diff, agree, positions = 0.0, 0, 0
    for _ in range(steps):
        expected, past = cpu.forward(step_ids, mask, past)
        got = bound.step(step_ids, mask)
        real = mask[:, -got.shape[1] :].astype(bool)  # padding positions are not compared
        max_diff = max(max_diff, float(np.abs(got - expected)[real].max()))
        agree += int((got.argmax(-1) == expected.argmax(-1))[real].sum())
        positions += int(real.sum())
        step_ids = expected[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
    devices = sorted({v.device_name() for v in bound.past or []})
    cpu_tokens = cpu.generate(PROMPTS, steps, eos_token_id=[])
    gpu_tokens = gpu.generate(PROMPTS, steps, eos_token_id=[])
    same_tokens = float((cpu_tokens == gpu_tokens).mean())
    top1 = agree / positions
    exact = max_diff <= 1e-4 and same_tokens == 1.0
    passed = devices == ["cuda"] and (exact if dtype == "float32" else top1 >= 0.99)
    line = (
        f"{dtype:8} {'PASS' if passed else 'FAIL'}  logits max|diff| {max_diff:.2e}  "
        f"teacher-forced top-1 {top1:.2%} of {positions}  greedy tokens equal {same_tokens:.2%} "
        f"({cpu_tokens.size})  cache on {','.join(devices)}"
    )
    return passed, line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the exports here.")
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("no CUDAExecutionProvider: install onnxruntime-gpu (pip install -e '.[cuda]')")
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results = []
    for dtype in ("float32", "float16"):
        folder = workdir / f"tiny-{dtype}"
        if not folder.is_dir():
            lmexport.convert("llama-tiny", folder, target="ort", dtype=dtype)
        results.append(compare(folder, dtype, args.steps))
        print(results[-1][1], flush=True)
    return 0 if all(passed for passed, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
