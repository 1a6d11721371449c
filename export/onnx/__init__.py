"""The ONNX target: the decoder with a KV cache (`model.onnx`), the MTP layer as its own graph
(`mtp.onnx`) and `genai_config.json`, fp32, for ONNX Runtime (GenAI) on CPU. A model built from
a quantize-fp8 graph keeps its GEMM weights FP8 in the files (DequantizeLinear, opset 21).

Requires the `onnx` extra (onnx, onnxscript; onnxruntime to run). Imported only by this target.
"""

from .genai import genai_config
from .graphs import DECODER_INPUTS, MTP_INPUTS, OPSET, export_decoder, export_mtp

__all__ = ["DECODER_INPUTS", "MTP_INPUTS", "OPSET", "export_decoder", "export_mtp", "genai_config"]
