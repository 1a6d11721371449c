"""The torch target: IR graph -> a plain, trainable `torch.nn.Module`."""

from .fp8 import passed_state
from .model import GLMForCausalLM, build_model

__all__ = ["GLMForCausalLM", "build_model", "passed_state"]
