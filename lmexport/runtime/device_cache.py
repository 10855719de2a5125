"""Cached decoding through onnxruntime IO binding: the KV cache never leaves the device.

Fed back through numpy, every step would copy each layer's whole cache to the host and back.
Bound instead, each `present.*` output stays an OrtValue where the provider made it (CUDA memory
on 'cuda') and is bound as the next step's `past_key_values.*` input; only the logits are copied
to the host, and only the new token ids and the mask go the other way. The same code runs with
'cpu' OrtValues, so the path is exercised (and its parity tested) without a GPU.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort


class DeviceCache:
    """One generation's cache on `device` ('cpu' or 'cuda'), for one batch."""

    def __init__(
        self,
        session: ort.InferenceSession,
        empty_past: list[np.ndarray],
        device: str,
        device_id: int = 0,
    ) -> None:
        outputs = [o.name for o in session.get_outputs()]
        self.session = session
        self.device = device
        self.device_id = device_id
        self.past_names = [i.name for i in session.get_inputs()][2:]
        self.logits_name, self.present_names = outputs[0], outputs[1:]
        # The prefill's zero-length past is bound from the host: no device buffer of size 0.
        self._empty = empty_past
        self.past: list[ort.OrtValue] | None = None

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Run the new tokens (mask over past + new) and keep the grown cache bound on the
        device; returns logits [batch, sequence, vocab] as float32 on the host."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input(
            "attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64)
        )
        if self.past is None:
            for name, empty in zip(self.past_names, self._empty, strict=True):
                binding.bind_cpu_input(name, empty)
        else:
            for name, value in zip(self.past_names, self.past, strict=True):
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(self.logits_name, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        logits, *self.past = binding.get_outputs()
        return logits.numpy().astype(np.float32)

    def host_copy(self) -> list[np.ndarray]:
        """The cache copied to numpy (for checks; decoding never needs it)."""
        return [value.numpy() for value in self.past or []]
