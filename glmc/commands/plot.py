"""Draw a training run's loss and expert-load curves to PNG (needs matplotlib: glmc[plot])."""

from __future__ import annotations

import argparse
from pathlib import Path

from glmc.commands._common import EXIT_OK

NAME = "plot"
HELP = "Plot a training run's loss and expert-load curves to PNG"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="run folder of `glmc train` (or its metrics.jsonl)")
    p.add_argument("-o", "--out", type=Path, help="folder for the PNGs (default: the run folder)")


def run(args: argparse.Namespace) -> int:
    from glmc.train.plot import plot_run

    for path in plot_run(args.run, args.out):
        print(path)
    return EXIT_OK
