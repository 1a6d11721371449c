"""Element types the IR knows, with their storage size and their safetensors / torch names.

This is glmc's one dtype table: the IR name, the element size, the `dtype` string of a
safetensors header and the torch dtype's name (`getattr(torch, name)`; the IR stays
torch-free). Every reader and writer of tensors derives its mapping from `DType`.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class DType(Enum):
    F64 = "f64"
    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"
    F8E4M3 = "f8e4m3"
    F8E5M2 = "f8e5m2"
    I64 = "i64"
    I32 = "i32"
    # Not weight dtypes: training checkpoints store RNG states and step counters in them.
    I16 = "i16"
    I8 = "i8"
    U8 = "u8"
    BOOL = "bool"

    @property
    def itemsize(self) -> int:
        return _TABLE[self].itemsize

    @property
    def safetensors(self) -> str:
        """The `dtype` string of a safetensors header (`BF16`, `F8_E4M3`)."""
        return _TABLE[self].safetensors

    @property
    def torch_name(self) -> str:
        """The torch dtype's attribute name (`bfloat16`, `float8_e4m3fn`)."""
        return _TABLE[self].torch

    @property
    def is_float8(self) -> bool:
        return self in (DType.F8E4M3, DType.F8E5M2)

    @property
    def is_float(self) -> bool:
        """A floating dtype that a plain cast converts into the other such dtypes (FP8 needs
        its scales, so it is not one)."""
        return self in (DType.F64, DType.F32, DType.BF16, DType.F16)

    @classmethod
    def parse(cls, text: str) -> DType:
        key = text.lower().removeprefix("torch.")
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(d.value for d in cls)
            raise ValueError(f"unknown dtype {text!r}; known: {known}") from None

    @classmethod
    def from_safetensors(cls, name: str) -> DType | None:
        """The DType of a safetensors header's `dtype` string; None for one glmc does not read."""
        return _BY_SAFETENSORS.get(name)

    def __str__(self) -> str:
        return self.value


class _Info(NamedTuple):
    itemsize: int
    safetensors: str
    torch: str


_TABLE = {
    DType.F64: _Info(8, "F64", "float64"),
    DType.F32: _Info(4, "F32", "float32"),
    DType.BF16: _Info(2, "BF16", "bfloat16"),
    DType.F16: _Info(2, "F16", "float16"),
    DType.F8E4M3: _Info(1, "F8_E4M3", "float8_e4m3fn"),
    DType.F8E5M2: _Info(1, "F8_E5M2", "float8_e5m2"),
    DType.I64: _Info(8, "I64", "int64"),
    DType.I32: _Info(4, "I32", "int32"),
    DType.I16: _Info(2, "I16", "int16"),
    DType.I8: _Info(1, "I8", "int8"),
    DType.U8: _Info(1, "U8", "uint8"),
    DType.BOOL: _Info(1, "BOOL", "bool"),
}
_BY_SAFETENSORS = {info.safetensors: d for d, info in _TABLE.items()}

# Spellings users and configs write: the torch names, plus a few common short forms.
_ALIASES = {info.torch: d.value for d, info in _TABLE.items()} | {
    "fp32": "f32",
    "float": "f32",
    "fp16": "f16",
    "half": "f16",
    "fp8": "f8e4m3",
    "e4m3": "f8e4m3",
}
