"""The TensorRT-LLM LLM-API fields the bundle's options file uses, with their types, as
documented in `tensorrt_llm/llmapi/llm_args.py` (NVIDIA/TensorRT-LLM main, 2026:
`BaseLlmArgs`, `KvCacheConfig`, `MTPDecodingConfig`; reference/deploy-formats.md §2).

TensorRT-LLM's own models are `extra="forbid"`, so an unknown key fails at server start; this
table lets glmc fail at build time instead, on machines without tensorrt_llm. Where
tensorrt_llm is importable, `validate_with_tensorrt_llm` checks against the real classes.
"""

from __future__ import annotations

from typing import Any

# field -> accepted Python types (bool is checked before int: bool is an int subclass)
TOP_LEVEL: dict[str, tuple[type, ...]] = {
    "tensor_parallel_size": (int,),
    "pipeline_parallel_size": (int,),
    "moe_expert_parallel_size": (int,),
    "moe_tensor_parallel_size": (int,),
    "enable_attention_dp": (bool,),
    "max_batch_size": (int,),
    "max_num_tokens": (int,),
    "max_seq_len": (int,),
    "trust_remote_code": (bool,),
    "kv_cache_config": (dict,),
    "speculative_config": (dict,),
}

KV_CACHE_CONFIG: dict[str, tuple[type, ...]] = {
    "dtype": (str,),
    "free_gpu_memory_fraction": (float,),
    "enable_block_reuse": (bool,),
}
KV_CACHE_DTYPES = ("auto", "fp8", "bfloat16", "float16")

MTP_DECODING_CONFIG: dict[str, tuple[type, ...]] = {
    "decoding_type": (str,),
    "num_nextn_predict_layers": (int,),
    "use_relaxed_acceptance_for_thinking": (bool,),
    "relaxed_topk": (int,),
    "relaxed_delta": (float,),
    "use_mtp_vanilla": (bool,),
    "mtp_eagle_one_model": (bool,),
    # Lower-case fields on main; 1.0-era releases hard-coded BEGIN_/END_THINKING_PHASE_TOKEN
    # class constants (DeepSeek-R1's 128798/128799) and reject these keys.
    "begin_thinking_phase_token": (int,),
    "end_thinking_phase_token": (int,),
}


def check_fields(where: str, values: dict[str, Any], schema: dict[str, tuple[type, ...]]) -> list[str]:
    """Problems (unknown keys, wrong types) in one level of the options."""
    problems = []
    for key, value in values.items():
        if key not in schema:
            problems.append(f"{where}{key}: not a TensorRT-LLM field")
            continue
        types = schema[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            names = "/".join(t.__name__ for t in types)
            problems.append(f"{where}{key}: expected {names}, got {type(value).__name__} {value!r}")
    return problems
