"""`glmc convert` and `glmc ir` from the command line: results, and bad plans or bad checkpoints
exiting 2 with one clear line, leaving no output folder and no temporary folder behind."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_helpers import expect_bad_input as _bad  # tests/cli_helpers.py
from cli_helpers import run
from safetensors.torch import load_file, save_file

import glmc
import glmc.api
from glmc import presets


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "hf"
    glmc.save_pretrained(glmc.api.build_torch(presets.get("glm-tiny"), dtype=torch.bfloat16), path)
    return path


def _no_leftovers(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_convert_writes_ranks_config_and_manifest(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, err = run(
        ["convert", ckpt, "-o", out, "--pipeline", "fuse-moe,shard{ep=2,pp=2},quantize-fp8"], capsys
    )
    assert code == 0, err
    assert "converted" in err and "4 rank folders" in err and "FP8 block128" in err
    manifest = json.loads((out / "glmc_convert.json").read_text())
    assert manifest["weight_layout"] == "fused" and manifest["mesh"] == {"pp": 2, "dp": 1, "ep": 2, "tp": 1}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "pp0-ep0-tp0", "pp0-ep1-tp0", "pp1-ep0-tp0", "pp1-ep1-tp0"]  # fmt: skip
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert (out / "graph.txt").read_text().startswith("graph glm-tiny")
    # stage 0 holds the embedding and layers 0-1, not the head
    names = set(load_file(str(out / "pp0-ep1-tp0" / "model.safetensors")))
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


@pytest.mark.parametrize(
    ("pipeline", "needles"),
    [
        ("shard{ep=3}", ["ep=3 does not divide moe.num_experts=8"]),
        ("shard{tp=2},quantize-fp8{serving=false}", ["recipe=block128 needs 128-aligned", "recipe=channel"]),
        ("quantize-fp8,fuse-moe", ["quantize-fp8 must come after fuse-moe"]),
        ("fuse-moe{x=1}", ["fuse-moe has no argument 'x'"]),
    ],
)
def test_bad_plans_exit_2_and_leave_nothing(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], pipeline: str, needles: list[str]
) -> None:
    out = tmp_path / "out"
    _bad(["convert", ckpt, "-o", out, "--pipeline", pipeline, "--quiet"], capsys, *needles)
    _no_leftovers(tmp_path, out)


def _edit(ckpt: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _nan(t: dict[str, torch.Tensor]) -> None:
    t["model.layers.1.mlp.experts.6.up_proj.weight"][3, 4] = float("nan")


@pytest.mark.parametrize(
    ("edit", "pipeline", "needle"),
    [
        (lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"), "fuse-moe", "missing 1 tensor(s): model.layers.2.self_attn.k_proj.weight"),
        (lambda t: t.__setitem__("model.layers.0.extra.weight", torch.ones(2)), "", "unexpected tensor(s): model.layers.0.extra.weight"),
        (lambda t: t.__setitem__("model.layers.1.mlp.experts.3.up_proj.weight", torch.randn(5, 64)), "fuse-moe",
         "model.layers.1.mlp.experts.3.up_proj.weight has shape [5, 64]"),
        (lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)), "", "model.norm.weight has dtype I32"),
        (_nan, "quantize-fp8{serving=false}", "model.layers.1.mlp.experts.6.up_proj.weight: cannot quantise to FP8: it has non-finite"),
    ],
)  # fmt: skip
def test_bad_checkpoints_exit_2_naming_the_tensor(
    ckpt: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, torch.Tensor]], None],
    pipeline: str,
    needle: str,
) -> None:
    _edit(ckpt, edit)
    out = tmp_path / "out"
    _bad(["convert", ckpt, "-o", out, "--pipeline", pipeline, "--quiet"], capsys, needle)
    _no_leftovers(tmp_path, out)


def test_fp8_sources_need_their_config_and_scales(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    q = tmp_path / "q"
    fp8 = "quantize-fp8{serving=false}"  # glm-tiny's sizes: the serving rule would keep them BF16
    assert run(["convert", ckpt, "-o", q, "--pipeline", fp8, "--quiet"], capsys)[0] == 0
    # FP8 -> bf16 works (dequantised)...
    assert run(["convert", q, "-o", tmp_path / "deq", "--dtype", "bf16", "--quiet"], capsys)[0] == 0
    assert (
        load_file(str(tmp_path / "deq" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].dtype
        == torch.bfloat16
    )
    # ...but not without scales, or without the quantization_config that says how to read them
    _edit(q, lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale_inv"))
    _bad(
        ["convert", q, "-o", tmp_path / "o1", "--quiet"],
        capsys,
        "model.layers.0.mlp.up_proj.weight_scale_inv are missing",
    )
    cfg = json.loads((q / "config.json").read_text())
    del cfg["quantization_config"]
    (q / "config.json").write_text(json.dumps(cfg))
    _bad(["convert", q, "-o", tmp_path / "o2", "--quiet"], capsys, "has no FP8 quantization_config")
    _no_leftovers(tmp_path, tmp_path / "o1")


def test_output_folder_rules(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _bad(["convert", ckpt, "-o", out, "--quiet"], capsys, "--force")
    assert (out / "keep.txt").exists()
    assert (
        run(["convert", ckpt, "-o", out, "--quiet", "--force", "--max-shard-size", "200KB"], capsys)[0] == 0
    )
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()
    _bad(["convert", ckpt, "-o", ckpt, "--quiet", "--force"], capsys, "is the source checkpoint")
    _bad(["convert", tmp_path / "none", "-o", tmp_path / "o", "--quiet"], capsys, "not found")
    _bad(["convert", ckpt, "-o", tmp_path / "o", "--max-shard-size", "lots"], capsys, "--max-shard-size")
    assert not (tmp_path / "o").exists()


def test_ranked_outputs_are_not_sources(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run(["convert", ckpt, "-o", tmp_path / "r", "--pipeline", "shard{ep=2}", "--quiet"], capsys)[0] == 0
    )
    _bad(["convert", tmp_path / "r", "-o", tmp_path / "o", "--quiet"], capsys, "per-rank shards")


def test_ir_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["ir", "glm-tiny", "--pipeline", "fuse-moe,shard{ep=2},quantize-fp8", "--print-after", "all",
                          "--time-passes"], capsys)  # fmt: skip
    assert code == 0, err
    headers = [line for line in out.splitlines() if line.startswith("// -----")]
    assert headers == [
        "// ----- IR after lower -----",
        "// ----- IR after fuse-moe -----",
        "// ----- IR after shard{ep=2} -----",
        "// ----- IR after quantize-fp8 -----",
    ]
    assert "fp8_kept=" in out and "all_to_all" in out  # glm-tiny's sizes: the serving rule keeps BF16
    for name in ("lower", "fuse-moe", "shard{ep=2}", "quantize-fp8", "total"):
        assert name in err
    code, out, _ = run(["ir", "glm-tiny"], capsys)
    assert code == 0 and out == (Path(__file__).parent / "golden" / "glm-tiny.ir").read_text()
    _bad(
        ["ir", "glm-tiny", "--pipeline", "fuse-moe", "--print-after", "shard"], capsys, "--print-after shard"
    )
    _bad(["ir", "glm-tiny", "--pipeline", "shard{ep=3}"], capsys, "ep=3")
