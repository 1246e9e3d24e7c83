"""quality_bench's method rows: the share of all parameters put into each method's own unit is the one the method
then removes (checked on a tiny model by running the method), and the row names parse back."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))
import quality_bench as qb  # noqa: E402

from core.models.llama import count_params  # noqa: E402


def test_row_names_parse_back():
    for name in ("method:shortgpt", "method:slicegpt", "method:flap", "depth:search:comp", "depth:block:nocomp",
                 "joint:4", "obs:comp:uniform"):
        assert qb.row_name(*qb.parse_rows(name)[0]) == name
    for bad in ("method:wanda", "depth:search", "depth:exhaustive:comp"):
        with pytest.raises(SystemExit, match="--rows"):
            qb.parse_rows(bad)


@pytest.mark.parametrize("width", [64, 48, 16])
def test_sliced_params_is_what_slicegpt_leaves(tiny, calib, width):
    from pruning.slicegpt import SliceGPT

    tiny = tiny[0]
    d = tiny.config.hidden_size
    predicted = qb.sliced_params(tiny, width)
    norms = sum(p.numel() for n, p in tiny.named_parameters() if p.dim() == 1)
    SliceGPT(sparsity=max(0.0, 1 - (width + 0.5) / d), progress=False)(tiny, calib)
    after = count_params(tiny)
    assert tiny.model.embed_tokens.weight.shape[1] == width
    assert after <= predicted <= after + norms  # an upper bound by at most the norm weights


@pytest.mark.parametrize("ratio", [0.25, 0.4, 0.5])
def test_depth_and_flap_budgets_reach_the_share(ratio):
    from core.models.load import build_tiny

    tiny = build_tiny(num_layers=8, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, seed=0)[0]
    total = count_params(tiny)
    over, derived = qb.method_overrides("depth", ratio, tiny)
    n, per_layer = derived["num_layers"], derived["layer_params"]
    assert over == [f"pruner.num_layers={n}"]
    assert n * per_layer >= ratio * total > (n - 1) * per_layer  # the fewest whole layers reaching it
    # FLAP's share is over the attention + MLP parameters of its ranges (here layers 3..4 of 8: ~15% of the model)
    small = ratio / 5
    over, derived = qb.method_overrides("flap", small, tiny)
    assert math.isclose(derived["ratio_of_prunable"] * derived["prunable"], small * total + derived["bias_params"],
                        rel_tol=1e-5)  # FLAP's compensation biases (hidden size per o_proj / down_proj) on top
    with pytest.raises(SystemExit, match="cannot remove"):
        qb.method_overrides("flap", ratio, tiny)


def test_slicegpt_budget_is_the_widest_fitting_width(tiny):
    tiny = tiny[0]
    total = count_params(tiny)
    _, derived = qb.method_overrides("slicegpt", 0.25, tiny)
    w = derived["sliced_width"]
    assert w % 8 == 0 and qb.sliced_params(tiny, w) <= 0.75 * total < qb.sliced_params(tiny, w + 8)
    assert int((1 - derived["sparsity"]) * tiny.config.hidden_size) == w
