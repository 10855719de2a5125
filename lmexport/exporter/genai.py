"""`genai_config.json`, so that onnxruntime-genai can run an `ort`-target Llama folder too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"


def genai_config(config: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The decoder description onnxruntime-genai reads. Our graph's present tensors grow with
    each step (past + new), so genai must not share past and present buffers."""
    eos = config.get("eos_token_id") or []
    return {
        "model": {
            "type": "llama",
            "bos_token_id": config.get("bos_token_id") or 0,
            "eos_token_id": eos,
            "pad_token_id": eos[0] if eos else 0,
            "vocab_size": config["vocab_size"],
            "context_length": config["max_position_embeddings"],
            "decoder": {
                "filename": "model.onnx",
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": config["head_dim"],
                "hidden_size": config["hidden_size"],
                "num_attention_heads": config["num_attention_heads"],
                "num_key_value_heads": config["num_key_value_heads"],
                "num_hidden_layers": num_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "max_length": config["max_position_embeddings"],
            "num_beams": 1,
            "past_present_share_buffer": False,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, config: dict[str, Any]) -> None:
    text = json.dumps(genai_config(config, int(config["num_hidden_layers"])), indent=2)
    (folder / GENAI_CONFIG).write_text(text)
