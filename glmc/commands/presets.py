"""List the built-in presets."""

from __future__ import annotations

import argparse

from glmc import presets
from glmc.commands._common import EXIT_OK, human

NAME = "presets"
HELP = "List the built-in presets"


def add_arguments(p: argparse.ArgumentParser) -> None:
    del p  # no arguments


def run(args: argparse.Namespace) -> int:
    from glmc.api import inspect

    for name in presets.names():
        p = inspect(name)["params"]
        print(f"{name:14s} {human(p['total']):>10s} total  {human(p['active']):>10s} active")
    return EXIT_OK
