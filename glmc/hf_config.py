"""Reading a Hugging Face `config.json` (model_type `glm4_moe`) into `ModelSpec` fields; the
spec validates them and writes configs back (`ModelSpec.to_hf_config`, in `glmc.spec`).

Written configs keep the legacy top-level `rope_theta`, `partial_rotary_factor` and
`rope_scaling` keys (transformers 4.5x reads only those; a `rope_parameters`-only config makes
it fall back to rope_theta=10000) and add `rope_parameters` for 5.x. `head_dim` is always
written because vLLM reads it directly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from glmc.errors import SpecError
from glmc.untrusted import check_tree, clip, describe, load_json, read_text

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
        check_tree(config, "config")
        return config, "config"
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    where = clip(str(p), 200)
    if not p.is_file():
        raise SpecError(f"Hugging Face config not found: {where}")
    data = load_json(read_text(p, "config.json"), where)
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a JSON object at the top level")
    return data, where


class _Reader:
    """Typed access to config.json keys, strict the way the spec is: a key left out takes
    transformers' default, but a present key must have the JSON type transformers declares
    (no `"64"` for 64, no `true` for 1) and `null` is accepted only where it means something."""

    _MISSING = object()

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def _fail(self, key: str, expected: str, value: Any) -> SpecError:
        return SpecError(f"{self.where}: {key} must be {expected}, got {describe(value)}")

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.data:
            return _HF_DEFAULTS.get(key) if default is self._MISSING else default
        return self.data[key]

    def integer(self, key: str, default: Any = _MISSING, nullable: bool = False) -> Any:
        v = self.raw(key, default)
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._fail(key, "an integer" + (" or null" if nullable else ""), v)
        return v

    def number(self, key: str, default: Any = _MISSING, within: str | None = None) -> Any:
        """A finite number; `within` names an object key (rope_parameters) to read it from."""
        data = self.data if within is None else (self.mapping(within) or {})
        v = data.get(key, default)
        if v is self._MISSING:
            v = _HF_DEFAULTS.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self._fail(f"{within}.{key}" if within else key, "a finite number", v)
        return v

    def flag(self, key: str) -> Any:
        v = self.raw(key)
        if not isinstance(v, bool):
            raise self._fail(key, "true or false", v)
        return v

    def mapping(self, key: str) -> dict[str, Any] | None:
        v = self.raw(key, None)
        if v is not None and not isinstance(v, dict):
            raise self._fail(key, "an object or null", v)
        return v


def spec_fields_from_hf_config(
    config: str | Path | dict[str, Any], source: str | None = None
) -> tuple[dict[str, Any], str]:
    """The ModelSpec fields a Hugging Face config describes, and where it came from (for the
    spec's validation messages); `ModelSpec.from_hf_config` validates them."""
    data, where = load_hf_config_dict(config)
    where = source or where
    model_type = data.get("model_type")
    if model_type != HF_MODEL_TYPE:
        raise SpecError(
            f"{where}: model_type is {describe(model_type)}; glmc reads Hugging Face configs of model_type 'glm4_moe'"
        )
    r = _Reader(data, where)

    rope_params = r.mapping("rope_parameters") or {}
    # The legacy top-level keys win (transformers 4.5x reads only those); both are checked.
    theta = r.number("rope_theta", _HF_DEFAULTS["rope_theta"], within="rope_parameters")
    rope_theta = r.number("rope_theta", theta)
    partial = r.number(
        "partial_rotary_factor", r.number("partial_rotary_factor", 0.5, within="rope_parameters")
    )
    scaling = r.mapping("rope_scaling")
    rope_type = rope_params.get("rope_type", "default")
    if not isinstance(rope_type, str):
        raise r._fail("rope_parameters.rope_type", "a string", rope_type)
    if scaling is None and rope_type != "default":
        scaling = {k: v for k, v in rope_params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    _check_quantization_config(r)
    act = r.raw("hidden_act")
    if act != "silu":
        raise SpecError(f"{where}: hidden_act is {describe(act)}; GLM-4.5 models use 'silu'")
    heads, hidden = r.integer("num_attention_heads"), r.integer("hidden_size")
    head_dim = r.integer("head_dim", None, nullable=True)
    if head_dim is None:  # transformers' rule for a config without head_dim
        if heads <= 0:
            raise SpecError(f"{where}: num_attention_heads must be positive, got {heads}")
        head_dim = hidden // heads
    eos = data.get("eos_token_id")
    if isinstance(eos, int) and not isinstance(eos, bool):
        eos = [eos]
    elif eos is not None and not (
        isinstance(eos, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in eos)
    ):
        raise r._fail("eos_token_id", "an integer, a list of integers or null", eos)
    layers, dense = r.integer("num_hidden_layers"), r.integer("first_k_dense_replace")
    mtp = r.integer("num_nextn_predict_layers", r.integer("num_mtp_layers", 0))
    name = r.raw("_name_or_path", None) or r.raw("name_or_path", None) or "hf"
    if not isinstance(name, str):
        raise r._fail("_name_or_path", "a string", name)
    spec = {
        "name": name,
        "vocab_size": r.integer("vocab_size"),
        "hidden_size": hidden,
        "num_layers": layers,
        # transformers makes layer i MoE when i >= first_k_dense_replace, so a larger value
        # means every layer is dense
        "num_dense_layers": min(dense, layers),
        "attention": {
            "num_heads": heads,
            "num_kv_heads": r.integer("num_key_value_heads"),
            "head_dim": head_dim,
            "qk_norm": r.flag("use_qk_norm"),
            "qkv_bias": r.flag("attention_bias"),
            "rope": {"theta": rope_theta, "partial_rotary_factor": partial, "scaling": scaling},
        },
        "mlp": {"intermediate_size": r.integer("intermediate_size")},
        "moe": {
            "num_experts": r.integer("n_routed_experts"),
            "num_shared_experts": r.integer("n_shared_experts"),
            "top_k": r.integer("num_experts_per_tok"),
            "intermediate_size": r.integer("moe_intermediate_size"),
            "n_group": r.integer("n_group"),
            "topk_group": r.integer("topk_group"),
            "norm_topk_prob": r.flag("norm_topk_prob"),
            "routed_scaling_factor": r.number("routed_scaling_factor"),
        },
        "num_mtp_layers": mtp,
        "norm_eps": r.number("rms_norm_eps"),
        "tie_word_embeddings": r.flag("tie_word_embeddings"),
        "max_position_embeddings": r.integer("max_position_embeddings"),
        "initializer_range": r.number("initializer_range"),
        "tokens": {
            "pad_token_id": r.integer("pad_token_id", None, nullable=True),
            "bos_token_id": r.integer("bos_token_id", None, nullable=True),
            "eos_token_id": eos,
        },
    }
    return spec, where


def _check_quantization_config(r: _Reader) -> None:
    """The JSON types of the quantization_config keys glmc's FP8 readers look at (the values
    themselves are checked where the recipe is read)."""
    q = r.mapping("quantization_config")
    if not q:
        return
    for key, kind, name in (
        ("quant_method", str, "a string"),
        ("weight_block_size", list, "a list"),
        ("config_groups", dict, "an object"),
        ("format", str, "a string"),
    ):
        if q.get(key) is not None and not isinstance(q[key], kind):
            raise r._fail(f"quantization_config.{key}", f"{name} or null", q[key])
    for gname, group in (q.get("config_groups") or {}).items():
        if not isinstance(group, dict) or not isinstance(group.get("weights") or {}, dict):
            raise r._fail(
                f"quantization_config.config_groups.{clip(gname, 40)}",
                "an object with a weights object",
                group,
            )
