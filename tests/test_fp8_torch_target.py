"""The torch target honours fuse-moe and quantize-fp8: built from the passed graph, its state
holds float8_e4m3fn weights with their scales, and its logits equal the model whose weights are
dequant(quant(w)) (computed through export/hf's checkpoint engine, an independent path), and
transformers' on the Hugging Face FP8 checkpoint of the same weights."""

from __future__ import annotations

from pathlib import Path

import accelerate  # noqa: F401  (transformers' FP8 checkpoint loader needs it)
import pytest
import torch
import transformers
from specs import WIDE  # tests/specs.py

import glmc
import glmc.api
from glmc import presets
from glmc.convert import convert
from glmc.export.hf import DictCheckpoint, LogicalSource, from_hf, hf_name, plan_checkpoint, produce, to_hf
from glmc.export.torch import build_model
from glmc.export.torch.fp8 import passed_state
from glmc.ir import GlmcError, Graph
from glmc.kernels.dispatch import use_kernels
from glmc.lower import lower
from glmc.pipeline import run_pipeline
from glmc.runtime.backend import TorchBackend
from glmc.runtime.decode import generate
from glmc.spec import ModelSpec

FP8 = torch.float8_e4m3fn


def _plain_state(g: Graph, seed: int) -> dict[str, torch.Tensor]:
    """Random weights for every parameter (norms and biases too, not their constant init)."""
    model = build_model(g)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.state_dict().items()}


def _fp8_checkpoint(plain: Graph, g: Graph, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FP8 checkpoint export/hf writes for `g` (Hugging Face names, g's layout)."""
    src = LogicalSource(DictCheckpoint(dict(to_hf(plain, state))), plan_checkpoint(plain), None)
    return {name: x for t in plan_checkpoint(g) for name, x in produce(t, src, torch.float32)}


def _dequantised_reference(
    plain: Graph, unquantised: Graph, g: Graph, state: dict[str, torch.Tensor]
) -> torch.nn.Module:
    """The plain fp32 model with each quantised weight replaced by dequant(quant(w)), read back
    through export/hf's logical reader (which dequantises segment by segment)."""
    ckpt = _fp8_checkpoint(plain, g, state)
    back = LogicalSource(DictCheckpoint(ckpt), plan_checkpoint(unquantised), g.attrs.quantization)
    model = build_model(plain)
    model.load_state_dict(from_hf(plain, back, torch.float32), strict=True)
    return model.eval()


CASES = [
    ("glm-tiny", "fuse-moe", "fuse-moe,quantize-fp8{serving=false}"),
    ("glm-tiny", None, "quantize-fp8{recipe=channel}"),
    ("glm-small", "fuse-moe", "fuse-moe,quantize-fp8"),  # keeps q/k/v BF16 (fp8_kept)
]


@pytest.mark.parametrize(("preset", "layout", "pipeline"), CASES)
def test_fp8_model_equals_the_dequantised_reference(preset: str, layout: str | None, pipeline: str) -> None:
    spec = presets.get(preset)
    plain = lower(spec, dtype="f32")
    g = run_pipeline(plain, pipeline)
    unquantised = run_pipeline(plain, layout) if layout else plain
    state = _plain_state(plain, seed=1)
    fp8_state = passed_state(g, state)

    model = build_model(g)
    model.load_state_dict(fp8_state, strict=True)
    model.eval()
    held = model.state_dict()
    quantised = [fqn for fqn, _, p in g.params() if p.attrs.quant is not None]
    assert quantised
    for fqn in quantised:
        assert held[fqn].dtype == FP8, fqn
    scales = [fqn for fqn, _, p in g.params() if p.role.name == "SCALE"]
    assert len(scales) == len(quantised)
    assert all(held[k].dtype == torch.float32 for k in scales)
    # The names a loader maps: the tensors export/hf's fused layout writes, bit for bit (the
    # Hugging Face layout splits experts per expert instead).
    ckpt = _fp8_checkpoint(plain, g, state)
    n_layers = g.attrs.num_layers
    fused = g.attrs.weight_layout == "fused"
    for k in [*quantised, *scales] if fused else []:
        assert torch.equal(held[k].view(torch.uint8), ckpt[hf_name(k, n_layers)].view(torch.uint8)), k

    ref = _dequantised_reference(plain, unquantised, g, state)
    ids = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref(ids), model(ids)
        want_mtp, got_mtp = ref.forward_with_mtp(ids)[1], model.forward_with_mtp(ids)[1]
        plain_model = build_model(plain)
        plain_model.load_state_dict(state)
        unq = plain_model.eval()(ids)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * scale
    for a, b in zip(got_mtp, want_mtp, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    assert (unq - want).abs().max().item() > 1e-3 * scale  # the quantisation is really there


def test_fp8_model_keeps_dtypes_through_to_and_runs_in_bf16() -> None:
    plain = lower(presets.get("glm-tiny"), dtype="f32")
    g = run_pipeline(plain, "fuse-moe,quantize-fp8{serving=false}")
    model = build_model(g, dtype=torch.bfloat16)
    model.load_state_dict(passed_state(g, _plain_state(plain, seed=4)))
    sd = model.state_dict()
    assert sd["model.layers.1.mlp.experts.gate_up_proj"].dtype == FP8
    assert sd["model.layers.1.mlp.experts.gate_up_proj_scale_inv"].dtype == torch.float32
    assert sd["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    ids = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(ids)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # Casting the whole model round trip leaves FP8 weights and fp32 scales bit for bit.
    before = {k: v.clone() for k, v in model.state_dict().items() if v.dtype in (FP8, torch.float32)}
    model.to(torch.float16).to(torch.float32)
    after = model.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)), k


def test_init_weights_quantises_a_random_draw() -> None:
    g = run_pipeline(lower(presets.get("glm-tiny"), dtype="f32"), "quantize-fp8{serving=false}")
    model = build_model(g)
    model.init_weights(0.02, torch.Generator().manual_seed(0))
    w = model.model.layers[0].self_attn.q_proj
    deq = w.dequantized(torch.float32)
    assert w.weight.dtype == FP8 and 0.01 < deq.std().item() < 0.03


def test_passed_state_names_the_missing_tensor() -> None:
    plain = lower(presets.get("glm-tiny"), dtype="f32")
    g = run_pipeline(plain, "fuse-moe,quantize-fp8{serving=false}")
    state = _plain_state(plain, seed=0)
    del state["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(GlmcError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        passed_state(g, state)
    state = _plain_state(plain, seed=0)
    state["model.layers.0.mlp.down_proj.weight"][0, 0] = float("inf")
    with pytest.raises(GlmcError, match=r"model\.layers\.0\.mlp\.down_proj\.weight: cannot quantise"):
        passed_state(g, state)


def test_triton_fp8_path_matches_weight_only_within_activation_rounding() -> None:
    """The GPU path (forced onto the Triton interpreter): FP8 activations 1 x 128 as well, so
    within FP8 rounding of the weight-only result, not equal to it."""
    spec = ModelSpec.from_dict(WIDE)
    plain = lower(spec, dtype="f32")
    g = run_pipeline(plain, "fuse-moe,quantize-fp8")
    model = build_model(g)
    model.load_state_dict(passed_state(g, _plain_state(plain, seed=6)))
    model.eval()
    ids = torch.randint(0, spec.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        weight_only = model(ids)
        with use_kernels("triton"):
            fused = model(ids)
    rel = (fused - weight_only).abs().max().item() / weight_only.abs().max().item()
    assert 0 < rel < 0.1


def test_transformers_agrees_on_the_hf_output_of_the_same_pipeline(tmp_path: Path) -> None:
    """transformers' FineGrainedFP8 (dequantises on CPU) on the Hugging Face FP8 checkpoint glmc
    writes from the same weights, against the FP8 torch model: fused and unfused layouts."""
    spec = ModelSpec.from_dict(WIDE)
    plain_model = glmc.api.build_torch(spec, dtype=torch.float32, seed=5)
    glmc.save_pretrained(plain_model, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "q", "quantize-fp8")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    plain = lower(spec, dtype="f32")
    state = plain_model.state_dict()
    ids = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(ids).logits
    for pipeline in ("quantize-fp8", "fuse-moe,quantize-fp8"):
        g = run_pipeline(plain, pipeline)
        ours = build_model(g)
        ours.load_state_dict(passed_state(g, state))
        with torch.no_grad():
            got = ours.eval()(ids)
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), pipeline


def test_greedy_decode_runs_the_fp8_model() -> None:
    spec = presets.get("glm-tiny")
    plain = lower(spec, dtype="f32")
    g = run_pipeline(plain, "fuse-moe,quantize-fp8{serving=false}")
    state = _plain_state(plain, seed=7)
    model = build_model(g)
    model.load_state_dict(passed_state(g, state))
    prompt = [5, 17, 301, 42]
    tokens, _ = generate(TorchBackend(model.eval(), spec), prompt, 6)
    spec_tokens, _ = generate(TorchBackend(model, spec), prompt, 6, draft_tokens=2)
    assert len(tokens) == 6 and spec_tokens == tokens  # MTP speculation accepts or corrects: same text
    with torch.no_grad():  # the first token is the FP8 model's argmax over the prompt
        assert tokens[0] == int(model(torch.tensor([prompt]))[0, -1].argmax())


@pytest.mark.parametrize("pipeline", ["fuse-moe,quantize-fp8{serving=false}", "quantize-fp8{recipe=channel}"])
def test_state_dict_follows_the_passed_graph(pipeline: str) -> None:
    """Every tensor the model holds is an IR parameter of the same shape, FP8 exactly where the
    graph says; the IR parameters it lacks are the tied MTP copies a checkpoint alone stores."""
    g = run_pipeline(lower(presets.get("glm-tiny"), dtype="f32"), pipeline)
    held = build_model(g, device="meta").state_dict()
    params = {fqn: p for fqn, _, p in g.params()}
    assert set(held) <= set(params)
    assert all(params[k].tied_to is not None for k in set(params) - set(held))
    for k, t in held.items():
        assert tuple(t.shape) == params[k].shape, k
        assert (t.dtype == FP8) == params[k].dtype.is_float8, k


@pytest.mark.parametrize("pipeline", ["quantize-fp8", "fuse-moe,quantize-fp8{recipe=channel}"])
def test_fp8_checkpoint_loads_into_the_fp8_model_without_dequantising(tmp_path: Path, pipeline: str) -> None:
    """The folder `glmc convert` writes (Hugging Face or fused names) gives back, tensor for
    tensor, the FP8 state `passed_state` makes from the same weights."""
    from safetensors.torch import load_file

    from glmc.export.torch.fp8 import checkpoint_state

    spec = ModelSpec.from_dict(WIDE)
    plain_model = glmc.api.build_torch(spec, dtype=torch.float32, seed=5)
    glmc.save_pretrained(plain_model, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "q", pipeline)
    stored = {
        k: v for f in sorted((tmp_path / "q").glob("*.safetensors")) for k, v in load_file(str(f)).items()
    }
    g = run_pipeline(lower(spec, dtype="f32"), pipeline)
    got = checkpoint_state(g, stored.__getitem__)
    want = passed_state(g, plain_model.state_dict())
    assert sorted(got) == sorted(want)
    for k, w in want.items():
        if w.dtype == FP8 or k.endswith(("_scale_inv", "_scale")):
            assert got[k].dtype == w.dtype and torch.equal(got[k].view(torch.uint8), w.view(torch.uint8)), k
    model = build_model(g)
    model.load_state_dict(got, strict=True)
    with pytest.raises(GlmcError, match="not in the checkpoint"):
        checkpoint_state(g, {k: v for k, v in stored.items() if "layers.0.self_attn" not in k}.__getitem__)


def test_build_writes_the_fp8_torch_artifact_and_generate_runs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`glmc build --pipeline fuse-moe,quantize-fp8 --emit torch`: the file holds F8_E4M3
    tensors, the loader rebuilds the passed graph from the recorded pipeline, the logits are the
    FP8 model's of the same weights, and `glmc generate` runs it (greedy and MTP)."""
    from safetensors import safe_open

    from glmc.api import load_torch_artifact
    from glmc.cli import main

    spec = presets.get("glm-tiny")
    pipeline = "fuse-moe,quantize-fp8{serving=false}"
    plain_model = glmc.api.build_torch(spec, dtype=torch.float32, seed=9)
    glmc.save_pretrained(plain_model, tmp_path / "ckpt")
    glmc.build(tmp_path / "ckpt", tmp_path / "out", weights=tmp_path / "ckpt", pipeline=pipeline,
               emit=["torch"], dtype="f32")  # fmt: skip
    with safe_open(str(tmp_path / "out" / "torch" / "model.safetensors"), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    assert dtypes["model.layers.1.mlp.experts.gate_up_proj"] == "F8_E4M3"
    assert dtypes["model.layers.1.mlp.experts.gate_up_proj_scale_inv"] == "F32"
    loaded = load_torch_artifact(tmp_path / "out" / "torch")
    g = run_pipeline(lower(spec, dtype="f32"), pipeline)
    want_model = build_model(g)
    want_model.load_state_dict(passed_state(g, plain_model.state_dict()))
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids), want_model.eval()(ids))
    art = str(tmp_path / "out" / "torch")
    assert main(["generate", art, "--prompt-ids", "5,17,301", "--max-new-tokens", "4", "--greedy"]) == 0
    greedy = capsys.readouterr().out.splitlines()[0]
    args = ["--speculative", "mtp"]
    assert (
        main(["generate", art, "--prompt-ids", "5,17,301", "--max-new-tokens", "4", "--greedy", *args]) == 0
    )
    assert capsys.readouterr().out.splitlines()[0] == greedy and len(greedy.split(",")) == 4
