"""`convert --adapter` merges a PEFT LoRA adapter; the graph matches the base model running the
adapter on the fly (y = x·Wᵀ + scale·(x·Aᵀ)·Bᵀ in every targeted linear layer)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import lmexport
from lmexport.errors import SourceError
from lmexport.models.llama import Llama
from lmexport.models.lora import is_target
from lmexport.models.source import load_source
from lmexport.runtime import LlamaRunner

from helpers import assert_bad_input, run, small_config, write_hf_folder

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraLinear(nn.Module):
    """A frozen linear layer with its low-rank update computed beside it, as PEFT runs it."""

    def __init__(self, base: nn.Linear, a: Tensor, b: Tensor, scale: float) -> None:
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.a.T) @ self.b.T


def random_adapter(
    folder: Path,
    model: Llama,
    rank: int = 4,
    alpha: float = 8.0,
    rslora: bool = False,
    targets: list[str] = TARGETS,
    seed: int = 0,
) -> dict[str, tuple[Tensor, Tensor]]:
    """An adapter folder as PEFT saves it; B is random (PEFT starts it at zero), small enough
    that the adapted model stays a sane one, large enough that the update shows.
    Returns (A, B) per module name."""
    gen = torch.Generator().manual_seed(seed)
    pairs = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets:
            a = torch.randn(rank, module.in_features, generator=gen) / math.sqrt(module.in_features)
            b = 0.3 * torch.randn(module.out_features, rank, generator=gen) / math.sqrt(rank)
            pairs[name] = (a, b)
    folder.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "llama-tiny",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "target_modules": targets,
        "use_rslora": rslora,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for name, (a, b) in pairs.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return pairs


def _read(folder: Path) -> dict[str, Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def with_adapter_on_the_fly(
    model: Llama, pairs: dict[str, tuple[Tensor, Tensor]], scale: float
) -> Llama:
    for name, (a, b) in pairs.items():
        parent, child = name.rsplit(".", 1)
        owner = model.get_submodule(parent)
        setattr(owner, child, LoraLinear(getattr(owner, child), a, b, scale))
    return model


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_merged_adapter_matches_on_the_fly(tmp_path: Path, rslora: bool) -> None:
    base = load_source("llama-tiny").model
    assert isinstance(base, Llama)
    pairs = random_adapter(tmp_path / "adapter", base, rank=4, alpha=8.0, rslora=rslora)
    scale = 8.0 / (math.sqrt(4) if rslora else 4)
    code, _, err = run(
        "convert", "llama-tiny", "-o", str(tmp_path / "out"), "--adapter", str(tmp_path / "adapter")
    )
    assert code == 0, err

    ids = np.random.default_rng(0).integers(0, base.config.vocab_size, size=(2, 12))
    with torch.no_grad():
        plain = base(torch.from_numpy(ids))[0].numpy()
        expected = with_adapter_on_the_fly(base, pairs, scale)(torch.from_numpy(ids))[0].numpy()
    got = LlamaRunner.load(tmp_path / "out", threads=2).logits(ids)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected - plain).max() > 0.1  # the adapter does change the model

    source = json.loads((tmp_path / "out" / "lmexport.json").read_text())["source"]
    adapter_file = tmp_path / "adapter" / "adapter_model.safetensors"
    assert source["adapter"]["path"] == str((tmp_path / "adapter").resolve())
    assert source["adapter"]["sha256"] == hashlib.sha256(adapter_file.read_bytes()).hexdigest()
    assert source["adapter"]["use_rslora"] is rslora
    if rslora:  # verify rebuilds the source with the recorded adapter merged again
        report = lmexport.verify(tmp_path / "out", steps=8)
        assert report.passed, report.table()


def test_adapter_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    base = load_source("llama-tiny").model
    assert isinstance(base, Llama)
    random_adapter(tmp_path / "adapter", base, targets=["q_proj"])
    tensors = {
        k: torch.zeros(v.shape[0], 32)
        if k.endswith("layers.1.self_attn.q_proj.lora_A.weight")
        else v
        for k, v in _read(tmp_path / "adapter").items()
    }
    save_file(tensors, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert_bad_input(
        [
            "convert",
            "llama-tiny",
            "-o",
            str(tmp_path / "out"),
            "--adapter",
            str(tmp_path / "adapter"),
        ],
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
        "[4, 32]",
        "[4, 64]",
    )
    assert list(tmp_path.glob("*out*")) == []


def test_adapter_for_modules_the_model_lacks(tmp_path: Path) -> None:
    base = load_source("llama-tiny").model
    assert isinstance(base, Llama)
    random_adapter(tmp_path / "deeper", base, targets=["q_proj"])
    tensors = _read(tmp_path / "deeper")
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(tmp_path / "deeper" / "adapter_model.safetensors"))
    out = str(tmp_path / "out")
    assert_bad_input(
        ["convert", "llama-tiny", "-o", out, "--adapter", str(tmp_path / "deeper")],
        "'model.layers.9.self_attn.q_proj', which the model does not have",
    )
    random_adapter(tmp_path / "gpt2", base, targets=["q_proj"])
    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "c_attn"]
    (tmp_path / "gpt2" / "adapter_config.json").write_text(json.dumps(config))
    assert_bad_input(
        ["convert", "llama-tiny", "-o", out, "--adapter", str(tmp_path / "gpt2")],
        "target_modules names 'c_attn'",
    )
    config["use_dora"] = True
    (tmp_path / "gpt2" / "adapter_config.json").write_text(json.dumps(config))
    assert_bad_input(
        ["convert", "llama-tiny", "-o", out, "--adapter", str(tmp_path / "gpt2")], "use_dora"
    )
    assert_bad_input(
        ["convert", "hornet-tiny-7x7", "-o", out, "--adapter", str(tmp_path / "deeper")],
        "--adapter applies to Llama-family models only",
    )
    assert list(tmp_path.glob("*out*")) == []


def test_target_modules_match_as_peft_matches_them() -> None:
    assert is_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert is_target("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not is_target("model.layers.0.self_attn.q_proj", ["proj"])
    assert is_target("model.layers.3.mlp.up_proj", r".*\.mlp\..*_proj")
    assert not is_target("model.layers.3.self_attn.q_proj", r".*\.mlp\..*_proj")
    assert is_target("model.layers.0.mlp.down_proj", "all-linear")
    assert not is_target("lm_head", "all-linear")


def test_adapter_on_a_tied_output_head_is_refused(tmp_path: Path) -> None:
    base = write_hf_folder(tmp_path / "hf", small_config(tie_word_embeddings=True))
    random_adapter(tmp_path / "adapter", base, targets=["lm_head"])
    with pytest.raises(SourceError, match="shares its weight with the embedding"):
        load_source(str(tmp_path / "hf"), adapter=tmp_path / "adapter")
