"""Whether this machine computes bf16 faster than fp32: the deciding fact for `--dtype auto`.

On x86 CPUs, torch's bf16 GEMMs (oneDNN) run on native bf16 instructions only with
AVX512-BF16 or AMX-BF16; without them bf16 is converted to fp32 around every kernel and runs
slower than fp32. `torch.backends.cpu.get_cpu_capability()` reports "AVX512" on CPUs with and
without AVX512-BF16, so the CPU's own feature flags decide (Linux: /proc/cpuinfo).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def fast_bf16(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(whether bf16 is the fast dtype on `device`, a short reason for the console)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA bf16" if ok else "this GPU has no bf16"
    found = [f for f in BF16_FLAGS if f in cpu_flags()]
    if found:
        return True, f"the CPU has {found[0].upper().replace('_', '-')}"
    capability = torch.backends.cpu.get_cpu_capability()
    return (
        False,
        f"the CPU has no AVX512-BF16 or AMX-BF16 (torch reports {capability}), so bf16 would run slower",
    )
