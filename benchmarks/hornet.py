"""HorNet-T latency, PyTorch eager against onnxruntime, for the 7x7 and the GF model, in one run.

    python benchmarks/hornet.py [--threads 2] [--repeats 20] [--batch 1] [--size 224]

For each model: PyTorch eager, onnxruntime on a plain export (what `torch.onnx.export` gives:
global filters as DFT ops), and onnxruntime on the `ort` target (`convert`'s default). Not a
test: timings on a shared machine are noisy, so the three take turns in rounds of consecutive
runs (a busy moment falls on all of them). Each figure is the median with its quartiles; ratios
are against PyTorch, over all runs and within each round (their range shows the spread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from lmexport.exporter.hornet import export_hornet
from lmexport.models.source import load_source
from lmexport.runtime.session import create_session

PRESETS = ["hornet-tiny-7x7", "hornet-tiny-gf"]
TARGET = 0.5  # the goal: onnxruntime at most half of PyTorch's latency
CYCLES = 4
PAUSE_S = 1.0


def timed_blocks(
    runs: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[list[float]]]:
    """Milliseconds of each run, `repeats` in all, in CYCLES rounds of consecutive runs.

    Each block starts after a pause and a warm-up run: onnxruntime's and OpenMP's worker threads
    spin for a while after a run, and a run started meanwhile shares the two cores with them
    (interleaving single runs slowed whichever session came second by up to 40%).
    """
    times: dict[str, list[list[float]]] = {name: [] for name in runs}
    for cycle in range(CYCLES):
        for name, run in runs.items():
            time.sleep(PAUSE_S)
            run()
            block: list[float] = []
            for _ in range(repeats // CYCLES + (cycle < repeats % CYCLES)):
                start = time.perf_counter()
                run()
                block.append((time.perf_counter() - start) * 1000)
            times[name].append(block)
    return times


def bench(preset: str, args: argparse.Namespace, root: Path) -> dict[str, list[list[float]]]:
    model = load_source(preset).model
    pixels = torch.randn(args.batch, 3, args.size, args.size)
    feeds = {"pixel_values": pixels.numpy()}
    runs: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        reference = model(pixels).numpy()
    runs["pytorch eager"] = lambda: model(pixels)
    for target in ("plain", "ort"):
        start = time.perf_counter()
        proto = export_hornet(model, target, args.size)
        path = root / f"{preset}-{target}.onnx"
        onnx.save(proto, str(path))
        session = create_session(path, "cpu", args.threads)
        diff = np.abs(session.run(None, feeds)[0] - reference).max()
        print(
            f"  {preset} {target}: exported in {time.perf_counter() - start:.0f} s, "
            f"{len(proto.graph.node)} nodes, logits max diff {diff:.2g}"
        )
        runs[f"onnxruntime {target}"] = lambda s=session: s.run(None, feeds)
    before = os.getloadavg()[0]
    with torch.inference_mode():
        times = timed_blocks(runs, args.repeats)
    print(f"  {preset} timed; 1-minute load average {before:.2f} → {os.getloadavg()[0]:.2f}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in PRESETS:
            results[preset] = bench(preset, args, Path(tmp))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\nbatch {args.batch}, {args.size}x{args.size}, {args.threads} threads, "
        f"median of {args.repeats} in {CYCLES} rounds (ms; ratio to PyTorch eager, "
        f"target ≤ {TARGET}); load average {load}"
    )
    for preset, times in results.items():
        eager = statistics.median(t for block in times["pytorch eager"] for t in block)
        print(f"{preset}")
        for name, blocks in times.items():
            flat = sorted(t for block in blocks for t in block)
            low, high = np.percentile(flat, [25, 75])
            # The ratio within each round, where both met the same load: its range is the spread.
            ratios = [
                statistics.median(b) / statistics.median(e)
                for b, e in zip(blocks, times["pytorch eager"], strict=True)
            ]
            print(
                f"  {name:<22} {statistics.median(flat):8.1f} ms  (IQR {low:6.1f}-{high:6.1f})"
                f"  {statistics.median(flat) / eager:5.2f}x  (per round {min(ratios):.2f}-"
                f"{max(ratios):.2f})"
            )


if __name__ == "__main__":
    main()
