"""The pass interface: a named, frozen, argument-carrying object with a pure `apply`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from glmc.ir import GlmcError, Graph


class PassError(GlmcError):
    """A pass cannot apply to this graph with these arguments (an invalid plan); the message names
    the argument and the model field that disagree."""


@dataclass(frozen=True)
class Pass:
    """Subclasses are frozen dataclasses whose fields are the pass's arguments.

    `name` is the pipeline spelling (`fuse-moe`), equal to the file name with `_` -> `-`.
    `after` names passes that must run earlier in a pipeline when both are present.
    Argument checks that need no graph go in `__post_init__` (raise ValueError naming the
    argument); checks against the graph raise `PassError` from `apply`."""

    name: ClassVar[str] = ""
    after: ClassVar[tuple[str, ...]] = ()

    def apply(self, graph: Graph) -> Graph:
        raise NotImplementedError

    def spelling(self) -> str:
        """The pipeline text of this pass: `name{arg=value,...}` with non-default arguments."""
        args = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                args.append(f"{f.name}={str(v).lower() if isinstance(v, bool) else v}")
        return self.name + ("{" + ",".join(args) + "}" if args else "")
