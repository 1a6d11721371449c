"""Shared pieces of the command modules: exit codes, the SPEC argument, number formatting."""

from __future__ import annotations

import argparse

from glmc import presets

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2

SPEC_HELP = (
    f"a preset ({', '.join(presets.names())}), a YAML/JSON spec file, a Hugging Face config.json, "
    f"or a checkpoint folder (default: {presets.DEFAULT})"
)


def add_spec_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", default=presets.DEFAULT, help=SPEC_HELP)


def human(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def human_bytes(x: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= div:
            return f"{x / div:.2f} {unit}"
    return f"{int(x)} B"
