"""The `trtllm` target: the Hugging Face checkpoint (FP8 block128 when quantized; never split
per rank: TensorRT-LLM shards at load time from the options' sizes) plus the serving files,
whose fields are those of TensorRT-LLM release `release` (default: the newest glmc knows)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from glmc.ir import GlmcError, Graph, summary

from ..target import BaseTarget, Meta, Weights, changed_node
from .launch import write_serving_files
from .mapping import Mapping, plan_mapping
from .options import ServeOptions, llm_api_options
from .schema import LATEST


@dataclass(frozen=True)
class TrtllmTarget(BaseTarget):
    name: ClassVar[str] = "trtllm"
    # shard: written as TensorRT-LLM's parallel sizes (the checkpoint stays whole); quantize-fp8:
    # block128 only (checked below). fuse-moe is refused: TensorRT-LLM maps HF names itself.
    honours: ClassVar[frozenset[str]] = frozenset({"quantize-fp8", "shard"})
    release: str = LATEST  # the TensorRT-LLM release whose llm_args fields the options use

    def check(self, graph: Graph) -> None:
        if graph.attrs.weight_layout == "fused":
            raise GlmcError(
                f"trtllm: fuse-moe ({changed_node(graph, 'fuse-moe')}) is not supported: the trtllm target "
                "writes Hugging Face tensor names, which TensorRT-LLM's Glm4MoeForCausalLM loader maps "
                "itself; drop fuse-moe from the pipeline for --emit trtllm"
            )
        super().check(graph)
        recipe = graph.attrs.quantization
        if recipe not in (None, "block128"):
            raise GlmcError(
                f"trtllm: quantize-fp8{{recipe={recipe}}} is not supported: the trtllm target writes FP8 as "
                "TensorRT-LLM 1.2 reads it (quant_method fp8, 128x128 weight blocks, weight_scale_inv): "
                f"use quantize-fp8{{recipe=block128}}, not recipe={recipe}"
            )
        self._options(graph, None)  # the mapping and the options are checked before any work

    def size_hint(self, graph: Graph, itemsize: int) -> int:
        return int(summary(graph)["params"]["checkpoint"])  # at least one byte per weight

    def emit(self, graph: Graph, weights: Weights, out: Path, meta: Meta) -> None:
        from ..hf.target import HfTarget

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # `check` already warned about the mapping
            m, opts = self._options(graph, meta.think_ids)
        HfTarget().emit(graph.with_attrs(mesh=(), pp_stages=()), weights, out, meta)
        write_serving_files(out, opts, attention=m.attention, notes=m.notes)

    def _options(self, graph: Graph, think_ids: tuple[int, int] | None) -> tuple[Mapping, dict[str, Any]]:
        # The plan's mesh and ShardSpecs, translated to TensorRT-LLM's sizes (mapping.py: the
        # plan's own rules ran in the shard pass; only TensorRT-LLM's are checked there).
        m = plan_mapping(graph)
        opts = ServeOptions(
            mapping=m,
            kv_cache_dtype="auto",
            think_ids=think_ids,
            max_seq_len=graph.attrs.max_position_embeddings,
            trtllm_version=self.release,
        )
        has_mtp = graph.attrs.num_mtp_layers > 0
        return m, llm_api_options(opts, has_mtp=has_mtp)
