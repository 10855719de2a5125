"""Meta-format folders (params.json + consolidated.NN.pth, sharded as Meta's model parallelism
shards them) and torchtune checkpoints convert to graphs that match Meta's own way of computing
the model: complex-number rotary on interleaved pairs, written out below."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import lmexport
from lmexport.models.checkpoints import meta
from lmexport.models.llama import rope_inv_freq
from lmexport.runtime import LlamaRunner

from helpers import assert_bad_input

# --- Meta's Llama, as its reference code computes it (no model parallelism, no cache) ---------


@dataclass
class Params:
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = 2
    vocab_size: int = 256
    multiple_of: int = 32
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False


def ffn_hidden(p: Params) -> int:
    hidden = int(2 * 4 * p.dim / 3)
    if p.ffn_dim_multiplier is not None:
        hidden = int(p.ffn_dim_multiplier * hidden)
    return p.multiple_of * ((hidden + p.multiple_of - 1) // p.multiple_of)


def apply_scaling(freqs: Tensor) -> Tensor:
    factor, low, high, old_len = 8, 1, 4, 8192
    wavelen = 2 * math.pi / freqs
    new = torch.where(wavelen > old_len / low, freqs / factor, freqs)
    smooth = (old_len / wavelen - low) / (high - low)
    band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(band, (1 - smooth) * new / factor + smooth * new, new)


def rope_freqs(p: Params) -> Tensor:
    head_dim = p.dim // p.n_heads
    exponents = torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim
    freqs = 1.0 / (p.rope_theta**exponents)
    return apply_scaling(freqs) if p.use_scaled_rope else freqs


def apply_rotary_emb(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class MetaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class MetaAttention(nn.Module):
    def __init__(self, p: Params) -> None:
        super().__init__()
        self.n_heads = p.n_heads
        self.n_kv_heads = p.n_kv_heads or p.n_heads
        self.head_dim = p.dim // p.n_heads
        self.wq = nn.Linear(p.dim, p.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(p.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(p.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(p.n_heads * self.head_dim, p.dim, bias=False)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor) -> Tensor:
        b, s, _ = x.shape
        xq = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        xk = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        rep = self.n_heads // self.n_kv_heads
        keys = xk.repeat_interleave(rep, dim=2).transpose(1, 2)
        values = xv.repeat_interleave(rep, dim=2).transpose(1, 2)
        scores = xq.transpose(1, 2) @ keys.transpose(2, 3) / math.sqrt(self.head_dim)
        scores = F.softmax((scores + mask).float(), dim=-1).type_as(xq)
        return self.wo((scores @ values).transpose(1, 2).reshape(b, s, -1))


class MetaFeedForward(nn.Module):
    def __init__(self, p: Params) -> None:
        super().__init__()
        hidden = ffn_hidden(p)
        self.w1 = nn.Linear(p.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, p.dim, bias=False)
        self.w3 = nn.Linear(p.dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MetaBlock(nn.Module):
    def __init__(self, p: Params) -> None:
        super().__init__()
        self.attention = MetaAttention(p)
        self.feed_forward = MetaFeedForward(p)
        self.attention_norm = MetaRMSNorm(p.dim, p.norm_eps)
        self.ffn_norm = MetaRMSNorm(p.dim, p.norm_eps)

    def forward(self, x: Tensor, freqs_cis: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaTransformer(nn.Module):
    def __init__(self, p: Params) -> None:
        super().__init__()
        self.params = p
        self.tok_embeddings = nn.Embedding(p.vocab_size, p.dim)
        self.layers = nn.ModuleList(MetaBlock(p) for _ in range(p.n_layers))
        self.norm = MetaRMSNorm(p.dim, p.norm_eps)
        self.output = nn.Linear(p.dim, p.vocab_size, bias=False)

    @torch.no_grad()
    def forward(self, tokens: Tensor) -> Tensor:
        s = tokens.shape[1]
        angles = torch.outer(torch.arange(s, dtype=torch.float32), rope_freqs(self.params))
        freqs_cis = torch.polar(torch.ones_like(angles), angles)
        mask = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        return self.output(self.norm(h)).float()


def random_meta_model(p: Params, seed: int = 0) -> MetaTransformer:
    model = MetaTransformer(p).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if name.endswith("norm.weight"):
                w.copy_(1.0 + 0.1 * torch.randn(w.shape, generator=gen))
            else:
                fan_in = 1 if name == "tok_embeddings.weight" else w.shape[-1]
                w.copy_(torch.randn(w.shape, generator=gen) / math.sqrt(fan_in))
    return model


# --- writing the folders -----------------------------------------------------------------------

# Meta's model parallelism: ColumnParallelLinear splits the output rows, RowParallelLinear the
# input columns; norms are copied to every rank.
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2")
TORCHTUNE_NAMES = {
    "attention.wq": "attn.q_proj",
    "attention.wk": "attn.k_proj",
    "attention.wv": "attn.v_proj",
    "attention.wo": "attn.output_proj",
    "feed_forward.": "mlp.",
    "attention_norm.weight": "sa_norm.scale",
    "ffn_norm.weight": "mlp_norm.scale",
}


DROP = object()  # a params.json key left out


def params_json(p: Params, **changes: object) -> dict[str, object]:
    return {k: v for k, v in {**asdict(p), **changes}.items() if v is not DROP}


def write_meta_folder(
    folder: Path,
    model: MetaTransformer,
    shards: int = 1,
    embedding_dim: int = 1,
    **params_changes: object,
) -> None:
    """consolidated.NN.pth shards; `embedding_dim` 1 as Llama 2's ParallelEmbedding splits the
    embedding, 0 as Llama 3's VocabParallelEmbedding."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params_json(model.params, **params_changes)))
    state = model.state_dict()
    for rank in range(shards):
        part = {}
        for name, w in state.items():
            kind = name.split(".")[-2]
            dim = (
                0
                if kind in COLUMN_PARALLEL
                else 1
                if kind in ROW_PARALLEL
                else embedding_dim
                if kind == "tok_embeddings"
                else None
            )
            part[name] = w.clone() if dim is None else w.chunk(shards, dim=dim)[rank].clone()
        torch.save(part, folder / f"consolidated.{rank:02d}.pth")


def write_torchtune_folder(folder: Path, model: MetaTransformer) -> None:
    """What torchtune's FullModelTorchTuneCheckpointer leaves: one file in its own naming, next
    to the params.json it copied from the Meta folder it started from."""
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params_json(model.params)))
    state = {}
    for name, w in model.state_dict().items():
        for meta_part, tune_part in TORCHTUNE_NAMES.items():
            name = name.replace(meta_part, tune_part)
        state[name.replace("norm.weight", "norm.scale")] = w.clone()
    torch.save(state, folder / "model-00001-of-00001.bin")


def assert_matches_meta(folder: Path, reference: MetaTransformer) -> None:
    ids = np.random.default_rng(0).integers(0, reference.params.vocab_size, size=(2, 12))
    expected = reference(torch.from_numpy(ids)).numpy()
    got = LlamaRunner.load(folder, threads=2).logits(ids)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected).max() > 1.0  # logits spread wide enough to mean something


# Llama 3.1-like: grouped queries, ffn_dim_multiplier, scaled rotary (theta 10000 puts head_dim
# 16's frequencies in all three bands of the scaling), a short context.
LLAMA31 = Params(ffn_dim_multiplier=1.3, use_scaled_rope=True)
# Llama 2-like as Meta released 70B: vocab_size -1 and no rope_theta in params.json.
LLAMA2 = Params()


@pytest.mark.parametrize(
    ("params", "shards", "target", "changes"),
    [
        (LLAMA31, 1, "ort", {"max_seq_len": 64}),
        (LLAMA2, 2, "ort", {"vocab_size": -1, "rope_theta": DROP}),
        (LLAMA2, 2, "plain", {"vocab_size": -1, "rope_theta": DROP}),
    ],
    ids=["llama31_1shard_ort", "llama2_2shards_ort", "llama2_2shards_plain"],
)
def test_meta_folder_matches_meta_reference(
    tmp_path: Path, params: Params, shards: int, target: str, changes: dict[str, object]
) -> None:
    reference = random_meta_model(params)
    write_meta_folder(tmp_path / "meta", reference, shards, **changes)
    out = lmexport.convert(str(tmp_path / "meta"), tmp_path / "out", target=target)
    assert_matches_meta(out, reference)
    config = json.loads((out / "lmexport.json").read_text())["config"]
    assert config["intermediate_size"] == ffn_hidden(params)
    assert config["vocab_size"] == params.vocab_size


def test_torchtune_naming_matches_meta_reference(tmp_path: Path) -> None:
    reference = random_meta_model(LLAMA31, seed=1)
    write_torchtune_folder(tmp_path / "tune", reference)
    out = lmexport.convert(str(tmp_path / "tune"), tmp_path / "out")
    assert_matches_meta(out, reference)
    report = lmexport.verify(out, steps=8)  # rebuilds the source from the torchtune folder
    assert report.passed, report.table()


def test_llama3_embedding_split_and_scaled_rope(tmp_path: Path) -> None:
    """Llama 3 splits the embedding by vocabulary rows, Llama 2 by columns: both load to the
    same model; use_scaled_rope gives Meta's frequencies."""
    reference = random_meta_model(LLAMA31)
    write_meta_folder(tmp_path / "rows", reference, 2, embedding_dim=0)
    write_meta_folder(tmp_path / "cols", reference, 2, embedding_dim=1)
    rows, cols = meta.load(tmp_path / "rows"), meta.load(tmp_path / "cols")
    for name, w in rows.state_dict().items():
        assert torch.equal(w, cols.state_dict()[name]), name
    torch.testing.assert_close(rope_inv_freq(rows.config), rope_freqs(LLAMA31))
    assert rows.config.max_position_embeddings == 131072  # Llama 3.1's context


def test_meta_intermediate_size_of_released_models() -> None:
    assert meta.intermediate_size(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert meta.intermediate_size(4096, 256, None) == 11008  # Llama 2 7B
    assert meta.intermediate_size(8192, 4096, 1.3) == 28672  # Llama 2/3 70B


def test_missing_shard_is_named(tmp_path: Path) -> None:
    reference = random_meta_model(LLAMA2)
    write_meta_folder(tmp_path / "gap", reference, 4)
    (tmp_path / "gap" / "consolidated.01.pth").unlink()
    assert_bad_input(
        ["convert", str(tmp_path / "gap"), "-o", str(tmp_path / "out")],
        "missing shard consolidated.01.pth",
    )
    write_meta_folder(tmp_path / "last", reference, 2)
    (tmp_path / "last" / "consolidated.01.pth").unlink()  # nothing left to show a gap
    assert_bad_input(
        ["convert", str(tmp_path / "last"), "-o", str(tmp_path / "out")],
        "missing shard consolidated.01.pth",
    )
    assert list(tmp_path.glob("*out*")) == []


def test_params_without_required_keys(tmp_path: Path) -> None:
    reference = random_meta_model(LLAMA2)
    write_meta_folder(tmp_path / "m", reference, dim=DROP, n_heads=DROP)
    assert_bad_input(
        ["convert", str(tmp_path / "m"), "-o", str(tmp_path / "out")],
        "params.json: missing keys dim, n_heads",
    )
    assert list(tmp_path.glob("*out*")) == []


def test_mis_shaped_or_foreign_tensors_are_named(tmp_path: Path) -> None:
    reference = random_meta_model(LLAMA2)
    write_meta_folder(tmp_path / "wide", reference, dim=128)
    assert_bad_input(
        ["convert", str(tmp_path / "wide"), "-o", str(tmp_path / "out")],
        "tok_embeddings.weight",
        "[256, 128]",
    )
    write_meta_folder(tmp_path / "deep", reference, n_layers=3)
    assert_bad_input(
        ["convert", str(tmp_path / "deep"), "-o", str(tmp_path / "out")],
        "missing tensors layers.2.attention_norm.weight",
    )
    folder = tmp_path / "odd"
    write_meta_folder(folder, reference)
    state = torch.load(folder / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.bias"] = torch.zeros(3)
    torch.save(state, folder / "consolidated.00.pth")
    assert_bad_input(
        ["convert", str(folder), "-o", str(tmp_path / "out")], "'layers.0.attention.bias'"
    )
    assert list(tmp_path.glob("*out*")) == []


@pytest.mark.parametrize(
    ("tied", "stated", "factor"), [(False, None, 8.0), (True, None, 32.0), (True, 16.0, 16.0)]
)
def test_scaled_rope_factor(tied: bool, stated: float | None, factor: float) -> None:
    """Llama 3.2 1B/3B (the tied ones) were trained with factor 32, the others with 8; a
    params.json that states rope_scaling_factor is taken at its word."""
    raw = {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 256, "multiple_of": 32}
    raw |= {"norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    if stated is not None:
        raw["rope_scaling_factor"] = stated
    config = meta.config_from_params(raw, Path("params.json"), 256, tied)
    assert config.rope_scaling is not None and config.rope_scaling["factor"] == factor
    assert config.rope_scaling["original_max_position_embeddings"] == 8192
