"""A Llama export's graph without its weights, for the streaming converter (`streaming.py`).

The model is built from fake tensors (shapes and dtypes, no data) and traced exactly as `convert`
traces it, but with the onnxscript optimizer held back. Before it runs, each weight becomes its
real data when it is small (the optimizer folds small constants through any op and deduplicates
them by value, so their values decide the graph), or else a placeholder: a NaN array of the
weight's shape with zero strides, which costs one element of memory. Above 8192 elements the
optimizer folds nothing but a Transpose, so every large initializer of the optimized graph is a
checkpoint tensor, transposed or not, or FusedLlama's stacked Q/K/V projection: a `Recipe` that
the writer replays one tensor at a time. Anything else is refused rather than guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ..models.llama import Llama, LlamaConfig, rope_inv_freq
from .llama import export_program
from .logits_to_keep import add_logits_to_keep

# Weights up to this many elements are read before the optimizer runs; the optimizer folds
# constants up to 8192 elements and deduplicates them up to 1024.
SMALL = 1 << 16
# FusedLlama (fused.py) stacks each layer's Q, K and V projections into one parameter for the
# ort target, named `qkv.{layer}` (biases: `qkv_bias.{layer}`).
_PACKED = re.compile(r"(?:^|\.)qkv(_bias)?\.(\d+)$")


@dataclass(frozen=True)
class Recipe:
    """How one initializer is made: the checkpoint tensors `sources` (our parameter names)
    stacked along their first axis, cast to `dtype`, transposed when `transpose`."""

    sources: tuple[str, ...]
    shape: tuple[int, ...]  # the initializer's
    dtype: torch.dtype
    transpose: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Skeleton:
    """The optimized graph; the initializers named in `recipes` still hold placeholders."""

    model: ir.Model
    recipes: dict[str, Recipe]


NUMPY_DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A CPU tensor's data as numpy, bfloat16 included (through ml_dtypes)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def placeholder(shape: tuple[int, ...], dtype: np.dtype, row: bool = False) -> np.ndarray:
    """A read-only array of `shape` backed by one element (NaN, or 0 for integers), or with
    `row` by one row repeated. Its data address names it: every view of it (a transpose, a
    reshape) starts at the same address; a backing row also tells a transposed view (strides
    (itemsize, 0)) from one in the original orientation (strides (0, itemsize))."""
    fill = 0 if np.issubdtype(dtype, np.integer) else np.nan
    if not row:
        return np.broadcast_to(np.full((), fill, dtype), shape)
    backing = np.full(shape[-1:], fill, dtype)
    strides = (0,) * (len(shape) - 1) + (backing.itemsize,)
    return np.lib.stride_tricks.as_strided(backing, shape, strides, writeable=False)


def address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def fake_llama(config: LlamaConfig, dtype: torch.dtype) -> Llama:
    """The model with fake parameters in `dtype`, cast as `model.to(dtype)` casts them in
    `convert`, and its real rotary frequencies (float32 at any dtype, as `Llama._apply` keeps
    them)."""
    with FakeTensorMode():
        model = Llama(config)
        cast: dict[int, nn.Parameter] = {}  # tied weights stay one parameter
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    if id(p) not in cast:
                        cast[id(p)] = nn.Parameter(p.to(dtype), requires_grad=False)
                    module._parameters[key] = cast[id(p)]
    model.inv_freq = rope_inv_freq(config)
    return model.eval()


def _sources(name: str, tensor: Tensor, names: dict[int, str]) -> tuple[str, ...]:
    if id(tensor) in names:
        return (names[id(tensor)],)
    packed = _PACKED.search(name)
    if packed is None:
        raise RuntimeError(f"streaming export: no checkpoint tensor behind initializer {name!r}")
    kind = "bias" if packed[1] else "weight"
    return tuple(f"model.layers.{packed[2]}.self_attn.{p}_proj.{kind}" for p in "qkv")


def trace_skeleton(
    config: LlamaConfig,
    dtype: torch.dtype,
    target: str,
    kv_cache: bool,
    read: Callable[[str], Tensor],
) -> Skeleton:
    """The graph `convert` would make, with `read(name)` called only for small tensors."""
    model = fake_llama(config, dtype)
    names = {id(p): n for n, p in model.named_parameters()}
    program = export_program(model, target, kv_cache, optimize=False)
    graph = program.model.graph
    stand_ins: dict[int, Recipe] = {}  # placeholder address → what it stands for
    for value in graph.initializers.values():
        tensor = getattr(value.const_value, "raw", None)
        if not isinstance(tensor, FakeTensor):
            continue  # rotary tables and constants of the trace: real already
        assert value.name is not None
        recipe = Recipe(_sources(value.name, tensor, names), tuple(tensor.shape), dtype)
        if recipe.numel <= SMALL:
            data = torch.cat([read(s).to(torch.float32) for s in recipe.sources]).to(dtype)
            if tuple(data.shape) != recipe.shape:
                raise RuntimeError(f"streaming export: {value.name} is not {recipe.sources}")
            value.const_value = ir.Tensor(to_numpy(data), name=value.name)
        else:
            array = placeholder(recipe.shape, NUMPY_DTYPES[dtype], row=True)
            stand_ins[address(array)] = recipe
            value.const_value = ir.Tensor(array, name=value.name)
    transposes = {
        node.outputs[0].name: tuple(node.attributes["perm"].as_ints())
        for node in graph
        if node.op_type == "Transpose"
        and node.domain == ""
        and "perm" in node.attributes
        and node.inputs[0] is not None
        and _stand_in(node.inputs[0], stand_ins) is not None
    }
    program.optimize()
    recipes: dict[str, Recipe] = {}
    for value in program.model.graph.initializers.values():
        made_from = _stand_in(value, stand_ins)
        if made_from is None:
            continue
        assert value.name is not None
        shape = tuple(value.const_value.shape)  # type: ignore[union-attr]
        if shape == made_from.shape and value.name not in transposes:
            recipes[value.name] = made_from
        elif transposes.get(value.name) == (1, 0) and shape == made_from.shape[::-1]:
            recipes[value.name] = replace(made_from, shape=shape, transpose=True)
        else:
            raise RuntimeError(
                f"streaming export: the optimizer made {value.name} from {made_from.sources} in "
                "a way the weight writer cannot replay"
            )
    add_logits_to_keep(program.model)
    return Skeleton(program.model, recipes)


def _stand_in(value: ir.Value, stand_ins: dict[int, Recipe]) -> Recipe | None:
    array = getattr(value.const_value, "raw", None)
    return stand_ins.get(address(array)) if isinstance(array, np.ndarray) else None
