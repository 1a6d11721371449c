"""Re-export of the user-facing error types (defined in `glmc.ir.errors`, the bottom layer)."""

from glmc.ir.errors import CheckpointError, GlmcError, SpecError

__all__ = ["CheckpointError", "GlmcError", "SpecError"]
