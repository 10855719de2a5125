"""Generated ids to text while they come: incremental detokenization and stop strings.

A token is not a unit of text: byte-level vocabularies split one character over several tokens,
and decoders merge pieces (SentencePiece's leading space, WordPiece's `##`). So each row decodes
its whole id list again and hands out only what is new, holding back a trailing U+FFFD (the start
of a character whose remaining bytes are still to come) and any tail that could be the start of
a stop string, which must never be shown. Joined, the pieces are the decode of all the ids, up to
the first stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import RuntimeInputError

REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


@dataclass
class TextStep:
    """One step of `LlamaRunner.stream_text`: the token of every row ([batch] int64; empty on
    the closing step, which only hands out held-back text) and each row's new text."""

    tokens: np.ndarray
    text: list[str]


def check_stop(stop: Sequence[str]) -> list[str]:
    if isinstance(stop, str):
        stop = [stop]
    stops = list(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise RuntimeInputError("stop strings must be non-empty strings")
    return stops


class Detokenizer:
    """One row's text, handed out piece by piece as its tokens arrive.

    Stop strings are looked for in the text with special tokens (`<|im_end|>`, `<|eot_id|>`),
    as transformers' `stop_strings` match them; the text handed out skips them, as a decode does
    by default, and ends before the stop string all the same."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = check_stop(stop)
        self.ids: list[int] = []
        self.text = ""  # everything handed out so far
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that `token` makes final (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        return self._hand_out(final=False)

    def finish(self) -> str:
        """What was held back, now that no token follows (up to a stop string, if any)."""
        if self.stopped:
            return ""
        return self._hand_out(final=True)

    def _decode(self, ids: list[int], skip_special: bool) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special))

    def _hand_out(self, final: bool) -> str:
        shown = self._decode(self.ids, True)
        full = self._decode(self.ids, False) if self.stop else shown
        if not final:
            shown, full = shown.rstrip(REPLACEMENT), full.rstrip(REPLACEMENT)
        found = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            end = max(self._shown_end(min(found), full, shown), len(self.text))
        elif final:
            end = len(shown)
        else:
            end = self._shown_end(len(full) - self._stop_prefix(full), full, shown)
        piece = shown[len(self.text) : end]
        self.text += piece
        return piece

    def _shown_end(self, cut: int, full: str, shown: str) -> int:
        """How much of `shown` comes before position `cut` of `full`: the shown text of the
        tokens that end before it, and of the token it falls in the part before it, unless
        that token is special (shown as nothing)."""
        if cut >= len(full):
            return len(shown)
        n = len(self.ids)
        while True:  # the most tokens whose text ends by `cut` (byte pieces may not decode)
            n -= 1
            before = self._decode(self.ids[:n], False)
            if n == 0 or (len(before) <= cut and full.startswith(before)):
                break
        start = len(self._decode(self.ids[:n], True))
        token_end = len(self._decode(self.ids[: n + 1], True))
        return start + min(cut - len(before), token_end - start)

    def _stop_prefix(self, decoded: str) -> int:
        """Length of the longest tail of `decoded` that a stop string starts with."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(decoded)), longest, -1):
                if decoded.endswith(s[:k]):
                    longest = k
                    break
        return longest


class TextRows:
    """A Detokenizer per batch row, with the text not yet taken by the caller."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], batch: int) -> None:
        self.rows = [Detokenizer(tokenizer, stop) for _ in range(batch)]
        self.pending = [""] * batch

    @property
    def stopped(self) -> np.ndarray:
        return np.array([r.stopped for r in self.rows])

    def push(self, tokens: np.ndarray, active: np.ndarray) -> None:
        """Feed each active row its token (finished rows and end tokens are not text)."""
        for i, (row, token) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            if active[i]:
                self.pending[i] += row.push(token)

    def take(self) -> list[str]:
        taken, self.pending = self.pending, [""] * len(self.rows)
        return taken

    def finish(self) -> list[str]:
        for i, row in enumerate(self.rows):
            self.pending[i] += row.finish()
        return self.take()
