"""The TensorRT-LLM bundle: a Hugging Face checkpoint transformers loads with no missing keys
and the same logits, plus an options file checked against TensorRT-LLM's documented fields.
Building and serving it needs tensorrt_llm and a GPU (the gpu-marked test)."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

import glmc
from glmc.errors import GlmcError
from glmc.export.trtllm import Mapping, ServeOptions, llm_api_options, validate_options


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("trt") / "out"
    glmc.build(tiny_checkpoint, out, weights=tiny_checkpoint, emit=["trtllm"], dtype="f32")
    return out / "trtllm"


def test_bundle_loads_in_transformers_with_same_logits(bundle, reference):
    from transformers import Glm4MoeForCausalLM

    hf, info = Glm4MoeForCausalLM.from_pretrained(bundle, output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == set() or not info["missing_keys"], info["missing_keys"]
    # transformers does not instantiate the MTP layer: its tensors are the only unexpected keys.
    assert all(k.startswith("model.layers.3.") for k in info["unexpected_keys"])
    ids = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, reference(ids), rtol=1e-4, atol=1e-4)


def test_bundle_files_and_options(bundle):
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["architectures"] == ["Glm4MoeForCausalLM"] and cfg["num_nextn_predict_layers"] == 1
    assert "quantization_config" not in cfg  # not quantized
    opts = yaml.safe_load((bundle / "extra_llm_api_options.yaml").read_text())
    assert validate_options(opts) == []
    assert opts["speculative_config"] == {"decoding_type": "MTP", "num_nextn_predict_layers": 3}
    assert opts["kv_cache_config"]["dtype"] == "auto"
    assert (opts["tensor_parallel_size"], opts["moe_expert_parallel_size"]) == (1, 1)
    launch = bundle / "launch.sh"
    assert launch.stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(launch)], check=False).returncode == 0
    text = launch.read_text()
    assert "trtllm-serve" in text and "--extra_llm_api_options" in text and "--backend pytorch" in text


# GLM-4.5 over 8 GPUs as shard{ep=8} translates (attention data parallel, experts over moe_ep).
EP8 = Mapping(tensor_parallel_size=8, moe_expert_parallel_size=8, enable_attention_dp=True)


def test_options_for_glm45_parallel_fp8_kv():
    opts = llm_api_options(
        ServeOptions(mapping=EP8, kv_cache_dtype="fp8", draft_tokens=3, think_ids=(151350, 151351)),
        has_mtp=True,
    )
    assert opts["moe_tensor_parallel_size"] == 1 and opts["enable_attention_dp"] is True
    assert opts["kv_cache_config"]["dtype"] == "fp8"
    spec = opts["speculative_config"]
    assert spec["use_relaxed_acceptance_for_thinking"] is True
    assert (spec["begin_thinking_phase_token"], spec["end_thinking_phase_token"]) == (151350, 151351)
    assert "speculative_config" not in llm_api_options(ServeOptions(), has_mtp=False)


def test_bad_options_are_rejected():
    with pytest.raises(GlmcError, match="kv cache dtype"):
        llm_api_options(ServeOptions(kv_cache_dtype="int4"), has_mtp=True)
    # TensorRT-LLM's own Mapping rule (tensor_parallel_size = moe_ep x moe_tp) holds by construction.
    with pytest.raises(ValueError, match="must equal moe_expert_parallel_size x moe_tensor_parallel_size"):
        Mapping(tensor_parallel_size=4, moe_expert_parallel_size=3)


def test_validator_catches_unknown_and_mistyped_fields():
    problems = validate_options(
        {"tensor_parallel_size": "2", "speculative_config": {"decoding_type": "MTP", "k": 1}}
    )
    assert any("tensor_parallel_size" in p for p in problems) and any(
        "speculative_config.k" in p for p in problems
    )


def _trtllm_or_skip() -> None:
    """gpu-marked tests skip (counted as GPU skips by CI) where the trtllm extra is missing."""
    try:
        import tensorrt_llm  # noqa: F401
    except ImportError as e:
        pytest.skip(f"tensorrt_llm is not importable ({e}); pip install 'glmc[trtllm]'")


@pytest.mark.gpu
def test_tensorrt_llm_accepts_and_runs_the_bundle(bundle):
    """The options validate as TorchLlmArgs and the bundle's llm_api.py (MTP speculation on)
    generates."""
    _trtllm_or_skip()
    from glmc.export.trtllm import validate_with_tensorrt_llm

    opts = yaml.safe_load((bundle / "extra_llm_api_options.yaml").read_text())
    validate_with_tensorrt_llm(str(bundle), opts)
    out = subprocess.run(
        [sys.executable, str(bundle / "llm_api.py"), "hello"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip(), "llm_api.py generated no text"


@pytest.mark.gpu
def test_tensorrt_llm_context_logits_match_torch(bundle, reference):
    """TensorRT-LLM's PyTorch backend computes the torch model's logits over a prompt. Context
    logits come back only without speculation, so the MTP options are left out here (the test
    above runs them). The engine runs in bf16 (TensorRT-LLM's attention kernels take fp16/bf16):
    the bound is bf16-sized, far below the O(1) error of a misread weight."""
    _trtllm_or_skip()
    from tensorrt_llm import LLM, SamplingParams

    opts = yaml.safe_load((bundle / "extra_llm_api_options.yaml").read_text())
    opts.pop("speculative_config", None)
    ids = torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(2))
    llm = LLM(model=str(bundle), dtype="bfloat16", **opts)
    try:
        (out,) = llm.generate([ids[0].tolist()], SamplingParams(max_tokens=1, return_context_logits=True))
    finally:
        llm.shutdown()
    got = out.context_logits.float().cpu()[:, :512]
    with torch.no_grad():
        want = reference(ids)[0]
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < 0.1
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_fp8_bundle_carries_block_scales_trtllm_reads(tmp_path, tiny_checkpoint, reference):
    """quantize-fp8{recipe=block128}: config.json has the DeepSeek-style block config, each
    quantized weight is F8_E4M3 [N, K] beside an F32 `weight_scale_inv` [ceil(N/128),
    ceil(K/128)]; the MTP eh_proj, router and head stay high precision; and the dequantised
    bundle still computes the model (FP8 rounding only)."""
    from safetensors import safe_open

    out = tmp_path / "b"
    glmc.build(tiny_checkpoint, out, weights=tiny_checkpoint, emit=["trtllm"], dtype="f32",
               pipeline="quantize-fp8{recipe=block128,serving=false}")  # fmt: skip
    bundle = out / "trtllm"
    q = json.loads((bundle / "config.json").read_text())["quantization_config"]
    assert (
        q["quant_method"] == "fp8"
        and q["weight_block_size"] == [128, 128]
        and q["activation_scheme"] == "dynamic"
    )
    with safe_open(str(bundle / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        w = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
        s = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert s.shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        assert f.get_tensor("model.layers.3.eh_proj.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" in keys
    assert "lm_head.weight_scale_inv" not in keys and "model.layers.3.eh_proj.weight_scale_inv" not in keys
    dequant = glmc.from_pretrained(bundle)
    # Fixed ids: with random ones a near-tied top-k occasionally flips and the max error wanders.
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = dequant(ids), reference(ids)
    assert ((a - b).abs().max() / b.abs().max()).item() < 0.1


def test_shard_plan_sets_parallel_sizes_and_keeps_one_checkpoint(tmp_path, tiny_checkpoint):
    out = tmp_path / "b"
    glmc.build(tiny_checkpoint, out, weights=tiny_checkpoint, emit=["trtllm"], dtype="f32",
               pipeline="shard{ep=4}")  # fmt: skip
    bundle = out / "trtllm"
    opts = yaml.safe_load((bundle / "extra_llm_api_options.yaml").read_text())
    assert (
        opts["tensor_parallel_size"],
        opts["moe_expert_parallel_size"],
        opts["moe_tensor_parallel_size"],
    ) == (4, 4, 1)
    assert opts["enable_attention_dp"] is True  # ep acts as data parallel for attention
    assert (bundle / "model.safetensors").is_file() and not list(bundle.glob("rank*"))
    assert "--tp_size 4 --pp_size 1 --ep_size 4" in (bundle / "launch.sh").read_text()


def test_trtllm_refuses_layouts_it_cannot_load(tmp_path, tiny_checkpoint):
    with pytest.raises(GlmcError, match="drop fuse-moe"):
        glmc.build(
            tiny_checkpoint, tmp_path / "a", weights=tiny_checkpoint, emit=["trtllm"], pipeline="fuse-moe"
        )
    with pytest.raises(GlmcError, match="recipe=block128"):
        glmc.build(tiny_checkpoint, tmp_path / "b", weights=tiny_checkpoint, emit=["trtllm"],
                   pipeline="quantize-fp8{recipe=channel}")  # fmt: skip
