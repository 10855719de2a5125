"""Chat prompts from the template a model ships in its tokenizer config.

Rendered the way transformers' `apply_chat_template` renders them, so a folder gives the same
prompt text here as in transformers: Jinja2's immutable sandbox (templates come with downloaded
models, they are untrusted code), trim_blocks and lstrip_blocks, loop controls, transformers'
`tojson` (no HTML escaping), `raise_exception` and `strftime_now`, and the special tokens
(`bos_token`, `eos_token`, …) as variables. The template is read from `chat_template.jinja` when
present (newer transformers save it there), else from `tokenizer_config.json`'s `chat_template`
(a string, or a list of named templates of which "default" is used).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LmexportError, RuntimeInputError, first_line

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for training masks in
    transformers; for rendering a prompt it is just its body."""

    tags = {"generation"}  # noqa: RUF012 (jinja2's Extension declares it a class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(value: Any) -> str | None:
    """A special token as configs store it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_text(path: Path) -> str:
    """The file's UTF-8 text; a one-line error for what cannot be read or decoded."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LmexportError(f"{path}: unreadable ({e})") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise LmexportError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise LmexportError(f"{path}: not a JSON object")
    return data


class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, str], origin: str = "template"):
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise LmexportError(f"{origin}: chat template line {e.lineno}: {e.message}") from None

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, …]), ending with the
        assistant's turn opened when `add_generation_prompt`. Encode it without adding special
        tokens: the template writes them."""
        chat = [dict(m) for m in messages]
        if not all("role" in m for m in chat):
            raise RuntimeInputError("every chat message needs a role")
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **variables},
            )
        except (jinja2.exceptions.TemplateError, TypeError, ValueError) as e:
            # raise_exception's message, or what a template did wrong with these messages
            message = first_line(e, 300)
            raise RuntimeInputError(f"{self.origin}: chat template: {message}") from None

    def encode(
        self, tokenizer: Any, messages: Sequence[Mapping[str, Any]], **variables: Any
    ) -> list[int]:
        """Token ids of the rendered prompt (the template already wrote the special tokens, so
        the tokenizer adds none), as transformers' apply_chat_template(tokenize=True) gives."""
        text = self.render(messages, **variables)
        return list(tokenizer.encode(text, add_special_tokens=False).ids)

    def end_token_ids(self, tokenizer: Any) -> list[int]:
        """The id of the template's eos_token (the end of an assistant turn), if it has one."""
        token = self.eos_token
        token_id = tokenizer.token_to_id(token) if token is not None else None
        return [] if token_id is None else [int(token_id)]


def load_chat_template(folder: str | Path) -> ChatTemplate:
    """The folder's chat template; a one-line error when it has none."""
    folder = Path(folder)
    config_path = folder / TOKENIZER_CONFIG
    config = _read_json(config_path) if config_path.is_file() else {}
    special: dict[str, str] = {}
    map_path = folder / SPECIAL_TOKENS_MAP
    for source in (_read_json(map_path) if map_path.is_file() else {}, config):
        for name in SPECIAL_TOKENS:
            text = _token_text(source.get(name))
            if text is not None:
                special[name] = text
    if (folder / TEMPLATE_FILE).is_file():
        path = folder / TEMPLATE_FILE
        return ChatTemplate(_read_text(path), special, str(path))
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise LmexportError(
            f"{folder}: no chat template (neither {TEMPLATE_FILE} nor a chat_template in "
            f"{TOKENIZER_CONFIG})"
        )
    return ChatTemplate(template, special, str(config_path))
