"""Loss-free balancing: the bias update lowers expert-load imbalance; recompute does not count twice."""

import torch

from glmc.train import train
from glmc.train.balance import global_counts, imbalance, routers, update_bias

from .conftest import tiny_config

# Experts 0 and 1 start ahead: at init the router's scores differ by ~1e-2 between experts,
# so a 0.04 head start wins most top-2 choices (max/mean load 2.4 of a possible 4).
SKEW = (0.04, 0.04, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def _late_imbalance(records):
    tail = records[-10:]
    return sum(r["load_imbalance_mean"] for r in tail) / len(tail)


def test_bias_update_lowers_imbalance_versus_rate_zero(tmp_path, corpus):
    from glmc import presets

    tiny = presets.get("glm-tiny")
    spec = tiny.model_copy(update={"moe": tiny.moe.model_copy(update={"n_group": 1, "topk_group": 1})})
    kw = {"spec": spec, "steps": 40, "init_router_bias": SKEW, "balance_loss": 0.0}
    off = train(tiny_config(tmp_path / "off", corpus, bias_update_rate=0.0, **kw)).records
    on = train(tiny_config(tmp_path / "on", corpus, bias_update_rate=0.004, **kw)).records
    start = off[0]["load_imbalance_mean"]
    assert start > 2.0
    # Without the bias update, training collapses the routing further (rich get richer).
    late_off, late_on = _late_imbalance(off), _late_imbalance(on)
    assert late_off > start
    assert late_on < 0.6 * late_off, (late_on, late_off)
    assert late_on < start


def test_update_rule_is_sign_of_mean_minus_load():
    from glmc import presets
    from glmc.api import build_torch

    m = build_torch(presets.get("glm-tiny"))
    rs = routers(m)
    for r in rs:
        r.tokens_per_expert.copy_(torch.tensor([9.0, 1, 4, 4, 4, 4, 4, 2]))  # mean 4
    counts = global_counts(rs)
    assert all(float(r.tokens_per_expert.sum()) == 0 for r in rs)  # consumed
    update_bias(rs, counts, rate=0.5)
    want = torch.tensor([-0.5, 0.5, 0, 0, 0, 0, 0, 0.5])
    for r in rs:
        torch.testing.assert_close(r.e_score_correction_bias, want)
    assert imbalance(counts)[0] == 9 / 4


def test_activation_checkpoint_counts_tokens_once(tmp_path, corpus):
    a = train(tiny_config(tmp_path / "a", corpus, steps=3)).records
    b = train(tiny_config(tmp_path / "b", corpus, steps=3, activation_checkpoint=True)).records
    for x, y in zip(a, b, strict=True):
        assert x["load_imbalance"] == y["load_imbalance"]  # same counts, so no double counting
        assert abs(x["loss"] - y["loss"]) < 1e-5
