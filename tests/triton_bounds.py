"""A bounds checker for Triton's CPU interpreter: every load, store and atomic of an interpreted
kernel must stay inside the tensors (views, not whole storages) passed to that launch.

On a GPU an out-of-bounds access is caught by `compute-sanitizer`; under `TRITON_INTERPRET=1` the
interpreter dereferences raw host addresses, so a wrong mask silently reads or overwrites
whatever lives next to the tensor (allocator metadata, another op's registration data). With
`install()` such an access raises `TritonOutOfBoundsError` *before* it happens, naming the kernel,
the operation, the number of offending lanes and the nearest argument.

The test suite installs it whenever the interpreter is active (tests/conftest.py); outside
pytest: `sys.path.insert(0, "tests"); import triton_bounds; triton_bounds.install()`;
`GLMC_TRITON_BOUNDS=0` turns it off.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np


class TritonOutOfBoundsError(AssertionError):
    pass


@dataclass(frozen=True)
class _Region:
    name: str
    start: int
    end: int  # exclusive


_state = threading.local()
_installed = False


def _regions() -> list[tuple[str, list[_Region]]]:
    if not hasattr(_state, "stack"):
        _state.stack = []
    return _state.stack  # type: ignore[no-any-return]


def _collect(name: str, arg: Any, out: list[_Region]) -> None:
    from triton.runtime.interpreter import _unwrap_tensor
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(arg, tuple):
        for i, a in enumerate(arg):
            _collect(f"{name}[{i}]", a, out)
    elif isinstance(arg, TensorDescriptor):
        _collect(name, arg.base, out)
    elif hasattr(arg, "data_ptr") and hasattr(arg, "untyped_storage"):
        t = _unwrap_tensor(arg)
        if t.numel() == 0:
            return
        # The view's own extent, not its storage's: a kernel given x[:5] must not touch x[5:].
        # (torch strides are never negative, so the view spans [data_ptr, data_ptr + last + 1).)
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
        out.append(_Region(name, t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()))


def _check(op: str, ptrs: Any, mask: Any, elem_bytes: int) -> None:
    stack = _regions()
    if not stack:
        return
    kernel, regions = stack[-1]
    addr = np.asarray(ptrs.data).astype(np.uint64)
    if mask is not None:
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        addr = addr[active]
    addr = addr.reshape(-1)
    if addr.size == 0:
        return
    ok = np.zeros(addr.shape, dtype=bool)
    for r in regions:
        ok |= (addr >= r.start) & (addr + elem_bytes <= r.end)
    if ok.all():
        return
    bad = addr[~ok]
    first = int(bad[0])
    nearest = min(regions, key=lambda r: min(abs(first - r.start), abs(first - r.end)), default=None)
    where = ""
    if nearest is not None:
        if first < nearest.start:
            where = f"; {nearest.start - first} bytes before argument {nearest.name!r}"
        else:
            where = f"; {first + elem_bytes - nearest.end} bytes past the end of argument {nearest.name!r}"
    raise TritonOutOfBoundsError(
        f"Triton kernel {kernel!r}: {op} touches {bad.size} address(es) outside every tensor argument "
        f"(first at {first:#x}{where})"
    )


def _elem_bytes(ptrs: Any) -> int:
    return max(1, int(ptrs.get_element_ty().primitive_bitwidth) // 8)


def installed() -> bool:
    return _installed


def install() -> None:
    """Patch the interpreter in place (idempotent)."""
    global _installed
    if _installed:
        return
    from triton.runtime import interpreter as itp

    builder_cls = itp.InterpreterBuilder
    load, store = builder_cls.create_masked_load, builder_cls.create_masked_store
    rmw, cas = builder_cls.create_atomic_rmw, builder_cls.create_atomic_cas

    def masked_load(self: Any, ptrs: Any, mask: Any, *a: Any, **k: Any) -> Any:
        _check("load", ptrs, mask, _elem_bytes(ptrs))
        return load(self, ptrs, mask, *a, **k)

    def masked_store(self: Any, ptrs: Any, value: Any, mask: Any, *a: Any, **k: Any) -> Any:
        _check("store", ptrs, mask, _elem_bytes(ptrs))
        return store(self, ptrs, value, mask, *a, **k)

    def atomic_rmw(self: Any, op: Any, ptr: Any, val: Any, mask: Any, *a: Any, **k: Any) -> Any:
        _check(f"atomic {op}", ptr, mask, _elem_bytes(ptr))
        return rmw(self, op, ptr, val, mask, *a, **k)

    def atomic_cas(self: Any, ptr: Any, cmp: Any, val: Any, *a: Any, **k: Any) -> Any:
        _check("atomic cas", ptr, None, _elem_bytes(ptr))
        return cas(self, ptr, cmp, val, *a, **k)

    builder_cls.create_masked_load = masked_load
    builder_cls.create_masked_store = masked_store
    builder_cls.create_atomic_rmw = atomic_rmw
    builder_cls.create_atomic_cas = atomic_cas

    call = itp.GridExecutor.__call__

    def guarded_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        regions: list[_Region] = []
        names = list(self.arg_names)
        for i, a in enumerate(args):
            _collect(names[i] if i < len(names) else f"arg{i}", a, regions)
        for k, v in kwargs.items():
            _collect(k, v, regions)
        stack = _regions()
        stack.append((getattr(self.fn, "__name__", str(self.fn)), regions))
        try:
            return call(self, *args, **kwargs)
        finally:
            stack.pop()

    itp.GridExecutor.__call__ = guarded_call
    _installed = True
