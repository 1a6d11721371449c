"""User-facing errors. Anything derived from `GlmcError` is bad input: the CLI prints its message
on one paragraph of stderr and exits with code 2. Any other exception is an internal error (exit 1)."""


class GlmcError(Exception):
    """Bad input from the user: a spec, a file, a checkpoint, a flag."""


class SpecError(GlmcError):
    """An invalid or unreadable model spec; the message names the field(s)."""


class CheckpointError(GlmcError):
    """A checkpoint that does not match its spec; the message names the tensor or file."""
