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
    """One row's text, handed out piece by piece as its tokens arrive."""

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
        return self._hand_out(self.tokenizer.decode(self.ids).rstrip(REPLACEMENT), final=False)

    def finish(self) -> str:
        """What was held back, now that no token follows (up to a stop string, if any)."""
        if self.stopped:
            return ""
        return self._hand_out(self.tokenizer.decode(self.ids), final=True)

    def _hand_out(self, decoded: str, final: bool) -> str:
        found = [i for i in (decoded.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped = True
            end = max(min(found), len(self.text))
        else:
            end = len(decoded) if final else len(decoded) - self._stop_prefix(decoded)
        piece = decoded[len(self.text) : end]
        self.text += piece
        return piece

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
