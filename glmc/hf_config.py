"""Hugging Face `config.json` (model_type `glm4_moe`) <-> `ModelSpec`.

Written configs keep the legacy top-level `rope_theta`, `partial_rotary_factor` and
`rope_scaling` keys (transformers 4.5x reads only those; a `rope_parameters`-only config makes
it fall back to rope_theta=10000) and add `rope_parameters` for 5.x. `head_dim` is always
written because vLLM reads it directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from glmc.errors import SpecError
from glmc.spec import ModelSpec

HF_MODEL_TYPE = "glm4_moe"

# Glm4MoeConfig's own defaults (transformers 5.x), used for keys a config.json leaves out, so
# that glmc reads a sparse config the way transformers does.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151552,
    "hidden_size": 4096,
    "intermediate_size": 10944,
    "num_hidden_layers": 46,
    "num_attention_heads": 96,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "moe_intermediate_size": 1408,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "n_routed_experts": 128,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "use_qk_norm": False,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5,
}


def load_hf_config_dict(config: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Read a config.json path, a checkpoint folder holding one, or pass a dict through."""
    if isinstance(config, dict):
        return config, "config"
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise SpecError(f"Hugging Face config not found: {p}")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"{p}: cannot parse JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: expected a JSON object at the top level")
    return data, str(p)


def spec_from_hf_config(config: str | Path | dict[str, Any], source: str | None = None) -> ModelSpec:
    data, where = load_hf_config_dict(config)
    where = source or where
    model_type = data.get("model_type")
    if model_type != HF_MODEL_TYPE:
        raise SpecError(
            f"{where}: model_type is {model_type!r}; glmc reads Hugging Face configs of model_type 'glm4_moe'"
        )

    def get(key: str) -> Any:
        return data[key] if key in data and data[key] is not None else _HF_DEFAULTS.get(key)

    rope_params = data.get("rope_parameters") or {}
    rope_theta = data.get("rope_theta", rope_params.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    partial = data.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 0.5))
    scaling = data.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope_params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if get("hidden_act") != "silu":
        raise SpecError(f"{where}: hidden_act is {get('hidden_act')!r}; GLM-4.5 models use 'silu'")
    heads = get("num_attention_heads")
    head_dim = data.get("head_dim") or get("hidden_size") // heads
    eos = data.get("eos_token_id")
    layers = get("num_hidden_layers")
    dense = get("first_k_dense_replace")
    mtp = data.get("num_nextn_predict_layers", data.get("num_mtp_layers", 0)) or 0
    spec = {
        "name": data.get("_name_or_path") or data.get("name_or_path") or "hf",
        "vocab_size": get("vocab_size"),
        "hidden_size": get("hidden_size"),
        "num_layers": layers,
        "num_dense_layers": min(dense, layers),
        "attention": {
            "num_heads": heads,
            "num_kv_heads": get("num_key_value_heads"),
            "head_dim": head_dim,
            "qk_norm": get("use_qk_norm"),
            "qkv_bias": get("attention_bias"),
            "rope": {"theta": rope_theta, "partial_rotary_factor": partial, "scaling": scaling},
        },
        "mlp": {"intermediate_size": get("intermediate_size")},
        "moe": {
            "num_experts": get("n_routed_experts"),
            "num_shared_experts": get("n_shared_experts"),
            "top_k": get("num_experts_per_tok"),
            "intermediate_size": get("moe_intermediate_size"),
            "n_group": get("n_group"),
            "topk_group": get("topk_group"),
            "norm_topk_prob": get("norm_topk_prob"),
            "routed_scaling_factor": get("routed_scaling_factor"),
        },
        "num_mtp_layers": mtp,
        "norm_eps": get("rms_norm_eps"),
        "tie_word_embeddings": get("tie_word_embeddings"),
        "max_position_embeddings": get("max_position_embeddings"),
        "initializer_range": get("initializer_range"),
        "tokens": {
            "pad_token_id": data.get("pad_token_id"),
            "bos_token_id": data.get("bos_token_id"),
            "eos_token_id": [eos] if isinstance(eos, int) else eos,
        },
    }
    return ModelSpec.from_dict(spec, source=where)


def hf_config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    att, rope = spec.attention, spec.attention.rope
    # A dense-only spec still needs valid MoE keys for Glm4MoeConfig; all layers stay dense.
    moe = spec.moe
    eos = spec.tokens.eos_token_id
    cfg: dict[str, Any] = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.mlp.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "first_k_dense_replace": spec.num_dense_layers,
        "num_attention_heads": att.num_heads,
        "num_key_value_heads": att.num_kv_heads,
        "head_dim": att.head_dim,
        "use_qk_norm": att.qk_norm,
        "attention_bias": att.qkv_bias,
        "attention_dropout": 0.0,
        "hidden_act": spec.mlp.activation,
        "partial_rotary_factor": rope.partial_rotary_factor,
        "rope_theta": rope.theta,
        "rope_scaling": rope.scaling,
        "rope_parameters": {
            "rope_type": (rope.scaling or {}).get("rope_type", "default"),
            **(rope.scaling or {}),
            "rope_theta": rope.theta,
            "partial_rotary_factor": rope.partial_rotary_factor,
        },
        "moe_intermediate_size": moe.intermediate_size if moe else spec.mlp.intermediate_size,
        "n_routed_experts": moe.num_experts if moe else 1,
        "n_shared_experts": moe.num_shared_experts if moe else 0,
        "num_experts_per_tok": moe.top_k if moe else 1,
        "n_group": moe.n_group if moe else 1,
        "topk_group": moe.topk_group if moe else 1,
        "norm_topk_prob": moe.norm_topk_prob if moe else True,
        "routed_scaling_factor": moe.routed_scaling_factor if moe else 1.0,
        "num_nextn_predict_layers": spec.num_mtp_layers,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": spec.initializer_range,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "pad_token_id": spec.tokens.pad_token_id,
        "bos_token_id": spec.tokens.bos_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else list(eos)) if eos else None,
        "_name_or_path": spec.name,
    }
    return cfg
