"""Dependency direction (DESIGN.md): ir -> stdlib only; passes -> ir; kernels never ir;
export -> ir, kernels. Checked on the source's import statements."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> list[tuple[Path, str]]:
    out = []
    for f in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out += [(f, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((f, node.module))
    return out


def _glmc_layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "glmc":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in {"ir", "passes", "kernels", "export"} else "glmc"


ALLOWED = {
    "ir": set(),
    "passes": {"ir"},
    "kernels": {"kernels"},
    "export": {"ir", "kernels", "export"},
}


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_layer_imports(folder):
    bad = []
    for f, mod in _imports(folder):
        layer = _glmc_layer(mod)
        if layer is not None and layer != folder and layer not in ALLOWED[folder]:
            bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(bad)


def test_ir_uses_only_the_standard_library():
    bad = [
        f"{f.relative_to(ROOT)} imports {mod}"
        for f, mod in _imports("ir")
        if mod.split(".")[0] not in sys.stdlib_module_names and not mod.startswith("glmc.ir")
    ]
    assert not bad, "\n".join(bad)


def test_packaging_installs_only_the_glmc_namespace():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["packages"]["find"]["include"] == ["glmc", "glmc.*"]
    for name in ("ir", "passes", "kernels", "export"):
        link = ROOT / "glmc" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), name
