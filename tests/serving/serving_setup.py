"""What the serving tests build and ask vLLM (shared by conftest.py and test_vllm.py)."""

from __future__ import annotations

from typing import Any

# std 0.15: clear logit margins, so greedy ids are a sharp check (the 0.02 default gives near-ties).
INIT_STD = 0.15
PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6, 7], [300, 12], [99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89]]
# The trained model: glmc train's built-in byte tokenizer (id = byte value), text prompts that
# start sentences of its corpus.
CORPUS_SENTENCES = [
    "the quick brown fox jumps over the lazy dog.",
    "glmc compiles a spec into an IR, runs passes and emits artifacts.",
    "experts are split over ranks and drafts are verified in one forward.",
]
TRAINED_PROMPTS = [
    list(t.encode()) for t in ("the quick brown ", "glmc compiles a ", "experts are", "drafts")
]
MAX_TOKENS = 24
TRAIN_STEPS = 30  # a few dozen: on the repetitive corpus, enough for the MTP layer to agree often
# Dense MLP 320 = 2.5 x 128: quantize-fp8 keeps it BF16 (modules_to_not_convert); the rest fits.
FP8_SPEC: dict[str, Any] = {
    "name": "glm-wide-fp8",
    "vocab_size": 256,
    "hidden_size": 256,
    "num_layers": 3,
    "num_dense_layers": 1,
    "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 128, "qk_norm": True, "qkv_bias": True},
    "mlp": {"intermediate_size": 320},
    "moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 256, "routed_scaling_factor": 2.5},
    "num_mtp_layers": 1,
    "max_position_embeddings": 4096,
    "initializer_range": INIT_STD,
}
