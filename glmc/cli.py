"""The `glmc` command line. Exit codes: 0 success, 2 bad input (one clear message on stderr, no
traceback), 1 internal error. Each verb lives in its own module under `glmc.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from glmc.commands import COMMANDS, EXIT_BAD_INPUT, EXIT_OK
from glmc.errors import GlmcError
from glmc.untrusted import one_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own usage errors are bad input too
        # One line like every other error (the usage text runs over several): point at --help.
        print(f"glmc: error: {one_line(message)} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _modules() -> dict[str, ModuleType]:
    return {name: importlib.import_module(f"glmc.commands.{name}") for name in COMMANDS}


def _parser(modules: dict[str, ModuleType]) -> argparse.ArgumentParser:
    p = _Parser(prog="glmc", description="A compiler for GLM-4.5-class Mixture-of-Experts models.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    for name, module in modules.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.__doc__))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    modules = _modules()
    parser = _parser(modules)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already reported by argparse
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        if args.version:
            from glmc import __version__

            print(__version__)
            return EXIT_OK
        if args.command is None:
            parser.print_help()
            return EXIT_BAD_INPUT
        return int(modules[args.command].run(args))
    except GlmcError as e:
        # Messages quote user input (values, file names, YAML context): one printable line,
        # clipped, whatever the input held.
        print(f"glmc: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("glmc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
