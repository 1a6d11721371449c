"""`quantization_config` of config.json for the FP8 recipes, and the recipe a config declares.

- block128: the DeepSeek-V3 `fp8` config that transformers (FineGrainedFP8, which dequantises
  on CPU), vLLM/SGLang (`Fp8Config`, `weight_block_size`) and TensorRT-LLM's PyTorch backend
  (FP8_BLOCK_SCALES) read. `modules_to_not_convert` lists the high-precision GEMM modules
  (vLLM and TensorRT-LLM also accept it in place of `ignored_layers`), among them the weights
  quantize-fp8 kept BF16 because their per-rank sizes are not multiples of 128: vLLM's
  `Fp8Config` then builds those layers unquantised instead of refusing them.
- channel: compressed-tensors `float-quantized`, one group targeting Linear layers, per-channel
  static weights and per-token dynamic activations, as in the GLM-4.5-FP8 release, with the
  high-precision modules under `ignore`.
"""

from __future__ import annotations

from typing import Any

from glmc.ir import CheckpointError


def quantization_config(recipe: str, unquantized: list[str]) -> dict[str, Any]:
    if recipe == "block128":
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
            "modules_to_not_convert": unquantized,
        }
    if recipe == "channel":
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "channel",
                        "symmetric": True,
                        "dynamic": False,
                        "observer": "minmax",
                        "group_size": None,
                        "block_structure": None,
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "strategy": "token",
                        "symmetric": True,
                        "dynamic": True,
                        "observer": None,
                        "group_size": None,
                        "block_structure": None,
                    },
                    "output_activations": None,
                }
            },
            "ignore": unquantized,
            "kv_cache_scheme": None,
            "sparsity_config": {},
        }
    raise ValueError(f"unknown FP8 recipe {recipe!r}")


def recipe_of(config: dict[str, Any], where: str) -> str | None:
    """The FP8 recipe a config.json's quantization_config declares (None when unquantised)."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fp8":
        block = q.get("weight_block_size")
        if block != [128, 128]:
            raise CheckpointError(
                f"{where}: quantization_config has weight_block_size {block}; glmc reads FP8 with "
                "[128, 128] blocks (DeepSeek-V3 format) or per-channel compressed-tensors"
            )
        return "block128"
    if method == "compressed-tensors":
        groups = list((q.get("config_groups") or {}).values())
        strategies = {(g.get("weights") or {}).get("strategy") for g in groups}
        types = {(g.get("weights") or {}).get("type") for g in groups}
        if strategies == {"channel"} and types == {"float"} and q.get("format") == "float-quantized":
            return "channel"
        raise CheckpointError(
            f"{where}: compressed-tensors config with weight strategies {sorted(map(str, strategies))}; "
            "glmc reads float8 per-channel weights only"
        )
    raise CheckpointError(f"{where}: quantization_config quant_method {method!r} is not FP8 that glmc reads")
