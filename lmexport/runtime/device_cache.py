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
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from ..errors import RuntimeInputError


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
    ) -> None:
        outputs = [o.name for o in session.get_outputs()]
        half = session.get_outputs()[0].type == "tensor(float16)"
        self._logits_dtype = np.float16 if half else np.float32
        self.vocab_size = vocab_size
        self.session = session
        self.device = device
        self.device_id = device_id
        self.capacity = capacity
        self.past_names = [i.name for i in session.get_inputs()][2:]
        self.logits_name, self.present_names = outputs[0], outputs[1:]
        self.length = 0  # cached positions
        # The prefill's zero-length past is bound from the host: no device buffer of size 0.
        self._empty = empty_past
        self.past: list[ort.OrtValue] | None = None
        self._binding = session.io_binding()
        # Outputs come back in binding order (the logits first). An output that onnxruntime
        # allocated stays bound, and a next run of another shape would refuse to reuse it, so
        # `step` binds the logits and growing presents afresh.
        self._binding.bind_output(self.logits_name, "cpu")
        if capacity is not None:
            batch, heads, _, head_dim = empty_past[0].shape
            self.past = [
                ort.OrtValue.ortvalue_from_shape_and_type(
                    [batch, heads, capacity, head_dim], empty_past[0].dtype, device, device_id
                )
                for _ in self.past_names
            ]
            names = zip(self.past_names, self.present_names, self.past, strict=True)
            for past_name, present_name, buffer in names:
                self._binding.bind_ortvalue_input(past_name, buffer)
                self._binding.bind_ortvalue_output(present_name, buffer)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the new tokens (mask over past + new) and keep the grown cache bound on the
        device; returns logits [batch, sequence, vocab] as float32 on the host."""
        total = attention_mask.shape[1]
        if total != self.length + input_ids.shape[1]:
            raise RuntimeInputError(
                f"attention_mask covers {total} positions, but the cache holds {self.length} "
                f"and {input_ids.shape[1]} are new"
            )
        if self.capacity is not None and total > self.capacity:
            raise RuntimeInputError(f"{total} positions exceed the cache's {self.capacity}")
        binding = self._binding
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(
            "attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64)
        )
        if self.capacity is None:
            binding.bind_output(self.logits_name, "cpu")
            for name in self.present_names:
                binding.bind_output(name, self.device, self.device_id)
            if self.past is None:
                for name, empty in zip(self.past_names, self._empty, strict=True):
                    binding.bind_cpu_input(name, empty)
            else:
                for name, value in zip(self.past_names, self.past, strict=True):
                    binding.bind_ortvalue_input(name, value)
        else:  # the cache is in place already: the logits land in a host array, no fetching
            logits = np.empty((*input_ids.shape, self.vocab_size), self._logits_dtype)
            binding.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        if self.capacity is None:
            fetched, *self.past = binding.get_outputs()
            logits = fetched.numpy()
        self.length = total
        return logits.astype(np.float32, copy=False)

    def keep(self, length: int) -> None:
        """Forget every cached position past `length` (a shared buffer only: its next step
        overwrites them)."""
        if self.capacity is None:
            raise RuntimeInputError("only a preallocated (shared) cache can be cut back")
        self.length = min(self.length, length)

    def host_copy(self) -> list[np.ndarray]:
        """The cache copied to numpy (for checks; decoding never needs it)."""
        return [value.numpy()[:, :, : self.length] for value in self.past or []]
