"""The declarative architecture spec: a frozen pydantic tree, validated at the boundary.

A `ModelSpec` holds only the knobs a user chooses. Everything derived from them (rotary
dimensions, per-layer kinds, parameter counts) is computed in lowering (`glmc.lower`), not
stored here. Hugging Face `config.json` import/export lives in `glmc.hf_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from glmc.errors import SpecError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class RopeSpec(_Frozen):
    """Rotary position embedding (NeoX rotate-half layout, applied to the first rotary dims)."""

    theta: float = Field(1_000_000.0, gt=0, description="RoPE base frequency (rope_theta).")
    partial_rotary_factor: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Fraction of each head's dims that are rotated; the first "
        "int(head_dim * factor) dims rotate, the rest pass through.",
    )
    scaling: dict[str, Any] | None = Field(
        None,
        description="Hugging Face rope_scaling dict for long-context variants; null (default RoPE) for GLM-4.5.",
    )


class AttentionSpec(_Frozen):
    """Grouped-query attention with optional per-head QK RMSNorm and q/k/v biases."""

    num_heads: int = Field(gt=0, description="Query heads (num_attention_heads).")
    num_kv_heads: int = Field(gt=0, description="Key/value heads (num_key_value_heads), for GQA.")
    head_dim: int = Field(gt=0, description="Per-head dimension; explicit, may differ from hidden/heads.")
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

    intermediate_size: int = Field(gt=0, description="Dense FFN width (intermediate_size).")
    activation: Literal["silu"] = Field(
        "silu", description="Gate activation (hidden_act); GLM-4.5 uses SiLU."
    )


class MoESpec(_Frozen):
    """Routed experts plus always-on shared experts, with GLM-4.5's sigmoid top-k router."""

    num_experts: int = Field(gt=0, description="Routed experts per MoE layer (n_routed_experts).")
    num_shared_experts: int = Field(
        1, ge=0, description="Shared experts, concatenated into one MLP (n_shared_experts)."
    )
    top_k: int = Field(gt=0, description="Routed experts chosen per token (num_experts_per_tok).")
    intermediate_size: int = Field(gt=0, description="Width of each expert's SwiGLU (moe_intermediate_size).")
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
    routed_scaling_factor: float = Field(1.0, gt=0, description="Scale on the routed sum (2.5 for GLM-4.5).")

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
    eos_token_id: list[int] | None = Field(None, description="End-of-sequence token id(s).")


class ModelSpec(_Frozen):
    """A GLM-4.5-class decoder: dense layers first, then MoE layers, then optional MTP layers."""

    name: str = Field("custom", description="A label for reports and artifacts.")
    vocab_size: int = Field(gt=0, description="Embedding rows (vocab_size, padded).")
    hidden_size: int = Field(gt=0, description="Residual stream width (hidden_size).")
    num_layers: int = Field(
        gt=0, description="Transformer layers in the trunk (num_hidden_layers), MTP excluded."
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
        0, ge=0, description="Multi-token-prediction layers after the trunk (num_nextn_predict_layers)."
    )
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon (rms_norm_eps).")
    tie_word_embeddings: bool = Field(False, description="Share the output head with the token embedding.")
    max_position_embeddings: int = Field(131072, gt=0, description="Longest supported context.")
    initializer_range: float = Field(0.02, gt=0, description="Std of the normal init for random weights.")
    tokens: TokenSpec = Field(default_factory=TokenSpec, description="Special token ids.")

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

        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(_format_validation_error(e, source)) from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelSpec:
        """Load a YAML or JSON spec file (a glmc spec, or a Hugging Face config.json)."""
        p = Path(path)
        if not p.is_file():
            raise SpecError(f"spec file not found: {p}")
        try:
            text = p.read_text()
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise SpecError(f"{p}: cannot parse: {e}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
        if "model_type" in data:
            return cls.from_hf_config(data, source=str(p))
        return cls.from_dict(data, source=str(p))

    @classmethod
    def from_hf_config(cls, config: str | Path | dict[str, Any], source: str | None = None) -> ModelSpec:
        """Import a Hugging Face `config.json` (model_type glm4_moe), its dict, or a checkpoint folder."""
        from glmc.hf_config import spec_from_hf_config

        return spec_from_hf_config(config, source=source)

    def to_hf_config(self) -> dict[str, Any]:
        """A `config.json` dict that transformers 4.5x and 5.x read identically."""
        from glmc.hf_config import hf_config_from_spec

        return hf_config_from_spec(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(e: Any, source: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(spec)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}")
    return f"{source}: invalid model spec: " + "; ".join(lines)
