"""Rewrite the per-pass golden IR files: `python tests/passes/regen_golden.py` (or
`python -m tests.regen_golden`, which also does this); review the diff before committing."""

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # tests/specs.py

from golden_cases import CASES, text  # noqa: E402


def main() -> None:
    for case in CASES:
        out = HERE / "golden" / f"{case}.ir"
        out.write_text(text(case))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
