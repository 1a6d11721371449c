"""Running glmc artifacts: a KV-cache decoding loop with MTP speculation over the torch,
AOTInductor and ONNX Runtime artifacts (`glmc generate`), backends and sampling. The emitters
that write the artifacts are targets in `glmc.export`. Imports torch on use, onnxruntime only
for onnx."""

from glmc.runtime.artifact import Artifact, open_artifact
from glmc.runtime.decode import MAX_DRAFT_TOKENS, Stats, generate, generate_batch
from glmc.runtime.sampling import Sampling
from glmc.tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "MAX_DRAFT_TOKENS",
    "Artifact",
    "ByteTokenizer",
    "Sampling",
    "Stats",
    "generate",
    "generate_batch",
    "load_tokenizer",
    "open_artifact",
]
