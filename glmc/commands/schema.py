"""Print the JSON schema of the model spec."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glmc.commands._common import EXIT_OK

NAME = "schema"
HELP = "Print the JSON schema of the model spec"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", type=Path, help="write to this file instead of stdout")


def run(args: argparse.Namespace) -> int:
    from glmc.spec import ModelSpec

    text = json.dumps(ModelSpec.model_json_schema(), indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK
