"""Choosing the next token from logits: greedy, or sampled after temperature, top-k, top-p,
min-p and repetition penalty.

The draw is inverse-transform sampling — one uniform number from a seeded
`numpy.random.Generator` against the cumulative distribution of the filtered probabilities — so a
seed reproduces a generation exactly, and the filtered-out tokens have zero probability mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RuntimeInputError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):
            raise RuntimeInputError(f"temperature must be finite and ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise RuntimeInputError(f"top-k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RuntimeInputError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise RuntimeInputError(f"min-p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise RuntimeInputError(
                f"repetition penalty must be > 0, got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize_repeats(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty, as transformers applies it: seen tokens' positive logits are divided by
    `penalty`, negative ones multiplied. logits [batch, vocab], seen [batch, n] token ids."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    rows = np.arange(logits.shape[0])[:, None]
    picked = out[rows, seen]
    out[rows, seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filtered_probabilities(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Probabilities [batch, vocab] after temperature, top-k, top-p and min-p (renormalised).

    The filters apply one after another, as transformers' warpers and llama.cpp's samplers do:
    top-p measures its nucleus in what top-k left, renormalised, not in the whole vocabulary.
    """
    with np.errstate(over="ignore"):
        scaled = logits.astype(np.float64) / sampling.temperature
    # A temperature so small that the scaled logits overflow (about 1e-300) leaves only the
    # limit of temperature → 0: greedy, not NaN probabilities that would always draw token 0.
    overflowed = np.flatnonzero(~np.isfinite(scaled.max(-1)))
    if overflowed.size:
        best = logits[overflowed].argmax(-1)
        scaled[overflowed] = -np.inf
        scaled[overflowed, best] = 0.0
    scaled -= scaled.max(-1, keepdims=True)
    probs = np.exp(scaled)
    order = np.argsort(-probs, axis=-1, kind="stable")
    ranked = np.take_along_axis(probs, order, -1)
    if sampling.top_k:
        ranked[:, sampling.top_k :] = 0.0
    if sampling.top_p < 1.0:
        # Keep the smallest prefix of the ranking whose mass reaches top_p (always the first).
        share = ranked / ranked.sum(-1, keepdims=True)
        ranked = np.where(np.cumsum(share, -1) - share < sampling.top_p, ranked, 0.0)
    if sampling.min_p:
        ranked = np.where(ranked >= sampling.min_p * ranked[:, :1], ranked, 0.0)
    probs = np.zeros_like(probs)
    np.put_along_axis(probs, order, ranked, -1)
    return probs / probs.sum(-1, keepdims=True)


def choose(
    logits: np.ndarray,
    sampling: Sampling,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,
) -> np.ndarray:
    """The next token of every row, [batch] int64, from last-position logits [batch, vocab]."""
    if seen is not None:
        logits = penalize_repeats(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits.argmax(-1).astype(np.int64)
    probs = filtered_probabilities(logits, sampling)
    cdf = np.cumsum(probs, -1)
    u = rng.random((len(probs), 1)) * cdf[:, -1:]
    # First index whose cumulative mass exceeds u: tokens of zero mass can never be chosen.
    return (cdf <= u).sum(-1).clip(max=probs.shape[-1] - 1).astype(np.int64)
