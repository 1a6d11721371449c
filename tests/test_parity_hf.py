"""glmc vs Hugging Face transformers' Glm4MoeForCausalLM, through real checkpoints on disk.

Each config turns on a different corner of GLM-4.5's math. Weights are random and never zero
(biases, norms and the router correction bias included), logits compared in fp32 relative to
the logit scale. Token ids come from seeded generators: routing flips on near-ties, so the
inputs must not depend on which tests ran before.

transformers is a hard dependency of the tests (the dev extras pin the versions these checks
need: >= 5.1 masks unselected expert groups with -inf as GLM-4.5 does, reference §2.2, and
MtpModel for the MTP path); this file is the only detector of several model bugs, so it must
never skip.
"""

import warnings

import pytest
import torch
import transformers
from transformers.modeling_layers import MtpModel

import glmc
from glmc import ModelSpec, presets

TOL = 1e-4  # max |diff| / max |logit|


def _spec(**over) -> ModelSpec:
    base = presets.get("glm-tiny").model_dump(mode="json")
    for key, value in over.items():
        target = base
        *path, last = key.split("__")
        for p in path:
            target = target[p]
        target[last] = value
    return ModelSpec.from_dict(base)


CONFIGS = {
    # group-limited routing, QK-norm, head_dim 32 != 64/4, routed scaling 2.5, two dense layers
    "grouped-qknorm": _spec(num_layers=4, num_dense_layers=2, num_mtp_layers=0),
    # no QK-norm, no q/k/v bias, one group, scaling 1, two shared experts, top_k = experts
    "plain": _spec(
        num_mtp_layers=0,
        attention__qk_norm=False,
        attention__qkv_bias=False,
        moe__n_group=1,
        moe__topk_group=1,
        moe__top_k=8,
        moe__routed_scaling_factor=1.0,
        moe__num_shared_experts=2,
    ),
    # four groups keep two, partial rotary 0.25, no renormalisation, tied embeddings, no dense layer
    "groups4-tied": _spec(
        num_mtp_layers=0,
        num_dense_layers=0,
        tie_word_embeddings=True,
        attention__rope__partial_rotary_factor=0.25,
        moe__n_group=4,
        moe__topk_group=2,
        moe__top_k=3,
        moe__norm_topk_prob=False,
    ),
}


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(0.15 * noise)
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_installed_transformers_is_in_the_tested_range() -> None:
    """The pins in pyproject.toml, checked where the tests run: an older transformers masks
    expert groups with 0.0 and these comparisons would fail for the wrong reason."""
    from packaging.version import Version

    assert Version(transformers.__version__) >= Version("5.1"), transformers.__version__


def _hf_model(spec: ModelSpec) -> torch.nn.Module:
    cfg = transformers.Glm4MoeConfig(**spec.to_hf_config())
    return transformers.Glm4MoeForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_checkpoint_loads_in_glmc(name, tmp_path):
    spec = CONFIGS[name]
    hf = _hf_model(spec)
    _randomize(hf, seed=1)
    hf.save_pretrained(tmp_path)
    ours = glmc.from_pretrained(tmp_path)
    ids = _ids(spec.vocab_size, (2, 13), seed=10)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == (2, 13, spec.vocab_size)
    assert _close(got, expected) < TOL
    # the router really routes: different experts for different tokens
    assert expected.abs().max() > 0.1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_glmc_checkpoint_loads_in_transformers(name, tmp_path):
    spec = CONFIGS[name]
    ours = glmc.api.build_torch(spec, dtype=torch.float32)
    _randomize(ours, seed=2)
    glmc.save_pretrained(ours, tmp_path)
    hf, info = transformers.Glm4MoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    ids = _ids(spec.vocab_size, (2, 11), seed=11)
    with torch.no_grad():
        assert _close(ours(ids), hf.float().eval()(ids).logits) < TOL


def test_transformers_save_without_mtp_weights_loads_trunk_only(tmp_path):
    spec = _spec(num_mtp_layers=1)
    hf = _hf_model(spec)
    _randomize(hf, seed=3)
    hf.save_pretrained(tmp_path)  # transformers creates and saves no MTP weights
    with pytest.warns(UserWarning, match="no model.layers.3"):
        ours = glmc.from_pretrained(tmp_path)
    assert ours.spec.num_mtp_layers == 0
    ids = _ids(spec.vocab_size, (1, 9), seed=12)
    with torch.no_grad():
        assert _close(ours(ids), hf(ids).logits) < TOL


# ---- MTP --------------------------------------------------------------------------------------

# transformers' MTP loader only looks for MTP weights at layer index 46 or 92: 46 layers it is.
MTP_SPEC = ModelSpec.from_dict(
    {
        "name": "mtp46",
        "vocab_size": 128,
        "hidden_size": 32,
        "num_layers": 46,
        "num_dense_layers": 1,
        "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "qk_norm": True, "qkv_bias": True},
        "mlp": {"intermediate_size": 64},
        "moe": {"num_experts": 4, "top_k": 2, "intermediate_size": 16, "routed_scaling_factor": 2.5},
        "num_mtp_layers": 1,
    }
)


def test_mtp_layer_matches_transformers_mtp_path(tmp_path):
    spec = MTP_SPEC
    ours = glmc.api.build_torch(spec, dtype=torch.float32)
    _randomize(ours, seed=4)
    glmc.save_pretrained(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.Glm4MoeForCausalLM.from_pretrained(tmp_path).float().eval()
    mtp = MtpModel(hf, 1).float().eval()

    # Map the checkpoint's layer-46 tensors onto MtpModel's names (reference §3.1).
    from safetensors.torch import load_file

    disk = load_file(str(tmp_path / "model.safetensors"))
    prefix = "model.layers.46."
    assert disk[prefix + "embed_tokens.weight"].equal(disk["model.embed_tokens.weight"])
    assert disk[prefix + "shared_head.head.weight"].equal(disk["lm_head.weight"])
    mapped = {}
    for key, value in disk.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            continue
        if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            mapped["layers.0." + rest] = value
        elif rest == "shared_head.norm.weight":
            mapped["layers.0.post_norm.weight"] = value
        else:
            mapped["layers.0.mtp_block." + rest] = value
    # transformers 5 holds experts stacked in memory: stack the per-expert tensors as it does
    e = spec.moe.num_experts
    block = "layers.0.mtp_block.mlp.experts."
    gate_up = [
        torch.cat([mapped.pop(f"{block}{i}.gate_proj.weight"), mapped.pop(f"{block}{i}.up_proj.weight")])
        for i in range(e)
    ]
    down = [mapped.pop(f"{block}{i}.down_proj.weight") for i in range(e)]
    mapped[block + "gate_up_proj"] = torch.stack(gate_up)
    mapped[block + "down_proj"] = torch.stack(down)
    missing, unexpected = mtp.load_state_dict(mapped, strict=False)
    assert not unexpected
    assert all(k.startswith(("embed_tokens", "shared_head")) for k in missing), missing

    ids = _ids(spec.vocab_size, (1, 10), seed=13)
    with torch.no_grad():
        logits, (mtp_logits,) = ours.forward_with_mtp(ids)
        h = hf.model(ids).last_hidden_state  # after the final norm
        emb = hf.model.embed_tokens(ids[:, 1:])
        pos = torch.arange(1, ids.shape[1])[None]
        pe = mtp.rotary_emb(emb, pos)
        z = mtp.layers[0](emb, h[:, :-1], pe, attention_mask=None, position_ids=pos, cache=None)
        expected = mtp._project_to_logits(z)
    assert mtp_logits.shape == (1, 9, spec.vocab_size)
    assert _close(logits, hf(ids).logits) < TOL
    assert _close(mtp_logits, expected) < TOL
