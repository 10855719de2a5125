"""`lmexport optimize` against the other graph optimizers, on one input graph, in one run.

    python benchmarks/optimize_peers.py [--preset llama-bench] [--threads 2] [--prompt 128]

The input is our `plain` export (primitive ops, as an ordinary torch.onnx export gives). Each
optimizer's output is checked against the input on the same prompt (max abs diff of the logits),
then timed: prefill of `--prompt` tokens, median of repeats. Not a test: timings are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import lmexport
from lmexport.optimizers import optimize_model


def ours(target: str) -> Callable[[onnx.ModelProto, dict], onnx.ModelProto]:
    return lambda model, config: optimize_model(model, target)[0]


def onnxscript_ort(model: onnx.ModelProto, config: dict) -> onnx.ModelProto:
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    fused, _ = optimize_for_ort(ir.serde.deserialize_model(model))
    return ir.serde.serialize_model(fused)


def ort_transformers(model: onnx.ModelProto, config: dict) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model as ort_optimize

    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    return ort_optimize(model, "gpt2", num_heads=heads, hidden_size=hidden, opt_level=0).model


PEERS: list[tuple[str, Callable[[onnx.ModelProto, dict], onnx.ModelProto]]] = [
    ("input (plain export)", lambda model, config: model),
    ("lmexport optimize --target ort", ours("ort")),
    ("lmexport optimize --target onnx", ours("onnx")),
    ("onnxscript optimize_for_ort", onnxscript_ort),
    ("onnxruntime transformers optimizer", ort_transformers),
]


def feeds(model: onnx.ModelProto, config: dict, prompt: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], size=(1, prompt))
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in model.graph.input:  # not `logits_to_keep`: every graph computes all logits here
        if not i.name.startswith("past_key_values."):
            continue
        shape = (1, config["num_key_value_heads"], 0, config["head_dim"])
        out[i.name] = np.zeros(shape, np.float32)
    return out


def prefill_ms(path: Path, inputs: dict, threads: int, repeats: int) -> tuple[float, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], inputs)[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(["logits"], inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = lmexport.convert(args.preset, Path(tmp) / "plain", target="plain")
        config = lmexport.runtime.read_manifest(folder)["config"]
        model = onnx.load(str(folder / "model.onnx"))
        inputs = feeds(model, config, args.prompt)
        rows = []
        for label, optimizer in PEERS:
            fresh = onnx.ModelProto()  # optimizers and external-data saving change models in place
            fresh.CopyFrom(model)
            try:
                optimized = optimizer(fresh, config)
            except Exception as e:  # a peer that fails on this graph is a result too
                rows.append((label, f"failed: {type(e).__name__}: {str(e)[:60]}"))
                continue
            path = Path(tmp) / f"{len(rows)}.onnx"
            onnx.save(optimized, str(path), save_as_external_data=True)
            ms, logits = prefill_ms(path, inputs, args.threads, args.repeats)
            rows.append((label, len(optimized.graph.node), ms, logits, optimized))
    reference = rows[0][3]
    print(
        f"\n{args.preset}, plain export with KV cache, {args.threads} threads, "
        f"prefill {args.prompt} tokens (median of {args.repeats})"
    )
    head = f"{'optimizer':<36} {'nodes':>6} {'prefill ms':>11} {'vs input':>9}"
    print(f"{head} {'max diff':>9}  fused ops")
    for row in rows:
        if len(row) == 2:
            print(f"{row[0]:<36} {row[1]}")
            continue
        label, nodes, ms, logits, optimized = row
        fused = Counter(
            n.op_type
            for n in optimized.graph.node
            if n.domain or n.op_type in ("RMSNormalization", "RotaryEmbedding", "Attention")
        )
        diff = float(np.abs(logits - reference).max())
        print(
            f"{label:<36} {nodes:>6} {ms:>11.1f} {rows[0][2] / ms:>8.2f}x {diff:>9.1e}  "
            f"{dict(fused)}"
        )


if __name__ == "__main__":
    main()
