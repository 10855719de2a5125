"""Running an exported Llama folder: full forwards, prefill + cached decode, generation as
tokens or text."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LmexportError, RuntimeInputError
from .batching import is_ragged, left_pad
from .device_cache import DeviceCache, keeps_logits
from .manifest import LOGITS_TO_KEEP, MODEL_FILE, every_layer_grouped, read_manifest
from .sampling import Sampling, choose
from .session import create_session, session_provider
from .speculative import SpeculativeStats, check_draft, speculative_stream
from .text import TextRows, TextStep
from .tokenizer import load_tokenizer


class LlamaRunner:
    """One onnxruntime session over a `convert` output folder.

    `forward` takes and returns the cache as numpy arrays, [batch, kv_heads, length, head_dim]
    per layer and K/V: what the graph returns as `present.*` is fed back as `past_key_values.*`.
    With `io_binding` generation keeps it bound instead (`device_cache.DeviceCache`): on CUDA
    (the default there) so that it stays on the device; on the CPU (the default for `ort`
    graphs) in one preallocated buffer per layer and K/V that GroupQueryAttention reads as past
    and writes as present, which saves every step's cache copy and allocation (SmolLM2-135M
    int4: 90 to 104 tokens/s on 2 threads) and makes a speculative rollback free.
    """

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        provider: str,
        threads: int | None,
        io_binding: bool | None = None,
        spinning: bool = True,
    ):
        if manifest.get("arch") != "llama":
            raise LmexportError(f"{folder}: holds a {manifest.get('arch')!r} model, not a Llama")
        self.folder = folder
        self.manifest = manifest
        self.config: dict[str, Any] = manifest["config"]
        self.kv_cache: bool = bool(manifest["kv_cache"])
        self.num_layers: int = int(self.config["num_hidden_layers"])
        self._gqa = self.kv_cache and every_layer_grouped(manifest)
        self.vocab_size: int = int(self.config["vocab_size"])
        self.eos_token_ids: list[int] = list(self.config.get("eos_token_id") or [])
        self.session = create_session(folder / MODEL_FILE, provider, threads, spinning)
        self.provider = session_provider(self.session)  # what `auto` became
        # GroupQueryAttention on the CPU writes new keys in place into a shared past/present
        # buffer; CUDA keeps the growing cache it was checked with on a GPU.
        self.shares_cache = self._gqa and self.provider == "cpu"
        default_binding = self.provider == "cuda" or self.shares_cache
        self.io_binding = default_binding if io_binding is None else io_binding
        self._tokenizer: Any = None
        self._past_names = [i.name for i in self.session.get_inputs()][2:]
        self.keeps_logits = keeps_logits(self.session)
        past_type = self.session.get_inputs()[-1].type if self._past_names else "tensor(float)"
        cache_dtype = past_type[len("tensor(") : -1]
        if self.kv_cache and cache_dtype not in ("float", "float16"):
            raise LmexportError(f"{folder}: cache dtype {cache_dtype} is not runnable from numpy")
        self.cache_dtype = np.float16 if cache_dtype == "float16" else np.float32

    @classmethod
    def load(
        cls,
        folder: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        io_binding: bool | None = None,
        spinning: bool = True,
    ) -> LlamaRunner:
        """provider: cpu, cuda or auto (CUDA if it can start, else CPU; `.provider` says which).
        spinning: False for a target and its draft, which take turns (`create_session`)."""
        folder = Path(folder)
        return cls(folder, read_manifest(folder), provider, threads, io_binding, spinning)

    @property
    def tokenizer(self) -> Any:
        """The folder's tokenizer.json (loaded when first asked for)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.folder)
        return self._tokenizer

    # -- inputs -------------------------------------------------------------------------------

    def _check_ids(self, input_ids: Any) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise RuntimeInputError(
                "input_ids must be a non-empty [batch, sequence] array of integers"
            )
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise RuntimeInputError(
                f"token id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size})"
            )
        limit = int(self.config["max_position_embeddings"])
        if ids.shape[1] > limit:
            raise RuntimeInputError(
                f"prompt of {ids.shape[1]} tokens exceeds the context of {limit}"
            )
        return ids.astype(np.int64)

    def _check_mask(self, mask: Any, ids: np.ndarray) -> np.ndarray:
        if mask is None:
            return np.ones(ids.shape, dtype=np.int64)
        mask = np.asarray(mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise RuntimeInputError(
                f"attention_mask shape {mask.shape} differs from input_ids {ids.shape}"
            )
        if not mask[:, -1].all():
            raise RuntimeInputError(
                "attention_mask must end in a real token on every row (pad on the left)"
            )
        return mask

    def _batch(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        """ids and mask, checked; token lists of different lengths are padded on the left."""
        if attention_mask is None and is_ragged(input_ids):
            input_ids, attention_mask = left_pad(input_ids)
        ids = self._check_ids(input_ids)
        return ids, self._check_mask(attention_mask, ids)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, int(self.config["num_key_value_heads"]), 0, int(self.config["head_dim"]))
        return [np.zeros(shape, dtype=self.cache_dtype) for _ in self._past_names]

    def device_cache(self, batch: int, capacity: int | None = None) -> DeviceCache:
        """A cache that stays bound on the session's device between steps: preallocated for
        `capacity` positions and shared by past and present where `shares_cache`, else grown
        by each step."""
        shared = capacity if self.shares_cache else None
        return DeviceCache(
            self.session, self.empty_cache(batch), self.provider, self.vocab_size,
            capacity=shared, grouped=self._gqa,
        )  # fmt: skip

    # -- forwards ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[np.ndarray] | None,
        keep: int = 0,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph run: logits [batch, seq, vocab] (float32), of the last `keep` positions
        only when `keep` > 0 (the graph's LM head skips the others), and the new cache."""
        rows, length = input_ids.shape
        if self._gqa and past is not None and rows > 1 and length > 1 and past[0].shape[2] > 0:
            # GroupQueryAttention takes several new tokens over a cache for one row at a time
            # (without its optional query_seqlens input, which onnxruntime 1.31 lacks).
            runs = [
                self.forward(
                    input_ids[r : r + 1],
                    attention_mask[r : r + 1],
                    [p[r : r + 1] for p in past],
                    keep,
                )
                for r in range(rows)
            ]
            cache = [np.concatenate(layer) for layer in zip(*(c for _, c in runs), strict=True)]
            return np.concatenate([logits for logits, _ in runs]), cache
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.kv_cache:
            past = past if past is not None else self.empty_cache(input_ids.shape[0])
            feeds.update(zip(self._past_names, past, strict=True))
        if keep and self.keeps_logits:
            feeds[LOGITS_TO_KEEP] = np.array(keep, dtype=np.int64)
        logits, *present = self.session.run(None, feeds)
        logits = logits[:, -keep:] if keep else logits
        return logits.astype(np.float32, copy=False), present

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """Full forward over the prompt, no cache kept."""
        ids, mask = self._batch(input_ids, attention_mask)
        return self.forward(ids, mask, None)[0]

    def stream(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        attention_mask: Any = None,
        eos_token_id: int | Sequence[int] | None = None,
        *,
        stop: Sequence[str] = (),
        tokenizer: Any = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        draft: LlamaRunner | None = None,
        draft_tokens: int = 4,
        stats: SpeculativeStats | None = None,
    ) -> Iterator[np.ndarray]:
        """Decoding that yields the next token of every row ([batch] int64) as it is made.

        `input_ids` is an array [batch, sequence] (with `attention_mask` for padding) or a list
        of token lists of any lengths, padded on the left here. Greedy unless `temperature` > 0
        (see `sampling.Sampling`); `seed` makes a sampled generation reproducible. Stops after
        `max_new_tokens`, or once every row has produced an end token or, decoded (by
        `tokenizer`, default the folder's), contains one of the `stop` strings; rows that
        finished earlier keep repeating their last token. With `draft` (a smaller runner of the
        same vocabulary, batch 1) decoding is speculative: `draft_tokens` proposals a round, the
        same output distribution; `stats` collects the acceptance rate.
        """
        ids, mask = self._batch(input_ids, attention_mask)
        texts = TextRows(self._tokenizer_for(tokenizer), stop, len(ids)) if stop else None
        return self._stream(
            ids, mask, max_new_tokens, eos_token_id, texts, temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
            seed=seed, draft=draft, draft_tokens=draft_tokens, stats=stats,
        )  # fmt: skip

    def stream_text(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        attention_mask: Any = None,
        eos_token_id: int | Sequence[int] | None = None,
        *,
        stop: Sequence[str] = (),
        tokenizer: Any = None,
        **options: Any,
    ) -> Iterator[TextStep]:
        """`stream` with text: each step's tokens and every row's new text (see `text.py`:
        characters split over tokens come out whole, stop strings never come out). A last step
        with no tokens hands out what was held back. `options` are `stream`'s."""
        ids, mask = self._batch(input_ids, attention_mask)
        texts = TextRows(self._tokenizer_for(tokenizer), stop, len(ids))
        tokens = self._stream(ids, mask, max_new_tokens, eos_token_id, texts, **options)
        return _text_steps(tokens, texts)

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        attention_mask: Any = None,
        eos_token_id: int | Sequence[int] | None = None,
        **options: Any,
    ) -> np.ndarray:
        """The continuation, new tokens only, [batch, steps]; greedy unless sampling options
        (temperature, top_k, top_p, min_p, repetition_penalty, seed) say otherwise. With
        `stop` strings, a row ends with the token that completed one."""
        ids, mask = self._batch(input_ids, attention_mask)
        steps = list(self.stream(ids, max_new_tokens, mask, eos_token_id, **options))
        if not steps:
            return np.zeros((ids.shape[0], 0), dtype=np.int64)
        return np.stack(steps, axis=1)

    def generate_text(
        self, input_ids: Any, max_new_tokens: int = 32, attention_mask: Any = None, **options: Any
    ) -> list[str]:
        """Each row's continuation as text, without the stop string that ended it."""
        ids, mask = self._batch(input_ids, attention_mask)
        texts = [""] * len(ids)
        for step in self.stream_text(ids, max_new_tokens, mask, **options):
            texts = [text + new for text, new in zip(texts, step.text, strict=True)]
        return texts

    def _tokenizer_for(self, tokenizer: Any) -> Any:
        return self.tokenizer if tokenizer is None else tokenizer

    def _stream(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        texts: TextRows | None,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        draft: LlamaRunner | None = None,
        draft_tokens: int = 4,
        stats: SpeculativeStats | None = None,
    ) -> Iterator[np.ndarray]:
        """Checks the request now (so bad input fails at the call), decodes when iterated."""
        sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        if max_new_tokens < 0:
            raise RuntimeInputError("max_new_tokens must be ≥ 0")
        if seed is not None and seed < 0:
            raise RuntimeInputError(f"seed must be ≥ 0, got {seed}")
        self._check_fits(ids.shape[1], max_new_tokens, "the context")
        if eos_token_id is None:
            stops = set(self.eos_token_ids)
        elif isinstance(eos_token_id, int | np.integer):  # numpy's integers too
            stops = {int(eos_token_id)}
        else:
            stops = set(eos_token_id)
        rng = np.random.default_rng(seed)
        if draft is not None:
            if ids.shape[0] != 1 or not mask.all():
                raise RuntimeInputError("speculative decoding takes one unpadded prompt")
            check_draft(self, draft, draft_tokens)
            draft._check_fits(ids.shape[1], max_new_tokens, "the draft's context")
            tokens = speculative_stream(
                self, draft, ids[0].tolist(), max_new_tokens, sampling, rng, stops,
                draft_tokens, stats,
            )  # fmt: skip
            return _single_rows(tokens, stops, texts)
        return self._decode(ids, mask, max_new_tokens, stops, sampling, rng, texts)

    def _check_fits(self, prompt: int, new_tokens: int, whose: str) -> None:
        limit = int(self.config["max_position_embeddings"])
        if prompt + new_tokens > limit:
            raise RuntimeInputError(
                f"prompt ({prompt}) + max_new_tokens ({new_tokens}) exceeds {whose} of {limit}"
            )

    def _decode(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        max_new_tokens: int,
        stops: set[int],
        sampling: Sampling,
        rng: np.random.Generator,
        texts: TextRows | None,
    ) -> Iterator[np.ndarray]:
        done = np.zeros(ids.shape[0], dtype=bool)
        past: list[np.ndarray] | None = None
        capacity = ids.shape[1] + max_new_tokens
        bound = self.device_cache(len(ids), capacity) if self.io_binding and self.kv_cache else None
        step_ids, seen = ids, ids
        # Left padding is not a token the model saw: the penalty sees the row's first real one.
        first_real = ids[np.arange(len(ids)), mask.argmax(-1)][:, None]
        penalized = np.where(mask.astype(bool), ids, first_real)
        for _ in range(max_new_tokens):
            if bound is not None:
                logits = bound.step(step_ids, mask, keep=1)
            elif self.kv_cache:
                logits, past = self.forward(step_ids, mask, past, keep=1)
            else:
                logits, _ = self.forward(seen, mask, None, keep=1)
            nxt = choose(logits[:, -1], sampling, rng, penalized)
            nxt = np.where(done, seen[:, -1], nxt)
            ended = np.isin(nxt, list(stops))
            if texts is not None:
                texts.push(nxt, ~done & ~ended)
                ended |= texts.stopped
            done |= ended
            yield nxt
            if done.all():
                return
            step_ids = nxt[:, None]
            seen = np.concatenate([seen, step_ids], axis=1)
            penalized = np.concatenate([penalized, step_ids], axis=1)
            mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)


def _single_rows(
    tokens: Iterator[int], stops: set[int], texts: TextRows | None
) -> Iterator[np.ndarray]:
    """A batch-1 token stream as [1] arrays, ended early by a stop string."""
    for token in tokens:
        step = np.array([token], dtype=np.int64)
        if texts is not None:
            texts.push(step, np.array([token not in stops]))
        yield step
        if texts is not None and texts.stopped.all():
            return


def _text_steps(tokens: Iterator[np.ndarray], texts: TextRows) -> Iterator[TextStep]:
    for step in tokens:
        yield TextStep(step, texts.take())
    rest = texts.finish()
    if any(rest):
        yield TextStep(np.zeros(0, dtype=np.int64), rest)
