"""The kernel modules run once per process, under `glmc.kernels` only.

From the repository root, `kernels/` is also importable as a top-level `kernels`, and transformers
imports that name (`is_kernels_available()` falls back to importing a package it finds without
metadata). Running the kernel modules a second time defines every `glmc::` op again; torch then
destroys the first registration while `glmc.kernels` still calls it through a freed dispatcher
entry (`ValueError: vector::reserve`, or a segfault, at the next call or compile).
See kernels/README.md, "Finding: `glmc::` ops called through freed dispatcher entries".
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter from the repository root, where '' (the root) leads sys.path.
_PROBE = """
import json, sys
import glmc.kernels
from torch._library import custom_ops

libs = {q: lib for q, lib in custom_ops.OPDEF_TO_LIB.items() if q.startswith("glmc::")}
import kernels  # the root folder under its top-level name, as transformers imports it
try:
    import kernels.fused_moe
    submodule = "imported"
except ImportError:
    submodule = "refused"
from transformers.utils.import_utils import is_kernels_available

print(json.dumps({
    "file": kernels.__file__,
    "path": list(kernels.__path__),
    "submodule": submodule,
    "hf_kernels_available": is_kernels_available(),
    "foreign_modules": sorted(m for m in sys.modules if m.startswith("kernels.")),
    "ops": sorted(libs),
    "redefined": sorted(q for q, lib in libs.items() if custom_ops.OPDEF_TO_LIB.get(q) is not lib),
}))
"""


def _env(**extra: str) -> dict[str, str]:
    # The child must not write this run's skip report (GLMC_SKIP_REPORT) nor inherit its pytest
    # or allocator state, and needs the working directory on sys.path (no PYTHONSAFEPATH).
    drop = ("PYTEST_", "MALLOC_", "GLMC_SKIP_REPORT", "PYTHONSAFEPATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(TRITON_INTERPRET="1", TORCHINDUCTOR_COMPILE_THREADS="1", **extra)
    return env


def test_top_level_kernels_import_from_the_root_defines_nothing_twice():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=_env(), capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve() == ROOT / "kernels" / "__init__.py"  # the shadowing is real
    assert {"glmc::fused_moe", "glmc::moe_align", "glmc::route", "glmc::grouped_mm"} <= set(got["ops"])
    assert got["redefined"] == []
    assert got["path"] == [] and got["submodule"] == "refused" and got["foreign_modules"] == []
    assert got["hf_kernels_available"] is False


# The reported pair, run by pytest.main inside a wrapper that also notes whether any glmc op was
# defined again on the way (deterministic, where the crash itself depends on the heap layout).
_PAIR = """
import json, sys
import pytest
import glmc.kernels
from torch._library import custom_ops

libs = {q: lib for q, lib in custom_ops.OPDEF_TO_LIB.items() if q.startswith("glmc::")}
rc = pytest.main(sys.argv[1:])
redefined = sorted(q for q, lib in libs.items() if custom_ops.OPDEF_TO_LIB.get(q) is not lib)
print(json.dumps({"rc": int(rc), "redefined": redefined}))
"""

PAIR = (
    "tests/kernels/test_fused_moe.py::test_reference_matches_transformers_experts",
    "tests/kernels/test_dispatch.py::test_moe_layer_compiles_fullgraph",
)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_transformers_experts_then_triton_compile_under_malloc_perturb():
    """transformers' Glm4MoeExperts test, then the fullgraph compile of the Triton MoE layer, in
    one process started from the root, with glibc filling freed memory (MALLOC_PERTURB_): a call
    through a freed dispatcher entry then fails with vector::reserve or a segfault."""
    args = ["-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu", *PAIR]
    out = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", _PAIR, *args],
        cwd=ROOT,
        env=_env(MALLOC_PERTURB_="165"),
        capture_output=True,
        text=True,
    )
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, tail
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"rc": 0, "redefined": []}, tail
    assert "3 passed" in out.stdout, tail
