"""Element types the IR knows, with their storage size and their safetensors / torch names."""

from __future__ import annotations

from enum import Enum


class DType(Enum):
    F64 = "f64"
    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"
    F8E4M3 = "f8e4m3"
    F8E5M2 = "f8e5m2"
    I64 = "i64"
    I32 = "i32"

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self]

    @property
    def is_float8(self) -> bool:
        return self in (DType.F8E4M3, DType.F8E5M2)

    @classmethod
    def parse(cls, text: str) -> DType:
        key = text.lower().removeprefix("torch.")
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(d.value for d in cls)
            raise ValueError(f"unknown dtype {text!r}; known: {known}") from None

    def __str__(self) -> str:
        return self.value


_ITEMSIZE = {
    DType.F64: 8,
    DType.F32: 4,
    DType.BF16: 2,
    DType.F16: 2,
    DType.F8E4M3: 1,
    DType.F8E5M2: 1,
    DType.I64: 8,
    DType.I32: 4,
}

_ALIASES = {
    "float64": "f64",
    "float32": "f32",
    "fp32": "f32",
    "float": "f32",
    "bfloat16": "bf16",
    "float16": "f16",
    "fp16": "f16",
    "half": "f16",
    "float8_e4m3fn": "f8e4m3",
    "fp8": "f8e4m3",
    "e4m3": "f8e4m3",
    "float8_e5m2": "f8e5m2",
    "int64": "i64",
    "int32": "i32",
}
