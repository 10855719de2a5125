"""Cached decoding through onnxruntime IO binding: the KV cache never leaves the device.

Fed back through numpy, every step would copy each layer's whole cache to the host and back.
Bound instead, each `present.*` output stays an OrtValue where the provider made it (CUDA memory
on 'cuda') and is bound as the next step's `past_key_values.*` input; only the logits are copied
to the host, and only the new token ids and the mask go the other way. The same code runs with
'cpu' OrtValues, so the path is exercised (and its parity tested) without a GPU.

With a `capacity`, the cache is instead one preallocated [batch, kv_heads, capacity, head_dim]
buffer per layer and K/V, bound as both past and present: GroupQueryAttention sees the same
memory on both sides and writes only the new tokens into it (as onnxruntime-genai's
`past_present_share_buffer` does), so no step allocates or copies a cache, and cutting it back
(`keep`) is free. The valid length is the attention mask's: GroupQueryAttention reads slots
[0, mask length) and writes the new tokens at the end of them.

The first step (the prompt) runs through `session.run` instead: it is the run with many
positions, where the graph's `logits_to_keep` input saves the LM head over all but the last
ones, and onnxruntime cannot bind that input (an overridable initializer) through IO binding.
Its cache then moves into place, onto the device or into the shared buffers' first slots.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import RuntimeInputError
from .manifest import LOGITS_TO_KEEP


def keeps_logits(session: ort.InferenceSession) -> bool:
    """Whether the graph takes `logits_to_keep` (folders exported before it do not)."""
    return LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}


class DeviceCache:
    """One generation's cache on `device` ('cpu' or 'cuda'), for one batch."""

    def __init__(
        self,
        session: ort.InferenceSession,
        empty_past: list[np.ndarray],
        device: str,
        vocab_size: int,
        device_id: int = 0,
        capacity: int | None = None,
        grouped: bool = False,
    ) -> None:
        """grouped: the graph attends through GroupQueryAttention (see `step`)."""
        outputs = [o.name for o in session.get_outputs()]
        half = session.get_outputs()[0].type == "tensor(float16)"
        self._logits_dtype = np.float16 if half else np.float32
        self.vocab_size = vocab_size
        self.session = session
        self.device = device
        self.device_id = device_id
        self.capacity = capacity
        self.grouped = grouped
        self.past_names = [i.name for i in session.get_inputs()][2:]
        self.logits_name, self.present_names = outputs[0], outputs[1:]
        self.length = 0  # cached positions
        self._empty = empty_past  # the first step's past, of length 0
        self.past: list[ort.OrtValue] | None = None
        self.keeps_logits = keeps_logits(session)
        self._binding = session.io_binding()

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, keep: int = 0) -> np.ndarray:
        """Run the new tokens (mask over past + new) and keep the grown cache bound on the
        device; returns logits [batch, sequence, vocab] as float32 on the host, of the last
        `keep` positions only when `keep` > 0."""
        total = attention_mask.shape[1]
        if total != self.length + input_ids.shape[1]:
            raise RuntimeInputError(
                f"attention_mask covers {total} positions, but the cache holds {self.length} "
                f"and {input_ids.shape[1]} are new"
            )
        if self.grouped and self.length and input_ids.shape[0] > 1 and input_ids.shape[1] > 1:
            raise RuntimeInputError(
                "GroupQueryAttention takes several new tokens over a cache for one row at a "
                "time: give each row its own cache (LlamaRunner.forward splits the rows)"
            )
        if self.capacity is not None and total > self.capacity:
            raise RuntimeInputError(f"{total} positions exceed the cache's {self.capacity}")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        logits = self._first(ids, mask, keep) if self.length == 0 else self._next(ids, mask)
        self.length = total
        return (logits[:, -keep:] if keep else logits).astype(np.float32, copy=False)

    def _first(self, ids: np.ndarray, mask: np.ndarray, keep: int) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask}
        feeds.update(zip(self.past_names, self._empty, strict=True))
        if keep and self.keeps_logits:
            feeds[LOGITS_TO_KEEP] = np.array(keep, dtype=np.int64)
        logits, *present = self.session.run(None, feeds)
        if self.capacity is None:
            self.past = [
                ort.OrtValue.ortvalue_from_numpy(p, self.device, self.device_id) for p in present
            ]
            return logits
        self.past = []
        for past_name, present_name, cache in zip(
            self.past_names, self.present_names, present, strict=True
        ):
            batch, heads, length, head_dim = cache.shape
            buffer = np.zeros((batch, heads, self.capacity, head_dim), cache.dtype)
            buffer[:, :, :length] = cache
            # On the CPU the OrtValue is the numpy buffer itself, not a copy.
            value = ort.OrtValue.ortvalue_from_numpy(buffer, self.device, self.device_id)
            self._binding.bind_ortvalue_input(past_name, value)
            self._binding.bind_ortvalue_output(present_name, value)
            self.past.append(value)
        return logits

    def _next(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        binding = self._binding
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.capacity is not None:  # the cache is in place: the logits land in a host array
            logits = np.empty((*ids.shape, self.vocab_size), self._logits_dtype)
            binding.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(logits))
            self.session.run_with_iobinding(binding)
            return logits
        # Outputs come back in binding order, the logits first. An output that onnxruntime
        # allocated stays bound, and a next run of another shape would refuse to reuse it, so
        # the logits and growing presents are bound afresh each step.
        binding.bind_output(self.logits_name, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        for name, value in zip(self.past_names, self.past or [], strict=True):
            binding.bind_ortvalue_input(name, value)
        self.session.run_with_iobinding(binding)
        fetched, *self.past = binding.get_outputs()
        return fetched.numpy()

    def keep(self, length: int) -> None:
        """Forget every cached position past `length` (a shared buffer only: its next step
        overwrites them)."""
        if self.capacity is None:
            raise RuntimeInputError("only a preallocated (shared) cache can be cut back")
        self.length = min(self.length, length)

    def host_copy(self) -> list[np.ndarray]:
        """The cache copied to numpy (for checks; decoding never needs it)."""
        return [value.numpy()[:, :, : self.length] for value in self.past or []]
