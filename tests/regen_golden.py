"""Rewrite the golden IR files: `python -m tests.regen_golden`; review the diff before committing.
Writes the lowering's golden and the per-pass goldens of tests/passes/golden/."""

import runpy
from pathlib import Path

from glmc import presets
from glmc.ir import format_graph
from glmc.lower import lower

if __name__ == "__main__":
    out = Path(__file__).parent / "golden" / "glm-tiny.ir"
    out.write_text(format_graph(lower(presets.get("glm-tiny"))))
    print(f"wrote {out}")
    runpy.run_path(str(Path(__file__).parent / "passes" / "regen_golden.py"), run_name="__main__")
