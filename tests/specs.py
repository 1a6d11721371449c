"""Small model specs shared by several test folders (tests/ is on sys.path under pytest)."""

# A GLM-shaped spec whose GEMM dims are multiples of 128, so block128 FP8 scales can follow a
# tp=2 split (the pass goldens and the conversion tests).
WIDE = {
    "name": "glm-wide",
    "vocab_size": 256,
    "hidden_size": 256,
    "num_layers": 3,
    "num_dense_layers": 1,
    "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 128, "qk_norm": True, "qkv_bias": True},
    "mlp": {"intermediate_size": 256},
    "moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 256, "routed_scaling_factor": 2.5},
    "num_mtp_layers": 1,
    "max_position_embeddings": 4096,
}
