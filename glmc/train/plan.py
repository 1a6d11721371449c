"""The parallel plan (dp, ep, tp, pp) and the process groups it implies.

The plan comes from the shard pass when the pipeline ran one (`plan_from_graph`), else from the
`--dp/--ep` options. EP borrows from the data-parallel ranks, as torchtitan and Megatron's
"parallel folding" do (reference/training-stack.md §2.5): every data-parallel rank reads its own
data; the EP group of a rank is the `ep` consecutive data-parallel ranks it belongs to; expert
weights are replicated over the `dp / ep` EP groups ("edp").

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


@dataclass(frozen=True)
class ParallelPlan:
    dp: int = 1  # data-parallel ranks (distinct data; FSDP shards dense weights over them)
    ep: int = 1  # expert-parallel ranks within dp
    tp: int = 1  # tensor parallel: attention heads and dense/shared MLP columns over the tp ranks
    pp: int = 1  # pipeline parallel; only 1 is implemented

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def edp(self) -> int:
        """Replicas of each expert shard (data-parallel groups of the experts)."""
        return self.dp // self.ep

    def check(
        self,
        world_size: int,
        num_experts: int | None,
        num_kv_heads: int | None = None,
        mlp_sizes: dict[str, int] | None = None,
    ) -> None:
        """Raise GlmcError unless this plan fits `world_size` processes and the model."""
        where = f"parallel plan dp={self.dp} ep={self.ep} tp={self.tp} pp={self.pp}"
        if min(self.dp, self.ep, self.tp, self.pp) < 1:
            raise GlmcError(f"{where}: every degree must be >= 1")
        if self.world != world_size:
            raise GlmcError(
                f"{where} needs dp*tp*pp = {self.world} processes but the launch has {world_size} "
                f"(torchrun --nproc_per_node / WORLD_SIZE); change the plan or the launch"
            )
        if self.dp % self.ep:
            raise GlmcError(
                f"{where}: ep={self.ep} must divide dp={self.dp} (EP borrows data-parallel ranks)"
            )
        if self.pp > 1:
            raise GlmcError(f"{where}: pipeline parallel training is not implemented yet; use pp=1")
        if self.tp > 1:
            if self.ep > 1:
                raise GlmcError(
                    f"{where}: tensor parallel together with expert parallel is not implemented; "
                    f"use --tp with ep=1 or --ep with tp=1"
                )
            if num_kv_heads is not None and num_kv_heads % self.tp:
                raise GlmcError(
                    f"{where}: the model's {num_kv_heads} KV heads do not split evenly over --tp {self.tp} "
                    f"(tensor parallel gives each rank whole query and KV heads)"
                )
            for what, size in (mlp_sizes or {}).items():
                if size % self.tp:
                    raise GlmcError(
                        f"{where}: the {what} intermediate size {size} does not split evenly over --tp {self.tp} "
                        f"(tensor parallel splits the dense and shared MLPs by columns)"
                    )
        if self.ep > 1:
            if not num_experts:
                raise GlmcError(f"{where}: ep > 1 but the model has no routed experts")
            if num_experts % self.ep:
                raise GlmcError(
                    f"{where}: the model's {num_experts} experts do not split evenly over ep={self.ep}"
                )


def plan_from_graph(g: Graph) -> ParallelPlan | None:
    """The plan the shard pass (`shard{dp,ep,tp,pp}`) recorded as the graph's `mesh` attribute,
    or None when no shard pass ran. The pass's mesh is pp x dp x ep x tp with `ep` also a
    data-parallel axis for dense weights, so its data-parallel ranks number dp*ep and its `dp`
    is this plan's edp (replicas of each expert shard)."""
    if g.attr("mesh", None) is None:
        return None
    from glmc.ir import mesh_of

    m = mesh_of(g)
    return ParallelPlan(dp=m["dp"] * m["ep"], ep=m["ep"], tp=m["tp"], pp=m["pp"])


@dataclass
class Dist:
    """This process's place in the run, and its groups (None when the group has one rank)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    plan: ParallelPlan
    ep_group: dist.ProcessGroup | None = None
    edp_group: dist.ProcessGroup | None = None
    dp_mesh: Any = None  # DeviceMesh over the data-parallel ranks (FSDP)
    tp_mesh: Any = None  # DeviceMesh over this rank's tensor-parallel group (tp > 1)
    dp_group: dist.ProcessGroup | None = None  # data-parallel ranks of this tp index (tp > 1)
    tp_group: dist.ProcessGroup | None = None
    ep_mesh: Any = None  # DeviceMesh (edp, ep): expert weights replicate over edp, shard over ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.plan.tp  # mesh (dp, tp): consecutive ranks form a tp group

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def world_from_env() -> tuple[int, int, int]:
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup(
    plan: ParallelPlan,
    num_experts: int | None,
    num_kv_heads: int | None = None,
    mlp_sizes: dict[str, int] | None = None,
) -> Dist:
    """Check the plan against the launch, then join the process group and build the groups."""
    rank, world, local_rank = world_from_env()
    plan.check(world, num_experts, num_kv_heads, mlp_sizes)
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

    if plan.tp > 1:
        # (dp, tp), tp innermost; FSDP2 and tensor parallel compose over slices of one root mesh.
        root = init_device_mesh(device.type, (plan.dp, plan.tp), mesh_dim_names=("dp", "tp"))
        d.dp_mesh, d.tp_mesh = root["dp"], root["tp"]
        d.tp_group = d.tp_mesh.get_group()
        if plan.dp > 1:
            d.dp_group = d.dp_mesh.get_group()
        return d
    d.dp_mesh = init_device_mesh(device.type, (plan.dp,), mesh_dim_names=("dp",))
    # (edp, ep) layout: consecutive ranks share an EP group.
    mesh = init_device_mesh(device.type, (plan.edp, plan.ep), mesh_dim_names=("edp", "ep"))
    d.ep_mesh = mesh
    if plan.ep > 1:
        d.ep_group = mesh.get_group("ep")
    if plan.edp > 1 and plan.ep > 1:
        d.edp_group = mesh.get_group("edp")
    return d


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
