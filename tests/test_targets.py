"""The Target seam (glmc/export/target.py): one registry read by the API, the CLI and the
docs; a pass a target cannot honour is refused by its `check` before any work, naming the
target, the pass and a node; the spec is lowered once per build and per convert."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import glmc
import glmc.api
import glmc.lower
from glmc.cli import main
from glmc.export import get, names, targets
from glmc.pipeline import compile_graph
from glmc.presets import get as preset

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"fuse-moe": "fuse-moe", "quantize-fp8": "quantize-fp8", "shard": "shard{ep=2}"}
UNHONOURED = [(t, p) for t in names() for p in PIPELINES if p not in get(t).honours]


def test_registry_is_the_one_list_of_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert names() == ("torch", "hf", "trtllm", "onnx", "aoti", "torch-trt")
    assert {n: t.name for n, t in targets().items()} == {n: n for n in names()}
    assert main(["build", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"comma-separated targets: {', '.join(names())}" in help_text
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{n}`" in readme for n in names()), "README.md names every target"


def test_every_target_accepts_the_unpassed_graph() -> None:
    g = compile_graph(preset("glm-tiny"))
    for t in targets().values():
        t.check(g)


def test_the_unhonoured_pairs_are_the_expected_ones() -> None:
    """aoti and torch-trt refuse every pass; onnx (built from the passed graph) refuses only a
    shard plan (one process, no per-rank programs); trtllm refuses fuse-moe (TensorRT-LLM maps
    Hugging Face names itself)."""
    assert sorted(UNHONOURED) == sorted(
        [("trtllm", "fuse-moe"), ("onnx", "shard")]
        + [(t, p) for t in ("aoti", "torch-trt") for p in PIPELINES]
    )


@pytest.mark.parametrize(("target", "pass_name"), UNHONOURED)
def test_an_unhonoured_pass_exits_2_before_any_work(
    target: str,
    pass_name: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_weights(*_a: object, **_k: object) -> None:
        raise AssertionError("weights were made before the targets' checks")

    monkeypatch.setattr(glmc.api, "build_torch", no_weights)
    out = tmp_path / "out"
    code = main(
        ["build", "glm-tiny", "-o", str(out), "--pipeline", PIPELINES[pass_name], "--emit", f"hf,{target}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"glmc: error: {target}: {pass_name}") and "not supported" in err
    assert "node model." in err  # the node the pass changed
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no folder, not even a temporary one


@pytest.mark.parametrize(
    ("target", "pass_name", "why"),
    [
        ("aoti", "quantize-fp8", "no C++ kernel"),
        ("aoti", "shard", "runs in one process"),
        ("onnx", "shard", "ONNX has no collectives"),
        ("torch-trt", "shard", "runs in one process"),
        ("torch-trt", "fuse-moe", "the torch-trt artifact would be written without it"),
    ],
)
def test_a_refusal_says_why(target: str, pass_name: str, why: str) -> None:
    g = compile_graph(preset("glm-tiny"), PIPELINES[pass_name])
    with pytest.raises(
        glmc.GlmcError, match=rf"^{target}: {pass_name}.* is not supported: .*{re.escape(why)}.*; drop it"
    ):
        targets()[target].check(g)


def test_trtllm_refuses_a_recipe_and_a_release_in_check(tmp_path: Path) -> None:
    with pytest.raises(glmc.GlmcError, match=r"^trtllm: quantize-fp8\{recipe=channel\} is not supported"):
        glmc.build("glm-tiny", tmp_path / "a", pipeline="quantize-fp8{recipe=channel}", emit=["trtllm"])
    with pytest.raises(glmc.GlmcError, match=r"Glm4MoeForCausalLM from 1\.1"):
        glmc.build("glm-tiny", tmp_path / "b", emit=["trtllm"], trtllm_version="1.0")
    assert list(tmp_path.iterdir()) == []


def test_emit_naming_a_target_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(glmc.GlmcError, match="--emit names hf twice"):
        glmc.build("glm-tiny", tmp_path / "a", emit=["hf", "torch", "hf"])


def _count_lowerings(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = glmc.lower.lower

    def counted(spec: glmc.ModelSpec, *a: object, **k: object) -> object:
        calls.append(spec.name)
        return real(spec, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(glmc.lower, "lower", counted)
    return calls


def test_build_and_convert_lower_the_spec_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_lowerings(monkeypatch)
    glmc.build(
        "glm-tiny", tmp_path / "b", pipeline="fuse-moe,quantize-fp8", emit=["torch", "hf"], dtype="f32"
    )
    assert calls == ["glm-tiny"]
    calls.clear()
    glmc.api.convert(tmp_path / "b" / "hf", tmp_path / "c", "quantize-fp8{recipe=channel}")
    assert calls == ["glm-tiny"]
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = glmc.from_pretrained(tmp_path / "c")(ids)
    assert torch.isfinite(logits).all() and logits.shape == (1, 6, 512)


def test_lower_is_called_in_one_place() -> None:
    """`glmc.pipeline.compile_graph` is the only caller of `lower(...)` in glmc/ and export/."""
    callers = []
    for folder in ("glmc", "export"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "lower":
                    callers.append(str(f.relative_to(ROOT)))
    assert callers == ["glmc/pipeline.py"]
