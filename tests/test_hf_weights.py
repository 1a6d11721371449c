"""The Hugging Face weight layout: glmc <-> HF round trips, safetensors I/O, validation errors, and
agreement with what transformers' Glm4MoeForCausalLM saves and loads."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glmc import presets
from glmc.export.hf import (
    INDEX_FILE,
    SINGLE_FILE,
    TORCH_DTYPES,
    from_hf,
    hf_tensor_layout,
    open_checkpoint,
    to_hf,
    write_checkpoint,
)
from glmc.ir import CheckpointError, Graph
from glmc.ir.naming import hf_layer, hf_name, ir_name
from glmc.lower import lower
from glmc.spec import ModelSpec


def random_state(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fresh random in-memory state dict: every untied IR parameter, in its IR dtype."""
    gen = torch.Generator().manual_seed(seed)
    return {
        fqn: torch.randn(p.shape, generator=gen, dtype=torch.float32).to(TORCH_DTYPES[p.dtype])
        for fqn, _, p in graph.params()
        if p.tied_to is None
    }


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype, k
        assert torch.equal(got[k], w), k


@pytest.fixture(scope="module")
def tiny() -> Graph:
    return lower(presets.get("glm-tiny"))


def tiny_spec(**update: object) -> ModelSpec:
    return ModelSpec.from_dict({**presets.get("glm-tiny").model_dump(), **update})


# ---- layout and round trips -------------------------------------------------------------------


def test_round_trip_in_memory_is_bit_exact(tiny: Graph) -> None:
    state = random_state(tiny)
    hf = dict(to_hf(tiny, state))
    assert list(hf) == list(hf_tensor_layout(tiny))
    assert_same_state(from_hf(tiny, hf), state)


def test_to_hf_matches_layout_and_splits_experts(tiny: Graph) -> None:
    state = random_state(tiny)
    layout = hf_tensor_layout(tiny)
    hf = dict(to_hf(tiny, state))
    for name, t in hf.items():
        shape, dt = layout[name]
        assert tuple(t.shape) == shape and t.is_contiguous(), name
        assert dt == {torch.bfloat16: "BF16", torch.float32: "F32"}[t.dtype], name
    assert hf["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    gate_up = state["model.layers.2.mlp.experts.gate_up_proj"]  # [E, 2I, H], gate rows first
    inter = gate_up.shape[1] // 2
    assert torch.equal(hf["model.layers.2.mlp.experts.5.gate_proj.weight"], gate_up[5, :inter])
    assert torch.equal(hf["model.layers.2.mlp.experts.5.up_proj.weight"], gate_up[5, inter:])
    assert torch.equal(
        hf["model.layers.2.mlp.experts.7.down_proj.weight"], state["model.layers.2.mlp.experts.down_proj"][7]
    )
    assert not any(".experts.gate_up_proj" in n or n.startswith("model.mtp.") for n in hf)


def test_to_hf_reads_a_non_contiguous_state(tiny: Graph) -> None:
    state = random_state(tiny)
    # Same values, column-major storage: experts are cut from these as from contiguous ones.
    strided = {k: v.mT.contiguous().mT if v.dim() >= 2 else v for k, v in state.items()}
    assert not strided["model.layers.2.mlp.experts.gate_up_proj"].is_contiguous()
    want = dict(to_hf(tiny, state))
    got = dict(to_hf(tiny, strided))
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].is_contiguous() and torch.equal(got[k], w), k


def test_mtp_layer_is_renamed_and_carries_copies(tiny: Graph) -> None:
    state = random_state(tiny)
    hf = dict(to_hf(tiny, state))
    n = tiny.attrs.num_layers
    assert torch.equal(hf[f"model.layers.{n}.eh_proj.weight"], state["model.mtp.0.eh_proj.weight"])
    for copy, main in (
        ("embed_tokens.weight", "model.embed_tokens.weight"),
        ("shared_head.head.weight", "lm_head.weight"),
    ):
        t = hf[f"model.layers.{n}.{copy}"]
        assert torch.equal(t, state[main])
        assert t.untyped_storage().data_ptr() != state[main].untyped_storage().data_ptr()  # a real copy
    assert not any(k.startswith(f"model.layers.{n + 1}.") for k in hf)


def test_mtp_naming_rule_and_its_inverse(tiny: Graph) -> None:
    n = tiny.attrs.num_layers
    for fqn, _, _ in tiny.params():
        assert ir_name(hf_name(fqn, n), n) == fqn
    assert hf_name("model.mtp.0.eh_proj.weight", n) == f"model.layers.{n}.eh_proj.weight"
    assert hf_name("model.mtp.1", n) == f"model.layers.{n + 1}"
    assert hf_name("model.mtp_x.0", n) == "model.mtp_x.0"
    assert ir_name(f"model.layers.{n - 1}.mlp.gate.weight", n) == f"model.layers.{n - 1}.mlp.gate.weight"
    assert hf_layer("model.layers.12.x") == 12 and hf_layer("model.layers.1x.y") == -1
    assert hf_layer("lm_head.weight") == -1


def test_layout_counts_match_the_released_models() -> None:
    # reference/glm45-architecture.md §2.1: tensors and parameters including the MTP layer and its copies.
    for name, tensors, params in (
        ("glm-4.5", 44_691, 358_337_791_296),
        ("glm-4.5-air", 18_329, 110_468_824_832),
    ):
        layout = hf_tensor_layout(lower(presets.get(name)))
        assert len(layout) == tensors
        assert sum(math.prod(s) for s, _ in layout.values()) == params
        assert layout["model.layers.3.mlp.gate.e_score_correction_bias"][1] == "F32"


def test_tied_embeddings_omit_lm_head() -> None:
    g = lower(tiny_spec(tie_word_embeddings=True))
    layout = hf_tensor_layout(g)
    assert "lm_head.weight" not in layout
    state = random_state(g)
    assert "lm_head.weight" not in state
    hf = dict(to_hf(g, state))
    n = g.attrs.num_layers
    # With a tied head, the MTP head copy is a copy of the embedding.
    assert torch.equal(hf[f"model.layers.{n}.shared_head.head.weight"], state["model.embed_tokens.weight"])
    assert_same_state(from_hf(g, hf), state)


def test_from_hf_casts_but_keeps_router_bias_fp32(tiny: Graph) -> None:
    state = random_state(tiny)
    got = from_hf(tiny, dict(to_hf(tiny, state)), dtype=torch.float32)
    for k, w in state.items():
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], w.float()), k
    g32 = lower(presets.get("glm-tiny"), dtype="f32")
    got16 = from_hf(g32, dict(to_hf(g32, random_state(g32))), dtype=torch.bfloat16)
    assert got16["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert got16["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16


def test_mtp_copies_may_be_absent(tiny: Graph) -> None:
    # GLM-4.6 ships no MTP embed/head copies; the main tensors are used.
    state = random_state(tiny)
    n = tiny.attrs.num_layers
    hf = {
        k: v
        for k, v in to_hf(tiny, state)
        if k not in {f"model.layers.{n}.embed_tokens.weight", f"model.layers.{n}.shared_head.head.weight"}
    }
    assert_same_state(from_hf(tiny, hf), state)


# ---- safetensors I/O --------------------------------------------------------------------------


def test_single_shard_write_and_read(tiny: Graph, tmp_path: Path) -> None:
    state = random_state(tiny, seed=1)
    files = write_checkpoint(to_hf(tiny, state), tmp_path)
    assert files == [str(tmp_path / SINGLE_FILE)]
    assert not (tmp_path / INDEX_FILE).exists()
    with safe_open(files[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_slice("model.layers.1.mlp.gate.e_score_correction_bias").get_dtype() == "F32"
    with open_checkpoint(tmp_path) as ckpt:
        assert set(ckpt.keys()) == set(hf_tensor_layout(tiny))
        assert_same_state(from_hf(tiny, ckpt), state)


def test_sharded_write_has_index_and_reads_back(tiny: Graph, tmp_path: Path) -> None:
    state = random_state(tiny, seed=2)
    files = write_checkpoint(to_hf(tiny, state), tmp_path, max_shard_bytes=64 * 1024)
    n = len(files)
    assert n > 2
    assert [Path(f).name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    layout = hf_tensor_layout(tiny)
    assert set(index["weight_map"]) == set(layout)
    assert set(index["weight_map"].values()) == {Path(f).name for f in files}
    assert index["metadata"]["total_size"] == sum(
        math.prod(s) * {"BF16": 2, "F32": 4}[dt] for s, dt in layout.values()
    )
    assert not (tmp_path / SINGLE_FILE).exists()
    assert not list(tmp_path.glob(".*partial"))
    with open_checkpoint(tmp_path) as ckpt:
        assert ckpt.file_of("model.norm.weight") == str(tmp_path / index["weight_map"]["model.norm.weight"])
        assert_same_state(from_hf(tiny, ckpt), state)


def test_rewrite_replaces_an_earlier_checkpoint(tiny: Graph, tmp_path: Path) -> None:
    write_checkpoint(to_hf(tiny, random_state(tiny, seed=3)), tmp_path, max_shard_bytes=64 * 1024)
    state = random_state(tiny, seed=4)
    write_checkpoint(to_hf(tiny, state), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    with open_checkpoint(tmp_path) as ckpt:
        assert_same_state(from_hf(tiny, ckpt), state)


def test_writer_copies_aliased_tensors(tmp_path: Path) -> None:
    a = torch.randn(4, 8)
    write_checkpoint([("a", a), ("b", a), ("c", a[1])], tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        assert torch.equal(ckpt["b"], a) and torch.equal(ckpt["c"], a[1])


def test_failed_write_leaves_no_partial_files(tiny: Graph, tmp_path: Path) -> None:
    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        yield from list(to_hf(tiny, random_state(tiny)))[:40]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(stream(), tmp_path, max_shard_bytes=16 * 1024)
    assert list(tmp_path.iterdir()) == []


# ---- validation errors ------------------------------------------------------------------------


def test_missing_tensors_are_named(tiny: Graph) -> None:
    hf = dict(to_hf(tiny, random_state(tiny)))
    del hf["model.layers.1.mlp.experts.3.up_proj.weight"]
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"
    ):
        from_hf(tiny, hf)
    for k in [k for k in hf if k.startswith("model.layers.2.")]:
        del hf[k]
    with pytest.raises(CheckpointError, match=r"missing \d+ tensor\(s\): (\S+, ){4}\S+ and \d+ more"):
        from_hf(tiny, hf)


def test_unexpected_tensors_are_named(tiny: Graph) -> None:
    hf = dict(to_hf(tiny, random_state(tiny)))
    n = tiny.attrs.num_layers + tiny.attrs.num_mtp_layers
    hf[f"model.layers.{n}.enorm.weight"] = torch.randn(64)
    hf["model.layers.1.mlp.experts.8.gate_proj.weight"] = torch.randn(32, 64)
    with pytest.raises(
        CheckpointError, match=rf"2 unexpected tensor\(s\): model\.layers\.{n}\.enorm\.weight, "
    ):
        from_hf(tiny, hf)


def test_checkpoint_with_mtp_for_spec_without_is_rejected_with_hint() -> None:
    with_mtp = lower(presets.get("glm-tiny"))
    without = lower(tiny_spec(num_mtp_layers=0))
    hf = dict(to_hf(with_mtp, random_state(with_mtp)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.3\..*num_mtp_layers=0"):
        from_hf(without, hf)


def test_wrong_shape_names_tensor_and_file(tiny: Graph, tmp_path: Path) -> None:
    hf = dict(to_hf(tiny, random_state(tiny)))
    hf["model.layers.1.self_attn.q_proj.weight"] = torch.randn(64, 64).bfloat16()
    write_checkpoint(hf.items(), tmp_path, max_shard_bytes=64 * 1024)
    with open_checkpoint(tmp_path) as ckpt:
        file = ckpt.file_of("model.layers.1.self_attn.q_proj.weight")
        msg = f"model.layers.1.self_attn.q_proj.weight has shape [64, 64] in {file}, expected [128, 64]"
        with pytest.raises(CheckpointError) as e:
            from_hf(tiny, ckpt)
        assert str(e.value) == msg
        assert Path(file).name.startswith("model-0")


def test_wrong_shape_of_an_mtp_copy_is_rejected(tiny: Graph) -> None:
    hf = dict(to_hf(tiny, random_state(tiny)))
    hf["model.layers.3.embed_tokens.weight"] = torch.randn(511, 64).bfloat16()
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.3\.embed_tokens\.weight has shape \[511, 64\]"
    ):
        from_hf(tiny, hf)


def test_fp8_tensor_needs_a_recipe(tiny: Graph) -> None:
    hf = dict(to_hf(tiny, random_state(tiny)))
    hf["model.layers.0.mlp.up_proj.weight"] = hf["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"up_proj\.weight has dtype F8_E4M3 .*expected BF16"):
        from_hf(tiny, hf)


def test_open_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no safetensors checkpoint"):
        open_checkpoint(tmp_path)
    (tmp_path / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"cannot read safetensors file .*model\.safetensors"):
        open_checkpoint(tmp_path)


def test_index_naming_a_missing_or_wrong_shard(tmp_path: Path) -> None:
    save_file({"a": torch.randn(3)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"lists 1 tensor\(s\) in model-00002-of-00002\.safetensors.*does not exist"
    ):
        open_checkpoint(tmp_path)
    index["weight_map"]["b"] = "model-00001-of-00002.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"puts tensor b in model-00001-of-00002\.safetensors"):
        open_checkpoint(tmp_path)
    index["weight_map"]["b"] = "../elsewhere.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="plain file names"):
        open_checkpoint(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=r"cannot read .*index\.json"):
        open_checkpoint(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match=r"only safetensors .* pytorch_model\.bin"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="only safetensors"):
        open_checkpoint(tmp_path / "pytorch_model.bin")


# ---- agreement with transformers ---------------------------------------------------------------


def _hf_model(spec: ModelSpec) -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**spec.to_hf_config())).float().eval()


def test_layout_matches_transformers_save_pretrained(tmp_path: Path) -> None:
    spec = presets.get("glm-tiny")
    _hf_model(spec).save_pretrained(tmp_path)
    with open_checkpoint(tmp_path) as ckpt:
        saved = {k: ckpt.meta(k) for k in ckpt}
    n = spec.num_layers
    ours = {
        k: v
        for k, v in hf_tensor_layout(lower(spec, dtype="f32")).items()
        if not any(k.startswith(f"model.layers.{n + j}.") for j in range(spec.num_mtp_layers))
    }
    assert saved == ours  # names, shapes and dtypes (transformers does not create MTP weights)


def test_transformers_loads_what_glmc_writes_and_back(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    spec = tiny_spec(num_mtp_layers=0)
    g = lower(spec, dtype="f32")
    state = random_state(g, seed=5)
    write_checkpoint(to_hf(g, state), tmp_path, max_shard_bytes=64 * 1024)
    (tmp_path / "config.json").write_text(json.dumps(spec.to_hf_config()))
    model = transformers.Glm4MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    # transformers >= 5 holds the same stacked expert layout in memory as glmc.
    theirs = model.state_dict()
    assert set(theirs) == set(state)
    for k, w in state.items():
        assert torch.equal(theirs[k], w), k
    out = tmp_path / "resaved"
    model.save_pretrained(out)
    with open_checkpoint(out) as ckpt:
        assert_same_state(from_hf(g, ckpt), state)
