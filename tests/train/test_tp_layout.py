"""Tensor parallel really splits what the shard pass says: over 2 gloo ranks, attention heads,
the dense / shared MLPs' columns and the vocabulary (embedding, head) are DTensor shards, the
routed experts hold their tp columns (expert-TP), and the sharded model's logits equal the
unsharded model's."""

from __future__ import annotations

import traceback
from typing import Any

from ._dist import Rendezvous, join_world, spawn


def _worker(rank: int, world: int, rdv: Rendezvous, queue: Any) -> None:
    join_world(rank, world, rdv)
    import copy

    import torch
    from torch.distributed.tensor import DTensor, Shard

    from glmc import presets
    from glmc.api import build_torch
    from glmc.export.torch.ep import ShardedExperts
    from glmc.pipeline import compile_graph
    from glmc.train.parallel import parallelize
    from glmc.train.plan import ParallelPlan, setup, teardown

    spec = presets.get("glm-tiny")
    graph = compile_graph(spec, "shard{tp=2}")
    d = setup(ParallelPlan.from_graph(graph))
    try:
        lm = build_torch(spec, dtype=torch.float32, seed=0)
        ref = copy.deepcopy(lm)
        parallelize(lm, graph, d, compile=False, activation_checkpoint=False, fsdp=False)
        dense, moe = lm.model.layers[0].mlp, lm.model.layers[1].mlp
        checks = {
            "q_proj": lm.model.layers[0].self_attn.q_proj.weight,
            "dense gate_proj": dense.gate_proj.weight,
            "dense down_proj": dense.down_proj.weight,
            "shared up_proj": moe.shared_experts.up_proj.weight,
            "mtp shared down_proj": lm.model.mtp[0].mlp.shared_experts.down_proj.weight,
            "embed_tokens": lm.model.embed_tokens.weight,
            "lm_head": lm.lm_head.weight,
        }
        want = {"dense down_proj": 1, "mtp shared down_proj": 1}
        layout = {}
        for name, w in checks.items():
            assert isinstance(w, DTensor), name
            layout[name] = (
                w.placements == (Shard(want.get(name, 0)),),
                tuple(w.to_local().shape),
                tuple(w.shape),
            )
        experts = moe.experts
        assert isinstance(experts, ShardedExperts)
        # Every expert, each with half of its intermediate columns: gate_up [8, 2*32/2, 64], down [8, 64, 16].
        layout["routed"] = (
            (tuple(experts.gate_up_proj.shape), tuple(experts.down_proj.shape)) == ((8, 32, 64), (8, 64, 16)),
            (1,),
            (2,),
        )
        ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (lm(ids) - ref(ids)).abs().max().item()
        queue.put((rank, "ok", layout, diff))
    except BaseException as e:
        queue.put((rank, "error", f"{type(e).__name__}: {e}", traceback.format_exc()))
        raise
    finally:
        teardown(d)


def test_tensor_parallel_shards_attention_and_mlps_and_keeps_logits():
    out = spawn(_worker, 2)
    assert sorted(out) == [0, 1], out
    for rank, (status, layout, diff) in out.items():
        assert status == "ok", f"rank {rank}: {layout}\n{diff}"
        for name, (placed, local, full) in layout.items():
            assert placed, (rank, name)
            dim = 1 if "down_proj" in name else 0
            assert local[dim] * 2 == full[dim], (rank, name, local, full)
        assert diff < 1e-5, (rank, diff)
