"""The declarative architecture spec: a frozen pydantic tree, validated at the boundary.

A `ModelSpec` holds only the knobs a user chooses. Everything derived from them (rotary
dimensions, per-layer kinds, parameter counts) is computed in lowering (`glmc.lower`), not
stored here. Reading a Hugging Face `config.json` lives in `glmc.hf_config`; writing one is
`ModelSpec.to_hf_config` (below).

Validation is strict: no coercion (`"64"` or `true` is not an integer), no NaN or infinity, and
every size has an upper bound far above any real model (a table below) so that an absurd value
is refused by name here instead of making lowering, a pass or an allocation run away.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glmc.errors import SpecError
from glmc.hf_config import HF_MODEL_TYPE, spec_fields_from_hf_config
from glmc.untrusted import (
    check_tree,
    clip,
    describe,
    has_control_chars,
    load_json,
    load_yaml,
    read_text,
)

# Upper bounds: at least 10x the largest released model's value (GLM-4.5: vocab 151552,
# hidden 5120, 92 layers, 96 heads, head_dim 128, 160 experts, 12288 dense FFN).
MAX_VOCAB = 2**24
MAX_HIDDEN = 2**17
MAX_LAYERS = 2048
MAX_HEADS = 4096
MAX_HEAD_DIM = 4096
MAX_INTERMEDIATE = 2**20
MAX_EXPERTS = 2**16
MAX_SHARED_EXPERTS = 64
MAX_MTP_LAYERS = 64
MAX_POSITIONS = 2**30
MAX_NAME_CHARS = 1024
# rope_scaling is free-form (its keys depend on rope_type) but always a flat dict of scalars or
# lists of numbers (longrope's per-dimension factors, mrope's sections).
MAX_SCALING_KEYS = 64
MAX_SCALING_LIST = 4096


class _Frozen(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, strict=True, allow_inf_nan=False
    )


class RopeSpec(_Frozen):
    """Rotary position embedding (NeoX rotate-half layout, applied to the first rotary dims)."""

    theta: float = Field(1_000_000.0, gt=0, description="RoPE base frequency (rope_theta), finite.")
    partial_rotary_factor: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Fraction of each head's dims that are rotated; the first "
        "int(head_dim * factor) dims rotate, the rest pass through.",
    )
    scaling: dict[str, Any] | None = Field(
        None,
        description="Hugging Face rope_scaling dict for long-context variants (flat: strings, finite "
        "numbers, booleans or lists of numbers); null (default RoPE) for GLM-4.5.",
    )

    @field_validator("scaling")
    @classmethod
    def _check_scaling(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        if len(v) > MAX_SCALING_KEYS:
            raise ValueError(f"has {len(v)} keys; a rope_scaling dict has at most {MAX_SCALING_KEYS}")
        for key, value in v.items():
            if not isinstance(key, str) or not key or len(key) > 64 or has_control_chars(key):
                raise ValueError(f"key {clip(key)} is not a short printable string")
            items = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) > MAX_SCALING_LIST:
                raise ValueError(f"{key} lists {len(value)} values; at most {MAX_SCALING_LIST}")
            for x in items:
                if isinstance(value, list) and not _is_number(x):
                    raise ValueError(f"{key} must list finite numbers, got {clip(x)}")
                if isinstance(x, float) and not math.isfinite(x):
                    raise ValueError(f"{key} is {x}; give a finite number")
                if isinstance(x, str) and (len(x) > 256 or has_control_chars(x)):
                    raise ValueError(f"{key} is not a short printable string")
                if not (x is None or isinstance(x, bool | str) or _is_number(x)):
                    raise ValueError(
                        f"{key} is a {type(x).__name__}; values are strings, numbers, booleans or lists of numbers"
                    )
        return v


class AttentionSpec(_Frozen):
    """Grouped-query attention with optional per-head QK RMSNorm and q/k/v biases."""

    num_heads: int = Field(gt=0, le=MAX_HEADS, description="Query heads (num_attention_heads).")
    num_kv_heads: int = Field(
        gt=0, le=MAX_HEADS, description="Key/value heads (num_key_value_heads), for GQA."
    )
    head_dim: int = Field(
        gt=0, le=MAX_HEAD_DIM, description="Per-head dimension; explicit, may differ from hidden/heads."
    )
    qk_norm: bool = Field(False, description="Per-head RMSNorm on q and k before RoPE (use_qk_norm).")
    qkv_bias: bool = Field(
        True, description="Bias on q, k and v projections (attention_bias); o_proj never has one."
    )
    rope: RopeSpec = Field(default_factory=RopeSpec, description="Rotary position embedding.")

    @model_validator(mode="after")
    def _check(self) -> AttentionSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"attention.num_heads ({self.num_heads}) must be divisible by "
                f"attention.num_kv_heads ({self.num_kv_heads})"
            )
        rotary = int(self.head_dim * self.rope.partial_rotary_factor)
        if rotary < 2 or rotary % 2:
            raise ValueError(
                f"rotary dims int(attention.head_dim * attention.rope.partial_rotary_factor) = "
                f"int({self.head_dim} * {self.rope.partial_rotary_factor}) = {rotary} must be even and >= 2"
            )
        return self


class MLPSpec(_Frozen):
    """The dense SwiGLU feed-forward used by the first `num_dense_layers` layers."""

    intermediate_size: int = Field(
        gt=0, le=MAX_INTERMEDIATE, description="Dense FFN width (intermediate_size)."
    )
    activation: Literal["silu"] = Field(
        "silu", description="Gate activation (hidden_act); GLM-4.5 uses SiLU."
    )


class MoESpec(_Frozen):
    """Routed experts plus always-on shared experts, with GLM-4.5's sigmoid top-k router."""

    num_experts: int = Field(
        gt=0, le=MAX_EXPERTS, description="Routed experts per MoE layer (n_routed_experts)."
    )
    num_shared_experts: int = Field(
        1,
        ge=0,
        le=MAX_SHARED_EXPERTS,
        description="Shared experts, concatenated into one MLP (n_shared_experts).",
    )
    top_k: int = Field(gt=0, description="Routed experts chosen per token (num_experts_per_tok).")
    intermediate_size: int = Field(
        gt=0, le=MAX_INTERMEDIATE, description="Width of each expert's SwiGLU (moe_intermediate_size)."
    )
    scoring: Literal["sigmoid"] = Field("sigmoid", description="Router score function; GLM-4.5 uses sigmoid.")
    correction_bias: bool = Field(
        True,
        description="Loss-free-balance bias added to scores for expert selection only (e_score_correction_bias).",
    )
    n_group: int = Field(1, gt=0, description="Expert groups for group-limited routing.")
    topk_group: int = Field(1, gt=0, description="Groups kept per token in group-limited routing.")
    norm_topk_prob: bool = Field(
        True, description="Renormalise the chosen experts' (unbiased) scores to sum to 1."
    )
    routed_scaling_factor: float = Field(
        1.0, gt=0, description="Scale on the routed sum (2.5 for GLM-4.5), finite."
    )

    @model_validator(mode="after")
    def _check(self) -> MoESpec:
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k ({self.top_k}) must not exceed moe.num_experts ({self.num_experts})")
        if self.num_experts % self.n_group:
            raise ValueError(
                f"moe.num_experts ({self.num_experts}) must be divisible by moe.n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(
                f"moe.topk_group ({self.topk_group}) must not exceed moe.n_group ({self.n_group})"
            )
        per_group = self.num_experts // self.n_group
        if self.n_group > 1 and per_group < 2:
            raise ValueError(
                f"group-limited routing scores each group by its top-2 experts, so moe.num_experts / moe.n_group "
                f"({per_group}) must be at least 2"
            )
        if self.top_k > self.topk_group * per_group:
            raise ValueError(
                f"moe.top_k ({self.top_k}) exceeds the experts left after group selection "
                f"(moe.topk_group * moe.num_experts / moe.n_group = {self.topk_group * per_group})"
            )
        return self


class TokenSpec(_Frozen):
    """Special token ids carried into the Hugging Face config (not used by the math)."""

    pad_token_id: int | None = Field(None, ge=0, description="Padding token id.")
    bos_token_id: int | None = Field(None, ge=0, description="Beginning-of-sequence token id.")
    eos_token_id: list[int] | None = Field(None, max_length=256, description="End-of-sequence token id(s).")


class ModelSpec(_Frozen):
    """A GLM-4.5-class decoder: dense layers first, then MoE layers, then optional MTP layers."""

    name: str = Field(
        "custom",
        min_length=1,
        max_length=MAX_NAME_CHARS,
        description="A label for reports and artifacts (printable: no control characters).",
    )
    vocab_size: int = Field(gt=0, le=MAX_VOCAB, description="Embedding rows (vocab_size, padded).")
    hidden_size: int = Field(gt=0, le=MAX_HIDDEN, description="Residual stream width (hidden_size).")
    num_layers: int = Field(
        gt=0,
        le=MAX_LAYERS,
        description="Transformer layers in the trunk (num_hidden_layers), MTP excluded.",
    )
    num_dense_layers: int = Field(
        ge=0, description="Leading layers with a dense MLP instead of MoE (first_k_dense_replace)."
    )
    attention: AttentionSpec = Field(description="Attention block.")
    mlp: MLPSpec = Field(description="Dense MLP of the first num_dense_layers layers.")
    moe: MoESpec | None = Field(
        None, description="MoE block of the remaining layers; null for a dense model."
    )
    num_mtp_layers: int = Field(
        0,
        ge=0,
        le=MAX_MTP_LAYERS,
        description="Multi-token-prediction layers after the trunk (num_nextn_predict_layers).",
    )
    norm_eps: float = Field(1e-5, gt=0, lt=1, description="RMSNorm epsilon (rms_norm_eps).")
    tie_word_embeddings: bool = Field(False, description="Share the output head with the token embedding.")
    max_position_embeddings: int = Field(
        131072, gt=0, le=MAX_POSITIONS, description="Longest supported context."
    )
    initializer_range: float = Field(
        0.02, gt=0, le=1, description="Std of the normal init for random weights."
    )
    tokens: TokenSpec = Field(default_factory=TokenSpec, description="Special token ids.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        # The name is printed by inspect and build and written into artifacts: an escape
        # sequence in it would drive the user's terminal.
        if has_control_chars(v):
            raise ValueError(f"{clip(v)} holds control or format characters; use printable text")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.num_dense_layers > self.num_layers:
            raise ValueError(
                f"num_dense_layers ({self.num_dense_layers}) must not exceed num_layers ({self.num_layers})"
            )
        if self.moe is None and self.num_dense_layers < self.num_layers:
            raise ValueError(
                f"moe is null but only num_dense_layers={self.num_dense_layers} of num_layers={self.num_layers} "
                "are dense; give a moe block or make every layer dense"
            )
        if self.moe is None and self.num_mtp_layers:
            raise ValueError(
                "num_mtp_layers > 0 needs a moe block: GLM-4.5's MTP layer is always an MoE layer"
            )
        for name, tok in (
            ("pad_token_id", self.tokens.pad_token_id),
            ("bos_token_id", self.tokens.bos_token_id),
        ):
            if tok is not None and tok >= self.vocab_size:
                raise ValueError(f"tokens.{name} ({tok}) must be below vocab_size ({self.vocab_size})")
        for tok in self.tokens.eos_token_id or []:
            if not 0 <= tok < self.vocab_size:
                raise ValueError(
                    f"tokens.eos_token_id entry {tok} must be in [0, vocab_size={self.vocab_size})"
                )
        return self

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "spec") -> ModelSpec:
        """Validate a plain dict; errors become a `SpecError` naming the fields."""
        from pydantic import ValidationError

        if not isinstance(data, dict):
            raise SpecError(f"{source}: expected a mapping of spec fields, got {type(data).__name__}")
        check_tree(data, source)  # bounded before pydantic (or an error message) walks it
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(_format_validation_error(e, source)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelSpec:
        """Load a YAML or JSON spec file (a glmc spec, or a Hugging Face config.json)."""
        p = Path(path)
        text = read_text(p)
        where = clip(str(p), 200)
        data = load_json(text, where) if p.suffix == ".json" else load_yaml(text, where)
        if not isinstance(data, dict):
            raise SpecError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
        if "model_type" in data:
            return cls.from_hf_config(data, source=where)
        return cls.from_dict(data, source=where)

    @classmethod
    def from_hf_config(cls, config: str | Path | dict[str, Any], source: str | None = None) -> ModelSpec:
        """Import a Hugging Face `config.json` (model_type glm4_moe), its dict, or a checkpoint folder."""
        data, where = spec_fields_from_hf_config(config, source=source)
        return cls.from_dict(data, source=where)

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict that transformers 4.5x and 5.x read identically."""
        return _hf_config(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


_SHOWN_ERRORS = 4


def _format_validation_error(e: Any, source: str) -> str:
    """One line: each field's location and problem, with the value given when it is a scalar."""
    errors = e.errors(include_url=False)
    parts = []
    for err in errors[:_SHOWN_ERRORS]:
        loc = ".".join(clip(str(x), 40) for x in err["loc"]) or "(spec)"
        msg = clip(err["msg"].removeprefix("Value error, "), 200)
        given = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden") and not err["type"].startswith("value_error"):
            msg += f", got {describe(given)}"
        parts.append(f"{loc}: {msg}")
    more = f"; and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
    return f"{source}: invalid model spec: " + "; ".join(parts) + more


def _hf_config(spec: ModelSpec) -> dict[str, Any]:
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
