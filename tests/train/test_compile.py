"""The compiled training step (per-block torch.compile(fullgraph=True)) trains like eager."""

import pytest

from glmc.train import train

from ._dist import run_distributed
from .conftest import tiny_config


@pytest.mark.slow
def test_compiled_expert_parallel_over_two_ranks_matches_eager(tmp_path, corpus):
    """Per-block fullgraph compile with EP's data-dependent all-to-all splits inside, on gloo,
    FSDP2 around it; same losses as one eager process. Two layers (dense + MoE) and the MTP
    layer keep the cold compile short on 2 cores."""
    from glmc import presets

    spec = presets.get("glm-tiny").model_copy(update={"num_layers": 2})
    eager = train(tiny_config(tmp_path / "e", corpus, spec=spec, steps=2)).records
    res = run_distributed(tiny_config(tmp_path / "c", corpus, spec=spec, steps=2, ep=2, compile=True))
    for rank in (0, 1):
        assert res[rank][0] == "ok", res[rank]
        for a, b in zip(res[rank][1], [r["loss"] for r in eager], strict=True):
            assert abs(a - b) / b < 1e-4


@pytest.mark.slow
def test_compiled_tensor_parallel_attention_matches_eager(tmp_path, corpus):
    """Per-block fullgraph compile around DTensor tensor-parallel attention (tp=2, colwise q/k/v,
    rowwise o, local heads) on gloo: same losses as one eager process."""
    from glmc import presets

    spec = presets.get("glm-tiny").model_copy(update={"num_layers": 2})
    eager = train(tiny_config(tmp_path / "e", corpus, spec=spec, steps=2)).records
    res = run_distributed(tiny_config(tmp_path / "c", corpus, spec=spec, steps=2, tp=2, compile=True))
    for rank in (0, 1):
        assert res[rank][0] == "ok", res[rank]
        for a, b in zip(res[rank][1], [r["loss"] for r in eager], strict=True):
            assert abs(a - b) / b < 1e-4
