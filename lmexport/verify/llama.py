"""Parity of an exported Llama folder against its PyTorch source, on seeded inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LmexportError
from ..models.llama import Llama
from ..models.source import load_source
from ..runtime.llama import LlamaRunner
from ..runtime.manifest import LLAMA_SHAPE_FIELDS
from .inputs import left_pad, random_ids
from .metrics import cosine, kl_divergence, max_abs_diff, top1_agreement
from .quantized import COMPUTE_KL, COMPUTE_TOP1, apply_quantization, compute_check, exact_runner
from .report import Check, Report
from .source import check_same_shape, source_weights_check

FP32_LOGITS_TOL = 1e-4
LOW_PRECISION_TOP1 = 0.99
# Weight-only quantization, checked at accuracy level 0 against the source with the same
# quantization (verify/quantized.py): float rounding only (KL ~1e-10), while every scale 5% off
# gives KL 0.01 and a wrong layout or zero point ~1.
QUANTIZED_TOP1, QUANTIZED_KL = 0.99, 1e-4
GREEDY_PROMPT = 8  # random ids the greedy check starts from
KV_PREFILL = 8  # the KV-cache check's prefill, then one-token steps
PADDED_GREEDY = 8  # tokens the left-padded batch generates (at most --steps)


def check_steps(steps: int, context: int) -> None:
    """The greedy check's prompt and `steps` must fit the model's context: refused before any
    model runs, not after PyTorch has generated them all. The other checks shorten their
    inputs to a context below their usual lengths (`check_lengths`)."""
    if steps < 1:
        raise LmexportError(f"--steps must be at least 1, got {steps}")
    if context < GREEDY_PROMPT + 1:
        raise LmexportError(
            f"verify needs a context of at least {GREEDY_PROMPT + 1} positions (a prompt of "
            f"{GREEDY_PROMPT} and one greedy token); the model's is {context}"
        )
    if GREEDY_PROMPT + steps > context:
        raise LmexportError(
            f"--steps {steps} is too many: a prompt of {GREEDY_PROMPT} plus {steps} greedy "
            f"tokens exceeds the model's context of {context} (at most --steps "
            f"{context - GREEDY_PROMPT})"
        )


def check_lengths(n: int, steps: int, context: int) -> dict[str, int]:
    """Each check's input length: `n` times the usual (n = 4 for low-precision folders), each cut
    to fit `context` (max_position_embeddings, at least GREEDY_PROMPT + steps by check_steps).
    `logits`: the full forward; `kv_cache`: prefill and decode steps in all; `pad_long` and
    `pad_short`: the left-padded prompts, which then generate min(PADDED_GREEDY, steps) tokens;
    `compute`: a quantized folder's graph against itself at accuracy level 0."""
    generated = min(PADDED_GREEDY, steps)
    pad_long = min(11 * n, context - generated)
    return {
        "logits": min(16 * n, context),
        "kv_cache": min(KV_PREFILL + 16 * n * 2, context),
        "pad_long": pad_long,
        "pad_short": min(5 * n, max(1, pad_long * 5 // 11)),
        "compute": min(64, context),
    }


@torch.no_grad()
def torch_logits(model: Llama, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    m = None if mask is None else torch.from_numpy(mask)
    return model(torch.from_numpy(ids), m)[0].numpy()


@torch.no_grad()
def torch_greedy(
    model: Llama, ids: np.ndarray, steps: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """PyTorch's own greedy decode with its KV cache: the reference token sequence."""
    x = torch.from_numpy(ids)
    m = torch.ones_like(x) if mask is None else torch.from_numpy(mask)
    cache = None
    out = []
    for _ in range(steps):
        logits, cache = model(x, m, cache)
        x = logits[:, -1].argmax(-1, keepdim=True)
        out.append(x)
        m = torch.cat([m, torch.ones_like(x)], dim=1)
    return torch.cat(out, dim=1).numpy()


def source_model(manifest: dict[str, Any], source: str | None) -> tuple[Llama, str]:
    """The PyTorch model a folder was exported from (or `source`), and its name."""
    record = manifest["source"]
    name = source or record.get("name") or record.get("path")
    seed = record.get("seed") if name == record.get("name") else None
    # The folder's weights include the merged adapter, so the source gets it too.
    adapter = (record.get("adapter") or {}).get("path")
    model = load_source(name, seed, adapter=adapter).model
    if not isinstance(model, Llama):
        raise LmexportError(f"{name}: is not a Llama-family model")
    check_same_shape(model.config.to_dict(), manifest["config"], name, LLAMA_SHAPE_FIELDS)
    return model, name


def verify_llama(
    folder: str | Path,
    *,
    source: str | None = None,
    provider: str = "cpu",
    steps: int = 32,
    seed: int = 0,
) -> Report:
    runner = LlamaRunner.load(folder, provider=provider)
    manifest = runner.manifest
    context = int(runner.config["max_position_embeddings"])
    check_steps(steps, context)
    model, source_name = source_model(manifest, source)
    quantization = manifest.get("quantization") or {}
    low_precision = manifest["dtype"] != "float32" or bool(quantization)
    top1_min, kl_max = (
        (QUANTIZED_TOP1, QUANTIZED_KL) if quantization else (LOW_PRECISION_TOP1, None)
    )
    tolerances = (
        {"top1_agreement_min": top1_min, **({"kl_max": kl_max} if kl_max else {})}
        if low_precision
        else {"logits_max_abs": FP32_LOGITS_TOL}
    )
    if quantization:
        tolerances |= {"compute_top1_min": COMPUTE_TOP1, "compute_kl_max": COMPUTE_KL}
    dtype = manifest["dtype"] + (f" ({quantization['method']} weights)" if quantization else "")
    report = Report(str(folder), source_name, provider, seed, dtype, tolerances)

    def close(metrics: dict[str, float | int | str]) -> bool:
        kl_ok = kl_max is None or float(metrics["kl"]) <= kl_max
        return float(metrics["top1"]) >= top1_min and kl_ok

    rng = np.random.default_rng(seed)
    vocab = runner.vocab_size
    # Top-1 agreement ≥ 99% only means something over ≥ 100 positions: one flipped near-tie in
    # 24 would read as 96%. Low-precision folders are therefore checked on longer inputs.
    n = 4 if low_precision else 1
    lengths = check_lengths(n, steps, context)

    def logits_check(name: str, ref: np.ndarray, got: np.ndarray, inputs: str) -> Check:
        metrics: dict[str, float | int | str] = {
            "max_abs": max_abs_diff(ref, got),
            "cosine_min": cosine(ref, got),
            "top1": top1_agreement(ref, got),
        }
        if low_precision:
            metrics["kl"] = kl_divergence(ref, got)
            ok = close(metrics)
        else:
            ok = float(metrics["max_abs"]) <= FP32_LOGITS_TOL
        return Check(name, ok, metrics, inputs)

    report.checks.append(source_weights_check(model, manifest))
    shipped = runner
    if quantization:
        apply_quantization(model, quantization)
        with tempfile.TemporaryDirectory() as tmp:  # onnxruntime has read it once loaded
            runner = exact_runner(shipped, Path(tmp))

    ids = random_ids(rng, vocab, 2, lengths["logits"])
    report.checks.append(
        logits_check(
            "logits",
            torch_logits(model, ids),
            runner.logits(ids),
            f"batch 2 x {ids.shape[1]} random ids",
        )
    )

    if runner.kv_cache:
        ids = random_ids(rng, vocab, 1, lengths["kv_cache"])
        ref = torch_logits(model, ids)
        got, past = runner.forward(ids[:, :KV_PREFILL], np.ones((1, KV_PREFILL), np.int64), None)
        per_step = [got]
        for t in range(KV_PREFILL, ids.shape[1]):
            step, past = runner.forward(ids[:, t : t + 1], np.ones((1, t + 1), np.int64), past)
            per_step.append(step)
        report.checks.append(
            logits_check(
                "kv_cache",
                ref,
                np.concatenate(per_step, axis=1),
                f"prefill {KV_PREFILL} then {ids.shape[1] - KV_PREFILL} one-token decode steps "
                "vs the full forward",
            )
        )

    prompt = random_ids(rng, vocab, 1, GREEDY_PROMPT)
    ref_tokens = torch_greedy(model, prompt, steps)
    got_tokens = runner.generate(prompt, steps, eos_token_id=[])
    same = int((np.cumprod(ref_tokens[0] == got_tokens[0])).sum())
    greedy_metrics: dict[str, float | int | str] = {"identical_prefix": same, "steps": steps}
    if low_precision:
        # Teacher-forced: both score the PyTorch greedy sequence, position by position.
        seq = np.concatenate([prompt, ref_tokens], axis=1)
        first = GREEDY_PROMPT - 1
        ref, got = torch_logits(model, seq)[:, first:-1], runner.logits(seq)[:, first:-1]
        greedy_metrics |= {"top1": top1_agreement(ref, got), "kl": kl_divergence(ref, got)}
        greedy_ok = close(greedy_metrics)
    else:
        greedy_ok = same == steps
    report.checks.append(
        Check(
            "greedy",
            greedy_ok,
            greedy_metrics,
            f"prompt of {GREEDY_PROMPT} random ids, {steps} greedy tokens",
        )
    )

    long, short = lengths["pad_long"], lengths["pad_short"]
    rows = [random_ids(rng, vocab, 1, length)[0] for length in (long, short)]
    ids, mask = left_pad(rows)
    batched = runner.logits(ids, mask)
    alone = [torch_logits(model, r[None]) for r in rows]
    width = ids.shape[1]
    ref = np.concatenate([a[0] for a in alone])
    got = np.concatenate([batched[i, width - len(r) :] for i, r in enumerate(rows)])
    pad_check = logits_check(
        "left_padding", ref, got, f"batch of prompts of {long} and {short} ids, left-padded"
    )
    n_gen = min(PADDED_GREEDY, steps)
    batch_tokens = runner.generate(ids, n_gen, attention_mask=mask, eos_token_id=[])
    alone_tokens = np.concatenate([torch_greedy(model, r[None], n_gen) for r in rows])
    pad_check.metrics["greedy_rows_identical"] = int((batch_tokens == alone_tokens).all(1).sum())
    if not low_precision:
        pad_check.passed &= bool((batch_tokens == alone_tokens).all())
    report.checks.append(pad_check)
    if quantization:
        report.checks.append(
            compute_check(shipped, runner, random_ids(rng, vocab, 2, lengths["compute"]))
        )
    return report
