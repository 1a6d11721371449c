"""Per-pass golden text: each case's printed IR must match `golden/<case>.ir` exactly.
Regenerate with `python tests/passes/regen_golden.py` and review the diff."""

from pathlib import Path

import pytest
from golden_cases import CASES, text

from glmc.passes import registry

GOLDEN = Path(__file__).parent / "golden"
PASSES_DIR = Path(__file__).resolve().parents[2] / "passes"


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    want = (GOLDEN / f"{case}.ir").read_text()
    assert text(case) == want, f"{case}: regenerate with python tests/passes/regen_golden.py and review"


def test_every_pass_has_a_golden_and_its_file() -> None:
    for name in registry():
        assert any(c.split(".")[0] == name for c in CASES), name
        assert (PASSES_DIR / f"{name.replace('-', '_')}.py").is_file(), name


def test_goldens_are_the_cases() -> None:
    assert sorted(p.stem for p in GOLDEN.glob("*.ir")) == sorted(CASES)
