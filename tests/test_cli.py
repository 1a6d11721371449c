"""The glmc command line: JSON numbers, artifacts, and bad input (exit 2, one message, no
traceback, no partial output folder)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmc
from glmc.cli import main


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_glm45(capsys):
    code, out, _ = run(["inspect", "glm-4.5", "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["params"]["total"] == 355_234_006_336
    assert info["params"]["active"] == 32_482_313_536
    assert info["params"]["checkpoint"] == 358_337_791_296
    assert info["flops_per_token"]["forward"] > 2 * info["params"]["active"]
    assert info["kv_cache_bytes_per_token"]["trunk"] == 376_832
    assert info == glmc.inspect("glm-4.5")  # the Python API gives the same data


def test_inspect_json_air(capsys):
    code, out, _ = run(["inspect", "glm-4.5-air", "--json"], capsys)
    p = json.loads(out)["params"]
    assert code == 0 and (p["total"], p["active"]) == (107_985_796_864, 12_481_494_784)


def test_inspect_table_for_people(capsys):
    code, out, _ = run(["inspect", "glm-4.5"], capsys)
    assert code == 0 and "355.23B" in out and "32.48B" in out


def test_inspect_hf_config_and_folder(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(glmc.presets.get("glm-4.5-air").to_hf_config()))
    for spec in (tmp_path / "config.json", tmp_path):
        code, out, _ = run(["inspect", spec, "--json"], capsys)
        assert code == 0 and json.loads(out)["params"]["active"] == 12_481_494_784


def test_schema(capsys, tmp_path):
    code, out, _ = run(["schema"], capsys)
    assert code == 0 and "MoESpec" in json.loads(out)["$defs"]


def test_build_default_preset_emits_torch_and_hf(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["build", "-o", out], capsys)
    assert code == 0, err
    manifest = json.loads((out / "build.json").read_text())
    assert manifest["targets"] == ["torch", "hf"] and manifest["spec"]["name"] == "glm-tiny"
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "model.safetensors").is_file()
    keys = set(load_file(str(out / "hf" / "model.safetensors")))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # per-expert names
    assert "model.layers.3.shared_head.head.weight" in keys  # MTP at num_layers
    a = glmc.from_pretrained(out / "hf")
    b = glmc.from_pretrained(out / "torch")
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_build_refuses_non_empty_output_without_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(["build", "-o", out], capsys)
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    code, _, _ = run(["build", "-o", out, "--force", "--emit", "hf"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "hf").is_dir()


def _bad(argv, capsys, *needles):
    code, _, err = run(argv, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_spec_field(tmp_path, capsys):
    spec = glmc.presets.get("glm-tiny").model_dump(mode="json")
    spec["attention"]["num_kv_heads"] = 3
    (tmp_path / "bad.yaml").write_text(json.dumps(spec))
    _bad(["inspect", tmp_path / "bad.yaml"], capsys, "attention.num_kv_heads")
    out = tmp_path / "out"
    _bad(["build", tmp_path / "bad.yaml", "-o", out], capsys, "attention.num_kv_heads")
    assert not out.exists()


def test_missing_file_and_unknown_names(tmp_path, capsys):
    _bad(["inspect", tmp_path / "nope.yaml"], capsys, "nope.yaml")
    _bad(["build", "-o", tmp_path / "o", "--emit", "tflite"], capsys, "tflite")
    _bad(["inspect", "glm-tiny", "--pipeline", "fuse-everything"], capsys, "fuse-everything")
    _bad(["build", "-o", tmp_path / "o", "--weights", tmp_path / "none"], capsys, "none")
    assert not (tmp_path / "o").exists()


def test_argparse_errors_exit_2(capsys):
    code, _, err = run(["build"], capsys)
    assert code == 2 and "--out" in err


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    glmc.save_pretrained(glmc.api.build_torch(glmc.presets.get("glm-tiny")), path)
    return path


def _edit(ckpt: Path, fn) -> None:
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"), "model.layers.2.self_attn.k_proj.weight"),
        (
            lambda t: t.__setitem__("model.layers.0.extra.weight", torch.ones(2)),
            "model.layers.0.extra.weight",
        ),
        (
            lambda t: t.__setitem__("model.layers.1.mlp.experts.3.up_proj.weight", torch.randn(5, 64)),
            "model.layers.1.mlp.experts.3.up_proj.weight has shape [5, 64]",
        ),
    ],
)
def test_bad_checkpoint_names_the_tensor(checkpoint, tmp_path, capsys, edit, needle):
    _edit(checkpoint, edit)
    out = tmp_path / "out"
    _bad(["build", checkpoint, "--weights", checkpoint, "-o", out], capsys, needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_console_script_exit_code(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "glmc.cli", "inspect", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "missing.json" in r.stderr


def test_quantize_fp8_says_which_weights_it_kept(tmp_path, capsys):
    """glm-tiny's GEMMs are narrower than 128, so the serving rule keeps them all high precision:
    build and convert say so (and how to quantise anyway) instead of writing BF16 silently;
    with serving=false every GEMM weight is FP8 and nothing is said."""
    assert (
        main(["build", "glm-tiny", "-o", str(tmp_path / "b"), "--emit", "hf", "--pipeline", "quantize-fp8"])
        == 0
    )
    err = capsys.readouterr().err
    assert "quantised no weight" in err and "serving=false" in err
    assert json.loads((tmp_path / "b" / "build.json").read_text())["notes"][0].startswith(
        "quantize-fp8 (block128)"
    )
    assert (
        main(["convert", str(tmp_path / "b" / "hf"), "-o", str(tmp_path / "c"), "--pipeline", "quantize-fp8"])
        == 0
    )
    assert "kept high precision" in capsys.readouterr().err
    pipeline = "quantize-fp8{serving=false}"
    assert main(["build", "glm-tiny", "-o", str(tmp_path / "d"), "--emit", "hf", "--pipeline", pipeline]) == 0
    assert "note:" not in capsys.readouterr().err
    assert "notes" not in json.loads((tmp_path / "d" / "build.json").read_text())
