"""Model folders written by the tests themselves: no network, seeded weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lmexport.cli import cli
from lmexport.models.checkpoints.hf import hf_config_json
from lmexport.models.llama import Llama, LlamaConfig, init_random

SMALL = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def random_transformers_llama(**overrides: object) -> torch.nn.Module:
    """A transformers `LlamaForCausalLM` of SMALL's shape with seeded random weights, spread
    wide enough (initializer_range 0.2) that greedy choices are unambiguous."""
    import transformers

    torch.manual_seed(0)
    settings: dict[str, object] = dict(
        vocab_size=SMALL.vocab_size,
        hidden_size=SMALL.hidden_size,
        intermediate_size=SMALL.intermediate_size,
        num_hidden_layers=SMALL.num_hidden_layers,
        num_attention_heads=SMALL.num_attention_heads,
        num_key_value_heads=SMALL.num_key_value_heads,
        max_position_embeddings=SMALL.max_position_embeddings,
        initializer_range=0.2,
    )
    settings.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings)).eval()


def small_config(**changes: Any) -> LlamaConfig:
    return replace(SMALL, **changes)


def write_hf_folder(
    folder: Path,
    config: LlamaConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
) -> Llama:
    """A Hugging Face-format folder; returns the fp32 model its weights round to."""
    folder.mkdir(parents=True, exist_ok=True)
    model = Llama(config).eval()
    init_random(model, seed)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    (folder / "config.json").write_text(json.dumps(hf_config_json(config)))
    names = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(folder / file))
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    # What the export will actually see: the weights after the round trip through `dtype`.
    with torch.no_grad():
        for v in model.state_dict().values():
            v.copy_(v.to(dtype).float())
    return model


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_bad_input(args: list[str], *words: str) -> None:
    code, _, err = run(*args)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


# SmolLM2-Instruct's template (ChatML with a default system turn).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZER_TEXT = [
    "Paris is the capital of France. The quick brown fox jumps over the lazy dog.",
    "Café, naïve, façade, 東京, Ελληνικά, 😀 and 🚀 are not ASCII: several bytes each.",
    "Beautiful is better than ugly. Explicit is better than implicit. Simple is better.",
    "user assistant system: hello, how are you? I am fine, thank you. What is 2 + 2?",
] * 4


def write_tokenizer(folder: Path, vocab_size: int = 512, **config: Any) -> Any:
    """A byte-level BPE tokenizer.json trained on a few sentences (so one non-ASCII character
    is often several tokens), with <s>, </s>, <|im_start|>, <|im_end|> as special tokens
    0-3, and tokenizer_config.json holding `config` (chat_template, bos_token, …)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT, trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer


def assert_no_training_outputs(model: onnx.ModelProto) -> None:
    """Every SkipSimplifiedLayerNormalization leaves its mean and inverse standard deviation
    unnamed (onnxruntime would compute them) and its residual sum read."""
    norms = [n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    assert norms
    for norm in norms:
        assert norm.output[1] == norm.output[2] == "" and norm.output[3]
