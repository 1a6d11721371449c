"""`glmc.from_pretrained` of an FP8 folder glmc wrote keeps FP8 (float8_e4m3fn weights with their
scales, the torch target's FP8 path) unless asked to dequantise; `glmc build --weights` reads
the checkpoint into its one lowering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from specs import WIDE  # tests/specs.py

import glmc
import glmc.api
import glmc.lower
from glmc.convert import convert
from glmc.errors import CheckpointError
from glmc.spec import ModelSpec

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp8load") / "hf"
    glmc.save_pretrained(glmc.api.build_torch(ModelSpec.from_dict(WIDE), dtype=torch.bfloat16, seed=5), path)
    return path


def _fp8_names(model: torch.nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.dtype == FP8]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("pipeline", ["quantize-fp8", "fuse-moe,quantize-fp8{recipe=channel}"])
def test_convert_output_loads_as_fp8(wide_ckpt: Path, tmp_path: Path, pipeline: str) -> None:
    convert(wide_ckpt, tmp_path / "q", pipeline)
    model = glmc.from_pretrained(tmp_path / "q")
    reference = glmc.from_pretrained(tmp_path / "q", dequantize=True)
    assert _fp8_names(model) and not _fp8_names(reference)
    scales = [k for k in model.state_dict() if k.endswith(("weight_scale_inv", "weight_scale", "proj_scale_inv",
                                                          "proj_scale"))]  # fmt: skip
    assert scales and all(model.state_dict()[k].dtype == torch.float32 for k in scales)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids), reference(ids)
    print(f"\n{pipeline}: FP8 model vs dequantised reference, max |diff| / max |logit| {_rel(got, want):.1e}")
    assert _rel(got, want) < 1e-5


def test_build_hf_fp8_output_and_torch_artifact_load_as_fp8(wide_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    glmc.build(wide_ckpt, out, weights=wide_ckpt, emit=["hf", "torch"], pipeline="fuse-moe,quantize-fp8")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    for target in ("hf", "torch"):
        model = glmc.from_pretrained(out / target)
        reference = glmc.from_pretrained(out / target, dequantize=True)
        assert _fp8_names(model) and not _fp8_names(reference), target
        with torch.no_grad():
            assert _rel(model(ids), reference(ids)) < 1e-5, target
    with torch.no_grad():  # both artifacts hold the same FP8 weights
        a, b = glmc.from_pretrained(out / "hf")(ids), glmc.from_pretrained(out / "torch")(ids)
    assert _rel(a, b) < 1e-5


def test_passes_that_disagree_with_the_stored_dtypes_are_refused(wide_ckpt: Path, tmp_path: Path) -> None:
    """glmc_convert.json says which passes made the folder; FP8 tensors it does not account for
    are refused by name instead of being cast."""
    convert(wide_ckpt, tmp_path / "q", "fuse-moe,quantize-fp8")
    f = tmp_path / "q" / "glmc_convert.json"
    manifest = json.loads(f.read_text())
    f.write_text(json.dumps({**manifest, "passes": ["fuse-moe"]}))
    with pytest.raises(CheckpointError, match=r"stored as torch\.float8_e4m3fn"):
        glmc.from_pretrained(tmp_path / "q")
    glmc.from_pretrained(tmp_path / "q", dequantize=True)  # the dequantising reader still reads it


def test_build_with_weights_lowers_once(
    wide_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = glmc.lower.lower

    def counting(spec: ModelSpec, *a: object, **k: object) -> object:
        calls.append(spec.name)
        return real(spec, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(glmc.lower, "lower", counting)
    convert(wide_ckpt, tmp_path / "q", "quantize-fp8")
    calls.clear()
    glmc.build(wide_ckpt, tmp_path / "b", weights=tmp_path / "q", emit=["hf", "torch"], pipeline="fuse-moe")
    assert len(calls) == 1, calls
    calls.clear()
    glmc.from_pretrained(tmp_path / "q")
    assert len(calls) == 1, calls


def test_generate_runs_fp8_artifacts_as_fp8_unless_dequantize(
    wide_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`glmc generate` loads an FP8 torch artifact through from_pretrained, so it runs the FP8
    path; `--dequantize` loads the plain model instead. The CPU FP8 path dequantises the weights
    it multiplies, so both give the same greedy ids. An exported graph cannot be dequantised at
    load time: refused by name."""
    from cli_helpers import expect_bad_input, run  # tests/cli_helpers.py

    from glmc.runtime import open_artifact

    out = tmp_path / "b"
    glmc.build(wide_ckpt, out, weights=wide_ckpt, emit=["torch"], pipeline="quantize-fp8")
    fp8 = open_artifact(out, "torch", dtype="fp32")
    plain = open_artifact(out, "torch", dtype="fp32", dequantize=True)
    assert _fp8_names(fp8.backend.model) and not _fp8_names(plain.backend.model)
    ids = []
    for flag in ([], ["--dequantize"]):
        code, stdout, _ = run(
            ["generate", out, "--target", "torch", "--prompt-ids", "3,17,42,9", "--max-new-tokens", "6",
             "--dtype", "fp32", "--speculative", "mtp", *flag],
            capsys,
        )  # fmt: skip
        assert code == 0
        ids.append(stdout)
    assert ids[0] == ids[1] and ids[0].strip()
    glmc.build(wide_ckpt, tmp_path / "o", weights=wide_ckpt, emit=["onnx"], pipeline="quantize-fp8")
    expect_bad_input(
        ["generate", tmp_path / "o", "--prompt-ids", "3,17", "--dequantize"], capsys, "--dequantize"
    )
