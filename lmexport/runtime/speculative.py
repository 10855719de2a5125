"""Speculative decoding: a draft model proposes k tokens, the target scores them in one forward.

Each proposal x, drawn from the draft's distribution q, is kept with probability
min(1, p(x) / q(x)) under the target's p; the first rejected one is replaced by a draw from
normalize(max(0, p - q)), and when all k pass, a bonus token comes from the target's next
distribution. The output is distributed exactly as the target's own sampling (greedy: p and q
are one-hot, so the output is the target's greedy tokens). Both KV caches are cut back to the
accepted tokens after every round.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import RuntimeInputError
from .sampling import Sampling, filtered_probabilities, penalize_repeats

if TYPE_CHECKING:
    from .llama import LlamaRunner


@dataclass
class SpeculativeStats:
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    # After each round: (sequence length, target cache length, draft cache length).
    cache_lengths: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class _Model:
    """One runner with its cache, fed whatever part of the sequence it has not seen: a shared
    buffer of `capacity` positions where the runner binds one (cut back for free), else numpy
    arrays (cut back by slicing)."""

    def __init__(self, runner: LlamaRunner, capacity: int) -> None:
        self.runner = runner
        shared = runner.io_binding and runner.shares_cache
        self.bound = runner.device_cache(1, capacity) if shared else None
        self.cache: list[np.ndarray] | None = None
        self.length = 0  # tokens in the cache

    def feed(self, sequence: list[int], keep: int) -> np.ndarray:
        """Logits [keep, vocab] for the last `keep` tokens of `sequence`, after running those
        past the cache."""
        new = np.array([sequence[self.length :]], dtype=np.int64)
        mask = np.ones((1, len(sequence)), dtype=np.int64)
        if self.bound is not None:
            logits = self.bound.step(new, mask, keep)
        else:
            logits, self.cache = self.runner.forward(new, mask, self.cache, keep)
        self.length = len(sequence)
        return logits[0]

    def keep(self, length: int) -> None:
        """Forget every cached token past `length` (rejected proposals)."""
        if length >= self.length:
            return
        if self.bound is not None:
            self.bound.keep(length)
        elif self.cache is not None:
            self.cache = [c[:, :, :length] for c in self.cache]
        self.length = length


def _distribution(logits: np.ndarray, sampling: Sampling, seen: list[int]) -> np.ndarray:
    logits = penalize_repeats(logits[None], np.array([seen]), sampling.repetition_penalty)[0]
    if sampling.greedy:
        one_hot = np.zeros(logits.shape, dtype=np.float64)
        one_hot[logits.argmax()] = 1.0
        return one_hot
    return filtered_probabilities(logits[None], sampling)[0]


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs)
    return int(min((cdf <= rng.random() * cdf[-1]).sum(), len(probs) - 1))


def check_draft(target: LlamaRunner, draft: LlamaRunner, k: int) -> None:
    """A draft that cannot serve `target` is refused before generation starts."""
    if draft.vocab_size != target.vocab_size:
        raise RuntimeInputError(
            f"the draft's vocabulary ({draft.vocab_size}) differs from the target's "
            f"({target.vocab_size})"
        )
    if not (target.kv_cache and draft.kv_cache):
        raise RuntimeInputError("speculative decoding needs KV-cache exports of both models")
    if k < 1:
        raise RuntimeInputError("the draft must propose at least 1 token")


def speculative_stream(
    target: LlamaRunner,
    draft: LlamaRunner,
    prompt: list[int],
    max_new_tokens: int,
    sampling: Sampling,
    rng: np.random.Generator,
    stops: set[int],
    k: int = 4,
    stats: SpeculativeStats | None = None,
) -> Iterator[int]:
    """Tokens of a batch-1 generation, as the target alone would produce them (the pair checked
    by `check_draft`, and the generation's length against both contexts, beforehand)."""
    stats = stats if stats is not None else SpeculativeStats()
    capacity = len(prompt) + max_new_tokens
    big, small = _Model(target, capacity), _Model(draft, capacity)
    sequence = list(prompt)
    produced = 0
    while produced < max_new_tokens:
        n = min(k, max_new_tokens - produced - 1)  # the round also yields one target token
        proposals: list[int] = []
        q: list[np.ndarray] = []
        for _ in range(n):
            seen = sequence + proposals  # the penalty sees what the target will see
            dist = _distribution(small.feed(seen, 1)[0], sampling, seen)
            proposals.append(_draw(dist, rng))
            q.append(dist)
        scored = big.feed(sequence + proposals, n + 1)  # p for each proposal, then the bonus
        accepted = 0
        token = -1
        for j, x in enumerate(proposals):
            p = _distribution(scored[j], sampling, sequence + proposals[:j])
            if rng.random() < min(1.0, p[x] / q[j][x]):
                accepted += 1
                continue
            residual = np.maximum(p - q[j], 0.0)
            token = _draw(residual if residual.sum() > 0 else p, rng)
            break
        if token < 0:  # all kept: the bonus token from the target's next distribution
            token = _draw(_distribution(scored[n], sampling, sequence + proposals), rng)
        stats.rounds += 1
        stats.proposed += n
        stats.accepted += accepted
        for t in [*proposals[:accepted], token]:
            sequence.append(t)
            produced += 1
            yield t
            if t in stops:
                return
        # Both caches keep only the accepted tokens; the new token is fed next round.
        big.keep(len(sequence) - 1)
        small.keep(len(sequence) - 1)
        stats.cache_lengths.append((len(sequence), big.length, small.length))
