"""Dependency direction (DESIGN.md): ir -> stdlib only; passes -> ir (no torch, no pydantic);
kernels never ir; export -> ir, kernels. Inside the whole `glmc` namespace: no import cycle and
no import of another module's private names. Checked on the source's import statements,
relative ones resolved, function-level (lazy) ones included: a lazy import still ties the two
modules together. Imports under `if TYPE_CHECKING:` are for the type checker only and skipped."""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Import:
    file: Path
    module: str  # absolute module name imported from (relative imports resolved)
    names: tuple[str, ...]  # the names of `from module import a, b`; () for `import module`


def _module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, without the bodies of `if TYPE_CHECKING:` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def package_files(root: Path, package: str) -> dict[str, Path]:
    """module name -> file for every module of `package` under `root` (symlinks followed, so
    glmc/ir -> ../ir counts as glmc.ir)."""
    out = {}
    for folder, _dirs, files in os.walk(root / package, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                path = Path(folder) / f
                out[_module_name(path, root)] = path
    return out


def file_imports(file: Path, module: str) -> list[Import]:
    """Every import statement of `file` (module `module`), relative ones made absolute."""
    is_package = file.name == "__init__.py"
    out = []
    for node in _walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            out += [Import(file, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                anchor = parts if is_package else parts[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            out.append(Import(file, base, tuple(a.name for a in node.names)))
    return out


def import_graph(root: Path, package: str) -> tuple[dict[str, set[str]], list[tuple[str, Import]]]:
    """Module -> modules it imports (inside `package`), and every (importer, import) pair."""
    modules = package_files(root, package)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    pairs = []
    for mod, f in modules.items():
        for imp in file_imports(f, mod):
            pairs.append((mod, imp))
            targets = [f"{imp.module}.{n}" for n in imp.names if f"{imp.module}.{n}" in modules]
            if len(targets) < max(len(imp.names), 1) and imp.module in modules:
                targets.append(imp.module)  # names that are not submodules come from the module
            edges[mod].update(t for t in targets if t != mod)
    return edges, pairs


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return groups


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_imports(root: Path, package: str) -> list[str]:
    """Imports of another module's private names (`from m import _x`), or of a private module
    (`m._impl`) from outside the package that holds it."""
    modules = package_files(root, package)
    bad = []
    for mod, imp in import_graph(root, package)[1]:
        if imp.module.split(".")[0] != package:
            continue
        parts = imp.module.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])
            if _private(part) and not (mod == owner or mod.startswith(owner + ".")):
                bad.append(f"{mod} imports private module {imp.module}")
        for n in imp.names:
            if _private(n) and f"{imp.module}.{n}" not in modules and imp.module != mod:
                bad.append(f"{mod} imports private name {n} from {imp.module}")
    return bad


# ---- the rules, on this repository ------------------------------------------------------------


def _imports(folder: str) -> list[tuple[Path, str]]:
    modules = package_files(ROOT, "glmc")
    prefix = f"glmc.{folder}"
    return [
        (imp.file, imp.module)
        for mod, f in modules.items()
        if mod == prefix or mod.startswith(prefix + ".")
        for imp in file_imports(f, mod)
    ]


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
            bad.append(f"{f} imports {mod}")
    assert not bad, "\n".join(bad)


def test_ir_uses_only_the_standard_library():
    bad = [
        f"{f} imports {mod}"
        for f, mod in _imports("ir")
        if mod.split(".")[0] not in sys.stdlib_module_names and not mod.startswith("glmc.ir")
    ]
    assert not bad, "\n".join(bad)


def test_passes_import_neither_torch_nor_pydantic():
    bad = [
        f"{f} imports {mod}" for f, mod in _imports("passes") if mod.split(".")[0] in ("torch", "pydantic")
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(import_graph(ROOT, "glmc")[0])
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_imports_across_modules():
    bad = private_imports(ROOT, "glmc")
    assert not bad, "\n".join(bad)


def test_packaging_installs_only_the_glmc_namespace():
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cfg["tool"]["setuptools"]["packages"]["find"]["include"] == ["glmc", "glmc.*"]
    for name in ("ir", "passes", "kernels", "export"):
        link = ROOT / "glmc" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve(), name


# ---- the checker itself, on planted trees ------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


CLEAN = {
    "pkg/__init__.py": "",
    "pkg/a.py": "from pkg.b import helper\n",
    "pkg/b.py": "def helper(): pass\n_hidden = 1\n",
    "pkg/sub/__init__.py": "from ._impl import thing\n",
    "pkg/sub/_impl.py": "from ..b import helper\nthing = helper\n",
    "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n",
    "pkg/d.py": "import pkg.c\n",
}


def test_checker_accepts_a_clean_tree(tmp_path: Path) -> None:
    root = _tree(tmp_path, CLEAN)
    edges = import_graph(root, "pkg")[0]
    assert edges["pkg.sub._impl"] == {"pkg.b"}  # `from ..b` resolved
    assert edges["pkg.sub"] == {"pkg.sub._impl"}  # `from ._impl` in a package's __init__
    assert edges["pkg.c"] == set()  # a TYPE_CHECKING import is not a dependency
    assert find_cycles(edges) == [] and private_imports(root, "pkg") == []


@pytest.mark.parametrize(
    "planted",
    [
        {"pkg/b.py": "def helper(): pass\ndef f():\n    from pkg import a\n"},  # lazy, still a cycle
        {"pkg/sub/_impl.py": "from .. import a\nthing = 1\n", "pkg/a.py": "from pkg.sub import thing\n"},
        {"pkg/b.py": "import pkg.d\ndef helper(): pass\n", "pkg/d.py": "from . import a\n"},
    ],
)
def test_checker_finds_a_planted_cycle(tmp_path: Path, planted: dict[str, str]) -> None:
    root = _tree(tmp_path, {**CLEAN, **planted})
    cycles = find_cycles(import_graph(root, "pkg")[0])
    assert len(cycles) == 1 and "pkg.a" in cycles[0], cycles


@pytest.mark.parametrize(
    ("planted", "needle"),
    [
        ({"pkg/a.py": "from pkg.b import _hidden\n"}, "pkg.a imports private name _hidden from pkg.b"),
        ({"pkg/a.py": "from .b import helper, _hidden\n"}, "pkg.a imports private name _hidden from pkg.b"),
        ({"pkg/a.py": "from pkg.sub._impl import thing\n"}, "pkg.a imports private module pkg.sub._impl"),
        ({"pkg/a.py": "import pkg.sub._impl\n"}, "pkg.a imports private module pkg.sub._impl"),
    ],
)
def test_checker_finds_a_planted_private_import(tmp_path: Path, planted: dict[str, str], needle: str) -> None:
    root = _tree(tmp_path, {**CLEAN, **planted})
    assert needle in private_imports(root, "pkg")
