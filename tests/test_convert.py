"""Streaming weight conversion: round trips bit for bit (HF -> fused -> HF), per-rank shards that
reassemble bit for bit, FP8 checkpoints in the formats serving stacks load, and the streaming
safetensors reader and writer underneath."""

from __future__ import annotations

import json
from pathlib import Path

import accelerate  # noqa: F401  (transformers' FP8 checkpoint loader needs it: a hard test dependency)
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from specs import WIDE  # tests/specs.py

import glmc
import glmc.api
from glmc import presets
from glmc.convert import convert
from glmc.export.hf import (
    DictCheckpoint,
    LogicalSource,
    Planned,
    StreamingCheckpoint,
    StreamingWriter,
    assemble,
    open_checkpoint,
    plan_checkpoint,
    produce,
    rank_dir,
    ranks,
)
from glmc.ir import CheckpointError, Graph
from glmc.lower import lower
from glmc.pipeline import run_pipeline
from glmc.spec import ModelSpec


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        assert torch.equal(got[k].view(torch.uint8), w.view(torch.uint8)), k


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """glm-tiny in bf16 with the router weight in fp32, as transformers 5.24 saves it."""
    path = tmp_path_factory.mktemp("ckpt") / "hf"
    model = glmc.api.build_torch(presets.get("glm-tiny"), dtype=torch.bfloat16, seed=3)
    glmc.save_pretrained(model, path)
    t = load_file(str(path / "model.safetensors"))
    for k in [k for k in t if k.endswith("mlp.gate.weight")]:
        t[k] = t[k].float()
    for k in t:  # fresh random bits everywhere (norms, biases and router bias are constant at init)
        t[k] = torch.randn(t[k].shape, generator=torch.Generator().manual_seed(len(k))).to(t[k].dtype)
    from safetensors.torch import save_file

    save_file(t, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wide") / "hf"
    glmc.save_pretrained(glmc.api.build_torch(ModelSpec.from_dict(WIDE), dtype=torch.bfloat16, seed=5), path)
    return path


# ---- round trips ------------------------------------------------------------------------------


def test_hf_to_fused_to_hf_is_bit_exact(tiny_ckpt: Path, tmp_path: Path) -> None:
    r = convert(tiny_ckpt, tmp_path / "fused", "fuse-moe", max_shard_bytes=300_000)
    assert r["weight_layout"] == "fused" and (tmp_path / "fused" / "model.safetensors.index.json").is_file()
    fused = _tensors(tmp_path / "fused")
    assert fused["model.layers.1.mlp.experts.gate_up_proj"].shape == (8, 64, 64)
    assert fused["model.layers.0.self_attn.qkv_proj.weight"].shape == (256, 64)
    assert fused["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # dtypes pass through
    assert not any(".experts.0." in k or "q_proj" in k for k in fused)
    convert(tmp_path / "fused", tmp_path / "back")
    _assert_same(_tensors(tmp_path / "back"), _tensors(tiny_ckpt))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["n_routed_experts"] == 8


def test_fused_experts_match_transformers_in_memory_layout(tiny_ckpt: Path, tmp_path: Path) -> None:
    """transformers 5 stacks experts as gate_up_proj [E, 2I, H], gate rows first: the same tensor."""
    convert(tiny_ckpt, tmp_path / "fused", "fuse-moe")
    fused = _tensors(tmp_path / "fused")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.bfloat16)
    experts = hf.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj.data, fused["model.layers.1.mlp.experts.gate_up_proj"])
    assert torch.equal(experts.down_proj.data, fused["model.layers.1.mlp.experts.down_proj"])


def test_in_memory_transform_and_inverse(tiny_ckpt: Path) -> None:
    hf = _tensors(tiny_ckpt)
    plain = lower(presets.get("glm-tiny"))
    fused_graph = run_pipeline(plain, "fuse-moe")
    src = LogicalSource(DictCheckpoint(hf), plan_checkpoint(plain), None)
    fused = {}
    for t in plan_checkpoint(fused_graph):
        for name, tensor in produce(t, src, hf[t.pieces[0].source].dtype):
            fused[name] = tensor
    back = LogicalSource(DictCheckpoint(fused), plan_checkpoint(fused_graph), None)
    _assert_same({k: back[k] for k in back}, hf)


def test_missing_mtp_copies_are_filled_from_their_owners(tiny_ckpt: Path, tmp_path: Path) -> None:
    t = _tensors(tiny_ckpt)
    for k in ("model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"):
        del t[k]
    src = tmp_path / "no-copies"
    src.mkdir()
    from safetensors.torch import save_file

    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    convert(src, tmp_path / "out", "fuse-moe")
    out = _tensors(tmp_path / "out")
    assert torch.equal(out["model.layers.3.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(out["model.layers.3.shared_head.head.weight"], t["lm_head.weight"])


# ---- per-rank shards ----------------------------------------------------------------------------


def _assembled(out: Path) -> dict[str, torch.Tensor]:
    manifest = json.loads((out / "glmc_convert.json").read_text())
    graph = _graph_of(out)
    assert [r["dir"] for r in manifest["ranks"]] == [rank_dir(c) for c in ranks(graph) if c is not None]

    def reader(d: str):  # type: ignore[no-untyped-def]
        ckpt = open_checkpoint(out / d)
        return lambda name: ckpt[name]

    return assemble(graph, {r["dir"]: reader(r["dir"]) for r in manifest["ranks"]})


def _graph_of(out: Path) -> Graph:
    manifest = json.loads((out / "glmc_convert.json").read_text())
    spec = ModelSpec.from_hf_config(out / "config.json")
    return run_pipeline(lower(spec, dtype="bf16"), manifest["pipeline"])


@pytest.mark.parametrize(
    ("pipeline", "n_ranks"),  # ranks with distinct weights: pp x ep x tp (dp replicas are copies)
    [
        ("fuse-moe,shard{ep=2,tp=2,pp=2}", 8),
        ("shard{ep=4}", 4),
        ("shard{ep=2,tp=4,pp=3}", 24),
        ("fuse-moe,shard{ep=4,redundant_experts=4}", 4),
    ],
)
def test_rank_shards_reassemble_bit_exact(
    tiny_ckpt: Path, tmp_path: Path, pipeline: str, n_ranks: int
) -> None:
    out = tmp_path / "ranks"
    r = convert(tiny_ckpt, out, pipeline)
    manifest = json.loads((out / "glmc_convert.json").read_text())
    assert r["ranks"] == len(manifest["ranks"]) == n_ranks
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(m["dir"] for m in manifest["ranks"])
    _assert_same(_assembled(out), _tensors(tiny_ckpt))


def test_ep_ranks_hold_their_experts_under_global_names(tiny_ckpt: Path, tmp_path: Path) -> None:
    convert(tiny_ckpt, tmp_path / "ep", "shard{ep=4}")
    names = set(_tensors(tmp_path / "ep" / "pp0-ep1-tp0"))
    experts = {int(n.split(".")[5]) for n in names if ".mlp.experts." in n}
    assert experts == {2, 3}
    assert "model.layers.1.mlp.gate.weight" in names  # the router is replicated
    cfg = json.loads((tmp_path / "ep" / "config.json").read_text())
    assert cfg["n_routed_experts"] == 8  # config.json describes the whole model


@pytest.mark.parametrize(
    ("ckpt", "sharded", "whole"),
    [
        ("tiny", "fuse-moe,shard{ep=2,pp=2},quantize-fp8", "quantize-fp8"),
        ("tiny", "shard{ep=2,tp=2},quantize-fp8{recipe=channel}", "quantize-fp8{recipe=channel}"),
        ("wide", "fuse-moe,shard{ep=2,tp=2},quantize-fp8", "quantize-fp8"),
    ],
)
def test_fp8_rank_shards_reassemble_to_the_unsharded_conversion(
    tiny_ckpt: Path, wide_ckpt: Path, tmp_path: Path, ckpt: str, sharded: str, whole: str
) -> None:
    src = tiny_ckpt if ckpt == "tiny" else wide_ckpt
    convert(src, tmp_path / "ranks", sharded)
    convert(src, tmp_path / "whole", whole)
    _assert_same(_assembled(tmp_path / "ranks"), _tensors(tmp_path / "whole"))


# ---- FP8 formats --------------------------------------------------------------------------------


def test_block128_checkpoint_format(tiny_ckpt: Path, tmp_path: Path) -> None:
    convert(tiny_ckpt, tmp_path / "q", "quantize-fp8{serving=false}")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    q = cfg["quantization_config"]
    assert {k: q[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    for module in ("lm_head", "model.embed_tokens", "model.layers.1.mlp.gate", "model.layers.3.eh_proj",
                   "model.layers.3.shared_head.head"):  # fmt: skip
        assert module in q["modules_to_not_convert"]
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        dt = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
        shape = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    w = "model.layers.1.mlp.experts.5.up_proj.weight"
    assert dt[w] == "F8_E4M3" and dt[w + "_scale_inv"] == "F32" and shape[w + "_scale_inv"] == [1, 1]
    assert dt["model.layers.0.self_attn.q_proj.bias"] == "BF16"
    assert dt["model.layers.3.eh_proj.weight"] == "BF16" and dt["lm_head.weight"] == "BF16"
    assert dt["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"


def test_channel_checkpoint_format(tiny_ckpt: Path, tmp_path: Path) -> None:
    convert(tiny_ckpt, tmp_path / "c", "quantize-fp8{recipe=channel}")
    q = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    group = q["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True and "lm_head" in q["ignore"]
    t = _tensors(tmp_path / "c")
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert t["model.layers.0.mlp.down_proj.weight_scale"].shape == (64, 1)


def test_transformers_loads_the_block128_checkpoint(wide_ckpt: Path, tmp_path: Path) -> None:
    """transformers' FineGrainedFP8 dequantises on CPU: its logits equal glmc's from the same files."""
    convert(wide_ckpt, tmp_path / "q", "quantize-fp8")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = glmc.from_pretrained(tmp_path / "q", dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert (a - b).abs().max().item() < 1e-5 * a.abs().max().item() + 1e-6  # measured 3.6e-7


def test_from_pretrained_reads_fused_and_fp8_and_refuses_ranks(tiny_ckpt: Path, tmp_path: Path) -> None:
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    base = glmc.from_pretrained(tiny_ckpt)
    convert(tiny_ckpt, tmp_path / "fused", "fuse-moe")
    convert(tiny_ckpt, tmp_path / "q", "fuse-moe,quantize-fp8{recipe=channel}")
    with torch.no_grad():
        assert torch.equal(glmc.from_pretrained(tmp_path / "fused")(ids), base(ids))
        q = glmc.from_pretrained(tmp_path / "q")(ids)
        assert 0 < (q - base(ids)).abs().max() < 0.5 * base(ids).abs().max()
    convert(tiny_ckpt, tmp_path / "ranks", "shard{ep=2}")
    with pytest.raises(CheckpointError, match="per-rank shards"):
        glmc.from_pretrained(tmp_path / "ranks")


# ---- streaming I/O ------------------------------------------------------------------------------


def test_streaming_writer_and_reader(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "b": torch.randn(7, generator=gen),
        "c": torch.randn(4, 4, generator=gen).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
    }
    plan = [Planned(k, tuple(v.shape), {torch.bfloat16: "BF16", torch.float32: "F32",
                                        torch.float8_e4m3fn: "F8_E4M3"}[v.dtype]) for k, v in tensors.items()]  # fmt: skip
    w = StreamingWriter(tmp_path, plan, max_shard_bytes=40)
    with pytest.raises(ValueError, match="expected tensor a next"):
        w.write("b", tensors["b"])
    for k, v in tensors.items():
        w.write(k, v)
    files = w.finish()
    assert len(files) == 3 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = {}
    for f in files:  # the safetensors library reads what we wrote
        loaded.update(load_file(str(f)))
    _assert_same(loaded, tensors)
    with StreamingCheckpoint(tmp_path) as r:
        assert torch.equal(r.read_range("b", 2, 5), tensors["b"][2:5])
        assert torch.equal(r["a"], tensors["a"])
    w2 = StreamingWriter(tmp_path / "x", plan[:1], 10)
    with pytest.raises(ValueError, match="planned BF16"):
        w2.write("a", tensors["b"])


def test_checkpoint_without_mtp_weights_converts_the_trunk(tiny_ckpt: Path, tmp_path: Path) -> None:
    """transformers never saves MTP weights; such checkpoints convert (and load) as the trunk."""
    t = {k: v for k, v in _tensors(tiny_ckpt).items() if not k.startswith("model.layers.3.")}
    src = tmp_path / "trunk"
    src.mkdir()
    from safetensors.torch import save_file

    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text((tiny_ckpt / "config.json").read_text())
    with pytest.warns(UserWarning, match="converting without MTP layers"):
        glmc.api.convert(src, tmp_path / "out", "fuse-moe")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    convert(tmp_path / "out", tmp_path / "back")
    _assert_same(_tensors(tmp_path / "back"), t)


def test_build_with_a_weight_changing_pipeline_writes_that_layout(tmp_path: Path) -> None:
    glmc.api.build("glm-tiny", tmp_path / "b", pipeline="fuse-moe,quantize-fp8{recipe=channel}")
    manifest = json.loads((tmp_path / "b" / "hf" / "glmc_convert.json").read_text())
    assert manifest["weight_layout"] == "fused" and manifest["quantization"] == "channel"
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = glmc.from_pretrained(tmp_path / "b" / "hf")(ids)
        b = glmc.from_pretrained(tmp_path / "b" / "torch")(ids)
    # Both artifacts follow the one passed graph: the torch artifact keeps the channel-FP8 weights
    # the hf folder holds, so the two models compute the same logits.
    with safe_open(str(tmp_path / "b" / "torch" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert "F8_E4M3" in dtypes, dtypes
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
