"""User-facing error types, defined at the bottom layer so every layer can raise them.

Anything derived from `GlmcError` is bad input: the CLI prints its message as one paragraph on
stderr and exits with code 2. Any other exception is an internal error (exit code 1), such as
`VerifyError`: a graph that breaks an IR invariant is a lowering or pass bug, not the user's."""


class GlmcError(Exception):
    """Bad input from the user: a spec, a file, a checkpoint, a flag."""


class SpecError(GlmcError):
    """An invalid or unreadable model spec; the message names the field(s)."""


class CheckpointError(GlmcError):
    """A checkpoint that does not match its spec; the message names the tensor or file."""


class VerifyError(ValueError):
    """The graph breaks an IR invariant."""


class AttrError(VerifyError):
    """An attribute record was given an unknown or missing field, a value of the wrong type, or
    values that contradict each other; caught when the node, parameter or graph is made."""
