"""samples/ run as the README says, with torch made unimportable (they use lmexport.runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lmexport.runtime import LlamaRunner, load_chat_template

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# Runs a sample as `python samples/X.py ARGS…` would, but where `import torch` fails.
WITHOUT_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _sample(name: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", WITHOUT_TORCH, str(SAMPLES / name), *args]
    return subprocess.Popen(command, text=True, **popen)


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(chat_folder: Path) -> Any:
    proc = _sample(
        "embed_in_app.py", str(chat_folder), "--host", "127.0.0.1", "--port", "0",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("serving on "):
        proc.kill()
        pytest.fail(f"embed_in_app did not start: {line}{proc.communicate()[1]}")
    yield line.split()[-1]
    proc.terminate()
    proc.wait(timeout=30)


def test_embed_in_app(server: str, chat_folder: Path) -> None:
    runner = LlamaRunner.load(chat_folder)
    ids = [5, 6, 7, 8]
    status, answer = _post(server, {"ids": ids, "max_new_tokens": 10})
    assert status == 200
    greedy = runner.generate([ids], 10)[0].tolist()
    assert answer["ids"] == greedy
    assert answer["text"] == runner.tokenizer.decode(greedy)
    sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 4}
    status, answer = _post(server, {"ids": ids, "max_new_tokens": 10, **sampled})
    assert status == 200 and answer["ids"] == runner.generate([ids], 10, **sampled)[0].tolist()
    status, answer = _post(server, {"prompt": "Paris is", "chat": True, "max_new_tokens": 6})
    template = load_chat_template(chat_folder)
    chat_ids = template.encode(runner.tokenizer, [{"role": "user", "content": "Paris is"}])
    eos = template.end_token_ids(runner.tokenizer)
    assert (
        status == 200 and answer["text"] == runner.generate_text([chat_ids], 6, eos_token_id=eos)[0]
    )


def test_embed_in_app_stop_string(server: str, chat_folder: Path) -> None:
    """A JSON string is one stop string, as a list of it is, not a stop at each character."""
    ids = [5, 6, 7, 8]
    text = LlamaRunner.load(chat_folder).generate_text([ids], 30)[0]
    # Three characters of the text, one of which comes earlier alone.
    stop = next(
        text[i : i + 3]
        for i in range(3, 25)
        if set(text[i : i + 3]) & set(text[:i]) and "\ufffd" not in text[i : i + 3]
    )
    for given in (stop, [stop]):
        status, answer = _post(server, {"ids": ids, "max_new_tokens": 30, "stop": given})
        assert status == 200 and answer["text"] == text[: text.index(stop)], given


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"ids": [1, 99999]}, "vocabulary"),
        ({"ids": [1], "top_p": 2}, "top-p"),
        ({"ids": [1], "prompt": "x"}, "either"),
        ({"ids": [1], "max_new_tokens": 600}, "context"),
        ({"ids": "123"}, "list of integers"),  # not the ids 1, 2, 3
        ({"ids": [1.7]}, "list of integers"),
        ({"ids": [1], "temperature": True}, "temperature"),
        ({"ids": [1], "top_k": 2.5}, "top_k"),
        ({"ids": [1], "max_new_tokens": "8"}, "max_new_tokens"),
        ({"ids": [1], "stop": [1]}, "stop"),  # not the string "1"
        ({"ids": [1], "stop": {"x": 1}}, "stop"),
    ],
)
def test_embed_in_app_bad_input(server: str, body: dict[str, Any], word: str) -> None:
    status, answer = _post(server, body)
    assert status == 400 and word in answer["error"]


def test_chat_sample(chat_folder: Path) -> None:
    """Two turns through stdin; the second prompt holds the first answer."""
    proc = _sample(
        "chat.py", str(chat_folder), "--max-new-tokens", "8",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = proc.communicate("What is the capital of France?\nAnd of Italy?\n", timeout=300)
    assert proc.returncode == 0, err
    runner = LlamaRunner.load(chat_folder)
    template = load_chat_template(chat_folder)
    eos = template.end_token_ids(runner.tokenizer)
    messages: list[dict[str, str]] = []
    expected = ""
    for question in ("What is the capital of France?", "And of Italy?"):
        messages.append({"role": "user", "content": question})
        ids = template.encode(runner.tokenizer, messages)
        answer = runner.generate_text([ids], 8, eos_token_id=eos)[0]
        messages.append({"role": "assistant", "content": answer})
        expected += f"> {answer}\n"
    assert out == expected + "> "


def test_chat_sample_without_template(tiny_folder: Path) -> None:
    proc = _sample("chat.py", str(tiny_folder), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.count("\n") == 1 and "chat template" in err
