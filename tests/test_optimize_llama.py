"""`optimize` on whole Llama graphs: our plain export and Hugging Face transformers exports."""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lmexport
from lmexport.models.llama import LlamaConfig
from lmexport.optimizers import optimize_model

from helpers import (
    assert_bad_input,
    assert_no_training_outputs,
    random_transformers_llama,
    small_config,
    write_hf_folder,
)

LAYERS = 4  # llama-tiny


@pytest.fixture(scope="module")
def plain_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plain")
    return {
        "kv": lmexport.convert("llama-tiny", root / "kv", target="plain"),
        "no_kv": lmexport.convert("llama-tiny", root / "no_kv", target="plain", kv_cache=False),
    }


@pytest.fixture(scope="module")
def ort_node_counts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What `convert --target ort` makes of the same model: the bar for `optimize`."""
    root = tmp_path_factory.mktemp("ort")
    counts = {}
    for cache, kv in (("kv", True), ("no_kv", False)):
        folder = lmexport.convert("llama-tiny", root / cache, target="ort", kv_cache=kv)
        counts[cache] = len(onnx.load(str(folder / "model.onnx")).graph.node)
    return counts


def ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def optimized_folder(folder: Path, target: str, dest: Path) -> tuple[Path, onnx.ModelProto]:
    """`lmexport optimize FOLDER -o DEST`: a converted folder with its graph fused."""
    report = lmexport.optimize(folder, dest, target=target)
    manifest = json.loads((dest / "lmexport.json").read_text())
    assert manifest["target"] == target and manifest["opset"] == 23
    assert manifest["passes"]["optimize"] == report.applied_by_fusion()
    assert report.max_diff is not None and report.max_diff <= 1e-4
    return dest, onnx.load(str(dest / "model.onnx"))


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_float16_plain_folder(target: str, tmp_path: Path) -> None:
    """A float16 graph moves by ~1e-3 under fusion (sums in another order): its check allows
    1e-2 (1e-4 refused it), and the folder still passes verify's float16 bar end to end. Its
    rotary casts float32 cos/sin to float16 and its softmax runs in float32 between two Casts:
    both fuse, the softmax's precision kept as Attention's softmax_precision."""
    plain = lmexport.convert("llama-tiny", tmp_path / "plain", target="plain", dtype="float16")
    report = lmexport.optimize(plain, tmp_path / "opt", target=target)
    assert report.max_diff is not None and 1e-4 < report.max_diff <= 1e-2
    fused = onnx.load(str(tmp_path / "opt" / "model.onnx"))
    counts = ops(fused)
    for op in ("Softmax", "Cos", "Sin"):
        assert counts[op] == 0, op
    if target == "ort":
        assert counts["GroupQueryAttention"] == LAYERS and counts["QuickGelu"] == LAYERS
    else:
        attentions = [n for n in fused.graph.node if n.op_type == "Attention"]
        assert len(attentions) == LAYERS and counts["RotaryEmbedding"] == 2 * LAYERS
        for node in attentions:
            precision = {a.name: a.i for a in node.attribute}.get("softmax_precision")
            assert precision == onnx.TensorProto.FLOAT
    verified = lmexport.verify(tmp_path / "opt", steps=8)
    assert verified.passed, verified.table()


def test_plain_folder_keeps_its_context(tmp_path: Path) -> None:
    """A plain folder's rotary caches span its whole context, as `convert` builds them: with
    8192 rows, a 10000-position model failed in GroupQueryAttention past position 8191."""
    write_hf_folder(tmp_path / "hf", small_config(max_position_embeddings=10000))
    plain = lmexport.convert(tmp_path / "hf", tmp_path / "plain", target="plain")
    lmexport.optimize(plain, tmp_path / "opt", target="ort")
    rng = np.random.default_rng(0)
    past = 8199  # one decode step at position 8199 over a random cache
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([[7]]),
        "attention_mask": np.ones((1, past + 1), dtype=np.int64),
    }
    for i in range(2):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, 2, past, 16), np.float32)
    plain_logits, fused_logits = (
        ort.InferenceSession(str(folder / "model.onnx")).run(["logits"], feeds)[0]
        for folder in (plain, tmp_path / "opt")
    )
    assert np.abs(plain_logits - fused_logits).max() <= 1e-4


@pytest.mark.parametrize("cache", ["kv", "no_kv"])
def test_plain_export_to_ort(
    plain_folders: dict[str, Path], ort_node_counts: dict[str, int], cache: str, tmp_path: Path
) -> None:
    folder, fused = optimized_folder(plain_folders[cache], "ort", tmp_path / "opt")
    counts = ops(fused)
    assert counts["GroupQueryAttention"] == LAYERS
    assert len(fused.graph.node) <= 1.2 * ort_node_counts[cache]
    assert_no_training_outputs(fused)
    for op in ("Softmax", "Tile", "ReduceMean", "Pow"):
        assert counts[op] == 0, op
    producers = {o: n for n in fused.graph.node for o in n.output}
    for gqa in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        for name in gqa.input[:5]:
            assert name == "" or producers.get(name) is None or producers[name].op_type != "Expand"
    # onnxruntime-genai can run it, as a `convert --target ort` folder (cached graphs only).
    assert (folder / "genai_config.json").is_file() == (cache == "kv")
    report = lmexport.verify(folder, steps=16)  # PyTorch vs the optimized graph, end to end
    assert report.passed, report.table()
    assert report.metrics["logits"]["max_abs"] <= 1e-4
    assert report.metrics["left_padding"]["max_abs"] <= 1e-4


@pytest.mark.parametrize("cache", ["kv", "no_kv"])
def test_plain_export_to_onnx(plain_folders: dict[str, Path], cache: str, tmp_path: Path) -> None:
    folder, fused = optimized_folder(plain_folders[cache], "onnx", tmp_path / "opt")
    counts = ops(fused)
    assert counts["Attention"] == LAYERS
    assert counts["RotaryEmbedding"] == 2 * LAYERS
    assert counts["RMSNormalization"] == 2 * LAYERS + 1
    assert counts["Softmax"] == 0 and {n.domain for n in fused.graph.node} == {""}
    assert not (folder / "genai_config.json").exists()
    report = lmexport.verify(folder, steps=16)
    assert report.passed, report.table()


def test_folder_of_another_target_refused(tmp_path: Path) -> None:
    """An `ort` folder's graph keeps its com.microsoft ops: `--target onnx` would record a
    standard-ops folder that is not one."""
    folder = lmexport.convert("llama-tiny", tmp_path / "ort")
    assert_bad_input(["optimize", str(folder), "-o", str(tmp_path / "o"), "--target", "onnx"],
                     "`ort` export", "--target plain")  # fmt: skip
    assert not (tmp_path / "o").exists()


def export_transformers(
    impl: str, path: Path, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    model = random_transformers_llama(attn_implementation=impl).to(dtype)

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    ids = torch.randint(0, 256, (2, 5))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Logits(),
            (ids, torch.ones_like(ids)),
            dynamo=True,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    return model


@pytest.mark.parametrize("target", ["ort", "onnx"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_export(impl: str, target: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")  # the other tests here need only lmexport
    model = export_transformers(impl, tmp_path / "hf.onnx")
    out = tmp_path / "opt.onnx"
    report = lmexport.optimize(tmp_path / "hf.onnx", out, target=target)
    applied = {f.name: f.applied for f in report.fusions}
    fused = onnx.load(str(out))
    counts = ops(fused)
    assert counts["GroupQueryAttention" if target == "ort" else "Attention"] == 2
    assert counts["Softmax"] == 0 and counts["ReduceMean"] == 0
    assert applied["rotary"] == 4 and applied["rms_norm"] == 5

    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, size=(2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits.numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    real = mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= 1e-4
    assert json.dumps(report.to_dict())  # the report serialises


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_float16_export(impl: str, tmp_path: Path) -> None:
    """transformers in float16: cos/sin cast from float32 angles and (eager) the softmax in float32
    between Casts; every fusion still applies and the fused graph picks PyTorch's tokens."""
    pytest.importorskip("transformers")
    model = export_transformers(impl, tmp_path / "hf.onnx", torch.float16)
    out = tmp_path / "opt.onnx"
    report = lmexport.optimize(tmp_path / "hf.onnx", out, target="ort")
    assert report.max_diff is not None and report.max_diff <= 1e-2
    counts = ops(onnx.load(str(out)))
    assert counts["GroupQueryAttention"] == 2 and counts["RotaryEmbedding"] == 0  # inside GQA
    assert counts["Softmax"] == 0 and counts["Cos"] == 0
    ids = np.random.default_rng(1).integers(0, 256, size=(2, 9), dtype=np.int64)
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    assert np.abs(got.astype(np.float32) - expected).max() <= 2e-2 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def attribute(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def prefill_then_steps(model: onnx.ModelProto, vocab: int) -> np.ndarray:
    """Logits of a cached graph in onnxruntime over real inputs: a prefill of two rows, the
    second left-padded by 3 (logits of its real tokens only: a fully masked query row is left
    to each attention kernel), then two one-token steps over the cache it returned, the
    `present` outputs fed back as `past_key_values`. [real tokens + 2 steps x 2 rows, vocab]."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    ids = rng.integers(0, vocab, size=(2, 7), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    for past in session.get_inputs()[2:]:
        assert past.name.startswith("past_key_values."), past.name
        feeds[past.name] = np.zeros((2, past.shape[1], 0, past.shape[3]), np.float32)
    names = [o.name for o in session.get_outputs()]
    got = []
    for _ in range(3):
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        real = feeds["attention_mask"][:, -feeds["input_ids"].shape[1] :].astype(bool)
        got.append(outputs["logits"][real])
        step = rng.integers(0, vocab, size=(2, 1), dtype=np.int64)
        feeds = {
            "input_ids": step,
            "attention_mask": np.concatenate([feeds["attention_mask"], np.ones_like(step)], 1),
        } | {
            name: outputs[name.replace("past_key_values.", "present.")]
            for name in feeds
            if name.startswith("past_key_values.")
        }
    assert feeds["past_key_values.0.key"].shape[2] == 9  # both steps went through the cache
    return np.concatenate(got)


def assert_same_logits(expected: np.ndarray, got: np.ndarray) -> None:
    assert np.abs(expected).max() > 0.1  # not a degenerate model
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


HEAD_LAYOUTS = {
    "mha": small_config(num_key_value_heads=4),  # as many K/V heads as Q heads: no repeat_kv
    "head_dim_24": small_config(head_dim=24),  # GroupQueryAttention cannot rotate it on CPU
}


@pytest.mark.parametrize("layout", sorted(HEAD_LAYOUTS))
def test_plain_export_of_other_head_layouts(layout: str, tmp_path: Path) -> None:
    """Multi-head attention (no K/V repeat to match) and a head size that is not a multiple of
    16 (rotary stays outside GroupQueryAttention), fused for both targets and run over a cache
    before and after."""
    config: LlamaConfig = HEAD_LAYOUTS[layout]
    mha = layout == "mha"
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    write_hf_folder(tmp_path / "hf", config, seed=1)
    folder = lmexport.convert(str(tmp_path / "hf"), tmp_path / "plain", target="plain")
    model = onnx.load(str(folder / "model.onnx"))
    if mha:
        assert ops(model)["Expand"] == ops(model)["Tile"] == 0  # nothing repeats K/V
    expected = prefill_then_steps(model, config.vocab_size)

    fused, report = optimize_model(model, "ort")
    applied = report.applied_by_fusion()
    for name, count in {"rms_norm": 2 * layers + 1, "rotary": 2 * layers, "attention": layers,
                        "group_query_attention": layers, "skip_rms_norm": 2 * layers,
                        "silu": layers}.items():  # fmt: skip
        assert applied[name] == count, (name, applied)
    counts = ops(fused)
    assert counts["Softmax"] == counts["Attention"] == 0
    nodes = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(nodes) == layers
    for node in nodes:
        assert attribute(node, "num_heads") == heads
        assert attribute(node, "kv_num_heads") == config.num_key_value_heads
        assert attribute(node, "do_rotary") == int(mha)  # head_dim 16 folds rotary in, 24 not
    if mha:
        assert applied["qkv_packing"] == layers and counts["RotaryEmbedding"] == 0
    else:
        rotary = [n for n in fused.graph.node if n.op_type == "RotaryEmbedding"]
        assert len(rotary) == 2 * layers and {n.domain for n in rotary} == {"com.microsoft"}
    assert_same_logits(expected, prefill_then_steps(fused, config.vocab_size))

    fused, report = optimize_model(model, "onnx")
    counts = ops(fused)
    assert counts["Attention"] == layers and counts["RotaryEmbedding"] == 2 * layers
    assert counts["RMSNormalization"] == 2 * layers + 1 and counts["Softmax"] == 0
    assert {n.domain for n in fused.graph.node} == {""}
    assert_same_logits(expected, prefill_then_steps(fused, config.vocab_size))


@pytest.fixture(scope="module")
def transformers_cached(tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    """A transformers Llama (SMALL: 2 layers, 4/2 heads, SDPA) exported with its KV cache: the
    past as graph inputs filling a DynamicCache, whose layers give the `present` outputs."""
    transformers = pytest.importorskip("transformers")
    model = random_transformers_llama()
    shape = small_config()  # random_transformers_llama's
    layers, kv_heads = shape.num_hidden_layers, shape.num_key_value_heads
    head_dim = shape.hidden_size // shape.num_attention_heads

    class Cached(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor
        ) -> tuple[torch.Tensor, ...]:
            cache = transformers.DynamicCache(config=self.model.config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=cache,
                use_cache=True,
            )
            present = [
                t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (out.logits, *present)

    kv = [f"{i}.{part}" for i in range(layers) for part in ("key", "value")]
    dynamic = torch.export.Dim.DYNAMIC
    ids = torch.randint(0, 256, (2, 5))
    past = [torch.randn(2, kv_heads, 3, head_dim) for _ in kv]  # a past of 3 positions
    shapes = {
        "input_ids": {0: dynamic, 1: dynamic},
        "attention_mask": {0: dynamic, 1: dynamic},
        "past": tuple({0: dynamic, 2: dynamic} for _ in kv),
    }
    path = tmp_path_factory.mktemp("hf_cached") / "model.onnx"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Cached(),
            (ids, torch.ones(2, 8, dtype=torch.int64), *past),
            dynamo=True,
            dynamic_shapes=shapes,
            input_names=["input_ids", "attention_mask"] + [f"past_key_values.{n}" for n in kv],
            output_names=["logits"] + [f"present.{n}" for n in kv],
            verbose=False,
        )
    assert program is not None
    program.save(str(path))
    return onnx.load(str(path))


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_transformers_cached_export(transformers_cached: onnx.ModelProto, target: str) -> None:
    """transformers' cache appends with Concat(axis=-2) after rotary, its K/V repeat feeds
    SDPA's decomposition: fused, and the same logits over a prefill and cached steps."""
    model = transformers_cached
    expected = prefill_then_steps(model, 256)
    fused, report = optimize_model(model, target)
    applied = report.applied_by_fusion()
    assert applied["rms_norm"] == 5 and applied["rotary"] == 4 and applied["attention"] == 2
    counts = ops(fused)
    assert counts["Softmax"] == counts["ReduceMean"] == counts["IsNaN"] == 0
    if target == "ort":
        assert applied["skip_rms_norm"] == 4 and applied["silu"] == 2
        assert applied["group_query_attention"] == counts["GroupQueryAttention"] == 2
    else:
        assert counts["Attention"] == 2
    assert_same_logits(expected, prefill_then_steps(fused, 256))
