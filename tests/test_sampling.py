"""Sampling: reproducible with a seed, never outside its filters, true to the distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmexport.errors import RuntimeInputError
from lmexport.runtime import LlamaRunner
from lmexport.runtime.sampling import Sampling, choose, filtered_probabilities, penalize_repeats

from helpers import assert_bad_input

LOGITS = np.log(np.array([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04]]))
# Chi-square critical value for 5 degrees of freedom at p = 0.001.
CHI2_CRITICAL_5 = 20.52


def draws(sampling: Sampling, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = np.repeat(LOGITS, n, axis=0)
    return choose(logits, sampling, rng)


def test_matches_the_distribution() -> None:
    tokens = draws(Sampling(temperature=1.0), 20_000)
    counts = np.bincount(tokens, minlength=6)
    expected = np.exp(LOGITS[0]) * len(tokens)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_CRITICAL_5, (counts, expected)


def test_temperature_reshapes_the_distribution() -> None:
    probs = filtered_probabilities(LOGITS, Sampling(temperature=0.5))[0]
    sharpened = np.exp(2 * LOGITS[0]) / np.exp(2 * LOGITS[0]).sum()
    assert np.allclose(probs, sharpened)
    tokens = draws(Sampling(temperature=0.5), 20_000, seed=1)
    chi2 = float(
        ((np.bincount(tokens, minlength=6) - sharpened * 20_000) ** 2 / (sharpened * 20_000)).sum()
    )
    assert chi2 < CHI2_CRITICAL_5


@pytest.mark.parametrize(
    ("sampling", "allowed"),
    [
        (Sampling(temperature=1.0, top_k=2), {0, 1}),
        (Sampling(temperature=1.0, top_p=0.6), {0, 1}),  # 0.40 < 0.6, 0.40 + 0.25 ≥ 0.6
        (Sampling(temperature=1.0, top_p=0.3), {0}),
        (Sampling(temperature=1.0, min_p=0.3), {0, 1, 2}),  # ≥ 0.3 · 0.40
        (Sampling(temperature=2.0, top_k=3, top_p=0.99), {0, 1, 2}),
    ],
)
def test_filters_are_never_crossed(sampling: Sampling, allowed: set[int]) -> None:
    tokens = draws(sampling, 5_000)
    assert set(np.unique(tokens).tolist()) == allowed


def test_top_p_measures_what_top_k_left() -> None:
    """[0.4, 0.3, 0.3] after top-k 2 is [4/7, 3/7, 0]: a nucleus of 0.5 holds the first alone
    (transformers and llama.cpp agree), not the two whose share of the whole is under 0.5."""
    logits = np.log(np.array([[0.4, 0.3, 0.3]]))
    probs = filtered_probabilities(logits, Sampling(1.0, top_k=2, top_p=0.5))[0]
    assert np.allclose(probs, [1.0, 0.0, 0.0])
    probs = filtered_probabilities(logits, Sampling(1.0, top_k=2, top_p=0.6))[0]
    assert np.allclose(probs, [4 / 7, 3 / 7, 0.0])


def test_repetition_penalty_lowers_seen_tokens() -> None:
    seen = np.array([[0]])
    plain = filtered_probabilities(LOGITS, Sampling(temperature=1.0))[0]
    logits = LOGITS.copy()
    rng = np.random.default_rng(0)
    choose(logits, Sampling(temperature=1.0, repetition_penalty=2.0), rng, seen)
    assert np.array_equal(logits, LOGITS)  # the caller's logits are left alone
    penalized = filtered_probabilities(penalize_repeats(LOGITS, seen, 2.0), Sampling(1.0))[0]
    assert penalized[0] < plain[0] and penalized[1] > plain[1]


def test_invalid_settings() -> None:
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}):
        with pytest.raises(RuntimeInputError):
            Sampling(**bad)  # type: ignore[arg-type]


def test_seeded_generation_is_reproducible(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    options = {"temperature": 1.0, "top_p": 0.9, "seed": 7, "eos_token_id": []}
    first = runner.generate([[1, 2, 3]], 24, **options)
    assert np.array_equal(first, runner.generate([[1, 2, 3]], 24, **options))
    other = runner.generate([[1, 2, 3]], 24, **{**options, "seed": 8})
    assert not np.array_equal(first, other)


def test_temperature_towards_zero_is_greedy(tiny_folder: Path) -> None:
    runner = LlamaRunner.load(tiny_folder)
    greedy = runner.generate([[4, 5, 6]], 16, eos_token_id=[])
    cold = runner.generate([[4, 5, 6]], 16, eos_token_id=[], temperature=1e-4, seed=0)
    assert np.array_equal(greedy, cold)


@pytest.mark.parametrize(
    ("option", "value", "word"),
    [
        ("--top-p", "0", "top-p"),
        ("--top-p", "1.5", "top-p"),
        ("--temperature", "-1", "temperature"),
    ],
)
def test_cli_bad_sampling(tiny_folder: Path, option: str, value: str, word: str) -> None:
    assert_bad_input(["generate", str(tiny_folder), "--ids", "1,2", option, value], word)


def test_temperature_too_small_to_scale_is_greedy(tiny_folder: Path) -> None:
    """1e-320 overflows the scaled logits: its limit, greedy, not NaN probabilities (which drew
    token 0 at every step)."""
    logits = np.array([[1.0, 5.0, 3.0], [-4.0, -1.0, -3.0]], dtype=np.float32)
    with np.errstate(all="raise"):
        probs = filtered_probabilities(logits, Sampling(temperature=1e-320))
    assert np.array_equal(probs, [[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    runner = LlamaRunner.load(tiny_folder)
    greedy = runner.generate([[4, 5, 6]], 16, eos_token_id=[])
    frozen = runner.generate([[4, 5, 6]], 16, eos_token_id=[], temperature=1e-320, seed=0)
    assert np.array_equal(greedy, frozen)
