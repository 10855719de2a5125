"""An 8B Llama (Llama 3 8B's shape, random weights) converted to int4 in bounded memory, then run.

    python benchmarks/big_convert.py [--workdir DIR] [--layers 32] [--threads N] [--keep]

1. Writes the checkpoint as a Hugging Face folder of bfloat16 safetensors: one shard per layer
   (0.4 GiB), one each for the embedding and the LM head (1 GiB), every tensor generated a block
   of rows at a time, so the writer holds one shard at most.
2. `lmexport convert CKPT -o OUT --quantize int4 --streaming` in a child process that reports
   its own peak RSS (VmHWM) and wall time. Target: under 6 GB, where loading the model alone
   would take 16 GB in bfloat16 (32 GB as the float32 model `convert` builds).
3. A second child (onnxruntime only, no torch) loads OUT and runs one prefill of 16 tokens and 8
   greedy decode steps, reporting their times, the decode tokens/s and its peak RSS.

Disk: the checkpoint takes 15 GiB and the result 7 GiB (the embedding stays float32, as
`--quantize int4` leaves it); free space is checked first. Not a test: expect many minutes on two
cores. `--layers 2` runs the same steps on a 2-layer model of the same width in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmexport.models.checkpoints.hf import hf_config_json
from lmexport.models.checkpoints.lazy import expected_shapes
from lmexport.models.llama import LlamaConfig

# Llama 3 8B (Meta-Llama-3-8B's config.json).
LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
    bos_token_id=128000,
)
GiB = 1 << 30
TARGET_PEAK = 6e9  # bytes
BLOCK_ELEMENTS = 1 << 25  # rows generated at a time: 128 MiB of float32

# Each child reports its own peak RSS: VmHWM, not getrusage's ru_maxrss, which starts from what
# this process (the checkpoint writer) had resident when it started the child.
CONVERT_CHILD = """
import json, sys, time
start = time.perf_counter()
from lmexport.cli import cli
from lmexport.exporter.progress import peak_rss
cli.main(sys.argv[1:], standalone_mode=False)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}))
"""

RUN_CHILD = """
import json, sys, time
import numpy as np
from lmexport.runtime import LlamaRunner
folder, threads, prompt, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
runner = LlamaRunner.load(folder, threads=threads)
load = time.perf_counter() - start
ids = np.random.default_rng(0).integers(0, runner.vocab_size, size=(1, prompt))
tokens = runner.stream(ids, max_new_tokens=steps + 1)
start = time.perf_counter()
next(tokens)  # the prefill's token
prefill = time.perf_counter() - start
start = time.perf_counter()
decoded = sum(1 for _ in tokens)
decode = time.perf_counter() - start
peak = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")]
print(json.dumps({"load_seconds": load, "prefill_seconds": prefill, "decode_steps": decoded,
                  "decode_seconds": decode, "peak_rss": peak[0]}))
"""


def random_tensor(shape: tuple[int, ...], name: str, gen: torch.Generator) -> torch.Tensor:
    """bfloat16, generated a block of rows at a time (never the whole tensor in float32)."""
    out = torch.empty(shape, dtype=torch.bfloat16)
    cols = math.prod(shape[1:])
    scale = 1.0 if "embed" in name else 1 / math.sqrt(shape[-1])
    step = max(1, BLOCK_ELEMENTS // cols)
    for start in range(0, shape[0], step):
        block = torch.randn((min(step, shape[0] - start), *shape[1:]), generator=gen) * scale
        out[start : start + step] = 1 + 0.1 * block if name.endswith("norm.weight") else block
    return out


def write_checkpoint(folder: Path, config: LlamaConfig) -> int:
    """The folder, shard by shard; returns its parameter count."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {**hf_config_json(config, "bfloat16"), "bos_token_id": config.bos_token_id}, indent=2
        )
    )
    shapes = expected_shapes(config)
    shards: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if ".layers." in name else name.rsplit(".", 2)[-2]
        shards.setdefault(key, []).append(name)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards.values()):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: random_tensor(shapes[n], n, gen) for n in names}, str(folder / file))
        weight_map.update(dict.fromkeys(names, file))
        print(f"\r  wrote {i + 1}/{len(shards)} shards", end="", flush=True)
    print()
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sum(math.prod(s) for s in shapes.values())


def child(script: str, *args: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child failed (exit {done.returncode}): {' '.join(args)}")
    return json.loads(done.stdout.splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Default: a temporary folder.")
    parser.add_argument("--layers", type=int, default=LLAMA3_8B.num_hidden_layers)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads.")
    parser.add_argument("--keep", action="store_true", help="Keep the checkpoint and the result.")
    args = parser.parse_args()

    config = LlamaConfig(**{**LLAMA3_8B.to_dict(), "num_hidden_layers": args.layers})
    work = args.workdir or Path(tempfile.mkdtemp(prefix="big_convert."))
    work.mkdir(parents=True, exist_ok=True)
    params = sum(math.prod(s) for s in expected_shapes(config).values())
    need = params * 2 + params * 0.9  # bfloat16 checkpoint + int4 result with a float32 embedding
    free = shutil.disk_usage(work).free
    print(
        f"{params / 1e9:.2f}B parameters: ~{need / GiB:.0f} GiB of disk in {work}, "
        f"{free / GiB:.0f} GiB free"
    )
    if free < need:
        raise SystemExit("not enough free disk space")
    ckpt, out = work / "checkpoint", work / "int4"
    try:
        start = time.perf_counter()
        write_checkpoint(ckpt, config)
        written = time.perf_counter() - start
        print(f"checkpoint: {folder_bytes(ckpt) / GiB:.1f} GiB in {written:.0f} s")
        converted = child(
            CONVERT_CHILD, "convert", str(ckpt), "-o", str(out), "--quantize", "int4", "--streaming"
        )
        threads = str(args.threads or torch.get_num_threads())
        ran = child(RUN_CHILD, str(out), threads, "16", "8")
        peak = converted["peak_rss"]
        print(
            f"convert --quantize int4 --streaming: {converted['seconds']:.0f} s, peak RSS "
            f"{peak / 1e9:.2f} GB ({'under' if peak < TARGET_PEAK else 'OVER'} the 6 GB target); "
            f"result {folder_bytes(out) / GiB:.1f} GiB"
        )
        print(
            f"onnxruntime ({threads} threads): load {ran['load_seconds']:.1f} s, prefill 16 "
            f"tokens {ran['prefill_seconds'] * 1000:.0f} ms, {ran['decode_steps']:.0f} decode "
            f"steps {ran['decode_steps'] / ran['decode_seconds']:.2f} tokens/s, peak RSS "
            f"{ran['peak_rss'] / 1e9:.2f} GB"
        )
    finally:
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
