"""The TensorRT-LLM LLM-API fields the bundle's options file uses, with their types, as
documented in `tensorrt_llm/llmapi/llm_args.py` (NVIDIA/TensorRT-LLM main, 2026:
`BaseLlmArgs`, `KvCacheConfig`, `MTPDecodingConfig`; reference/deploy-formats.md §2), and which
release first has each (`RELEASES`).

TensorRT-LLM's own models are `extra="forbid"`, so an unknown key fails at server start; this
table lets glmc fail at build time instead, on machines without tensorrt_llm. Where
tensorrt_llm is importable, `validate_with_tensorrt_llm` checks against the real classes.

Per release, from `llm_args.py` as it stood in each line (read in the public source; the release
a snapshot belongs to is told by what it contains, not by a tag): the 1.0 line's
MTPDecodingConfig has num_nextn_predict_layers, relaxed acceptance (topk, delta) and
use_mtp_vanilla, with the thinking span's ids as class constants hard-coded to DeepSeek-R1's
128798/128799; 1.1 adds mtp_eagle_one_model (ids still constants), and is the first with
`Glm4MoeForCausalLM` (PR #8256, October 2025); 1.2 makes `begin_thinking_phase_token` /
`end_thinking_phase_token` fields (and announces mtp_eagle_one_model's removal for 1.3). The
top-level and KV-cache fields used here exist in every 1.x release.
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


RELEASES = ("1.0", "1.1", "1.2")
LATEST = RELEASES[-1]
GLM4_MOE_SINCE = "1.1"  # Glm4MoeForCausalLM in the PyTorch backend
_MTP_SINCE = {
    "decoding_type": "1.0",
    "num_nextn_predict_layers": "1.0",
    "use_relaxed_acceptance_for_thinking": "1.0",
    "relaxed_topk": "1.0",
    "relaxed_delta": "1.0",
    "use_mtp_vanilla": "1.0",
    "mtp_eagle_one_model": "1.1",
    "begin_thinking_phase_token": "1.2",
    "end_thinking_phase_token": "1.2",
}
assert set(_MTP_SINCE) == set(MTP_DECODING_CONFIG)


def check_release(version: str) -> str:
    """A release glmc has a field table for (`1.2`, or `1.2.1`: the table is per minor line)."""
    line = ".".join(version.strip().split(".")[:2])
    if line not in RELEASES:
        raise ValueError(
            f"TensorRT-LLM version {version!r}: glmc knows the llm_args fields of {', '.join(RELEASES)}"
        )
    return line


def release_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def mtp_fields(version: str) -> dict[str, tuple[type, ...]]:
    """MTPDecodingConfig's fields in release `version`."""
    line = check_release(version)
    return {k: t for k, t in MTP_DECODING_CONFIG.items() if release_key(_MTP_SINCE[k]) <= release_key(line)}


def floor(opts: dict[str, Any]) -> str:
    """The oldest release that loads GLM-4.5 and accepts every key of these options."""
    need = [GLM4_MOE_SINCE, *(_MTP_SINCE[k] for k in opts.get("speculative_config") or {} if k in _MTP_SINCE)]
    return max(need, key=release_key)


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
