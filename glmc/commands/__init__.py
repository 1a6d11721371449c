"""One module per `glmc` verb. Each defines NAME, HELP, `add_arguments(parser)` and
`run(args) -> exit code`; keep module tops light (import torch inside `run`).
Add a verb by writing its module and listing it in COMMANDS."""

from glmc.commands._common import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK

COMMANDS = ["inspect", "ir", "build", "convert", "schema", "presets", "generate", "train", "plot"]

__all__ = ["COMMANDS", "EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_OK"]
