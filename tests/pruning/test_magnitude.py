"""Magnitude pruning and the shared mask helpers on tiny random GQA Llamas: exact patterns, thresholds, ranges,
structured removal, bad input."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose
from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params
from core.models.load import build_tiny
from pruning import PruneError
from pruning.magnitude import Magnitude, channel_norms, group_norms
from pruning.sparsity import (TARGETS, global_threshold, linear, nm_mask, parse_pattern, threshold_mask,
                              unstructured_mask)

HD = 8  # head_dim of the tiny model (64 / 8 heads); 2 KV groups of 4 query heads


def weights(model) -> dict[tuple[int, str], torch.Tensor]:
    return {(l, n): linear(layer, n).weight.detach().clone() for l, layer in enumerate(model.model.layers)
            for n in TARGETS}


def lowest_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k lowest entries (scores of random weights have no ties)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[torch.argsort(score.reshape(-1))[:k]] = True
    return mask.view_as(score)


# --------------------------------------------------------------------------- mask helpers


def test_global_threshold_is_exact_with_ties():
    a = torch.tensor([[0.5, 0.1, 0.1], [0.1, 0.9, 0.0]])
    b = torch.tensor([0.1, 0.3, 0.1, 2.0])
    for k in range(0, 10):
        th = global_threshold(lambda: [a, b], k)
        masks = [threshold_mask(a, th), threshold_mask(b, th)]
        assert sum(int(m.sum()) for m in masks) == k
        flat = torch.cat([a.reshape(-1), b])
        chosen = torch.cat([m.reshape(-1) for m in masks])
        if k:  # everything chosen is <= everything left, and ties go by position
            assert flat[chosen].max() <= flat[~chosen].min()
            tie = flat[chosen].max()
            ties = (flat == tie).nonzero().squeeze(1)
            taken = chosen[ties]
            assert torch.equal(taken, torch.sort(taken, descending=True).values)


def test_global_threshold_matches_a_full_sort_on_many_values():
    g = torch.Generator().manual_seed(1)
    parts = [torch.rand(300, 70, generator=g), torch.rand(5000, generator=g) * 3, torch.rand(17, 9, generator=g)]
    flat = torch.cat([p.reshape(-1) for p in parts])
    for k in (1, 1234, flat.numel() // 2, flat.numel() - 1):
        th = global_threshold(lambda: parts, k)
        assert th.value == torch.sort(flat).values[k - 1].item()
        assert sum(int(threshold_mask(p, th).sum()) for p in parts) == k


def test_unstructured_and_nm_masks_exact_counts():
    g = torch.Generator().manual_seed(2)
    s = torch.rand(6, 16, generator=g)
    assert torch.equal(unstructured_mask(s, 0.25, per_row=True).sum(1), torch.full((6,), 4))
    assert int(unstructured_mask(s, 0.3, per_row=False).sum()) == int(96 * 0.3)
    m = nm_mask(s, 2, 4)
    assert torch.equal(m.view(6, 4, 4).sum(-1), torch.full((6, 4), 2))
    ties = torch.ones(2, 8)  # all equal: the first N of each group go
    assert torch.equal(nm_mask(ties, 1, 4)[0], torch.tensor([True, False, False, False] * 2))
    rows = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0], [2.0, 1.0, 1.0, 1.0, 0.0, 3.0]])
    assert unstructured_mask(rows, 0.5, per_row=True).tolist() == [[True, False, True, False, True, False],
                                                                   [False, True, True, False, True, False]]
    assert unstructured_mask(rows, 0.7, per_row=False).tolist() == [[True, True, True, True, True, True],
                                                                    [False, True, False, False, True, False]]
    assert int(unstructured_mask(s, 0.0, per_row=True).sum()) == 0


@pytest.mark.parametrize("value,want", [("2:4", "2:4"), ("4:8", "4:8"), (124, "2:4"), (248, "4:8"), ("'2:4'", "2:4"),
                                        ("unstructured", "unstructured"), ("structured", "structured")])
def test_pattern_spellings(value, want):
    assert str(parse_pattern(value)) == want


def test_command_line_pattern_is_a_string(tmp_path):
    from recipes._common import build

    for override, want in (("pruner.pattern=2:4", "2:4"), ("pruner.pattern=4:8", "4:8")):
        cfg = compose(["pruner=magnitude", override], tmp_path)
        assert build(cfg.pruner, "pruner").pattern == want


# --------------------------------------------------------------------------- unstructured


def test_per_layer_threshold_zeros_exactly_the_smallest(tiny):
    model, _ = tiny
    before = weights(model)
    res = Magnitude(ratio=0.5)(model, None)
    for (l, n), w in before.items():
        now = linear(model.model.layers[l], n).weight
        zero = now == 0
        assert torch.equal(zero, lowest_k(w.abs(), w.numel() // 2)), (l, n)
        assert torch.equal(now[~zero], w[~zero])  # the rest untouched
    assert res.compression == {"unit": "sparsity", "amount": 0.5, "pattern": "unstructured"}
    assert res.details["sparsity_of_all_linears"] == 0.5
    assert res.params_before == res.params_after == count_params(model)  # shapes unchanged: nothing removed
    assert res.details["zeros_added"] == sum(w.numel() for w in before.values()) // 2
    assert any("dense kernels gain no speed" in n for n in res.notes)
    assert any("to_sparse_semi_structured" in n for n in res.notes)


def test_row_scope_zeros_the_smallest_of_each_row(tiny):
    model, _ = tiny
    before = weights(model)
    Magnitude(ratio=0.25, scope="row")(model, None)
    for (l, n), w in before.items():
        zero = linear(model.model.layers[l], n).weight == 0
        k = w.shape[1] // 4
        for r in range(w.shape[0]):
            assert torch.equal(zero[r], lowest_k(w[r].abs(), k)), (l, n, r)


def test_global_threshold_takes_more_from_small_layers(tiny):
    model, _ = tiny
    with torch.no_grad():
        for n in TARGETS:
            linear(model.model.layers[1], n).weight.mul_(0.1)  # layer 1's weights are all small
    per_layer, glob = copy.deepcopy(model), copy.deepcopy(model)
    before = weights(model)
    r_layer = Magnitude(ratio=0.4)(per_layer, None)
    r_global = Magnitude(ratio=0.4, scope="global")(glob, None)
    sp = {e["layer"]: e["sparsity"] for e in r_layer.layers}
    assert all(abs(v - 0.4) < 0.01 for s in sp.values() for v in s.values())
    gsp = {e["layer"]: e["sparsity"] for e in r_global.layers}
    assert min(gsp[1].values()) > 0.9 and max(gsp[0].values()) < 0.4
    # exactly the globally smallest 40% of all targeted weights are zero
    flat = torch.cat([w.abs().reshape(-1) for w in before.values()])
    want = lowest_k(flat, int(flat.numel() * 0.4))
    got = torch.cat([(linear(glob.model.layers[l], n).weight == 0).reshape(-1) for (l, n) in before])
    assert torch.equal(got, want)
    assert r_global.compression["amount"] == int(flat.numel() * 0.4) / flat.numel()


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_row_by_row(tiny, pattern, n, m):
    model, _ = tiny
    before = weights(model)
    res = Magnitude(ratio=0.3, pattern=pattern)(model, None)
    for (l, name), w in before.items():
        zero = (linear(model.model.layers[l], name).weight == 0)
        rows, cols = w.shape
        groups_w = w.abs().view(rows, cols // m, m)
        groups_z = zero.view(rows, cols // m, m)
        assert torch.equal(groups_z.sum(-1), torch.full((rows, cols // m), n))  # exactly N zeros in every group
        smallest = torch.zeros_like(groups_z).scatter_(-1, groups_w.argsort(-1)[..., :n], True)
        assert torch.equal(groups_z, smallest), (l, name)  # ... the N smallest
    assert res.compression["amount"] == pytest.approx(n / m)
    assert any("fixes the sparsity" in note for note in res.notes)


def test_layer_ranges_and_targets_honoured(tiny):
    model, _ = tiny
    before = weights(model)
    res = Magnitude(ratio=0.5, attention_layers=(1, 2), mlp_layers=(2, 4), targets=["q", "o", "down"])(model, None)
    pruned = {(1, "q"), (1, "o"), (2, "down"), (3, "down")}
    for (l, n), w in before.items():
        now = linear(model.model.layers[l], n).weight
        if (l, n) in pruned:
            assert int((now == 0).sum()) == w.numel() // 2
        else:
            assert torch.equal(now, w), (l, n)  # bit-identical
    assert res.ranges == {"attention": [1, 2], "mlp": [2, 4]}
    assert res.details["targets"] == ["q", "o", "down"]


def test_zero_ratio_skips_a_block(tiny):
    model, _ = tiny
    before = weights(model)
    Magnitude(ratio=0.5, attention_ratio=0.0, attention_layers=(2, 2))(model, None)  # empty range is fine at 0
    for (l, n), w in before.items():
        assert torch.equal(linear(model.model.layers[l], n).weight, w) == (n in ("q", "k", "v", "o"))


def test_deterministic(tiny):
    model, _ = tiny
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    Magnitude(ratio=0.6, scope="global")(a, None)
    Magnitude(ratio=0.6, scope="global")(b, None)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- structured


def test_structured_removes_lowest_norm_units_gqa_consistently(tiny, calib):
    model, tok = tiny
    ref = copy.deepcopy(model)
    a = model.model.layers[1].self_attn
    with torch.no_grad():  # make KV group 0 of layer 1 clearly the smallest across q, k, v, o
        a.q_proj.weight[:32] *= 0.01
        a.k_proj.weight[:8] *= 0.01
        a.v_proj.weight[:8] *= 0.01
        a.o_proj.weight[:, :32] *= 0.01
    scores = {l: (group_norms(layer, HD, "l2"), channel_norms(layer, "l2")) for l, layer in enumerate(model.model.layers)}
    layer2 = copy.deepcopy(model.model.layers[2])
    res = Magnitude(ratio=0.5, pattern="structured", attention_layers=(1, 3), mlp_layers=(0, 3))(model, None)
    geo = Geometry.of(model)
    assert geo.kv_heads == (2, 1, 1, 2) and geo.heads == (8, 4, 4, 8)  # whole groups: 1 KV head + its 4 query heads
    assert geo.widths == (64, 64, 64, 128)
    assert res.layers[1]["removed_kv_groups"] == [0]
    assert res.layers[2]["removed_kv_groups"] == [int(scores[2][0].argmin())]
    keep = torch.sort(torch.topk(scores[2][1], 64).indices).values  # the 64 largest-norm channels stay
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, layer2.mlp.down_proj.weight[:, keep])
    # norm: sqrt of the summed squares of gate row, up row and down column
    m = ref.model.layers[3].mlp
    hand = (m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1) + m.down_proj.weight.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(channel_norms(ref.model.layers[3], "l2"), hand)
    assert res.compression["unit"] == "groups" and res.compression["amount"] == 0.5
    assert res.compression["params_removed"] == pytest.approx(1 - res.params_after / res.params_before)
    assert res.params_after == count_params(model)
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()
    out = model.generate(calib[:1, :5], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_structured_checkpoint_round_trips(tiny, calib, tmp_path):
    from core.models.checkpoint import save_checkpoint
    from core.models.load import load_model
    from core.models.ref import ModelRef

    model, tok = tiny
    Magnitude(ratio=0.5, pattern="structured", norm="l1", attention_layers=(0, 2), mlp_layers=(1, 4))(model, None)
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "magnitude"})
    loaded, _ = load_model(ModelRef.at(out), cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, model(calib).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,match", [
    (dict(ratio=1.0), r"ratio=1.0 must be a number in \[0, 1\)"),
    (dict(ratio=-0.1), r"ratio=-0.1 must be"),
    (dict(mlp_ratio=1.5), r"pruner.mlp_ratio=1.5 must be"),
    (dict(pattern="4:4"), r"pruner.pattern='4:4'.*1 <= N < M"),
    (dict(pattern="5:4"), r"pruner.pattern='5:4'.*1 <= N < M"),
    (dict(pattern="2-4"), r"pruner.pattern='2-4' is not one of"),
    (dict(scope="rows"), r"pruner.scope='rows' is not one of layer, row, global"),
    (dict(scope="global", pattern="2:4"), r"scope='global' applies to pattern=unstructured only"),
    (dict(scope="global", attention_ratio=0.3), r"attention_ratio and mlp_ratio must be equal"),
    (dict(targets=["q", "qq"]), r"pruner.targets=\['q', 'qq'\] must be distinct names"),
    (dict(pattern="structured", targets=["q"]), r"pruner.targets applies to unstructured and N:M"),
    (dict(norm="l3"), r"pruner.norm='l3'"),
    (dict(ratio_target="params"), r"ratio_target='params' is not supported by pruner=magnitude"),
    (dict(mlp_layers=(3, 1)), r"layers.mlp: start=3 is after end=1"),
])
def test_bad_options_fail_at_build(kw, match):
    with pytest.raises(ConfigError, match=match):
        Magnitude(**kw)


def test_nm_width_not_a_multiple_is_named_before_any_change():
    model, _ = build_tiny(num_layers=2, hidden_size=64, intermediate_size=100, num_heads=8, num_kv_heads=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruneError, match=r"pattern='4:8': layer 0 mlp.down_proj has 100 input columns, not a multiple of M=8"):
        Magnitude(pattern="4:8")(model, None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kw,match", [
    (dict(ratio=0.25), r"pruner.attention_ratio=0.25 rounds \(floor\) to 0 KV groups in every layer.*"
                       r"possible: 0 \(skip: pruner.attention_ratio=0\), or with 2 KV groups per layer: >= 0.5 removes 1"),
    (dict(ratio=0.8, rounding="nearest"), r"pruner.attention_ratio=0.8 removes all 2 KV groups of layer 0 "
                                          r"\(rounding=nearest\); one must stay: use a ratio below 0.75"),
    (dict(ratio=0.5, mlp_ratio=0.001), r"pruner.mlp_ratio=0.001 rounds \(floor\) to 0 MLP channels"),
])
def test_structured_ratios_the_layout_cannot_honour(tiny, kw, match):
    model, _ = tiny
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PruneError, match=match):
        Magnitude(pattern="structured", **kw)(model, None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_check_resolves_ranges_without_weights():
    with pytest.raises(PruneError, match="beyond the model's depth"):
        Magnitude(attention_layers=(0, 9)).check(4)
    with pytest.raises(PruneError, match=r"layers.mlp: \[2, 2\) is empty but its ratio is 0.5"):
        Magnitude(mlp_layers=(2, 2)).check(4)
    Magnitude(mlp_layers=(2, 2), targets=["q", "k"]).check(4)  # no MLP target: an empty MLP range is fine


def test_building_imports_no_torch():
    code = ("import sys; from pruning.magnitude import Magnitude; from pruning.wanda import Wanda; "
            "Magnitude(ratio=0.5, pattern='2:4'); Wanda(pattern='structured'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
