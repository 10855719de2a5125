"""Weight-only int4/int8 quantization of exported Llama graphs (`convert/optimize --quantize`).

`blocks.quantize_blocks` quantizes one weight array and knows nothing of graphs; `graph.py`
rewrites a graph with it; `accuracy.py` measures the result against the float graph. Both
int4 and int8 become `com.microsoft::MatMulNBits` (see benchmarks/README.md for the int8 forms
that were measured against it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from ..errors import LmexportError
from .accuracy import measure_accuracy
from .blocks import BlockQuantized, check_block_size, dequantize_blocks, quantize_blocks
from .graph import QuantizeOptions, quantize_graph

METHODS = {"int4": 4, "int8": 8}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def quantize_options(
    method: str,
    block_size: int = 32,
    lm_head: bool = True,
    embedding: bool = False,
    accuracy_level: int = 4,
    symmetric: bool = False,
    offsets: bool = False,
    lm_head_bits: int | None = None,
) -> QuantizeOptions:
    """Checked options, or a one-line error naming the bad one."""
    if method not in METHODS:
        raise LmexportError(f"unknown --quantize {method!r} (choose from {', '.join(METHODS)})")
    check_block_size(block_size)
    if accuracy_level not in ACCURACY_LEVELS:
        raise LmexportError(f"accuracy level must be 0 to 4, got {accuracy_level}")
    if lm_head_bits is not None and lm_head_bits not in METHODS.values():
        raise LmexportError(f"LM head bits must be 4 or 8, got {lm_head_bits}")
    if lm_head_bits is not None and not lm_head:
        raise LmexportError("--lm-head-bits with --no-quantize-lm-head: the head stays float")
    if symmetric and offsets:
        raise LmexportError("--symmetric and --float-offsets are two different schemes: pick one")
    return QuantizeOptions(
        METHODS[method],
        block_size,
        lm_head,
        embedding,
        accuracy_level,
        symmetric,
        offsets,
        lm_head_bits if lm_head_bits is not None else METHODS[method],
    )


def as_options(quantize: str | QuantizeOptions | None) -> QuantizeOptions | None:
    """`convert(quantize=...)` takes a method name for the defaults, or full options, checked as
    `quantize_options` checks the CLI's (a dataclass built by hand is not)."""
    if quantize is None:
        return None
    if not isinstance(quantize, QuantizeOptions):
        return quantize_options(quantize)
    q = quantize
    method = next((name for name, bits in METHODS.items() if bits == q.bits), f"int{q.bits}")
    head_bits = None if q.lm_head_bits in (None, q.bits) else q.lm_head_bits
    return quantize_options(
        method,
        q.block_size,
        q.lm_head,
        q.embedding,
        q.accuracy_level,
        q.symmetric,
        q.offsets,
        head_bits,
    )


def check_quantizable(manifest: dict[str, Any]) -> None:
    """Quantized graphs use onnxruntime's contrib ops on float32 Llama graphs only."""
    if manifest.get("arch") != "llama":
        raise LmexportError("--quantize applies to Llama models only")
    if manifest.get("target") != "ort":
        raise LmexportError(
            f"--quantize needs the ort target (onnxruntime's MatMulNBits), not "
            f"{manifest.get('target')!r}"
        )
    if manifest.get("dtype") != "float32":
        raise LmexportError(f"--quantize needs a float32 model, not {manifest.get('dtype')}")
    if manifest.get("quantization"):
        raise LmexportError("the model is quantized already")


def quantize_model(
    model: onnx.ModelProto,
    options: QuantizeOptions,
    vocab_size: int,
    tokenizer: Any = None,
    context: int | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The quantized graph and its `lmexport.json` record, with the accuracy measured against
    `model` (left unchanged) on prompts of at most `context` ids."""
    graph = ir.serde.deserialize_model(model)
    counts = quantize_graph(graph, options)
    quantized = ir.serde.serialize_model(graph)
    accuracy = measure_accuracy(model, quantized, vocab_size, tokenizer, context=context)
    return quantized, quantization_record(options, counts, accuracy)


def quantization_record(
    options: QuantizeOptions, ops: dict[str, int], accuracy: dict[str, Any] | None
) -> dict[str, Any]:
    """`lmexport.json`'s `quantization`: the settings, the ops made, the measured accuracy."""
    return {
        "method": f"int{options.bits}",
        "bits": options.bits,
        "block_size": options.block_size,
        "symmetric": options.symmetric,
        "offsets": options.offsets,
        "lm_head": options.lm_head,
        "lm_head_bits": options.lm_head_bits or options.bits,
        "embedding": options.embedding,
        "accuracy_level": options.accuracy_level,
        "ops": dict(sorted(ops.items())),
        "accuracy": accuracy,
    }


def quantize_into(
    model: onnx.ModelProto, options: QuantizeOptions, manifest: dict[str, Any], folder: Path
) -> onnx.ModelProto:
    """The quantized graph for an output folder being written; records the quantization in
    `manifest`. The accuracy prompts are text when `folder` has its tokenizer.json already."""
    from ..runtime.tokenizer import load_tokenizer

    check_quantizable(manifest)
    tokenizer = load_tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    config = manifest["config"]
    quantized, manifest["quantization"] = quantize_model(
        model, options, int(config["vocab_size"]), tokenizer, int(config["max_position_embeddings"])
    )
    return quantized


__all__ = [
    "METHODS",
    "BlockQuantized",
    "QuantizeOptions",
    "as_options",
    "check_quantizable",
    "dequantize_blocks",
    "quantization_record",
    "quantize_blocks",
    "quantize_into",
    "quantize_model",
    "quantize_options",
]
