"""What a command's arguments name: a spec (preset, spec file, config.json or checkpoint folder)
and a weight dtype. Spec-side only: no torch, so the API, `glmc convert` and the commands share
it without importing one another."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from glmc import presets
from glmc.errors import GlmcError, SpecError
from glmc.export.target import GLMC_SPEC_FILE
from glmc.ir import DType
from glmc.spec import ModelSpec

# The dtypes a model's weights are built, loaded or written in (FP8 comes only from a pass).
WEIGHT_DTYPES = (DType.BF16, DType.F16, DType.F32)


def resolve_spec(spec: ModelSpec | str | Path | dict[str, Any]) -> ModelSpec:
    """A ModelSpec from a spec object, a dict, a preset name, a YAML/JSON spec file, a Hugging
    Face config.json, or a checkpoint folder (glmc's or Hugging Face's)."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict):
        return ModelSpec.from_hf_config(spec) if "model_type" in spec else ModelSpec.from_dict(spec)
    text = str(spec)
    if text in presets.names():
        return presets.get(text)
    p = Path(text)
    if p.is_dir():
        if (p / GLMC_SPEC_FILE).is_file():
            return ModelSpec.from_file(p / GLMC_SPEC_FILE)
        if (p / "config.json").is_file():
            return ModelSpec.from_hf_config(p)
        raise SpecError(f"{p}: folder has neither {GLMC_SPEC_FILE} nor config.json")
    if p.is_file():
        return ModelSpec.from_file(p)
    raise SpecError(
        f"{text!r} is not a preset ({', '.join(presets.names())}), a spec file or a checkpoint folder"
    )


def trunk_only_without_mtp(spec: ModelSpec, names: Iterable[str], where: Path, action: str) -> ModelSpec:
    """`spec` without MTP layers when checkpoint `names` hold none of them (transformers never
    saves MTP weights, so such a checkpoint is the trunk alone); warns when it drops them."""
    prefix = f"model.layers.{spec.num_layers}."
    if spec.num_mtp_layers and not any(k.startswith(prefix) for k in names):
        warnings.warn(
            f"{where}: config.json declares {spec.num_mtp_layers} MTP layer(s) but the checkpoint has no "
            f"{prefix}* tensors; {action} without MTP layers",
            stacklevel=3,
        )
        return spec.model_copy(update={"num_mtp_layers": 0})
    return spec


def weight_dtype(name: str) -> DType:
    """The IR dtype a `--dtype` argument names (bf16, f16 or f32, with their long spellings)."""
    try:
        dt = DType.parse(name)
    except ValueError:
        dt = None
    if dt is None or dt not in WEIGHT_DTYPES:
        raise GlmcError(f"unsupported dtype {name!r}; use bf16, f16 or f32")
    return dt
