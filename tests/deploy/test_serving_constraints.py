"""What serving stacks refuse at load, checked when glmc writes the bundle: TensorRT-LLM's
attention/expert mapping of a shard plan, the llm_args fields per TensorRT-LLM release (the
version floor), and block-FP8 weights whose per-rank sizes are not multiples of 128 (a
GLM-4.5-Air-shaped checkpoint through `glmc convert`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import glmc
from glmc import presets
from glmc.cli import main
from glmc.errors import GlmcError
from glmc.export.trtllm import Mapping, ServeOptions, floor, llm_api_options, plan_mapping, validate_options
from glmc.lower import lower
from glmc.pipeline import run_pipeline


def _mapping_of(preset: str, pipeline: str) -> dict:
    return vars(plan_mapping(run_pipeline(lower(presets.get(preset)), pipeline)))


def test_tiny_ep8_tp2_gets_attention_dp_and_says_why(tmp_path: Path) -> None:
    """glm-tiny's 4 heads do not split over tensor_parallel_size 16 (ep=8 x tp=2): attention-DP is
    the only valid mapping; the build warns naming the heads and the degree, and the options file
    and launch.sh say it."""
    with pytest.warns(
        UserWarning, match=r"4 attention heads do not divide by 16 = tensor_parallel_size \(ep=8 x tp=2\)"
    ):
        glmc.build("glm-tiny", tmp_path / "b", pipeline="shard{ep=8,tp=2}", emit=["trtllm"])
    bundle = tmp_path / "b" / "trtllm"
    opts = yaml.safe_load((bundle / "extra_llm_api_options.yaml").read_text())
    assert opts["tensor_parallel_size"] == 16 and opts["enable_attention_dp"] is True
    assert (opts["moe_expert_parallel_size"], opts["moe_tensor_parallel_size"]) == (8, 2)
    for f in ("extra_llm_api_options.yaml", "launch.sh"):
        assert (
            "Attention: data parallel (enable_attention_dp): 4 attention heads do not divide by 16"
            in (bundle / f).read_text()
        )


def test_glm45_mappings() -> None:
    """GLM-4.5 (96 heads, 8 KV heads, 160 experts of 1536): ep=32 x tp=2 = 64 does not divide 96
    heads (attention-DP, with the warning); ep=16 x tp=2 = 32 does (attention TP over 32, KV heads
    duplicated 4 ways); tp=1 is attention-DP exactly as glmc's plan."""
    with pytest.warns(
        UserWarning, match=r"96 attention heads do not divide by 64 = tensor_parallel_size \(ep=32 x tp=2\)"
    ):
        m = _mapping_of("glm-4.5", "shard{ep=32,tp=2}")
    assert (m["tensor_parallel_size"], m["enable_attention_dp"], m["moe_expert_parallel_size"]) == (
        64,
        True,
        32,
    )
    m = _mapping_of("glm-4.5", "shard{ep=16,tp=2}")
    assert (m["tensor_parallel_size"], m["enable_attention_dp"], m["moe_tensor_parallel_size"]) == (
        32,
        False,
        2,
    )
    assert _mapping_of("glm-4.5", "shard{ep=32}")["enable_attention_dp"] is True


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        # The plan's own rules: the pass's one message, before the bundle is looked at.
        ("shard{ep=3}", "shard: ep=3 does not divide moe.num_experts=8"),
        ("shard{ep=2,tp=3}", "shard: tp=3 does not divide attention.num_heads=4"),
        # TensorRT-LLM's own rule: it places experts contiguously, without the plan's replicas.
        (
            "shard{ep=3,redundant_experts=1}",
            "trtllm: moe_expert_parallel_size=3 (shard ep) does not divide the 8 routed experts",
        ),
    ],
)
def test_plans_trtllm_cannot_serve_exit_2_naming_the_degree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pipeline: str, message: str
) -> None:
    out = tmp_path / "b"
    code = main(["build", "glm-tiny", "-o", str(out), "--emit", "trtllm", "--pipeline", pipeline])
    err = capsys.readouterr().err
    assert code == 2 and message in " ".join(err.split()), err
    assert "Traceback" not in err and not out.exists()


def test_plan_layouts_trtllm_does_not_carry_are_said(tmp_path: Path) -> None:
    """A load-aware expert map is not written (TensorRT-LLM places experts contiguously: a
    warning and a line in both headers); the plan's dp is that many launches."""
    load = tmp_path / "load.json"
    load.write_text(json.dumps([100, 1, 50, 3, 7, 20, 2, 9]))
    with pytest.warns(UserWarning, match=r"load-aware expert map is not written.*4 per moe_ep rank \(ep=2\)"):
        glmc.build(
            "glm-tiny", tmp_path / "b", pipeline=f"shard{{dp=3,ep=2,expert_load={load}}}", emit=["trtllm"]
        )
    bundle = tmp_path / "b" / "trtllm"
    opts = yaml.safe_load((bundle / "extra_llm_api_options.yaml").read_text())
    assert (opts["tensor_parallel_size"], opts["moe_expert_parallel_size"], opts["enable_attention_dp"]) == (
        2,
        2,
        True,
    )
    for f in ("extra_llm_api_options.yaml", "launch.sh"):
        text = (bundle / f).read_text()
        assert "# Plan: experts: contiguous, 4 per moe_ep rank; the plan's load-aware expert map" in text
        assert "# Plan: the plan's dp=3 is 3 launches of this bundle, each on 2 GPUs" in text
    # Replicas whose experts still divide ep: served without them, said the same way.
    with pytest.warns(UserWarning, match=r"redundant_experts=2 replicas \(10 slots\) is not written"):
        m = _mapping_of("glm-tiny", "shard{ep=2,redundant_experts=2}")
    assert m["moe_expert_parallel_size"] == 2 and m["launches"] == 1
    # A contiguous plan is TensorRT-LLM's own placement: nothing to say.
    assert _mapping_of("glm-tiny", "shard{dp=1,ep=2}")["notes"] == ()


def test_glm45_stages_differ_from_trtllm_even_split() -> None:
    """TensorRT-LLM splits the 92 trunk layers 23 a rank; the pass balances FLOPs (the embedding
    rides with the first stage, head and MTP with the last): the options say both."""
    m = _mapping_of("glm-4.5", "shard{pp=4,ep=8}")
    assert m["pipeline_parallel_size"] == 4 and m["tensor_parallel_size"] == 8
    (note,) = m["notes"]
    assert note.startswith(
        "layers: TensorRT-LLM splits the 92 layers evenly over pp=4 (0-22, 23-45, 46-68, 69-91)"
    )


def _glm_opts(version: str) -> dict:
    # GLM-4.5's vocabulary: <think>/</think> ids are known, so relaxed acceptance is wanted.
    m = Mapping(tensor_parallel_size=8, moe_expert_parallel_size=8, enable_attention_dp=True)
    o = ServeOptions(mapping=m, think_ids=(151350, 151351), trtllm_version=version)
    return llm_api_options(o, has_mtp=True)


def test_version_floor_follows_the_fields_written() -> None:
    newest = _glm_opts("1.2")
    assert newest["speculative_config"]["begin_thinking_phase_token"] == 151350 and floor(newest) == "1.2"
    # 1.1 hard-codes DeepSeek-R1's think ids: no relaxed acceptance there, and the floor drops.
    older = _glm_opts("1.1.0")
    assert "use_relaxed_acceptance_for_thinking" not in older["speculative_config"] and floor(older) == "1.1"
    assert any("begin_thinking_phase_token" in p for p in validate_options(newest, "1.1"))
    assert validate_options(newest, "1.2") == []
    with pytest.raises(GlmcError, match=r"Glm4MoeForCausalLM from 1\.1"):
        _glm_opts("1.0")
    with pytest.raises(GlmcError, match=r"knows the llm_args fields of 1\.0, 1\.1, 1\.2"):
        _glm_opts("0.21")


def test_launch_files_state_the_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["build", "glm-tiny", "-o", str(tmp_path / "b"), "--emit", "trtllm", "--trtllm-version", "1.1"]
    )
    assert code == 0, capsys.readouterr().err
    bundle = tmp_path / "b" / "trtllm"
    assert "tensorrt_llm >= 1.1" in (bundle / "launch.sh").read_text()
    assert "tensorrt_llm >= 1.1" in (bundle / "llm_api.py").read_text()
    assert main(["build", "glm-tiny", "-o", str(tmp_path / "c"), "--trtllm-version", "1.1"]) == 2
    assert "--trtllm-version applies to --emit trtllm" in capsys.readouterr().err


# ---- GLM-4.5-Air's sizes through quantize-fp8 ---------------------------------------------------

# GLM-4.5-Air's real GEMM sizes (hidden 4096, 96 x 128 query heads, 8 KV heads, dense MLP 10944,
# experts 1408) in two layers (one dense, one MoE) without the MTP layer; 4 experts instead of 128
# and a 2048-token vocabulary, so the checkpoint is 0.9 GB instead of 8.8 GB on a 2-core test box
# (neither the expert count nor the vocabulary changes which weights fit the 128 rule).
AIR_SHAPED = {
    **presets.get("glm-4.5-air").model_dump(mode="json"),
    "name": "glm-4.5-air-2l",
    "vocab_size": 2048,
    "num_layers": 2,
    "num_dense_layers": 1,
    "num_mtp_layers": 0,
    "tokens": presets.get("glm-tiny").model_dump(mode="json")["tokens"],  # GLM's ids exceed 2048
}
AIR_SHAPED["moe"] = {**AIR_SHAPED["moe"], "num_experts": 4, "top_k": 2, "n_group": 1, "topk_group": 1}
DENSE_MLP = [f"model.layers.0.mlp.{m}_proj" for m in ("gate", "up", "down")]


@pytest.fixture(scope="module")
def air_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = glmc.ModelSpec.from_dict(AIR_SHAPED)
    assert spec.mlp.intermediate_size == 10944 and spec.hidden_size == 4096
    path = tmp_path_factory.mktemp("air") / "ckpt"
    glmc.save_pretrained(glmc.api.build_torch(spec, dtype=torch.bfloat16, seed=1), path)
    return path


def _fp8_sizes(folder: Path) -> dict[str, list[int]]:
    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as r:
            for k in r.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = r.get_slice(k)
                if t.get_dtype() == "F8_E4M3":
                    out[k] = list(t.get_shape())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_air_shaped_convert_keeps_the_dense_mlp_bf16(
    air_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tp: int
) -> None:
    """`glmc convert` with quantize-fp8 (after shard{tp=N} for N > 1): the 10944-wide dense MLP
    stays BF16 and is in modules_to_not_convert; every FP8 tensor each rank holds has both sizes
    multiples of 128 (the rule vLLM, SGLang and TensorRT-LLM apply per rank)."""
    out = tmp_path / "q"
    pipeline = "quantize-fp8" if tp == 1 else f"shard{{tp={tp}}},quantize-fp8"
    assert main(["convert", str(air_ckpt), "-o", str(out), "--pipeline", pipeline, "--quiet"]) == 0, (
        capsys.readouterr().err
    )
    folders = [out] if tp == 1 else sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == tp
    q = json.loads((out / "config.json").read_text())["quantization_config"]  # one config for all ranks
    for folder in folders:
        assert set(DENSE_MLP) <= set(q["modules_to_not_convert"])
        sizes = _fp8_sizes(folder)
        assert any(".self_attn.q_proj." in k for k in sizes)  # attention (3072 per rank at tp=4) is FP8
        assert not any(k.startswith("model.layers.0.mlp.") for k in sizes)
        for k, shape in sizes.items():
            assert shape[-1] % 128 == 0 and shape[-2] % 128 == 0, (k, shape)


def test_air_shaped_strict_refuses_naming_the_weight(
    air_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q"
    code = main(
        ["convert", str(air_ckpt), "-o", str(out), "--pipeline", "quantize-fp8{strict=true}", "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "model.layers.0.mlp.gate_proj.weight has output size 10944, not a multiple of 128" in err
