"""The TensorRT-LLM target: a bundle for the PyTorch backend (`trtllm-serve`, `LLM`), which
loads GLM-4.5 from a Hugging Face layout folder (`Glm4MoeForCausalLM`, MTP at layer
`num_hidden_layers`; reference/deploy-formats.md §1-2). The legacy `trtllm-build` engine path
cannot express sigmoid routing or MTP and is not targeted.

The checkpoint itself is written by the hf target's writer (FP8 block128 included: the
DeepSeek-style `quantization_config` and `weight_scale_inv` blocks TensorRT-LLM 1.2 reads);
this package adds the options file and the launch scripts.
"""

from .launch import LAUNCH_FILE, LLM_API_FILE, OPTIONS_FILE, write_serving_files
from .mapping import Mapping, attention_split_problem, plan_mapping
from .options import ServeOptions, llm_api_options, validate_options, validate_with_tensorrt_llm
from .schema import LATEST, RELEASES, check_release, floor

__all__ = [
    "LATEST",
    "LAUNCH_FILE",
    "LLM_API_FILE",
    "OPTIONS_FILE",
    "RELEASES",
    "Mapping",
    "ServeOptions",
    "attention_split_problem",
    "check_release",
    "floor",
    "llm_api_options",
    "plan_mapping",
    "validate_options",
    "validate_with_tensorrt_llm",
    "write_serving_files",
]
