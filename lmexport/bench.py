"""`lmexport bench`: prefill latency, time to first token, decode speed and peak memory of an
exported Llama folder, optionally beside its PyTorch source and with speculative decoding.

Every engine decodes the same seeded prompt greedily, in the same process and with the same
thread count. Timed rounds are interleaved (each round runs every engine once) so that a shared
machine's slow spells spread over all of them, and each figure is the median over rounds.
The PyTorch side lives here, outside `runtime/`, which never imports torch.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import LmexportError
from .runtime import LlamaRunner
from .runtime.speculative import SpeculativeStats

PROMPT_SEED = 0
WARM_UP = 2  # untimed short rounds per engine; PyTorch's first two forwards are slow
# Between engines: lets the last one's idle worker threads stop spinning before the next runs.
PAUSE_S = 0.05


class Engine(Protocol):
    """What `measure` times: a prefill, and a greedy token stream (benchmarks add peers)."""

    name: str

    def prefill(self, prompt: np.ndarray) -> None: ...

    def stream(self, prompt: np.ndarray, new_tokens: int) -> Iterator[int]: ...

    def acceptance_rate(self) -> float | None: ...


@dataclass
class EngineFigures:
    name: str
    prefill_ms: float  # one forward over the prompt, empty cache, the last logits only
    ttft_ms: float  # from the call to the first generated token (prefill + choosing it)
    decode_tokens_per_s: float  # tokens after the first, over the time they took
    peak_rss_mb: float  # the process's peak once this engine ran (engines load in turn)
    tokens_match_first: bool  # greedy tokens identical to the first engine's
    acceptance_rate: float | None = None  # speculative decoding only
    rounds: list[dict[str, float]] = field(default_factory=list)


@dataclass
class BenchReport:
    folder: str
    provider: str
    threads: int
    prompt_length: int
    new_tokens: int
    repeats: int
    engines: list[EngineFigures]

    def ratios(self) -> dict[str, dict[str, float]]:
        """Each engine against the first (`ort`): decode speed-up and prefill speed-up."""
        first = self.engines[0]
        return {
            e.name: {
                "decode_speedup": e.decode_tokens_per_s / first.decode_tokens_per_s,
                "prefill_speedup": first.prefill_ms / e.prefill_ms,
            }
            for e in self.engines[1:]
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": self.ratios()}

    def table(self) -> str:
        head = (
            f"bench {self.folder} · {self.provider} · {self.threads} threads · prompt "
            f"{self.prompt_length} · {self.new_tokens} new tokens · median of {self.repeats}"
        )
        cols = ("engine", "prefill ms", "TTFT ms", "decode tok/s", "peak RSS MB", "same tokens")
        rows = [
            (
                e.name,
                f"{e.prefill_ms:.1f}",
                f"{e.ttft_ms:.1f}",
                f"{e.decode_tokens_per_s:.1f}",
                f"{e.peak_rss_mb:.0f}",
                "yes" if e.tokens_match_first else "NO",
            )
            for e in self.engines
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines = [head, "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        for e in self.engines:
            if e.acceptance_rate is not None:
                lines.append(f"{e.name}: draft acceptance {e.acceptance_rate:.0%}")
        for name, r in self.ratios().items():
            lines.append(
                f"{name} vs {self.engines[0].name}: decode x{r['decode_speedup']:.2f}, "
                f"prefill x{r['prefill_speedup']:.2f}"
            )
        return "\n".join(lines)


class OrtEngine:
    def __init__(
        self, name: str, runner: LlamaRunner, draft: LlamaRunner | None = None, k: int = 4
    ) -> None:
        self.name, self.runner, self.draft, self.k = name, runner, draft, k
        self.stats = SpeculativeStats()

    def prefill(self, prompt: np.ndarray) -> None:
        self.runner.forward(prompt[None], np.ones((1, len(prompt)), np.int64), None, keep=1)

    def stream(self, prompt: np.ndarray, new_tokens: int) -> Iterator[int]:
        # Acceptance is the last stream's: every timed round is the same greedy generation,
        # and the warm-up's short rounds would skew it.
        self.stats = SpeculativeStats()
        steps = self.runner.stream(
            prompt[None], new_tokens, eos_token_id=[], draft=self.draft, draft_tokens=self.k,
            stats=self.stats,
        )  # fmt: skip
        for step in steps:
            yield int(step[0])

    def acceptance_rate(self) -> float | None:
        return self.stats.acceptance_rate if self.draft is not None else None


class TorchEngine:
    """Our PyTorch Llama, eager, with its KV cache: the source the folder was exported from."""

    name = "torch"

    def __init__(self, manifest: dict[str, Any], source: str | None, threads: int) -> None:
        # PyTorch's OpenMP workers otherwise busy-wait after each op and, interleaved with
        # onnxruntime on few cores, starve it and themselves (a 5 ms forward took 600 ms).
        # libgomp reads this when torch loads it, so it must be set before the first import.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        from .verify.llama import source_model

        torch.set_num_threads(threads)
        self.torch = torch
        self.model, _ = source_model(manifest, source)

    def prefill(self, prompt: np.ndarray) -> None:
        with self.torch.no_grad():
            self.model(self.torch.from_numpy(prompt[None]), None, logits_to_keep=1)

    def stream(self, prompt: np.ndarray, new_tokens: int) -> Iterator[int]:
        torch = self.torch
        x = torch.from_numpy(prompt[None])
        mask = torch.ones_like(x)
        cache = None
        with torch.no_grad():
            for _ in range(new_tokens):
                logits, cache = self.model(x, mask, cache, logits_to_keep=1)
                x = logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(x)], dim=1)
                yield int(x[0, 0])

    def acceptance_rate(self) -> float | None:
        return None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, else KiB


def _round(
    engine: Engine, prompt: np.ndarray, new_tokens: int
) -> tuple[dict[str, float], list[int]]:
    start = time.perf_counter()
    engine.prefill(prompt)
    prefill = time.perf_counter() - start
    tokens: list[int] = []
    stamps: list[float] = []
    start = time.perf_counter()
    for token in engine.stream(prompt, new_tokens):
        stamps.append(time.perf_counter())
        tokens.append(token)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    figures = {"prefill_ms": prefill * 1e3, "ttft_ms": (stamps[0] - start) * 1e3}
    return {**figures, "decode_tokens_per_s": decode}, tokens


def all_cores(threads: int | None) -> int:
    """`threads`, or one per core (what a bench table reports)."""
    return threads if threads is not None else os.cpu_count() or 1


def bench(
    folder: str | Path,
    *,
    prompt_length: int = 128,
    new_tokens: int = 128,
    threads: int | None = None,
    repeats: int = 3,
    provider: str = "cpu",
    vs_torch: bool = False,
    source: str | None = None,
    draft: str | Path | None = None,
    draft_tokens: int = 4,
) -> BenchReport:
    """Time the folder's model (and PyTorch, and speculative decoding with `draft`)."""
    threads = all_cores(threads)
    if prompt_length < 1 or new_tokens < 2 or repeats < 1 or threads < 1:
        raise LmexportError(
            "--prompt-length, --repeats and --threads must be at least 1, --new-tokens at least 2"
        )
    if source is not None and not vs_torch:
        raise LmexportError("--source names the --vs-torch model: give --vs-torch too")
    runner = LlamaRunner.load(folder, provider=provider, threads=threads)
    if not runner.kv_cache:
        raise LmexportError(f"{folder}: bench needs a KV-cache export (not --no-kv-cache)")
    limit = int(runner.config["max_position_embeddings"])
    if prompt_length + new_tokens > limit:
        raise LmexportError(
            f"prompt ({prompt_length}) + new tokens ({new_tokens}) exceed the context of {limit}"
        )
    prompt = np.random.default_rng(PROMPT_SEED).integers(0, runner.vocab_size, prompt_length)

    def engines() -> Iterator[Engine]:
        yield OrtEngine("ort", runner)
        if draft is not None:  # a pair that takes turns: threads that do not spin, or one pool
            pair = [LlamaRunner.load(f, provider, threads, spinning=False) for f in (folder, draft)]
            yield OrtEngine("speculative", pair[0], pair[1], draft_tokens)
        if vs_torch:
            yield TorchEngine(runner.manifest, source, threads)

    figures = measure(engines(), prompt, new_tokens, repeats)
    return BenchReport(
        str(folder), runner.provider, threads, prompt_length, new_tokens, repeats, figures
    )


def measure(
    engines: Iterable[Engine], prompt: np.ndarray, new_tokens: int, repeats: int
) -> list[EngineFigures]:
    """Warm each engine up as it comes (so its peak RSS is taken before the next one loads),
    then time `repeats` interleaved rounds of all of them; medians per figure."""
    loaded: list[Engine] = []
    peaks: dict[str, float] = {}
    for engine in engines:
        for _ in range(WARM_UP):
            _round(engine, prompt, 2)
        loaded.append(engine)
        peaks[engine.name] = _peak_rss_mb()
    rounds: dict[str, list[dict[str, float]]] = {e.name: [] for e in loaded}
    tokens: dict[str, list[int]] = {}
    for _ in range(repeats):
        for engine in loaded:
            time.sleep(PAUSE_S)
            figures, tokens[engine.name] = _round(engine, prompt, new_tokens)
            rounds[engine.name].append(figures)
    first = loaded[0].name
    return [
        EngineFigures(
            name=e.name,
            prefill_ms=statistics.median(r["prefill_ms"] for r in rounds[e.name]),
            ttft_ms=statistics.median(r["ttft_ms"] for r in rounds[e.name]),
            decode_tokens_per_s=statistics.median(r["decode_tokens_per_s"] for r in rounds[e.name]),
            peak_rss_mb=peaks[e.name],
            tokens_match_first=tokens[e.name] == tokens[first],
            acceptance_rate=e.acceptance_rate(),
            rounds=rounds[e.name],
        )
        for e in loaded
    ]
