"""Named specs: the two released architectures and small CPU-sized ones for demos and tests."""

from __future__ import annotations

from typing import Any

from glmc.errors import SpecError
from glmc.spec import ModelSpec

_GLM_TOKENS: dict[str, Any] = {"pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338]}

_PRESETS: dict[str, dict[str, Any]] = {
    # zai-org/GLM-4.5: 355B total / 32B active (paper Table 1; reference/glm45-architecture.md §1).
    "glm-4.5": {
        "vocab_size": 151552,
        "hidden_size": 5120,
        "num_layers": 92,
        "num_dense_layers": 3,
        "attention": {"num_heads": 96, "num_kv_heads": 8, "head_dim": 128, "qk_norm": True, "qkv_bias": True},
        "mlp": {"intermediate_size": 12288},
        "moe": {
            "num_experts": 160,
            "num_shared_experts": 1,
            "top_k": 8,
            "intermediate_size": 1536,
            "routed_scaling_factor": 2.5,
        },
        "num_mtp_layers": 1,
        "tokens": _GLM_TOKENS,
    },
    # zai-org/GLM-4.5-Air: 106B / 12B.
    "glm-4.5-air": {
        "vocab_size": 151552,
        "hidden_size": 4096,
        "num_layers": 46,
        "num_dense_layers": 1,
        "attention": {
            "num_heads": 96,
            "num_kv_heads": 8,
            "head_dim": 128,
            "qk_norm": False,
            "qkv_bias": True,
        },
        "mlp": {"intermediate_size": 10944},
        "moe": {
            "num_experts": 128,
            "num_shared_experts": 1,
            "top_k": 8,
            "intermediate_size": 1408,
            "routed_scaling_factor": 1.0,
        },
        "num_mtp_layers": 1,
        "tokens": _GLM_TOKENS,
    },
    # CPU-sized, every GLM-4.5 feature on: head_dim != hidden/heads, QK-norm, group-limited
    # routing, routed scaling, MTP. The default for `glmc build` and the demos.
    "glm-tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "num_layers": 3,
        "num_dense_layers": 1,
        "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "qk_norm": True, "qkv_bias": True},
        "mlp": {"intermediate_size": 128},
        "moe": {
            "num_experts": 8,
            "num_shared_experts": 1,
            "top_k": 2,
            "intermediate_size": 32,
            "n_group": 2,
            "topk_group": 1,
            "routed_scaling_factor": 2.5,
        },
        "num_mtp_layers": 1,
        "max_position_embeddings": 4096,
    },
    # A few million parameters: big enough to learn on a laptop CPU in minutes.
    "glm-small": {
        "vocab_size": 1024,
        "hidden_size": 256,
        "num_layers": 6,
        "num_dense_layers": 1,
        "attention": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 48, "qk_norm": True, "qkv_bias": True},
        "mlp": {"intermediate_size": 768},
        "moe": {
            "num_experts": 16,
            "num_shared_experts": 1,
            "top_k": 4,
            "intermediate_size": 128,
            "routed_scaling_factor": 2.5,
        },
        "num_mtp_layers": 1,
        "max_position_embeddings": 4096,
    },
}

DEFAULT = "glm-tiny"


def names() -> list[str]:
    return list(_PRESETS)


def get(name: str) -> ModelSpec:
    if name not in _PRESETS:
        raise SpecError(f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}")
    return ModelSpec.from_dict({"name": name, **_PRESETS[name]}, source=f"preset {name}")
