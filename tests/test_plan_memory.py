"""Per-rank memory of parallel plans, against a hand calculation from the GLM-4.5 component
counts of reference/glm45-architecture.md §4.1 (not from the IR)."""

import json

import pytest

import glmc
from glmc.cli import main
from glmc.ir import DType, TrainingAssumptions

H, V, E, D = 5120, 151552, 160, 128
A = 136_329_472  # attention incl. q/k/v biases and qk-norm
DENSE = 188_743_680  # 3 H I
EXPERT = 23_592_960  # 3 H I_m
ROUTER_W = E * H  # bf16; its fp32 bias (E) is counted apart
NORMS = 2 * H
MTP_EXTRA = 2 * H + 2 * H * H + H  # enorm, hnorm, eh_proj, shared_head.norm
KV_PER_LAYER = 2 * 8 * D * 2  # K and V, 8 heads x 128, bf16


def _layer(i: int, experts_per_rank: int) -> tuple[int, int]:
    """(bf16 params, fp32 router-bias params) one rank holds of trunk layer i, tp=1."""
    if i < 3:
        return A + DENSE + NORMS, 0
    return A + NORMS + ROUTER_W + EXPERT + experts_per_rank * EXPERT, E


def test_glm45_ep32_pp4_dp2_by_hand() -> None:
    info = glmc.inspect("glm-4.5", pipeline="fuse-moe,shard{ep=32,pp=4,dp=2}")
    par = info["parallel"]
    assert par["mesh"] == {"pp": 4, "dp": 2, "ep": 32, "tp": 1} and par["world_size"] == 256
    per_rank = 160 // 32
    for st in par["stages"]:
        first, last = st["layers"]
        bf16 = f32 = 0
        for i in range(first, last + 1):
            b, f = _layer(i, per_rank)
            bf16, f32 = bf16 + b, f32 + f
        if st["stage"] == 0:
            bf16 += V * H  # embedding
        if st["stage"] == 3:
            mtp_b, mtp_f = _layer(92, per_rank)
            # final norm, lm_head, the MTP layer, and its embedding copy (its owner is on stage 0);
            # the MTP head copy shares lm_head's storage on this stage.
            bf16 += H + V * H + mtp_b + MTP_EXTRA + V * H
            f32 += mtp_f
            assert st["mtp_layers"] == [92] and st["mtp_kv_cache_bytes_per_token"] == KV_PER_LAYER
        trained = bf16  # the router bias is a buffer: no gradient, no optimizer state
        assert st["params"] == bf16 + f32
        assert st["param_bytes"] == 2 * bf16 + 4 * f32
        assert st["grad_bytes"] == 4 * trained
        assert st["master_bytes"] == 4 * trained
        assert st["optimizer_bytes"] == 2 * 4 * trained
        assert st["training_bytes"] == 2 * bf16 + 4 * f32 + 16 * trained
        assert st["kv_cache_bytes_per_token"] == (last - first + 1) * KV_PER_LAYER
    assert [s["layers"][0] for s in par["stages"]] == [0, *(s["layers"][1] + 1 for s in par["stages"][:-1])]
    assert par["stages"][-1]["layers"][1] == 91
    assert par["per_rank"]["param_bytes"] == max(s["param_bytes"] for s in par["stages"])


def test_glm45_tp8_ep8_with_zero1_by_hand() -> None:
    opts = TrainingAssumptions(grad=DType.BF16, master=DType.F32, optimizer=DType.F32, shard_optimizer=True)
    par = glmc.inspect("glm-4.5", pipeline="fuse-moe,shard{tp=8,ep=8,dp=4}", training=opts)["parallel"]
    (st,) = par["stages"]
    att = (A - 2 * D) // 8 + 2 * D  # q/k/v/o and biases split 8 ways (one KV head each); qk-norm replicated
    dense_layer = att + DENSE // 8 + NORMS
    moe_experts = (E // 8) * EXPERT // 8  # 20 experts per EP rank, each split 8 ways by TP
    moe_rest = att + NORMS + ROUTER_W + EXPERT // 8
    mtp_rest = moe_rest + MTP_EXTRA
    vocab = V * H // 8
    # pp=1: the MTP embedding and head copies share storage with the main ones
    experts = 90 * moe_experts
    dense = 3 * dense_layer + 89 * moe_rest + mtp_rest + 2 * vocab + H
    assert st["params"] == experts + dense + 90 * E
    assert st["param_bytes"] == 2 * (experts + dense) + 4 * 90 * E
    assert st["grad_bytes"] == 2 * (experts + dense)
    # ZeRO-1: expert state split over dp=4, dense state over dp x ep = 32 replicas (every local
    # tensor of GLM-4.5 divides evenly, so per-tensor rounding does not show)
    held = experts // 4 + dense // 32
    assert st["master_bytes"] == 4 * held
    assert st["optimizer_bytes"] == 2 * 4 * held
    assert st["kv_cache_bytes_per_token"] == 92 * 2 * 1 * D * 2  # one KV head per TP rank


def test_inspect_cli_reports_per_rank_memory(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", "glm-4.5", "--pipeline", "fuse-moe,shard{ep=32,pp=4,dp=2}", "--json",
                 "--grad-dtype", "bf16", "--master-dtype", "none"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    a = out["parallel"]["assumptions"]
    assert a["grad"] == "bf16" and a["master"] == "none"
    assert all(s["master_bytes"] == 0 for s in out["parallel"]["stages"])
    code = main(["inspect", "glm-4.5", "--pipeline", "fuse-moe,shard{ep=32,pp=4,dp=2}"])
    text = capsys.readouterr().out
    assert code == 0 and "per-rank memory" in text and "+MTP" in text
    assert "parallel" not in glmc.inspect("glm-4.5")  # no shard pass, no plan
