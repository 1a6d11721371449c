"""`genai_config.json` for ONNX Runtime GenAI (0.18): `type: decoder`, the generic decoder-only
model. GenAI has no `glm4_moe` type (it raises "Unsupported model_type"); `decoder` runs any
graph with the input/output names below (reference/deploy-formats.md §6a).

The graph concatenates past and new KV (its presents grow), so `past_present_share_buffer`
must be false. The `mtp` section follows the layout of GenAI's Qwen3.5 builder.
"""

from __future__ import annotations

from typing import Any, cast

from ..torch.model import Attention, GLMForCausalLM


def genai_config(
    model: GLMForCausalLM,
    *,
    context_length: int,
    eos_token_id: list[int],
    bos_token_id: int | None,
    pad_token_id: int | None,
    mtp_file: str | None,
) -> dict[str, Any]:
    att = cast(Attention, model.model.layers[0].self_attn)
    vocab, hidden = model.model.embed_tokens.weight.shape
    eos: int | list[int] = eos_token_id[0] if len(eos_token_id) == 1 else eos_token_id
    session = {"log_id": "onnxruntime-genai", "provider_options": []}  # [] = CPU
    decoder = {
        "filename": "model.onnx",
        "head_size": att.d,
        "hidden_size": hidden,
        "num_attention_heads": att.nh,
        "num_key_value_heads": att.nkv,
        "num_hidden_layers": len(model.model.layers),
        "session_options": session,
        **_io(mtp=False),
    }
    cfg: dict[str, Any] = {
        "model": {
            "type": "decoder",
            "bos_token_id": bos_token_id if bos_token_id is not None else eos_token_id[0],
            "eos_token_id": eos,
            "pad_token_id": pad_token_id if pad_token_id is not None else eos_token_id[0],
            "context_length": context_length,
            "vocab_size": vocab,
            "decoder": decoder,
        },
        "search": {
            "max_length": context_length,
            "min_length": 0,
            "do_sample": False,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "length_penalty": 1.0,
            "no_repeat_ngram_size": 0,
            "diversity_penalty": 0.0,
            "early_stopping": True,
        },
    }
    if mtp_file is not None:
        mtp_att = cast(Attention, model.model.mtp[0].self_attn)
        cfg["model"]["mtp"] = {
            "enabled": True,
            "filename": mtp_file,
            "num_hidden_layers": 1,
            "num_key_value_heads": mtp_att.nkv,
            "head_size": mtp_att.d,
            "main_hidden_states": "hidden_states",
            "session_options": session,
            **_io(mtp=True),
        }
    return cfg


def _io(*, mtp: bool) -> dict[str, dict[str, str]]:
    """genai's input/output name maps for the decoder or the MTP graph (names as export/steps.py
    gives them; the MTP graph also reads and returns hidden states)."""
    hidden_in = {"hidden_states": "hidden_states"} if mtp else {}
    hidden_out = {"hidden_states": "hidden_states_out"} if mtp else {}
    return {
        "inputs": {
            "input_ids": "input_ids",
            **hidden_in,
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            **hidden_out,
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
