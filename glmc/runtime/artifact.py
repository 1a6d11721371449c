"""Open a `glmc build` output folder (or one target's subfolder) as a decoding Backend.

Target folders that are not a checkpoint (onnx, aoti, torch-trt) carry `glmc_runtime.json`:
the target, its files and the spec, so they run without the rest of the build folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmc.errors import CheckpointError, GlmcError
from glmc.export import GLMC_SPEC_FILE, RUNTIME_FILE
from glmc.runtime.backend import Backend, TorchBackend
from glmc.spec import ModelSpec

BUILD_FILE = "build.json"
# Which target `glmc generate BUILD_FOLDER` runs when --target is not given.
PREFERENCE = ("torch", "hf", "trtllm", "aoti", "onnx")
RUNNABLE = {"torch", "hf", "trtllm", "aoti", "onnx"}


@dataclass
class Artifact:
    backend: Backend
    folder: Path
    target: str
    dtype: str = "fp32"
    dtype_note: str = ""  # why --dtype auto chose `dtype`

    @property
    def spec(self) -> ModelSpec:
        return self.backend.spec


def open_artifact(
    path: str | Path,
    target: str | None = None,
    dtype: str = "fp32",
    compiled: bool = False,
    dequantize: bool = False,
) -> Artifact:
    """`dtype` ("fp32", "bf16" for the torch backend only: the exported graphs are fp32; "auto":
    bf16 where this machine computes it faster than fp32, see glmc.runtime.cpu) and
    `compiled` (the torch backend's fixed-shape steps under torch.compile) pick how it runs.
    A torch or checkpoint artifact with FP8 weights runs them as FP8 (glmc.from_pretrained)
    unless `dequantize`, which loads the plain model in `dtype` instead."""
    p = Path(path)
    if not p.is_dir():
        raise GlmcError(f"artifact folder not found: {p}")
    if (p / BUILD_FILE).is_file():
        return _open_build(p, target, dtype, compiled, dequantize)
    found = _kind(p)
    if found is None:
        raise GlmcError(
            f"{p} is not a glmc artifact: expected {BUILD_FILE} (a build folder), {RUNTIME_FILE} (an onnx or "
            f"aoti target folder), {GLMC_SPEC_FILE} (a torch artifact) or config.json (a Hugging Face checkpoint)"
        )
    if target is not None and target != found:
        raise GlmcError(f"{p} holds a {found} artifact, not {target}")
    return _open(p, found, dtype, compiled, dequantize)


def _open_build(p: Path, target: str | None, dtype: str, compiled: bool, dequantize: bool) -> Artifact:
    present = [t for t in PREFERENCE if (p / t).is_dir()]
    if target is not None:
        if target not in RUNNABLE:
            raise GlmcError(f"--target {target}: generate runs {', '.join(sorted(RUNNABLE))}")
        if target not in present:
            raise GlmcError(f"{p} has no {target}/ folder (it has: {', '.join(present) or 'none'})")
        return _open(p / target, target, dtype, compiled, dequantize)
    if not present:
        raise GlmcError(f"build folder {p} has no runnable target folder ({', '.join(PREFERENCE)})")
    return _open(p / present[0], present[0], dtype, compiled, dequantize)


def _kind(p: Path) -> str | None:
    if (p / RUNTIME_FILE).is_file():
        return str(read_runtime_manifest(p)["target"])
    if (p / GLMC_SPEC_FILE).is_file():
        return "torch"
    if (p / "config.json").is_file():
        return "hf"
    return None


def read_runtime_manifest(p: Path) -> dict[str, Any]:
    """`glmc_runtime.json` of target folder `p`, checked for the keys a backend needs."""
    try:
        data: dict[str, Any] = json.loads((p / RUNTIME_FILE).read_text())
        for key in ("target", "files", "spec"):
            data[key]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p / RUNTIME_FILE}: unreadable or incomplete ({e})") from None
    return data


def _open(
    p: Path, target: str, dtype: str = "fp32", compiled: bool = False, dequantize: bool = False
) -> Artifact:
    if dtype not in ("auto", "fp32", "bf16"):
        raise GlmcError(f"--dtype must be auto, fp32 or bf16 (got {dtype!r})")
    note = ""
    if target in ("torch", "hf", "trtllm"):
        import torch

        from glmc.api import from_pretrained
        from glmc.runtime.cpu import fast_bf16

        if dtype == "auto":
            fast, why = fast_bf16("cpu")
            dtype, note = ("bf16" if fast else "fp32"), why
        model = from_pretrained(
            p, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, dequantize=dequantize
        )
        backend = TorchBackend(model, model.spec, compiled=compiled)  # type: ignore[arg-type]
        return Artifact(backend, p, target, dtype, note)
    if dtype == "auto":
        dtype, note = "fp32", f"the {target} artifact is compiled for fp32"
    if dtype != "fp32":
        raise GlmcError(
            f"--dtype {dtype}: the {target} artifact is compiled for fp32; use --dtype fp32 or auto"
        )
    if compiled:
        raise GlmcError(
            f"--compile applies to the torch backend; the {target} artifact is compiled ahead of time"
        )
    if dequantize:
        raise GlmcError(
            f"--dequantize applies to torch and checkpoint artifacts; the {target} artifact's weights are "
            "fixed when it is built (build it without quantize-fp8 instead)"
        )
    if target not in RUNNABLE:
        raise GlmcError(
            f"{p} is a {target} artifact, which generate cannot run here (it runs {', '.join(sorted(RUNNABLE))})"
        )
    m = read_runtime_manifest(p)
    spec = ModelSpec.from_dict(m["spec"], source=str(p / RUNTIME_FILE))
    files: dict[str, str] = m["files"]
    missing = [f for f in files.values() if not (p / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{p}: the {target} artifact is missing {', '.join(missing)} (listed in {RUNTIME_FILE})"
        )
    if target == "onnx":
        from glmc.runtime.backend_onnx import OnnxBackend

        try:
            return Artifact(OnnxBackend(p, spec, files), p, target, dtype, note)
        except ModuleNotFoundError:
            raise GlmcError("running an onnx artifact needs onnxruntime: pip install 'glmc[onnx]'") from None
    from glmc.runtime.backend_aoti import AotiBackend

    return Artifact(AotiBackend(p, spec, files), p, target, dtype, note)
