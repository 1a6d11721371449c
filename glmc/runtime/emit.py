"""The deployment targets' emitters, as `glmc.api.build` calls them: (spec, graph, weights,
out folder). Spec-dependent glue lives here; the target code is in export/<target>/.

`weights` is always the unpassed model's state. The graph exporters (onnx, aoti, torch-trt)
trace the plain torch module of it: a fuse-moe/shard/quantize-fp8 pipeline changes how a
checkpoint is stored and split, which only the checkpoint targets (hf, trtllm) write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from glmc.errors import GlmcError
from glmc.ir import Graph, mesh_of
from glmc.runtime.artifact import write_manifest
from glmc.spec import ModelSpec

# GLM-4.5's tokenizer (vocab 151552): <think> / </think> ids, for TensorRT-LLM's relaxed
# acceptance inside the thinking span. Other vocabularies get strict acceptance.
GLM45_VOCAB = 151552
GLM45_THINK_IDS = (151350, 151351)


def _model(spec: ModelSpec, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    from glmc.export.torch import build_model
    from glmc.lower import lower

    model = build_model(lower(spec), dtype=dtype)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _eos(spec: ModelSpec) -> list[int]:
    return list(spec.tokens.eos_token_id or [spec.vocab_size - 1])


def emit_onnx(spec: ModelSpec, graph: Graph, state: dict[str, torch.Tensor], out: Path) -> None:
    from glmc.export.onnx import export_decoder, export_mtp, genai_config

    out.mkdir(parents=True)
    model = _model(spec, state, torch.float32)  # ORT CPU has no bf16 kernels for this graph
    context = spec.max_position_embeddings
    files = {"decoder": "model.onnx"}
    export_decoder(model, out / files["decoder"], context)  # type: ignore[arg-type]
    if spec.num_mtp_layers:
        files["mtp"] = "mtp.onnx"
        export_mtp(model, out / files["mtp"], context)  # type: ignore[arg-type]
    cfg = genai_config(
        model,  # type: ignore[arg-type]
        context_length=context,
        eos_token_id=_eos(spec),
        bos_token_id=spec.tokens.bos_token_id,
        pad_token_id=spec.tokens.pad_token_id,
        mtp_file=files.get("mtp"),
    )
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_manifest(out, "onnx", spec, files, dtype="float32")


def emit_aoti(spec: ModelSpec, graph: Graph, state: dict[str, torch.Tensor], out: Path) -> None:
    from glmc.export.aoti import export_aoti

    out.mkdir(parents=True)
    model = _model(spec, state, torch.float32)  # compiled for this CPU: fp32
    files = export_aoti(model, out, spec.max_position_embeddings, mtp=spec.num_mtp_layers > 0)  # type: ignore[arg-type]
    write_manifest(out, "aoti", spec, files, dtype="float32", device="cpu")


def emit_torch_trt(spec: ModelSpec, graph: Graph, state: dict[str, torch.Tensor], out: Path) -> None:
    from glmc.export.torch_trt import export_programs

    out.mkdir(parents=True)
    # TensorRT's dynamo path is strongly typed: the program's dtype is the engine's precision.
    dtype = next(v.dtype for k, v in state.items() if not k.endswith("e_score_correction_bias"))
    model = _model(spec, state, dtype)
    files = export_programs(model, out, spec.max_position_embeddings, mtp=spec.num_mtp_layers > 0)  # type: ignore[arg-type]
    write_manifest(out, "torch-trt", spec, files, dtype=str(dtype).removeprefix("torch."))


def emit_trtllm(
    spec: ModelSpec,
    graph: Graph,
    state: dict[str, torch.Tensor],
    out: Path,
    trtllm_version: str | None = None,
) -> None:
    """The Hugging Face checkpoint (FP8 block128 when quantized; never split per rank:
    TensorRT-LLM shards at load time from the options' sizes) plus the serving files, whose
    fields are those of TensorRT-LLM release `trtllm_version` (default: the newest glmc knows)."""
    from glmc.api import _emit_hf
    from glmc.export.trtllm import LATEST, ServeOptions, llm_api_options, plan_mapping, write_serving_files

    if graph.attr("weight_layout", None) == "fused":
        raise GlmcError(
            "the trtllm target writes Hugging Face tensor names, which TensorRT-LLM's Glm4MoeForCausalLM "
            "loader maps itself: drop fuse-moe from the pipeline for --emit trtllm"
        )
    recipe = graph.attr("quantization", None)
    if recipe not in (None, "block128"):
        raise GlmcError(
            f"the trtllm target writes FP8 as TensorRT-LLM 1.2 reads it (quant_method fp8, 128x128 weight "
            f"blocks, weight_scale_inv): use quantize-fp8{{recipe=block128}}, not recipe={recipe}"
        )
    mesh = mesh_of(graph)
    # glmc's mesh: experts split over ep (x tp), attention over tp with ep as data parallel.
    # TensorRT-LLM: tensor_parallel_size GPUs per pipeline stage, experts moe_ep x moe_tp,
    # attention either TP over all of them or pure DP (attention-DP); checked before writing.
    m = plan_mapping(
        ep=mesh["ep"],
        tp=mesh["tp"],
        pp=mesh["pp"],
        num_heads=spec.attention.num_heads,
        num_kv_heads=spec.attention.num_kv_heads,
        num_experts=spec.moe.num_experts if spec.moe else 0,
        moe_intermediate_size=spec.moe.intermediate_size if spec.moe else 0,
    )
    _emit_hf(spec, graph.with_attrs(mesh=None, pp_stages=None), state, out)
    opts = ServeOptions(
        tp=m.tensor_parallel_size,
        ep=m.moe_expert_parallel_size,
        pp=m.pipeline_parallel_size,
        attention_dp=m.enable_attention_dp,
        kv_cache_dtype="auto",
        think_ids=GLM45_THINK_IDS if spec.vocab_size == GLM45_VOCAB else None,
        max_seq_len=spec.max_position_embeddings,
        trtllm_version=trtllm_version or LATEST,
    )
    num_experts = spec.moe.num_experts if spec.moe else 0
    opts_dict = llm_api_options(opts, num_experts, has_mtp=spec.num_mtp_layers > 0)
    write_serving_files(out, opts_dict, attention=m.attention)
