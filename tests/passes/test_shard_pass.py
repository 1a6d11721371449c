"""shard: placements for every parameter, explicit collectives, expert placement (contiguous and
load-aware with redundancy), balanced pipeline stages, and invalid plans refused by name."""

import itertools
import json
import os
import random
import re
from pathlib import Path

import pytest

from glmc import presets
from glmc.ir import CollectiveAttrs, Graph, Op, ParamRole, local_shape, mesh_of, shard_specs, stage_of, verify
from glmc.lower import lower
from glmc.passes import PassError
from glmc.passes._expert_placement import balanced, contiguous
from glmc.passes._pipeline_stages import balance
from glmc.pipeline import PipelineError, run_pipeline
from glmc.spec import ModelSpec


def _tiny(**update: object) -> ModelSpec:
    data = presets.get("glm-tiny").model_dump()
    for k, v in update.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    return ModelSpec.from_dict(data)


@pytest.fixture(scope="module")
def glm45() -> Graph:
    return lower(presets.get("glm-4.5"))


def test_issue_pipeline_on_glm45() -> None:
    """The GLM-4.5 spec through fuse-moe, shard (ep=64, pp=4, dp=2) and quantize-fp8, no weights.
    160 experts do not split 64 ways, so the plan needs 32 redundant experts (3 slots per rank).
    Its wall time is measured by bench/passes.py, not asserted here."""
    g = run_pipeline(
        lower(presets.get("glm-4.5")), "fuse-moe,shard{ep=64,pp=4,dp=2,redundant_experts=32},quantize-fp8"
    )
    assert mesh_of(g) == {"pp": 4, "dp": 2, "ep": 64, "tp": 1} and g.attrs.ep_slots == 3
    assert len(g.find(Op.SEND_RECV)) == 3 and len(g.find(Op.ALL_TO_ALL)) == 2 * 90
    # every one of the 160 + 32 slots of a layer is filled, each expert at least once
    expert = next(p for _, _, p in g.params() if p.role is ParamRole.EXPERT)
    index = next(s for s in shard_specs(expert) if s.axis == "ep").index
    assert [len(r) for r in index] == [3] * 64 and set().union(*map(set, index)) == set(range(160))


def test_issue_pipeline_literally_is_refused_with_the_way_out(glm45: Graph) -> None:
    with pytest.raises(PassError) as e:
        run_pipeline(glm45, "fuse-moe,shard{ep=64,pp=4,dp=2},quantize-fp8")
    msg = str(e.value)
    assert "ep=64 does not divide moe.num_experts=160" in msg and "redundant_experts=32" in msg
    assert "[1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 80, 160]" in msg


@pytest.mark.parametrize(
    ("spec", "pipeline", "needle"),
    [
        ("glm-4.5", "shard{ep=3}", "ep=3 does not divide moe.num_experts=160"),
        ("glm-4.5", "shard{tp=16,kv_replication=false}", "tp=16 exceeds attention.num_kv_heads=8"),
        ("glm-4.5", "shard{tp=12}", "tp=12 exceeds attention.num_kv_heads=8 but is not a multiple"),
        ("glm-4.5", "shard{tp=64}", "tp=64 does not divide attention.num_heads=96"),
        ("glm-4.5", "shard{pp=93}", "pp=93 exceeds num_layers=92"),
        ("glm-4.5", "shard{redundant_experts=8}", "set ep > 1"),
        ("glm-4.5", "shard{ep=2,redundant_experts=161}", "redundant_experts=161 exceeds"),
        (
            "glm-4.5",
            "shard{ep=4,redundant_experts=2}",
            "ep=4 does not divide moe.num_experts=160 + redundant_experts=2",
        ),
        ("odd-mlp", "shard{tp=2}", "tp=2 does not divide mlp.intermediate_size=129"),
        ("odd-vocab", "shard{tp=2}", "tp=2 does not divide vocab_size=513"),
        ("dense", "shard{ep=2}", "need MoE layers"),
    ],
)
def test_invalid_plans_are_refused_naming_the_argument(spec: str, pipeline: str, needle: str) -> None:
    specs = {
        "odd-mlp": lambda: _tiny(mlp={"intermediate_size": 129}),
        "odd-vocab": lambda: _tiny(vocab_size=513),
        "dense": lambda: _tiny(num_dense_layers=3, num_mtp_layers=0, moe=None),
    }
    s = specs[spec]() if spec in specs else presets.get(spec)
    with pytest.raises((PassError, PipelineError)) as e:
        run_pipeline(lower(s), pipeline)
    assert needle in str(e.value)


def test_every_parameter_is_placed_consistently(glm45: Graph) -> None:
    g = run_pipeline(glm45, "fuse-moe,shard{ep=32,tp=4,pp=4,dp=2}")
    mesh = mesh_of(g)
    assert all(n.attrs.stage is not None for n in g.nodes)
    for fqn, _, p in g.params():
        axes = [s.axis for s in shard_specs(p)]
        if p.role.value == "expert":
            assert axes == ["ep", "tp"], fqn
        local = local_shape(p, mesh, {"ep": 1, "tp": 3})
        assert all(a <= b for a, b in zip(local, p.shape, strict=True)), fqn
    att = g.node("model.layers.5.self_attn")
    # 96 heads, 8 KV heads over tp=4: 24 q heads and 2 KV heads per rank
    assert local_shape(att.param("qkv_proj.weight"), mesh, {"tp": 1}) == ((24 + 2 * 2) * 128, 5120)
    assert local_shape(att.param("o_proj.weight"), mesh, {"tp": 1}) == (5120, 24 * 128)
    moe = g.node("model.layers.5.mlp")
    assert local_shape(moe.param("experts.gate_up_proj"), mesh, {"ep": 7, "tp": 2}) == (5, 2 * 384, 5120)


def test_kv_heads_replicate_above_their_count(glm45: Graph) -> None:
    g = run_pipeline(glm45, "shard{tp=16}")
    att = g.node("model.layers.0.self_attn")
    k = att.param("k_proj.weight")
    (spec,) = shard_specs(k)
    assert spec.replicas == (2,)
    # ranks 2r and 2r + 1 hold KV head r, whole
    assert [spec.absolute_ranges(16, r) for r in (4, 5)] == [[(256, 384)], [(256, 384)]]
    assert local_shape(k, mesh_of(g), {"tp": 5}) == (128, 5120)


def test_collectives_are_explicit(glm45: Graph) -> None:
    g = run_pipeline(glm45, "fuse-moe,shard{ep=8,tp=2}")
    kinds = [
        (n.op, CollectiveAttrs.of(n).axis, CollectiveAttrs.of(n).kind)
        for n in g.nodes
        if n.op.value in ("all_reduce", "all_to_all", "all_gather")
    ]
    n_att, n_moe = 93, 90
    assert kinds.count((Op.ALL_TO_ALL, "ep", "dispatch")) == n_moe
    assert kinds.count((Op.ALL_TO_ALL, "ep", "combine")) == n_moe
    # attention + every MLP/MoE output + the two vocab-parallel embeddings
    assert kinds.count((Op.ALL_REDUCE, "tp", "sum")) == n_att + 93 + 2
    assert kinds.count((Op.ALL_GATHER, "tp", "vocab")) == 2
    moe = g.node("model.layers.10.mlp")
    assert moe.inputs == ("model.layers.10.post_attention_layernorm", "model.layers.10.mlp.dispatch")


def test_contiguous_and_load_aware_expert_placement(tmp_path: Path) -> None:
    assert contiguous(8, 4) == ((0, 1), (2, 3), (4, 5), (6, 7))
    rng = random.Random(0)
    loads = [rng.expovariate(1.0) * (20 if e in (3, 11) else 1) for e in range(16)]
    for redundant in (0, 4):
        plan = balanced(loads, 4, redundant)
        assert all(len(r) == (16 + redundant) // 4 for r in plan)
        assert all(len(set(r)) == len(r) for r in plan)  # never two copies on one rank
        assert {e for r in plan for e in r} == set(range(16))
    copies = {e: sum(e in r for r in balanced(loads, 4, 4)) for e in range(16)}

    def worst(plan: tuple[tuple[int, ...], ...]) -> float:
        n = {e: sum(e in r for r in plan) for e in range(16)}
        return max(sum(loads[e] / n[e] for e in r) for r in plan)

    assert copies[3] > 1 and copies[11] > 1  # the hot experts got replicas
    assert worst(balanced(loads, 4, 4)) < worst(balanced(loads, 4, 0)) < worst(contiguous(16, 4))
    hist = tmp_path / "load.json"
    hist.write_text(json.dumps({"1": [1, 1, 1, 1, 1, 1, 50, 40], "default": [1] * 8}))
    g = run_pipeline(lower(presets.get("glm-tiny")), f"fuse-moe,shard{{ep=2,expert_load={hist}}}")
    (spec,) = shard_specs(g.node("model.layers.1.mlp").param("experts.down_proj"))
    assert sorted(spec.index[0] + spec.index[1]) == list(range(8))
    assert (6 in spec.index[0]) != (7 in spec.index[0])  # the two hot experts on different ranks
    verify(g)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("[1, 2, 3]", "must list 8 counts"),
        ('{"0": [1, 1, 1, 1, 1, 1, 1, 1]}', "layer '0', which is not an MoE layer"),
        ("[1, 1, 1, 1, 1, 1, 1, -1]", "counts must be finite and >= 0"),
        ("not json", "cannot read expert_load"),
    ],
)
def test_bad_expert_load_files_are_named(tmp_path: Path, content: str, needle: str) -> None:
    hist = tmp_path / "load.json"
    hist.write_text(content)
    with pytest.raises(PassError) as e:
        run_pipeline(lower(presets.get("glm-tiny")), f"shard{{ep=2,expert_load={hist}}}")
    assert needle in str(e.value) and "expert_load" in str(e.value)


def test_stage_balance_is_optimal_against_brute_force() -> None:
    rng = random.Random(1)
    for _ in range(200):
        n, pp = rng.randint(1, 9), rng.randint(1, 5)
        if pp > n:
            continue
        costs = [rng.randint(1, 50) for _ in range(n)]
        got = balance(costs, pp)
        assert got[0][0] == 0 and got[-1][1] == n - 1 and len(got) == pp
        assert all(b >= a and got[i + 1][0] == b + 1 for i, (a, b) in enumerate(got[:-1]))
        best = min(
            max(sum(costs[a:b]) for a, b in itertools.pairwise((0, *cut, n)))
            for cut in itertools.combinations(range(1, n), pp - 1)
        )
        assert max(sum(costs[a : b + 1]) for a, b in got) == best


@pytest.mark.parametrize("balance_by", ["flops", "params"])
def test_stages_cover_the_model_and_carry_embedding_and_head(glm45: Graph, balance_by: str) -> None:
    g = run_pipeline(glm45, f"fuse-moe,shard{{pp=4,ep=8,balance={balance_by}}}")
    stages = g.attrs.pp_stages
    assert stages[0][0] == 0 and stages[-1][1] == 91 and len(stages) == 4
    assert stage_of(g.node("model.embed_tokens")) == 0
    assert {stage_of(g.node(n)) for n in ("lm_head", "model.norm", "model.mtp.0.mlp")} == {3}
    # The last stage also runs the head and the MTP layer, so it gets fewer trunk layers.
    sizes = [b - a + 1 for a, b in stages]
    assert sizes[-1] < max(sizes[:-1])


@pytest.mark.parametrize(
    ("pipeline", "needle"),
    [
        # the plan glmc's own divisibility message used to suggest for ep=10^9: it hung
        ("shard{ep=1000000000,redundant_experts=999999992}", "1000000000 ranks exceeds 1048576"),
        ("shard{ep=1024,dp=1024,tp=2}", "2097152 ranks exceeds 1048576"),
        ("shard{ep=2,redundant_experts=70000}", "redundant_experts=70000 exceeds 65536"),
        ("shard{ep=16384,redundant_experts=65536}", "65544 expert slots per layer exceeds 65536"),
        ("shard{seq_len=2000000000}", "seq_len=2000000000 exceeds"),
        ("shard{ep=99999999999999999999}", "ep='99999999999999999999' is not a valid int"),
        ("shard{ep=1_000}", "is not a valid int"),
    ],
)
def test_absurd_plans_are_refused_by_name(pipeline: str, needle: str) -> None:
    with pytest.raises((PassError, PipelineError)) as e:
        run_pipeline(lower(presets.get("glm-tiny")), pipeline)
    assert needle in str(e.value)


@pytest.mark.parametrize("ep", [3, 3000, 65536, 100_000])
def test_the_divisibility_message_suggests_only_plans_that_are_accepted(ep: int) -> None:
    """The suggested redundant_experts, when there is one, is a plan the pass then applies."""
    with pytest.raises((PassError, PipelineError)) as e:
        run_pipeline(lower(presets.get("glm-tiny")), f"shard{{ep={ep}}}")
    msg = str(e.value)
    assert len(msg) < 300
    suggested = re.search(r"redundant_experts=(\d+)", msg)
    if 8 + (-8 % ep) <= 65536:  # glm-tiny's 8 experts padded to a multiple of ep fit the slot bound
        assert suggested is not None
        g = run_pipeline(lower(presets.get("glm-tiny")), f"shard{{ep={ep},redundant_experts={suggested[1]}}}")
        assert g.attrs.ep_slots == -(-8 // ep)
    else:
        assert suggested is None


def test_many_ranks_with_one_slot_each_are_placed() -> None:
    """8 experts over 3000 ranks: 2992 replicas, one slot per rank, every expert on 375 ranks."""
    g = run_pipeline(lower(presets.get("glm-tiny")), "shard{ep=3000,redundant_experts=2992}")
    expert = next(p for _, _, p in g.params() if p.role is ParamRole.EXPERT)
    index = next(s for s in shard_specs(expert) if s.axis == "ep").index
    assert all(len(r) == 1 for r in index) and len(index) == 3000
    assert [sum(r[0] == e for r in index) for e in range(8)] == [375] * 8


def _greedy_by_scan(loads: list[float], ep: int, redundant: int) -> tuple[tuple[int, ...], ...]:
    """The placement rule of passes/_expert_placement.py written as plain scans (quadratic),
    as the pass computed it before it used heaps."""
    n = len(loads)
    replicas = [1] * n
    for _ in range(redundant):
        e = max((i for i in range(n) if replicas[i] < ep), key=lambda i: (loads[i] / replicas[i], -i))
        replicas[e] += 1
    items = sorted(
        ((loads[e] / replicas[e], e) for e in range(n) for _ in range(replicas[e])),
        key=lambda t: (-t[0], t[1]),
    )
    slots = (n + redundant) // ep
    bins: list[list[int]] = [[] for _ in range(ep)]
    weight = [0.0] * ep
    for w, e in items:
        free = [r for r in range(ep) if len(bins[r]) < slots and e not in bins[r]]
        r = min(free, key=lambda r: (weight[r], r))
        bins[r].append(e)
        weight[r] += w
    return tuple(tuple(sorted(b)) for b in bins)


def test_heap_placement_equals_the_plain_greedy() -> None:
    rng = random.Random(2)
    for _ in range(300):
        e, ep = rng.choice([2, 3, 5, 8, 12, 16]), rng.choice([2, 3, 4, 6, 8, 16])
        redundant = rng.randint(0, min(e * (ep - 1), 40))
        redundant += (-(e + redundant)) % ep
        if redundant > e * (ep - 1):
            continue
        loads = (
            [float(rng.randint(0, 4)) for _ in range(e)]
            if rng.random() < 0.5
            else [rng.random() for _ in range(e)]
        )
        assert balanced(loads, ep, redundant) == _greedy_by_scan(loads, ep, redundant)


@pytest.mark.parametrize(("make", "needle"), [("fifo", "not a regular file"), ("missing", "no such file")])
def test_expert_load_must_be_a_regular_file(tmp_path: Path, make: str, needle: str) -> None:
    path = tmp_path / "load.json"
    if make == "fifo":
        os.mkfifo(path)  # reading it would block forever
    with pytest.raises(PassError, match=needle):
        run_pipeline(lower(presets.get("glm-tiny")), f"shard{{ep=2,expert_load={path}}}")


def test_expert_maps_of_many_layers_are_bounded() -> None:
    """Slots x MoE layers bounds the expert maps the IR carries: 65536 slots in 200 layers are
    refused by name; the same slots in 64 layers are planned, every layer sharing one map."""
    many = _tiny(num_layers=200, moe={"num_experts": 65536})
    with pytest.raises(PassError, match="65536 expert slots x 200 MoE layers"):
        run_pipeline(lower(many), "shard{ep=65536}")
    g = run_pipeline(lower(_tiny(num_layers=64, moe={"num_experts": 65536})), "shard{ep=65536}")
    maps = {id(p.attrs.shard[0].index) for _, _, p in g.params() if p.role is ParamRole.EXPERT}
    assert len(maps) == 1  # the encoded map itself, not just equal copies
