"""Text as it is generated: incremental detokenization, stop strings, batches of prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lmexport.errors import LmexportError, RuntimeInputError
from lmexport.runtime import Detokenizer, LlamaRunner, load_tokenizer

from helpers import assert_bad_input, run, write_tokenizer

TEXT = "Café 東京 😀 Zürich: Paris is the capital of France. 🎉 北京 done"
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def _pieces(tokenizer: Any, ids: list[int], stop: list[str]) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tokenizer, stop)
    pieces = [detok.push(t) for t in ids]
    return [*pieces, detok.finish()], detok


def test_characters_split_over_tokens_come_out_whole(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT).ids
    assert len(ids) > len(TEXT.split())  # the multi-byte characters take several tokens
    assert any("\ufffd" in tokenizer.decode(ids[:i]) for i in range(len(ids)))
    pieces, _ = _pieces(tokenizer, ids, [])
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    # Nothing is held back longer than needed: after each token, all complete text is out.
    detok = Detokenizer(tokenizer)
    for i, t in enumerate(ids, 1):
        detok.push(t)
        assert detok.text == tokenizer.decode(ids[:i]).rstrip("\ufffd")


def test_stop_string_never_shown(tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT).ids
    pieces, detok = _pieces(tokenizer, ids, ["the capital", "zzz"])
    assert "".join(pieces) == TEXT[: TEXT.index("the capital")] and detok.stopped
    # A stop string's beginning is held back while it might still complete...
    shown = ""
    detok = Detokenizer(tokenizer, ["the capital"])
    for t in ids:
        shown += detok.push(t)
        assert "the c" not in shown
    # ...and handed out when it does not.
    pieces, detok = _pieces(tokenizer, ids, ["the capitol"])
    assert "".join(pieces) == TEXT and not detok.stopped


def test_stop_strings_match_special_tokens(tokenizer: Any) -> None:
    """Stop strings see `<|im_end|>` and the like, as transformers' stop_strings do; the text
    handed out skips them all the same and ends before the stop string."""
    ids = tokenizer.encode("Paris is<|im_end|> the capital<|im_start|>").ids
    assert 3 in ids and 2 in ids  # <|im_end|>, <|im_start|>: special tokens
    for stop, shown in [
        ("<|im_end|>", "Paris is"),
        ("is<|im_end|> the", "Paris "),  # across a special token
        ("im_end|> the", "Paris is"),  # beginning inside one
        ("capital<|im_start|>", "Paris is the "),
        ("zzz", "Paris is the capital"),
    ]:
        pieces, detok = _pieces(tokenizer, ids, [stop])
        assert "".join(pieces) == shown and detok.stopped == (stop != "zzz"), stop
    # The text before a special token is held back while it might begin a stop string.
    detok = Detokenizer(tokenizer, ["is<|im_end|>"])
    assert "".join(detok.push(t) for t in ids[: ids.index(3)]) == "Paris "


def test_stop_string_of_a_generated_special_token(chat_folder: Path) -> None:
    runner = LlamaRunner.load(chat_folder)
    prompt = [[320, 28, 46, 195, 426]]
    tokens = runner.generate(prompt, 24, eos_token_id=[])[0].tolist()
    end = tokens.index(2) + 1  # this prompt makes the tiny model write <|im_start|>
    assert runner.generate_text(prompt, 24, eos_token_id=[], stop=["<|im_start|>"]) == [
        runner.tokenizer.decode(tokens[: end - 1])
    ]
    stopped = runner.generate(prompt, 24, eos_token_id=[], stop=["<|im_start|>"])
    assert stopped.shape == (1, end) and stopped[0].tolist() == tokens[:end]


def test_stream_text_joins_to_the_decoded_tokens(chat_folder: Path) -> None:
    runner = LlamaRunner.load(chat_folder)
    tokens = runner.generate(PROMPTS, 40, eos_token_id=[])
    steps = list(runner.stream_text(PROMPTS, 40, eos_token_id=[]))
    assert np.array_equal(np.stack([s.tokens for s in steps if s.tokens.size], axis=1), tokens)
    for i, row in enumerate(tokens):
        text = "".join(s.text[i] for s in steps)
        assert text == runner.tokenizer.decode(row.tolist())
    assert runner.generate_text(PROMPTS, 40, eos_token_id=[]) == [
        runner.tokenizer.decode(row.tolist()) for row in tokens
    ]


def test_batch_of_three_prompts_equals_each_alone(tiny_folder: Path) -> None:
    """Prompts of 7, 2 and 4 tokens, left-padded into one batch, numpy and bound caches."""
    for io_binding in (False, True):
        runner = LlamaRunner.load(tiny_folder, io_binding=io_binding)
        batched = runner.generate(PROMPTS, 12, eos_token_id=[])
        assert batched.shape == (3, 12)
        for prompt, row in zip(PROMPTS, batched, strict=True):
            assert np.array_equal(row, runner.generate([prompt], 12, eos_token_id=[])[0])


def test_stop_strings_end_each_row(chat_folder: Path) -> None:
    runner = LlamaRunner.load(chat_folder)
    free = runner.generate_text(PROMPTS, 30, eos_token_id=[])
    tokens = runner.generate(PROMPTS, 30, eos_token_id=[])
    # A stop string from the middle of row 0's text; the other rows may or may not contain it.
    stop = next(free[0][i : i + 3] for i in range(5, 25) if "\ufffd" not in free[0][i : i + 3])
    texts = runner.generate_text(PROMPTS, 30, eos_token_id=[], stop=[stop])
    stopped = runner.generate(PROMPTS, 30, eos_token_id=[], stop=[stop])
    for i, text in enumerate(free):
        end = text.find(stop)
        assert texts[i] == (text if end < 0 else text[:end])
    # Row 0 ends with the token that completed the stop string; it then repeats that token.
    cut = next(n for n in range(1, 31) if stop in runner.tokenizer.decode(tokens[0, :n].tolist()))
    assert stopped.shape[1] <= 30 and np.array_equal(stopped[0, :cut], tokens[0, :cut])
    assert (stopped[0, cut:] == tokens[0, cut - 1]).all()


def test_stop_strings_need_a_tokenizer(tiny_folder: Path) -> None:
    with pytest.raises(LmexportError, match=r"tokenizer\.json"):
        LlamaRunner.load(tiny_folder).generate([[1, 2]], 4, stop=["x"])
    assert_bad_input(["generate", str(tiny_folder), "--ids", "1,2", "--stop", "x"], "--stop")
    with pytest.raises(RuntimeInputError, match="non-empty"):
        Detokenizer(None, [""])


def test_cli_streams_the_same_text(chat_folder: Path) -> None:
    runner = LlamaRunner.load(chat_folder)
    ids = runner.tokenizer.encode("Paris is").ids
    expected = runner.generate_text([ids], 16)[0]
    code, out, err = run(
        "generate", str(chat_folder), "--prompt", "Paris is", "--max-new-tokens", "16"
    )
    assert code == 0, err
    assert out == expected + "\n"


def test_cli_batch(chat_folder: Path, tmp_path: Path) -> None:
    """Repeated --ids, repeated --prompt and --prompt-file give one `[n] …` line a prompt."""
    runner = LlamaRunner.load(chat_folder)
    args = [a for p in PROMPTS for a in ("--ids", ",".join(map(str, p)))]
    tiny = str(chat_folder)
    code, out, err = run("generate", tiny, *args, "--max-new-tokens", "6", "--stop", "\n")
    assert code == 0, err
    texts = runner.generate_text(PROMPTS, 6, stop=["\n"])
    assert out == "".join(f"[{i}] {t}\n" for i, t in enumerate(texts, 1))
    prompts = ["Paris is", "The quick brown fox", "Café"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[1:]) + "\n\n")
    code, out, err = run(
        "generate", tiny, "--prompt", prompts[0], "--prompt-file", str(tmp_path / "prompts.txt"),
        "--max-new-tokens", "6", "--stop", "\n",
    )  # fmt: skip
    assert code == 0, err
    rows = [runner.tokenizer.encode(p).ids for p in prompts]
    texts = runner.generate_text(rows, 6, stop=["\n"])
    assert out == "".join(f"[{i}] {t}\n" for i, t in enumerate(texts, 1))


def test_cli_batch_of_ids_without_tokenizer(tiny_folder: Path) -> None:
    code, out, err = run("generate", str(tiny_folder), "--ids", "1,2,3", "--ids", "4,5")
    assert code == 0, err
    runner = LlamaRunner.load(tiny_folder)
    tokens = runner.generate([[1, 2, 3], [4, 5]], 32, eos_token_id=[])
    lines = [f"[{i}] {' '.join(map(str, row))}" for i, row in enumerate(tokens.tolist(), 1)]
    assert out.splitlines() == lines


def test_prompt_longer_than_context(tiny_folder: Path) -> None:
    ids = ",".join(["1"] * 513)  # llama-tiny's context is 512
    assert_bad_input(["generate", str(tiny_folder), "--ids", ids], "513", "context")
    assert_bad_input(
        ["generate", str(tiny_folder), "--ids", "1,2", "--max-new-tokens", "511"], "context"
    )


def test_prompt_file_errors(tiny_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n \n")
    assert_bad_input(
        ["generate", str(tiny_folder), "--prompt-file", str(tmp_path / "empty.txt")], "no prompts"
    )
    assert_bad_input(["generate", str(tiny_folder)], "--prompt")


def test_tokenizer_loaded_once(chat_folder: Path) -> None:
    runner = LlamaRunner.load(chat_folder)
    assert runner.tokenizer is runner.tokenizer
    assert runner.tokenizer.get_vocab_size() == load_tokenizer(chat_folder).get_vocab_size()
