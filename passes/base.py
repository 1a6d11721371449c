"""The pass interface: a named, frozen, argument-carrying object with a pure `apply`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from glmc.ir import Graph


@dataclass(frozen=True)
class Pass:
    """Subclasses are frozen dataclasses whose fields are the pass's arguments.

    `name` is the pipeline spelling (`fuse-moe`), equal to the file name with `_` -> `-`.
    `after` names passes that must run earlier in a pipeline when both are present."""

    name: ClassVar[str] = ""
    after: ClassVar[tuple[str, ...]] = ()

    def apply(self, graph: Graph) -> Graph:
        raise NotImplementedError
