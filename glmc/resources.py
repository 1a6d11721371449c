"""Memory guard: refuse a command whose model cannot fit in this machine's memory, before it
allocates anything.

Without it, `glmc build glm-4.5` on a 24 GB machine (or a spec with a huge hidden size)
allocates tensor by tensor until the kernel kills the process, minutes later and without a
message. The IR knows every tensor's size, so the bytes a command will hold are computed from
the lowered graph (`glmc.ir.weight_bytes`) and compared with what the machine can give:
`MemAvailable` from /proc/meminfo, or less where a cgroup (container) limit leaves less.

Estimates (measured: `glmc build` of a 1.40 GB bf16 model peaked at 2.63 GB RSS; this module
says 2.74 GB):

- a model built or loaded whole (build with random init or with --weights, which reads the
  checkpoint through `from_pretrained`): its weights at the build dtype, plus the temporaries of
  initialising the largest tensor (normal draws are made in fp32, then cast and scaled), plus
  `BASELINE_BYTES` for the interpreter, torch and the libraries;
- training, per process: the fp32 model every rank builds whole before it is sharded, plus
  gradients and AdamW's two states (12 bytes per parameter) split over the ranks at best, plus
  the baseline, times the processes on this host; activations not counted. A lower bound.

`GLMC_SKIP_MEMORY_CHECK=1` turns the guard off (for a machine with swap, or an estimate that is
wrong for it); on a system without /proc/meminfo it does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from glmc.errors import GlmcError
from glmc.ir import DType, Graph, weight_bytes
from glmc.spec import ModelSpec

BASELINE_BYTES = 512 * 2**20
SKIP_ENV = "GLMC_SKIP_MEMORY_CHECK"


def available_bytes() -> int | None:
    """What this process can still allocate: MemAvailable, capped by a cgroup v2/v1 limit."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    avail = None
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
            break
    if avail is None:
        return None
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = Path(limit_file).read_text().strip(), Path(usage_file).read_text().strip()
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit():
            avail = min(avail, max(0, int(limit) - int(usage)))
    return avail


def model_bytes(graph: Graph) -> tuple[int, int]:
    """(weights, init temporaries) of a torch model of `graph` at the graph's dtype: every
    tensor the model holds, and fp32 draws plus a cast copy of its largest tensor."""
    item = graph.attrs.dtype.itemsize
    largest = max((p.numel for _, _, p in graph.params() if p.tied_to is None), default=0)
    return weight_bytes(graph), largest * (4 + item)


def check_model(
    spec: ModelSpec, dtype: str, what: str, weights: str | Path | None = None, graph: Graph | None = None
) -> None:
    """Refuse (GlmcError, exit 2) when a `dtype` torch model of `spec`, built whole in this
    process (random init, or loaded from `weights`), does not fit in available memory. `graph`:
    the model's graph when the caller compiled it already (else compiled here)."""
    from glmc.pipeline import compile_graph

    held, temp = model_bytes(graph if graph is not None else compile_graph(spec, dtype=dtype))
    how = (
        "read whole from the checkpoint; `glmc convert` streams one tensor at a time instead"
        if weights is not None
        else "held whole while initialised"
    )
    require(
        held + temp + BASELINE_BYTES,
        f"{what}: {spec.name} needs about {_size(held + temp + BASELINE_BYTES)} of memory "
        f"({_size(held)} of {DType.parse(dtype)} weights, {how})",
        "`glmc inspect SPEC` shows its sizes, with --pipeline 'shard{...}' per rank",
    )


def check_training(spec: ModelSpec, world: int = 1) -> None:
    """Refuse training that cannot fit: each process on this host (LOCAL_WORLD_SIZE, as torchrun
    sets it; `world` without it) builds the fp32 model whole, and holds at least its 1/`world`
    share of gradients and AdamW states."""
    from glmc.pipeline import compile_graph

    try:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        local_world = world

    held, temp = model_bytes(compile_graph(spec, dtype="f32"))
    per_process = held + temp + 3 * held // max(world, 1) + BASELINE_BYTES
    need = per_process * max(local_world, 1)
    require(
        need,
        f"glmc train: {spec.name} needs at least {_size(need)} of memory ({_size(held)} of fp32 weights "
        f"built by each of {local_world} process(es) on this host, plus gradients and AdamW states; "
        "activations not counted)",
        "`glmc inspect SPEC --pipeline 'shard{...}'` shows per-rank training memory for a plan",
    )


def require(needed: int, what: str, how_to_proceed: str) -> None:
    """Raise GlmcError naming `what` and the figures when `needed` bytes exceed what is available."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    avail = available_bytes()
    if avail is None or needed <= avail:
        return
    raise GlmcError(
        f"{what}, but this machine has {_size(avail)} available; {how_to_proceed}, or use a machine "
        f"with more memory ({SKIP_ENV}=1 skips this check)"
    )


def _size(n: int) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:,} bytes"
