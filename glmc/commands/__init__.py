"""One module per `glmc` verb. Each defines NAME, HELP, `add_arguments(parser)` and
`run(args) -> exit code`; keep module tops light (import torch inside `run`).
Add a verb by writing its module and listing it in COMMANDS."""

COMMANDS = ["inspect", "ir", "build", "convert", "schema", "presets", "generate", "train", "plot"]
