"""The compiled training step (per-block torch.compile(fullgraph=True)) trains like eager."""

import pytest

from glmc.train import train

from ._dist import run_distributed
from .conftest import tiny_config


@pytest.mark.slow
@pytest.mark.parametrize(
    "plan",
    [
        # EP's data-dependent all-to-all splits inside the compiled block, FSDP2 around it.
        {"ep": 2},
        # DTensor tensor parallel inside the block: colwise q/k/v and gate/up, rowwise o and down.
        {"tp": 2},
    ],
    ids=["ep2+fsdp2", "tp2"],
)
def test_compiled_parallel_step_over_two_ranks_matches_eager(tmp_path, corpus, plan):
    """Same losses as one eager process, on gloo. Two layers (dense + MoE) and the MTP layer keep
    the cold compile short on 2 cores."""
    from glmc import presets

    spec = presets.get("glm-tiny").model_copy(update={"num_layers": 2})
    eager = train(tiny_config(tmp_path / "e", corpus, spec=spec, steps=2)).records
    res = run_distributed(tiny_config(tmp_path / "c", corpus, spec=spec, steps=2, compile=True, **plan))
    for rank in (0, 1):
        assert res[rank][0] == "ok", res[rank]
        for a, b in zip(res[rank][1], [r["loss"] for r in eager], strict=True):
            assert abs(a - b) / b < 1e-4
