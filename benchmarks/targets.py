"""Prefill latency and decode speed of each export target on `llama-bench`, in one run.

    python benchmarks/targets.py [--preset llama-bench] [--threads 2] [--prompt 128] [--new 64]

Not a test: timings on a shared machine are noisy, so each figure is the median of repeats, and
the table gives ratios against `plain` (what an ordinary export gives) alongside the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from lmexport.exporter.llama import export_llama
from lmexport.models.source import load_source
from lmexport.runtime import LlamaRunner

# (label, target, rotary placement for `ort`)
VARIANTS = [
    ("plain", "plain", "auto"),
    ("ort (rotary inside GQA)", "ort", "inside"),
    ("ort (RotaryEmbedding before GQA)", "ort", "before"),
    ("onnx (opset 23)", "onnx", "auto"),
]


def export_folder(preset: str, target: str, rotary: str, root: Path) -> Path:
    """A minimal runnable folder (model.onnx + lmexport.json) without the full convert checks."""
    import json

    from lmexport.exporter.folder import FORMAT_VERSION, save_model

    loaded = load_source(preset)
    proto = export_llama(loaded.model, target, kv_cache=True, rotary=rotary)
    folder = root / f"{target}-{rotary}"
    folder.mkdir()
    save_model(proto, folder)
    manifest = {
        "format_version": FORMAT_VERSION,
        "arch": "llama",
        "config": loaded.model.config.to_dict(),
        "kv_cache": True,
        "dtype": "float32",
    }
    (folder / "lmexport.json").write_text(json.dumps(manifest))
    print(f"  {folder.name}: {len(onnx.load(str(folder / 'model.onnx')).graph.node)} nodes")
    return folder


def measure(
    folder: Path, threads: int, prompt_len: int, new: int, repeats: int
) -> tuple[float, float]:
    runner = LlamaRunner.load(folder, threads=threads)
    ids = np.random.default_rng(0).integers(0, runner.vocab_size, size=(1, prompt_len))
    mask = np.ones_like(ids)
    runner.forward(ids, mask, None, keep=1)  # warm-up; the last logits, as generation asks
    prefill = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.forward(ids, mask, None, keep=1)
        prefill.append(time.perf_counter() - start)
    decode = []
    for _ in range(max(1, repeats // 3)):
        start = time.perf_counter()
        runner.generate(ids[:, :8], new, eos_token_id=[])
        decode.append(new / (time.perf_counter() - start))
    return statistics.median(prefill) * 1000, statistics.median(decode)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"exporting {args.preset} ...")
        folders = [(label, export_folder(args.preset, t, r, Path(tmp))) for label, t, r in VARIANTS]
        for label, folder in folders:
            rows.append(
                (label, *measure(folder, args.threads, args.prompt, args.new, args.repeats))
            )
    base_prefill, base_decode = rows[0][1], rows[0][2]
    print(
        f"\n{args.preset}, {args.threads} intra-op threads, prefill {args.prompt} tokens, "
        f"decode {args.new} tokens (median of repeats)"
    )
    print(f"{'target':<36} {'prefill ms':>10} {'vs plain':>9} {'decode tok/s':>13} {'vs plain':>9}")
    for label, prefill, decode in rows:
        print(
            f"{label:<36} {prefill:>10.1f} {base_prefill / prefill:>8.2f}x "
            f"{decode:>13.1f} {decode / base_decode:>8.2f}x"
        )


if __name__ == "__main__":
    main()
