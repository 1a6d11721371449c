"""The parallel plan and the process groups it implies. The plan IS the shard pass's mesh.

One meaning of each degree everywhere (the shard pass, `glmc inspect`, `glmc train`, the
TensorRT-LLM options): the mesh is `pp x dp x ep x tp`, outermost first, and the world size is
their product. `ep` splits the routed experts and is a data-parallel axis for every other weight
(DeepSeek-V3/GLM "DP attention + EP", torchtitan's "parallel folding"), so a step reads
`dp x ep` distinct micro-batches, dense weights are replicated (FSDP2: sharded) over `dp x ep`
and expert slices over `dp`. `--dp/--ep/--tp/--pp` are shorthands that append
`shard{dp=..,ep=..,tp=..,pp=..}` to the pipeline (`plan_pipeline`), so every plan is read from
the passed graph (`ParallelPlan.from_graph`); the divisibility rules and the check against the
launch live in the pass (`glmc.passes.shard`).

Launching: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; without them the run
is a single process. gloo on CPU, NCCL on GPU, the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from glmc.errors import GlmcError
from glmc.ir import Graph

MESH_AXES = ("pp", "dp", "ep", "tp")


@dataclass(frozen=True)
class ParallelPlan:
    """The graph's mesh: pp stages x dp replicas x ep expert ranks x tp tensor ranks."""

    dp: int = 1  # replicas of every weight (experts included); a data-parallel axis
    ep: int = 1  # expert ranks; also a data-parallel axis for non-expert weights
    tp: int = 1  # tensor parallel: heads, MLP/expert columns, vocabulary
    pp: int = 1  # pipeline stages
    stages: tuple[tuple[int, int], ...] = ()  # the pass's (first, last) trunk layer of each stage

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.ep * self.tp

    @property
    def data_parallel(self) -> int:
        """Ranks reading distinct data (and over which FSDP2 shards dense weights): dp x ep."""
        return self.dp * self.ep

    @property
    def edp(self) -> int:
        """Replicas of each expert slice."""
        return self.dp

    def describe(self) -> str:
        return f"pp={self.pp} dp={self.dp} ep={self.ep} tp={self.tp}"

    @classmethod
    def from_graph(cls, g: Graph) -> ParallelPlan:
        """The shard pass's mesh on `g` (all 1 when no shard pass ran)."""
        from glmc.ir import mesh_of

        m = mesh_of(g)
        stages = g.attrs.pp_stages
        return cls(dp=m["dp"], ep=m["ep"], tp=m["tp"], pp=m["pp"], stages=stages)


def plan_pipeline(
    pipeline: str | None, *, dp: int | None, ep: int, tp: int, pp: int, world: int
) -> str | None:
    """The pipeline text training runs: `pipeline` as given when it holds a shard pass (then the
    shorthands must be unset or agree with it), else with `shard{dp,ep,tp,pp}` appended from the
    shorthands (`dp` defaults to world / (ep * tp * pp)); unchanged on one process without any."""
    from glmc.pipeline import build

    passes = build(pipeline) if pipeline else []
    shard = next((p for p in passes if p.name == "shard"), None)
    if shard is not None:
        have = {k: int(getattr(shard, k)) for k in ("dp", "ep", "tp", "pp")}
        given = {"ep": ep, "tp": tp, "pp": pp} | ({"dp": dp} if dp is not None else {})
        # ep/tp/pp default to 1: only a value other than 1 is a request.
        clash = [f"--{k} {v}" for k, v in given.items() if v != have[k] and (k == "dp" or v != 1)]
        if clash:
            raise GlmcError(
                f"{', '.join(clash)} disagree with the pipeline's shard pass "
                f"(dp={have['dp']} ep={have['ep']} tp={have['tp']} pp={have['pp']}); give one or the other"
            )
        return pipeline
    if dp is None and ep == tp == pp == 1 and world == 1:
        return pipeline
    if dp is None:
        dp = max(1, world // max(1, ep * tp * pp))
    shard_text = f"shard{{dp={dp},ep={ep},tp={tp},pp={pp}}}"
    return f"{pipeline},{shard_text}" if pipeline else shard_text


@dataclass
class Dist:
    """This process's place in the run: its coordinates on the graph's mesh (pp, dp, ep, tp;
    row-major, tp innermost) and the groups and sub-meshes the placements use. Groups are None
    on one process; a size-1 axis still has its (one-rank) group and sub-mesh."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    plan: ParallelPlan
    mesh: Any = None  # DeviceMesh (pp, dp, ep, tp) over the whole world
    coords: dict[str, int] | None = None  # this rank's index along each mesh axis
    data_mesh: Any = None  # DeviceMesh "dp_ep": the data-parallel ranks of this (pp, tp) (FSDP2)
    tp_mesh: Any = None
    ep_mesh: Any = None
    pp_group: dist.ProcessGroup | None = None  # this rank's pipeline: the pp stages of its (dp, ep, tp)
    dp_group: dist.ProcessGroup | None = None  # data-parallel ranks (dp x ep) of this (pp, tp)
    ep_group: dist.ProcessGroup | None = None  # expert ranks of this (pp, dp, tp)
    edp_group: dist.ProcessGroup | None = None  # the dp replicas of this rank's expert slice
    tp_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def coord(self, axis: str) -> int:
        return (self.coords or {}).get(axis, 0)

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.coord("pp")

    @property
    def stage(self) -> tuple[int, int] | None:
        """(first, last) trunk layer of this rank's stage, as the shard pass balanced them."""
        return self.plan.stages[self.pp_rank] if self.plan.stages else None

    @property
    def dp_rank(self) -> int:
        """Which of the dp x ep data shards this rank reads (its tp ranks read the same)."""
        return self.coord("dp") * self.plan.ep + self.coord("ep")

    @property
    def ep_rank(self) -> int:
        return self.coord("ep")

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def world_from_env() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup(plan: ParallelPlan) -> Dist:
    """Join the process group and build the (pp, dp, ep, tp) mesh. The plan was checked
    against the launch by the shard pass (`glmc.passes.shard.check_launch`) before this."""
    rank, world, local_rank = world_from_env()
    if plan.world != world:  # callers run check_launch first; this guards direct use
        raise GlmcError(
            f"parallel plan {plan.describe()} needs {plan.world} processes, the launch has {world}"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            # Ranks sharing a CPU must not oversubscribe it: OpenMP spin-waits collapse throughput.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    d = Dist(rank, world, local_rank, device, plan)
    if world == 1:
        return d
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (plan.pp, plan.dp, plan.ep, plan.tp), mesh_dim_names=MESH_AXES)
    coord = mesh.get_coordinate()
    assert coord is not None
    d.mesh, d.coords = mesh, dict(zip(MESH_AXES, coord, strict=True))
    d.data_mesh = mesh["dp", "ep"]._flatten("dp_ep")
    d.tp_mesh, d.ep_mesh = mesh["tp"], mesh["ep"]

    def group(axis: str, size: int) -> dist.ProcessGroup | None:
        return mesh.get_group(axis) if size > 1 else None

    d.pp_group = group("pp", plan.pp)
    d.ep_group = group("ep", plan.ep)
    d.edp_group = group("dp", plan.dp)
    d.tp_group = group("tp", plan.tp)
    d.dp_group = d.data_mesh.get_group() if plan.data_parallel > 1 else None
    return d


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
