"""Numbers that compare two sets of logits."""

from __future__ import annotations

import numpy as np


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine similarity over the last axis (one value per position)."""
    a64 = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b64 = b.reshape(-1, b.shape[-1]).astype(np.float64)
    num = (a64 * b64).sum(-1)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    return float((num / np.maximum(den, 1e-30)).min())


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def kl_divergence(ref: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(ref ‖ other) over positions, in nats."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(other)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())
