"""Pass infrastructure: pipeline text -> frozen pass objects; unknown passes, bad arguments and
bad orders rejected with messages naming them; the IR verified after every pass."""

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import pytest

from glmc import presets
from glmc.ir import Graph, Op, VerifyError
from glmc.lower import lower
from glmc.passes import FuseMoE, Pass, QuantizeFP8, Shard, registry
from glmc.pipeline import PipelineError, build, parse, run_passes, run_pipeline


def test_parse_builds_frozen_typed_passes() -> None:
    passes = build("fuse-moe, shard{ep=8,tp=2,pp=1,dp=4,kv_replication=false}, quantize-fp8{recipe=channel}")
    assert [type(p) for p in passes] == [FuseMoE, Shard, QuantizeFP8]
    shard = passes[1]
    assert isinstance(shard, Shard) and (shard.ep, shard.tp, shard.dp, shard.kv_replication) == (
        8,
        2,
        4,
        False,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        shard.ep = 2  # type: ignore[misc]
    assert [p.spelling() for p in passes] == [
        "fuse-moe",
        "shard{dp=4,tp=2,ep=8,kv_replication=false}",
        "quantize-fp8{recipe=channel}",
    ]
    # spelling() is pipeline text: it parses back to the same passes
    assert build(",".join(p.spelling() for p in passes)) == passes


def test_empty_pipeline_is_no_passes() -> None:
    assert build("") == [] and parse("  ") == []


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("fuse-everything", ["unknown pass 'fuse-everything'", "fuse-moe", "quantize-fp8", "shard"]),
        ("shard{ep=two}", ["shard", "ep='two'", "int"]),
        ("shard{ep=0}", ["shard", "ep must be a positive integer"]),
        ("shard{kv_replication=maybe}", ["kv_replication='maybe'", "bool"]),
        ("shard{experts=4}", ["shard has no argument 'experts'", "ep"]),
        ("shard{ep=2,ep=4}", ["argument ep is given twice"]),
        ("shard{ep}", ["'ep' is not key=value"]),
        ("quantize-fp8{recipe=block64}", ["recipe='block64'", "block128, channel"]),
        ("shard{balance=memory}", ["balance='memory'", "flops, params"]),
        ("quantize-fp8,fuse-moe", ["quantize-fp8 must come after fuse-moe"]),
        ("shard,fuse-moe", ["shard must come after fuse-moe"]),
        ("quantize-fp8,shard", ["quantize-fp8 must come after shard"]),
        ("fuse-moe,fuse-moe", ["fuse-moe appears twice"]),
        ("fuse-moe;shard", ["cannot parse pipeline"]),
    ],
)
def test_bad_pipelines_are_rejected_with_a_message(text: str, needles: list[str]) -> None:
    with pytest.raises(PipelineError) as e:
        build(text)
    for n in needles:
        assert n in str(e.value)


def test_registry_names_match_files_and_are_kebab_case() -> None:
    for name, cls in registry().items():
        assert cls.name == name and name == name.lower() and "_" not in name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Breaks(Pass):
    name: ClassVar[str] = "breaks"

    def apply(self, graph: Graph) -> Graph:
        nodes = [n for n in graph.nodes if n.op is not Op.EMBED]  # leaves dangling inputs
        return graph.replace_nodes(nodes)


def test_ir_is_verified_after_every_pass() -> None:
    g = lower(presets.get("glm-tiny"))
    with pytest.raises(VerifyError, match=r"model\.embed_tokens is not defined"):
        run_passes(g, [FuseMoE(), _Breaks()])


def test_runner_records_provenance_and_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    import glmc.pipeline

    # A fake clock the runner reads before a pass, after it and after its verification: the
    # records must hold the differences (not timestamps), apply and verify each in its field.
    ticks = iter([100.0, 102.0, 105.0, 110.0, 113.0, 120.0])
    monkeypatch.setattr(glmc.pipeline, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    seen = []
    graph = lower(presets.get("glm-tiny"))
    g = run_pipeline(graph, "fuse-moe,shard{ep=2}", lambda p, g, r: seen.append(r))
    assert g.attrs.passes == ("fuse-moe", "shard{ep=2}")
    assert [r.spelling for r in seen] == ["fuse-moe", "shard{ep=2}"]
    assert seen[0].nodes_before == len(graph.nodes) == 47 and seen[0].nodes_after < 47
    assert seen[1].nodes_before == seen[0].nodes_after and seen[1].nodes_after == len(g.nodes)
    assert [(r.seconds, r.verify_seconds) for r in seen] == [(2.0, 3.0), (3.0, 7.0)]


def test_passes_are_pure() -> None:
    g = lower(presets.get("glm-tiny"))
    before = g.nodes
    run_pipeline(g, "fuse-moe,shard{ep=2,tp=2},quantize-fp8{recipe=channel}")
    assert g.nodes is before and g == lower(presets.get("glm-tiny"))
