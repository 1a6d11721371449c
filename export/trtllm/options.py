"""The `trtllm-serve` / `LLM(...)` options file: parallelism as mapping.py translates the shard
plan (no rule of its own: the plan's divisibility is the pass's, TensorRT-LLM's is mapping.py's),
KV-cache dtype, and MTP speculation (one MTP layer reused for `draft_tokens` drafts:
TensorRT-LLM's MTP-Eagle mode), with relaxed acceptance inside GLM's `<think>` span when the ids
are known and the target release has the fields for them (1.2; older releases hard-code
DeepSeek-R1's ids, so there the bundle keeps strict acceptance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmc.ir import GlmcError

from .mapping import Mapping
from .schema import (
    GLM4_MOE_SINCE,
    KV_CACHE_CONFIG,
    KV_CACHE_DTYPES,
    LATEST,
    TOP_LEVEL,
    check_fields,
    check_release,
    mtp_fields,
    release_key,
)


@dataclass(frozen=True)
class ServeOptions:
    # TensorRT-LLM's parallel sizes, as mapping.plan_mapping translates the shard plan.
    mapping: Mapping = field(default_factory=Mapping)
    kv_cache_dtype: str = "auto"
    draft_tokens: int = 3  # 0 disables MTP speculation
    think_ids: tuple[int, int] | None = None  # (<think>, </think>) for relaxed acceptance
    max_batch_size: int = 64
    max_num_tokens: int = 8192
    max_seq_len: int = 4096
    free_gpu_memory_fraction: float = 0.85
    trtllm_version: str = LATEST  # the release whose llm_args fields the options may use


def llm_api_options(o: ServeOptions, has_mtp: bool) -> dict[str, Any]:
    """The options dict (YAML for `--extra_llm_api_options`, or kwargs for `LLM`)."""
    try:
        version = check_release(o.trtllm_version)
    except ValueError as e:
        raise GlmcError(f"--trtllm-version: {e}") from None
    if release_key(version) < release_key(GLM4_MOE_SINCE):
        raise GlmcError(
            f"--trtllm-version {o.trtllm_version}: TensorRT-LLM runs Glm4MoeForCausalLM from {GLM4_MOE_SINCE} on"
        )
    if o.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise GlmcError(
            f"trtllm: kv cache dtype {o.kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}"
        )
    m = o.mapping
    opts: dict[str, Any] = {
        "tensor_parallel_size": m.tensor_parallel_size,
        "pipeline_parallel_size": m.pipeline_parallel_size,
        "moe_expert_parallel_size": m.moe_expert_parallel_size,
        "moe_tensor_parallel_size": m.moe_tensor_parallel_size,
        "enable_attention_dp": m.enable_attention_dp,
        "max_batch_size": o.max_batch_size,
        "max_num_tokens": o.max_num_tokens,
        "max_seq_len": o.max_seq_len,
        "kv_cache_config": {
            "dtype": o.kv_cache_dtype,
            "free_gpu_memory_fraction": o.free_gpu_memory_fraction,
        },
    }
    if o.draft_tokens and has_mtp:
        spec: dict[str, Any] = {"decoding_type": "MTP", "num_nextn_predict_layers": o.draft_tokens}
        if o.think_ids is not None and "begin_thinking_phase_token" in mtp_fields(version):
            spec |= {
                "use_relaxed_acceptance_for_thinking": True,
                "relaxed_topk": 10,  # TensorRT-LLM's documented example values
                "relaxed_delta": 0.01,
                "begin_thinking_phase_token": o.think_ids[0],
                "end_thinking_phase_token": o.think_ids[1],
            }
        opts["speculative_config"] = spec
    problems = validate_options(opts, version)
    if problems:
        raise GlmcError("trtllm options do not match TensorRT-LLM's fields: " + "; ".join(problems))
    return opts


def validate_options(opts: dict[str, Any], version: str = LATEST) -> list[str]:
    """Check the options against the documented TensorRT-LLM fields of release `version` (no
    tensorrt_llm needed)."""
    problems = check_fields("", opts, TOP_LEVEL)
    kv = opts.get("kv_cache_config", {})
    problems += check_fields("kv_cache_config.", kv, KV_CACHE_CONFIG)
    if kv.get("dtype", "auto") not in KV_CACHE_DTYPES:
        problems.append(f"kv_cache_config.dtype: {kv['dtype']!r} not in {KV_CACHE_DTYPES}")
    spec = opts.get("speculative_config")
    if spec is not None:
        problems += check_fields("speculative_config.", spec, mtp_fields(version))
        if spec.get("decoding_type") != "MTP":
            problems.append("speculative_config.decoding_type: must be 'MTP'")
        if spec.get("num_nextn_predict_layers", 1) < 1:
            problems.append("speculative_config.num_nextn_predict_layers: must be positive")
    return problems


def validate_with_tensorrt_llm(model_dir: str, opts: dict[str, Any]) -> Any:
    """Build TensorRT-LLM's own argument object from the options (tensorrt_llm required)."""
    from tensorrt_llm.llmapi.llm_args import TorchLlmArgs

    kwargs = dict(opts)
    spec = kwargs.pop("speculative_config", None)
    if spec is not None:
        from tensorrt_llm.llmapi import MTPDecodingConfig

        kwargs["speculative_config"] = MTPDecodingConfig(
            **{k: v for k, v in spec.items() if k != "decoding_type"}
        )
    return TorchLlmArgs(model=model_dir, **kwargs)
