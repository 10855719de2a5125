"""Chat templates rendered by the runtime (jinja2 only) as transformers renders them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lmexport.errors import LmexportError, RuntimeInputError
from lmexport.runtime import LlamaRunner, load_chat_template, load_tokenizer

from helpers import CHATML_TEMPLATE, assert_bad_input, run, write_tokenizer

# Llama 2's: bos_token and eos_token as variables, raise_exception, a filter.
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% endif %}{% endfor %}"
)
# Line statements with trim_blocks/lstrip_blocks, tojson of non-ASCII, loop controls, generation.
BLOCKS_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ message['role'] }}>{{ message['content'] | tojson }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}
    {% endif %}
{% endfor %}
turns={{ ns.n }}
{% if add_generation_prompt %}<assistant>{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "  Café or 東京? 😀 "},
    ],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi! How are you?"},
        {"role": "user", "content": "fine, thank you"},
    ],
]


def _template_folder(tmp_path: Path, template: str) -> Path:
    folder = tmp_path / "tok"
    folder.mkdir()
    write_tokenizer(folder, chat_template=template, bos_token="<s>", eos_token="</s>")
    return folder


@pytest.mark.parametrize("template", [CHATML_TEMPLATE, LLAMA2_TEMPLATE, BLOCKS_TEMPLATE])
def test_same_prompt_as_transformers(tmp_path: Path, template: str) -> None:
    import transformers

    folder = _template_folder(tmp_path, template)
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    ours = load_chat_template(folder)
    tokenizer = load_tokenizer(folder)
    for messages in CONVERSATIONS:
        if template is LLAMA2_TEMPLATE and messages[0]["role"] == "system":
            continue  # that template refuses system turns (tested below)
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.render(messages) == expected
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert ours.encode(tokenizer, messages) == ids


def test_raise_exception_is_one_line_error(tmp_path: Path) -> None:
    template = load_chat_template(_template_folder(tmp_path, LLAMA2_TEMPLATE))
    with pytest.raises(RuntimeInputError, match="roles must alternate"):
        template.render(CONVERSATIONS[1])


def test_template_file_and_named_templates(tmp_path: Path) -> None:
    """chat_template.jinja wins over the config; a list of named templates gives 'default'."""
    folder = _template_folder(tmp_path, CHATML_TEMPLATE)
    config: dict[str, Any] = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
    ]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert (
        load_chat_template(folder).render(CONVERSATIONS[0])
        == "<s>" + CONVERSATIONS[0][0]["content"]
    )
    (folder / "chat_template.jinja").write_text("{{ eos_token }}")
    assert load_chat_template(folder).render(CONVERSATIONS[0]) == "</s>"


def test_no_template(tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    write_tokenizer(folder, eos_token="</s>")
    with pytest.raises(LmexportError, match="no chat template"):
        load_chat_template(folder)


def test_bad_template_syntax(tmp_path: Path) -> None:
    with pytest.raises(LmexportError, match="chat template line 1"):
        load_chat_template(_template_folder(tmp_path, "{% for m in messages %}"))


def test_sandboxed(tmp_path: Path) -> None:
    """Templates are untrusted: no reaching Python internals through attributes."""
    template = load_chat_template(
        _template_folder(tmp_path, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    )
    with pytest.raises(RuntimeInputError, match="chat template"):
        template.render(CONVERSATIONS[0])


def test_cli_chat(chat_folder: Path) -> None:
    """--chat generates from the rendered prompt and stops at the template's end token."""
    question = "What is the capital of France?"
    code, out, err = run(
        "generate", str(chat_folder), "--chat", "--prompt", question, "--max-new-tokens", "12"
    )
    assert code == 0, err
    runner = LlamaRunner.load(chat_folder)
    template = load_chat_template(chat_folder)
    ids = template.encode(runner.tokenizer, [{"role": "user", "content": question}])
    eos = template.end_token_ids(runner.tokenizer)
    assert eos == [runner.tokenizer.token_to_id("<|im_end|>")]
    expected = runner.generate_text([ids], 12, eos_token_id=runner.eos_token_ids + eos)[0]
    assert out == expected + "\n"


def test_cli_chat_without_template(chat_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    shutil.copytree(chat_folder, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert_bad_input(["generate", str(folder), "--chat", "--prompt", "hi"], "no chat template")


def test_template_file_not_utf8(chat_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    shutil.copytree(chat_folder, folder)
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(LmexportError, match=r"chat_template\.jinja: unreadable"):
        load_chat_template(folder)
    assert_bad_input(
        ["generate", str(folder), "--prompt", "hi", "--chat", "--max-new-tokens", "2"],
        "unreadable",
    )
