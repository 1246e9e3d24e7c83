"""The compensated structured pruner (pruner=obs) on tiny random GQA Llamas: options, the parameter budget and its
allocation, KV-group removal, the guard and its record, compensation off, the checkpoint, a run through run.py."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import CACHE_DIR, ROOT
from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params
from pruning import PruneError
from pruning.obs.allocate import allocate_channels
from pruning.obs.pruner import StructuredOBS

# config.json geometries (the keys the token rule reads) of SmolLM2-135M-Instruct, Llama-3.2-1B, Llama-3-8B and
# Llama-3-70B
SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
           "num_key_value_heads": 3}
LLAMA32_1B = {"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
              "num_key_value_heads": 8}
LLAMA3_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8}
LLAMA3_70B = {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
              "num_key_value_heads": 8}

# tiny: 4 layers, hidden 64, MLP 128, 8 heads / 2 KV heads of head_dim 8, 172,992 parameters;
# one MLP channel = 3 x 64 = 192 parameters, one KV group = 2 x (4 x 8 x 64) + 2 x (8 x 64) = 5,120.
CHANNEL, HIDDEN = 192, 64


def obs(**kw) -> StructuredOBS:
    """Tests feed their own calibration batch (tokens=None), keep the log quiet and run float32 layer forwards on
    every CPU (the default autocast=auto is bfloat16 on AVX512-BF16/AMX ones)."""
    return StructuredOBS(**{"tokens": None, "seq_len": 8, "progress": False, "autocast": None, **kw})


@pytest.fixture
def data():
    """64 x 32 = 2,048 calibration tokens: 16x the 129 unknowns per row of a down_proj with its bias."""
    return torch.randint(0, 256, (64, 32), generator=torch.Generator().manual_seed(0))


def kept_rows(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Which rows of ``old`` the rows of ``new`` are, in order (rows nobody refits: gate/up_proj, k_proj)."""
    rows = []
    for r in new:
        hit = (old == r).all(1).nonzero().squeeze(1)
        assert hit.numel() == 1, "a kept row is not an original row"
        rows.append(int(hit))
    assert rows == sorted(rows)
    return rows


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("kw,match", [
    ({"ratio": 1.0}, r"ratio=1.0 must be in \[0, 1\)"),
    ({"ratio": -0.1}, r"ratio=-0.1 must be in \[0, 1\)"),
    ({"ratio": True}, r"ratio=True must be in \[0, 1\)"),
    ({"selection": "OBS"}, r"pruner.selection='OBS' is not one of obs, wanda, flap, magnitude"),
    ({"allocation": "even"}, r"pruner.allocation='even' is not one of .*uniform"),
    ({"ratio_target": "layers"}, r"pruner.ratio_target='layers' is not one of params, groups"),
    ({"target": "model"}, r"pruner.target='model' is not one of dense, layer"),
    ({"attention_ratio": 1.0}, r"pruner.attention_ratio=1.0 must be in \[0, 1\)"),
    ({"attention_ratio": None}, r"pruner.attention_ratio=null means `ratio` of the KV groups, which only "
                                r"ratio_target=groups defines"),
    ({"compensate": "yes"}, r"pruner.compensate='yes' must be true or false"),
    ({"guard": 1}, r"pruner.guard=1 must be true or false"),
    ({"holdout": 0.5}, r"pruner.holdout=0.5 must be in \[0, 0.5\)"),
    ({"damp": 0}, r"pruner.damp=0 must be > 0"),
    ({"rounds": 0}, r"pruner.rounds=0 must be an integer >= 1"),
    ({"min_channels": 0}, r"pruner.min_channels=0 must be an integer >= 1"),
    ({"seq_len": 4}, r"pruner.seq_len=4 must be an integer >= 8"),
    ({"tokens": 100, "seq_len": 512}, r"pruner.tokens=100 must be auto, null or an integer >= pruner.seq_len"),
    ({"tokens": "many"}, r"pruner.tokens='many' must be auto, null or an integer >= pruner.seq_len"),
    ({"tokens": "auto", "tokens_per_unknown": 0}, r"pruner.tokens_per_unknown=0 must be a number > 0"),
    ({"tokens": "auto", "min_tokens": 256, "seq_len": 512}, r"pruner.min_tokens=256 must be >= pruner.seq_len=512"),
    ({"tokens": "auto", "min_tokens": 4096, "max_tokens": 2048}, r"pruner.max_tokens=2048 is below "
                                                                 r"pruner.min_tokens=4096"),
    ({"tokens": "auto", "min_tokens": 512, "seq_len": 512}, r"pruner.guard=true holds out calibration samples, but "
                                                            r"the rule's floor pruner.min_tokens=512 in windows of "
                                                            r"pruner.seq_len=512 is one sample"),
    ({"tokens": "auto", "min_tokens": 512, "seq_len": 512, "allocation": "search", "guard": False},
     r"pruner.allocation=search fits on at least 2 calibration samples, but the rule's floor pruner.min_tokens=512"),
    ({"batch_size": -1}, r"pruner.batch_size=-1 must be an integer >= 0"),
    ({"offload": True}, r"pruner.offload=true needs pruner.device"),
    ({"device": 0}, r"pruner.device=0 must be a device name"),
    ({"attention_layers": (3, 1)}, r"layers.attention: start=3 is after end=1"),
    ({"autocast": "bf16"}, r"pruner.autocast='bf16' is not one of null, auto, bfloat16, float16"),
    # an option that cannot take effect is an error, not ignored
    ({"holdout": 0.0}, r"pruner.guard=true judges each compensation on held-out samples, but pruner.holdout=0 "
                       r"holds out none: give a share in \(0, 0.5\) or set pruner.guard=false"),
    ({"tokens": 512, "seq_len": 512}, r"pruner.guard=true holds out calibration samples, but pruner.tokens=512 in "
                                      r"windows of pruner.seq_len=512 is one sample, none to spare"),
    ({"refit_attention": True, "target": "layer"}, r"pruner.refit_attention=true refits o_proj towards the dense "
                                                   r"model's outputs: it needs pruner.target=dense and "
                                                   r"pruner.compensate=true \(here target=layer, compensate=true\)"),
    ({"refit_attention": True, "compensate": False}, r"pruner.refit_attention=true .* \(here target=dense, "
                                                     r"compensate=false\)"),
])
def test_bad_options_are_one_config_error(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        obs(**kw)
    assert "\n" not in str(e.value)


def test_every_bad_option_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        obs(ratio=2.0, selection="x", damp=-1, rounds=0)
    msg = str(e.value)
    assert "\n" not in msg and msg.count("; ") == 3
    for part in ("ratio=2.0", "pruner.selection='x'", "pruner.damp=-1", "pruner.rounds=0"):
        assert part in msg


def test_the_option_file_builds_the_pruner():
    from conftest import compose
    from recipes._common import build

    cfg = compose(["pruner=obs", "ratio=0.3", "pruner.selection=wanda"], ROOT / "outputs" / "unused")
    p = build(cfg.pruner, "pruner")
    assert isinstance(p, StructuredOBS) and p.ratio == 0.3 and p.selection == "wanda" and p.ratio_target == "params"
    assert p.tokens == "auto"
    assert p.calibration_plan(SMOLLM2).shape == (63, 512)  # 21 x 1536 unknowns = 32,256 tokens in windows of 512


def test_building_from_options_needs_no_torch():
    code = ("import sys; from pruning.obs.pruner import StructuredOBS; p = StructuredOBS(ratio=0.2); p.check(30); "
            f"print(p.calibration_plan({SMOLLM2!r}).shape, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "(63, 512) False", out.stderr


@pytest.mark.parametrize("kw,match", [
    ({"attention_layers": (0, 9)}, r"layers.attention: \[0, 9\) is beyond the model's depth of 4"),
    ({"mlp_layers": (-9, None)}, r"layers.mlp: \[-9, 4\) is beyond the model's depth of 4"),
    ({"attention_layers": (2, 2), "attention_ratio": 0.5},
     r"layers.attention: \[2, 2\) is empty but its ratio is 0.5; to skip attention pruning set pruner.attention_ratio=0"),
])
def test_bad_ranges_fail_in_check(kw, match):
    with pytest.raises(PruneError, match=match):
        obs(ratio=0.2, **kw).check(4)


def test_an_empty_mlp_range_names_options_obs_has():
    with pytest.raises(PruneError, match=r"layers.mlp: \[1, 1\) is empty") as e:
        obs(ratio=0.2, mlp_layers=(1, 1)).check(4)
    assert "mlp_ratio" not in str(e.value)


@pytest.mark.parametrize("kw,calibration,match", [
    # 4 layers x 127 removable channels x 192 of 172,992 parameters = 0.5638 (KV groups: attention_ratio=0)
    ({"ratio": 0.6}, True, r"obs: ratio=0.6 of all parameters cannot be removed inside layers.mlp \[0, 4\] "
                           r"\(at most 0.5638 while every layer keeps pruner.min_channels=1\); widen the range or lower the ratio"),
    ({"ratio": 0.2, "mlp_layers": (0, 1)}, True, r"at most 0.1409"),
    ({"ratio": 0.2}, False, r"obs needs calibration tokens"),
    ({"ratio": 0.2, "device": "nodevice"}, True, r"pruner.device='nodevice' is not a device"),
])
def test_impossible_requests_fail_before_the_model_changes(tiny, data, kw, calibration, match):
    model, _ = tiny
    ref = copy.deepcopy(model)
    with pytest.raises(PruneError, match=match):
        obs(**kw)(model, data if calibration else None)
    assert all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_unsupported_architecture_is_named(data):
    class Odd(torch.nn.Module):
        pass

    with pytest.raises(PruneError, match="obs: unsupported architecture Odd"):
        obs(ratio=0.2)(Odd(), data)


# --------------------------------------------------------------------------- the budget


@pytest.mark.parametrize("ratio,attention_ratio", [(0.05, 0.0), (0.2, 0.0), (0.4, 0.0), (0.2, 0.5), (0.4, 0.5)])
@pytest.mark.parametrize("compensate", [False, True])
def test_params_target_is_met_within_one_channel(tiny, data, ratio, attention_ratio, compensate):
    """guard=False: every refitted bias is added, so the net removal is exactly as planned."""
    model, _ = tiny
    p0 = count_params(model)
    res = obs(ratio=ratio, attention_ratio=attention_ratio, compensate=compensate, guard=False)(model, data)
    target = (1 - ratio) * p0
    assert res.params_before == p0 and res.params_after == count_params(model)
    assert target - CHANNEL < res.params_after <= target
    assert res.compression == {"unit": "params", "amount": pytest.approx(1 - res.params_after / p0)}
    assert all(l.mlp.down_proj.bias is not None for l in model.model.layers) == compensate
    d = res.details
    assert d["kv_groups_removed"] == ({l: 1 for l in range(4)} if attention_ratio else {})
    assert [l["kv_heads"] for l in res.layers] == [[2, 2 - d["kv_groups_removed"].get(i, 0)] for i in range(4)]
    assert [l["intermediate_size"] for l in res.layers] == [[128, 128 - d["channels_removed"].get(i, 0)]
                                                            for i in range(4)]


def test_params_target_with_the_guard_is_met_within_one_channel_and_the_biases(tiny, data):
    """A rejected update adds no bias: the model may end up to one bias vector per projection smaller."""
    model, _ = tiny
    p0 = count_params(model)
    res = obs(ratio=0.2, attention_ratio=0.5)(model, data)
    target = 0.8 * p0
    projections = len(res.details["projections"])
    assert projections == 8
    assert target - CHANNEL - HIDDEN * projections < res.params_after <= target
    rejected = res.details["updates_rejected"]
    assert target - CHANNEL - HIDDEN * rejected < res.params_after


def test_ratio_zero_changes_nothing(tiny, data):
    model, _ = tiny
    ref = copy.deepcopy(model)
    res = obs(ratio=0.0)(model, data)
    assert res.params_after == res.params_before and res.details["channels_removed"] == {}
    assert all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


@pytest.mark.parametrize("ratio,attention_ratio", [(0.25, None), (0.3, 0.5), (0.1, 0.0)])
def test_groups_target_takes_the_share_of_each_layer(tiny, data, ratio, attention_ratio):
    model, _ = tiny
    res = obs(ratio=ratio, ratio_target="groups", attention_ratio=attention_ratio, mlp_layers=(1, 4))(model, data)
    att = ratio if attention_ratio is None else attention_ratio
    for i, layer in enumerate(model.model.layers):
        width = 128 - (math.floor(ratio * 128) if i >= 1 else 0)
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == width
        assert layer.mlp.down_proj.in_features == width
        assert layer.self_attn.k_proj.out_features == 8 * (2 - math.floor(att * 2))
    assert res.params_after == count_params(model)


# --------------------------------------------------------------------------- allocation

GEO = Geometry(hidden=4, head_dim=2, heads=(4,) * 5, kv_heads=(2,) * 5, widths=(10, 10, 3, 10, 10),
               attn_bias=False, mlp_bias=False)


@pytest.mark.parametrize("allocation", ["uniform", "depth", "flap"])
@pytest.mark.parametrize("total", [0, 1, 7, 20, 31, 33])
@pytest.mark.parametrize("min_channels", [1, 2])
def test_allocations_sum_exactly_and_respect_min_channels(allocation, total, min_channels):
    g = torch.Generator().manual_seed(total)
    scores = {l: torch.randn(GEO.widths[l], generator=g) for l in range(5)}
    cap = sum(w - min_channels for w in GEO.widths)
    if total > cap:
        with pytest.raises(PruneError, match=f"{total} MLP channels cannot be removed while each layer keeps "
                                             f"{min_channels}"):
            allocate_channels(GEO, (0, 5), total, allocation, min_channels, scores)
        return
    plan = allocate_channels(GEO, (0, 5), total, allocation, min_channels, scores)
    assert sum(plan.values()) == total and all(c > 0 for c in plan.values())
    assert all(GEO.widths[l] - c >= min_channels for l, c in plan.items())


def test_uniform_and_depth_shapes():
    geo = Geometry(hidden=4, head_dim=2, heads=(4,) * 6, kv_heads=(2,) * 6, widths=(100,) * 6,
                   attn_bias=False, mlp_bias=False)
    uniform = allocate_channels(geo, (1, 5), 42, "uniform")
    assert sorted(uniform) == [1, 2, 3, 4] and sorted(uniform.values()) == [10, 10, 11, 11]
    depth = allocate_channels(geo, (1, 5), 60, "depth")  # weights 0.5, 0.833, 1.167, 1.5 of the mean 15
    exact = {1: 7.5, 2: 12.5, 3: 17.5, 4: 22.5}
    assert sum(depth.values()) == 60 and all(abs(depth[l] - exact[l]) < 1 for l in exact)
    # a capped layer's share goes to the others: layer 2 of GEO keeps 1 of its 3
    capped = allocate_channels(GEO, (0, 5), 30, "uniform")
    assert capped[2] == 2 and sum(capped.values()) == 30 and max(capped.values()) - min(capped[l] for l in (0, 1, 3, 4)) <= 1


def test_flap_allocation_takes_the_lowest_scores_across_layers():
    scores = {0: torch.tensor([0.1, 5.0, 6.0, 7.0]), 1: torch.tensor([-3.0, -2.0, -1.0, 8.0]),
              2: torch.tensor([0.2, 9.0, 9.0, 9.0])}
    geo = Geometry(hidden=4, head_dim=2, heads=(4,) * 3, kv_heads=(2,) * 3, widths=(4, 4, 4),
                   attn_bias=False, mlp_bias=False)
    assert allocate_channels(geo, (0, 3), 4, "flap", 1, scores) == {0: 1, 1: 3}
    assert allocate_channels(geo, (0, 3), 5, "flap", 1, scores) == {0: 1, 1: 3, 2: 1}
    # min_channels=2: layer 1 stops at 2 although its third channel (-1.0) is the global third-lowest
    assert allocate_channels(geo, (0, 3), 4, "flap", 2, scores) == {0: 1, 1: 2, 2: 1}


@pytest.mark.parametrize("allocation", ["uniform", "depth", "flap"])
def test_the_model_follows_the_allocation(tiny, data, allocation):
    model, _ = tiny
    res = obs(ratio=0.3, allocation=allocation, mlp_layers=(1, 4), min_channels=8)(model, data)
    plan = res.details["channels_removed"]
    assert set(plan) <= {1, 2, 3} and res.details["allocation"] == allocation
    assert [l.mlp.down_proj.in_features for l in model.model.layers] == [128 - plan.get(i, 0) for i in range(4)]
    assert min(l.mlp.down_proj.in_features for l in model.model.layers) >= 8
    if allocation == "depth":
        assert plan[1] < plan[2] < plan[3]


# --------------------------------------------------------------------------- attention: whole KV groups


def test_kv_groups_are_removed_whole_and_the_model_runs(data):
    from core.models.load import build_tiny

    model, _ = build_tiny(num_heads=8, num_kv_heads=4)  # head_dim 8, 2 query heads per KV head
    ref = copy.deepcopy(model)
    res = obs(ratio=0.25, ratio_target="groups", attention_ratio=0.5)(model, data)
    hd, n_rep = 8, 2
    assert res.details["kv_groups_removed"] == {l: 2 for l in range(4)}
    for i, (layer, old) in enumerate(zip(model.model.layers, ref.model.layers)):
        a, b = layer.self_attn, old.self_attn
        heads = kept_rows(a.k_proj.weight.view(-1, hd * 64), b.k_proj.weight.view(-1, hd * 64))  # whole KV heads
        assert len(heads) == 2
        q_rows = [h * n_rep * hd + j for h in heads for j in range(n_rep * hd)]
        kv_rows = [h * hd + j for h in heads for j in range(hd)]
        assert torch.equal(a.q_proj.weight, b.q_proj.weight[q_rows])  # the query heads of the kept KV heads
        assert torch.equal(a.v_proj.weight, b.v_proj.weight[kv_rows])
        assert a.o_proj.in_features == a.q_proj.out_features == 2 * n_rep * hd
        lc = model.config.layer_configs[i]
        assert lc["num_key_value_heads"] == 2 and lc["num_attention_heads"] == 4
        assert res.layers[i]["kv_heads"] == [4, 2]
    with torch.no_grad():
        logits = model(data[:2]).logits
    assert torch.isfinite(logits).all()
    out = model.generate(data[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False)  # with the KV cache
    assert out.shape == (1, 9)


# --------------------------------------------------------------------------- the record and the guard


def test_one_record_per_pruned_projection_with_the_guards_decision(tiny, data):
    model, _ = tiny
    res = obs(ratio=0.2, attention_ratio=0.5, attention_layers=(1, 3))(model, data)
    d = res.details
    recs = d["projections"]
    assert [(r["layer"], r["kind"]) for r in recs] == [(0, "mlp"), (1, "attention"), (1, "mlp"), (2, "attention"),
                                                        (2, "mlp"), (3, "mlp")]
    held = math.ceil(0.1 * 64)  # the last 7 samples: never fitted
    for r in recs:
        plan = d["kv_groups_removed"] if r["kind"] == "attention" else d["channels_removed"]
        assert r["removed"] == plan[r["layer"]]
        assert r["tokens"] == (64 - held) * 32 and r["heldout_tokens"] == held * 32
        assert r["update"] == ("kept" if r["heldout_error"] < r["heldout_error_plain"] else "rejected")
    assert d["updates_kept"] + d["updates_rejected"] == len(recs)
    assert d["updates_kept"] >= 1  # 16x more tokens than unknowns: compensation helps somewhere
    assert bool(res.notes) == bool(d["updates_rejected"])
    assert d["calibration_tokens"] == 64 * 32


@pytest.mark.parametrize("kw,decision", [({"guard": False}, "kept"), ({"guard": False, "holdout": 0.0}, "kept"),
                                         ({"compensate": False}, None), ({"compensate": False, "holdout": 0.0}, None)])
def test_decisions_without_a_guard(tiny, data, kw, decision):
    model, _ = tiny
    res = obs(ratio=0.2, **kw)(model, data)
    recs = res.details["projections"]
    assert len(recs) == 4 and all(r.get("update") == decision for r in recs)
    assert all("heldout_error" not in r for r in recs)
    assert res.details["updates_kept"] == (4 if decision == "kept" else 0)  # every applied update counted


def test_a_guard_without_held_out_samples_fails_before_the_model_changes(tiny):
    """One calibration sample: the guard would have nothing to judge by (and the record would say no update was
    kept though all were applied); one clear error instead, the model untouched."""
    model, _ = tiny
    ref = copy.deepcopy(model)
    one = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PruneError, match=r"obs: pruner.guard=true holds out pruner.holdout=0.1 of the calibration "
                                         r"samples, which leaves none of these 1 to judge the compensation by"):
        obs(ratio=0.2)(model, one)
    assert all(p.shape == q.shape and torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert obs(ratio=0.2, guard=False)(model, one).details["updates_kept"] == 4


def test_without_compensation_kept_weights_are_unchanged(tiny, data):
    model, _ = tiny
    ref = copy.deepcopy(model)
    comp = copy.deepcopy(model)
    obs(ratio=0.25, attention_ratio=0.5, compensate=False)(model, data)
    obs(ratio=0.25, attention_ratio=0.5, compensate=True, guard=False)(comp, data)
    for layer, old, c in zip(model.model.layers, ref.model.layers, comp.model.layers):
        keep = kept_rows(layer.mlp.gate_proj.weight, old.mlp.gate_proj.weight)
        assert torch.equal(layer.mlp.up_proj.weight, old.mlp.up_proj.weight[keep])
        assert torch.equal(layer.mlp.down_proj.weight, old.mlp.down_proj.weight[:, keep])
        heads = kept_rows(layer.self_attn.k_proj.weight.view(-1, 8 * 64), old.self_attn.k_proj.weight.view(-1, 8 * 64))
        cols = [h * 32 + j for h in heads for j in range(32)]
        assert torch.equal(layer.self_attn.o_proj.weight, old.self_attn.o_proj.weight[:, cols])
        assert layer.mlp.down_proj.bias is None and layer.self_attn.o_proj.bias is None
        # the compensated model did change its kept columns (the test can tell) and gained biases
        keep_c = kept_rows(c.mlp.gate_proj.weight, old.mlp.gate_proj.weight)
        assert not torch.equal(c.mlp.down_proj.weight, old.mlp.down_proj.weight[:, keep_c])
        assert c.mlp.down_proj.bias is not None and c.self_attn.o_proj.bias is not None


def test_layers_outside_the_ranges_are_untouched(tiny, data):
    model, _ = tiny
    ref = copy.deepcopy(model)
    obs(ratio=0.15, attention_ratio=0.5, attention_layers=(1, 3), mlp_layers=(1, 3))(model, data)
    for l in (0, 3):
        for (name, p), q in zip(model.model.layers[l].named_parameters(), ref.model.layers[l].parameters()):
            assert p.shape == q.shape and torch.equal(p, q), (l, name)
    assert model.model.layers[1].mlp.down_proj.in_features < 128


def _mlp_error(model, ref, x: torch.Tensor) -> float:
    """Relative error of layer 0's MLP output against the dense model's on the dense layer-0 MLP input of ``x``
    (layer 0's attention is not pruned here, so every model sees the same input)."""
    seen = {}
    h = ref.model.layers[0].mlp.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        ref(x)
        h.remove()
        want, got = ref.model.layers[0].mlp(seen["x"]), model.model.layers[0].mlp(seen["x"])
    return float((got - want).pow(2).sum() / want.pow(2).sum())


def test_dense_and_layer_targets_agree_on_the_first_pruned_layer(tiny, data):
    """Before any layer is pruned the dense model's output of a projection is the layer's own: same fit."""
    model, _ = tiny
    other = copy.deepcopy(model)
    a = obs(ratio=0.2, ratio_target="groups", mlp_layers=(1, 2), target="dense", guard=False)(model, data)
    b = obs(ratio=0.2, ratio_target="groups", mlp_layers=(1, 2), target="layer", guard=False)(other, data)
    assert a.layers == b.layers
    d1, d2 = model.model.layers[1].mlp.down_proj, other.model.layers[1].mlp.down_proj
    torch.testing.assert_close(d1.weight, d2.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d1.bias, d2.bias, rtol=1e-4, atol=1e-6)


def test_refit_attention_refits_o_proj_of_pruned_layers_after_the_first(tiny, data):
    """refit_attention: from the second pruned layer on (the first's o_proj sees dense inputs) o_proj is refitted
    towards the dense outputs with nothing removed; its bias counts in the budget (guard off: every bias added)."""
    model, _ = tiny
    p0 = count_params(model)
    before = [l.self_attn.o_proj.weight.clone() for l in model.model.layers]
    res = obs(ratio=0.2, refit_attention=True, guard=False)(model, data)
    kinds = [(r["layer"], r["kind"]) for r in res.details["projections"]]
    assert kinds == [(0, "mlp"), (1, "attention_refit"), (1, "mlp"), (2, "attention_refit"), (2, "mlp"),
                     (3, "attention_refit"), (3, "mlp")]
    assert all(r["removed"] == 0 for r in res.details["projections"] if r["kind"] == "attention_refit")
    layers = model.model.layers
    assert torch.equal(layers[0].self_attn.o_proj.weight, before[0]) and layers[0].self_attn.o_proj.bias is None
    assert all(layers[i].self_attn.o_proj.bias is not None and not torch.equal(layers[i].self_attn.o_proj.weight, before[i])
               for i in (1, 2, 3))
    assert [l["kv_heads"] for l in res.layers] == [[2, 2]] * 4
    # the budget counted 4 o_proj biases, 3 were added: at most one bias and one channel under the target
    assert 0.8 * p0 - CHANNEL - HIDDEN < res.params_after <= 0.8 * p0


@pytest.mark.parametrize("overrides,match", [
    (["pruner.target=layer", "pruner.refit_attention=true"], r"pruner.refit_attention=true refits o_proj towards "
                                                             r"the dense model's outputs: it needs pruner.target=dense"),
    (["pruner.holdout=0.0"], r"pruner.guard=true judges each compensation on held-out samples, but "
                             r"pruner.holdout=0 holds out none"),
])
def test_options_that_cannot_take_effect_fail_at_config_validation(overrides, match):
    """target=layer has no drift for refit_attention to undo, and a guard with no held-out sample judges nothing:
    run.py's checks refuse both before any model loads."""
    import run
    from conftest import compose

    cfg = compose(["pruner=obs", *overrides], ROOT / "outputs" / "unused")
    with pytest.raises(ConfigError, match=match):
        run.check(cfg)


def test_the_class_defaults_are_the_option_files():
    """conf/pruner/obs.yaml and StructuredOBS state the same defaults (the interpolated keys, ``${ratio}`` and the
    like, come from the top level)."""
    import dataclasses

    import yaml

    data = yaml.safe_load((ROOT / "conf" / "pruner" / "obs.yaml").read_text())
    fields = {f.name: f.default for f in dataclasses.fields(StructuredOBS)}
    assert set(data) - {"_target_"} == set(fields)
    literal = {k: v for k, v in data.items() if k != "_target_" and not (isinstance(v, str) and v.startswith("${"))}
    assert {k: fields[k] for k in literal} == literal


def test_the_default_damping_reaches_every_fit(tiny, data):
    """The default damp (conf/pruner/obs.yaml's 0.1: regularises the change towards the original weights, which
    measured less damage out of domain than 0.01 / 0.03) is what every projection's fit used, and it changes the
    result: the default prune equals an explicit damp=0.1 and differs from the former 0.01."""
    import yaml

    assert yaml.safe_load((ROOT / "conf" / "pruner" / "obs.yaml").read_text())["damp"] == StructuredOBS().damp == 0.1
    model, _ = tiny
    explicit, former = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(ratio=0.3, ratio_target="groups", mlp_layers=(0, 2))
    res = obs(**kw)(model, data)
    obs(**kw, damp=0.1)(explicit, data)
    obs(**kw, damp=0.01)(former, data)
    assert res.details["damp"] == 0.1
    assert [r["damp"] for r in res.details["projections"]] == [0.1, 0.1]
    downs = [[layer.mlp.down_proj.weight for layer in m.model.layers[:2]] for m in (model, explicit, former)]
    assert all(torch.equal(a, b) for a, b in zip(downs[0], downs[1]))
    assert not all(a.shape == c.shape and torch.allclose(a, c) for a, c in zip(downs[0], downs[2]))


@pytest.mark.parametrize("target", ["layer", "dense"])
@pytest.mark.parametrize("selection", ["wanda", "magnitude", "flap"])
def test_compensation_lowers_the_error_on_fresh_text(tiny, data, selection, target):
    """Enough tokens (16x the unknowns): the refit of the same choice of channels beats plain removal on text
    it never saw (layer 0's MLP: its input is the dense one in every model). Lightly damped (0.01), so the
    least-squares refit itself is measured, not the default's pull towards the original weights."""
    model, _ = tiny
    ref = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    res = obs(ratio=0.3, ratio_target="groups", selection=selection, mlp_layers=(0, 1), target=target,
              damp=0.01)(model, data)
    obs(ratio=0.3, ratio_target="groups", selection=selection, mlp_layers=(0, 1), compensate=False)(plain, data)
    assert res.details["projections"][0]["update"] == "kept"
    fresh = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(7))
    assert _mlp_error(model, ref, fresh) < 0.9 * _mlp_error(plain, ref, fresh)


def test_autocast_prunes_the_same_budget_with_float32_fits(tiny, data):
    """bfloat16 layer forwards: the same parameter count, float32 weights, the choice mostly the same, and the
    refit still beats plain removal on fresh text."""
    model, _ = tiny
    ref, plain, low = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(ratio=0.3, ratio_target="groups", mlp_layers=(0, 2), damp=0.01)  # lightly damped: the refit's own gain
    full = obs(**kw)(model, data)
    half = obs(**kw, autocast="bfloat16")(low, data)
    obs(**kw, compensate=False)(plain, data)
    assert half.details["forward_dtype"] == "bfloat16" and full.details["forward_dtype"] == "float32"
    assert half.params_after == full.params_after
    assert all(p.dtype == torch.float32 for p in low.parameters())
    fresh = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(7))
    assert _mlp_error(low, ref, fresh) < 0.9 * _mlp_error(plain, ref, fresh)
    assert _mlp_error(low, ref, fresh) < 1.2 * _mlp_error(model, ref, fresh)


def test_the_guard_rejects_a_fit_from_too_few_tokens(tiny):
    """10 x 16 tokens, one sample held out: 144 fitted tokens for 129 unknowns per row of down_proj (with its bias),
    almost undamped. The fit follows noise; every projection says rejected and keeps plain removal, and on fresh
    text the guarded model is closer to the dense one than the same fit without the guard."""
    model, _ = tiny
    ref = copy.deepcopy(model)
    unguarded = copy.deepcopy(model)
    few = torch.randint(0, 256, (10, 16), generator=torch.Generator().manual_seed(0))
    res = obs(ratio=0.2, damp=1e-6)(model, few)
    obs(ratio=0.2, damp=1e-6, guard=False)(unguarded, few)
    recs = res.details["projections"]
    assert len(recs) == 4 and [r["update"] for r in recs] == ["rejected"] * 4
    assert all(r["tokens"] == 144 and r["heldout_error"] > r["heldout_error_plain"] for r in recs)
    assert res.details["updates_rejected"] == 4 and "rejected the compensation of 4 projection(s)" in res.notes[0]
    for layer, old in zip(model.model.layers, ref.model.layers):  # plain removal: kept columns as they were
        keep = kept_rows(layer.mlp.gate_proj.weight, old.mlp.gate_proj.weight)
        assert torch.equal(layer.mlp.down_proj.weight, old.mlp.down_proj.weight[:, keep])
        assert layer.mlp.down_proj.bias is None
    fresh = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(7))
    assert _mlp_error(model, ref, fresh) < _mlp_error(unguarded, ref, fresh)
    with torch.no_grad():
        dense = ref(fresh).logits

        def err(m):
            return float((m(fresh).logits - dense).pow(2).sum() / dense.pow(2).sum())

        assert err(model) < err(unguarded)


def test_the_guard_builds_no_autograd_graph(tiny, data):
    import warnings

    model, _ = tiny
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        obs(ratio=0.2, attention_ratio=0.5, target="layer")(model, data)
    assert not [w for w in seen if "requires_grad" in str(w.message)]


def test_micro_batches_and_offload_give_the_same_result(tiny, data):
    model, _ = tiny
    other, third = copy.deepcopy(model), copy.deepcopy(model)
    a = obs(ratio=0.2, attention_ratio=0.5)(model, data)
    b = obs(ratio=0.2, attention_ratio=0.5, batch_size=5)(other, data)
    c = obs(ratio=0.2, attention_ratio=0.5, batch_size=0, offload=True, device="cpu")(third, data)
    for r in (b, c):
        assert r.layers == a.layers and r.params_after == a.params_after
        assert [p["update"] for p in r.details["projections"]] == [p["update"] for p in a.details["projections"]]
    with torch.no_grad():
        logits = model(data[:4]).logits
        for m in (other, third):
            torch.testing.assert_close(m(data[:4]).logits, logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the checkpoint and run.py


def test_checkpoint_reloads_in_plain_transformers_with_identical_logits(tiny, data, tmp_path):
    from core.models.checkpoint import save_checkpoint

    model, tok = tiny
    obs(ratio=0.2, attention_ratio=0.5, guard=False)(model, data)  # every projection refitted: biases everywhere
    lcs = model.config.layer_configs
    assert all(lc.get("down_proj_bias") and lc.get("o_proj_bias") for lc in lcs)
    x = data[:2, :12]
    with torch.no_grad():
        logits = model(x).logits
    torch.save(x, tmp_path / "x.pt")
    torch.save(logits, tmp_path / "ref.pt")
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "obs"})
    script = f"""
import sys
for name in ("core", "pruning", "analysis", "replacement", "recovery", "recipes"):
    sys.modules[name] = None  # prunelab is not importable here
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
layers = m.model.layers
print("BIASES", all(l.mlp.down_proj.bias is not None and l.self_attn.o_proj.bias is not None for l in layers))
print("WIDTHS", [l.mlp.down_proj.in_features for l in layers], [l.self_attn.k_proj.out_features for l in layers])
with torch.no_grad():
    print("MAXDIFF", (m(x).logits - ref).abs().max().item())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    widths = [l.mlp.down_proj.in_features for l in model.model.layers]
    assert "BIASES True" in proc.stdout
    assert f"WIDTHS {widths} {[8] * 4}" in proc.stdout
    assert "MAXDIFF 0.0" in proc.stdout


def test_run_py_prunes_with_the_pruners_calibration_tokens(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), "model=tiny", "pruner=obs", "ratio=0.2", "layers=all",
           "pruner.tokens=1536", "pruner.seq_len=48", "pruner.attention_ratio=0.5", "eval=none", "logger=none",
           f"paths.cache_dir={CACHE_DIR}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and m["method"] == "obs"
    cal = m["data"]["calibration"]
    assert (cal["num_samples"], cal["seq_len"], cal["tokens"]) == (32, 48, 1536)
    assert m["pruning"]["calibration_tokens"] == 1536
    assert m["pruning"]["selection"] == "obs" and len(m["pruning"]["projections"]) == 8
    assert m["params"]["pruned"] <= 0.8 * m["params"]["base"]
    assert (run_dir / "model" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- the calibration size (tokens=auto)


def test_the_token_rule_gives_the_documented_counts_without_torch():
    """tokens=auto: 21 tokens per unknown of a down_proj row, floor 8,192, cap 262,144, whole windows of 512
    (docs/methods/compensated.md, "Calibration size"), from config.json dicts alone."""
    code = ("import json, sys; from pruning.obs.pruner import StructuredOBS; p = StructuredOBS(); "
            "print(json.dumps([p.calibration_plan(c).record() for c in json.loads(sys.argv[1])]), "
            "'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps([SMOLLM2, LLAMA32_1B, LLAMA3_8B, LLAMA3_70B])],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    plans, torch_loaded = out.stdout.strip().rsplit(" ", 1)
    assert torch_loaded == "False"
    smol, l1, l8, l70 = json.loads(plans)
    assert (smol["tokens"], smol["samples"], smol["seq_len"]) == (32256, 63, 512)
    assert smol["rule"] == "21 x 1536 unknowns (down_proj input) = 32256, floor 8192, cap 262144: 63 windows of 512"
    assert (l1["tokens"], l1["samples"]) == (172032, 336)  # 21 x 8,192
    assert (l8["tokens"], l8["samples"]) == (262144, 512)  # 21 x 14,336 = 301,056, capped
    assert l8["rule"] == "21 x 14336 unknowns (down_proj input) = 301056, floor 8192, cap 262144: 512 windows of 512"
    assert (l70["tokens"], l70["samples"]) == (262144, 512)  # 21 x 28,672 = 602,112, capped
    assert l70["rule"].startswith("21 x 28672 unknowns (down_proj input) = 602112, floor 8192, cap 262144")


def test_the_token_rule_follows_what_is_fitted():
    """The widest compensated projection sets the count: o_proj's input once KV groups are removed (or refitted),
    only the layers in range, a floor for small models, whole windows; allocation=search adds its fitness tokens on
    top; an explicit count wins."""
    wide_attention = {**SMOLLM2, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8}  # 32 x 64
    assert StructuredOBS().unknowns(Geometry.from_config(wide_attention)) == (1536, "down_proj input")
    assert StructuredOBS(attention_ratio=0.25).unknowns(Geometry.from_config(wide_attention)) == (2048, "o_proj input")
    assert StructuredOBS(refit_attention=True).unknowns(Geometry.from_config(wide_attention)) == (2048, "o_proj input")
    assert StructuredOBS(attention_ratio=0.25).calibration_plan(wide_attention).tokens == 21 * 2048
    # a pruned checkpoint's per-layer widths: only the layers in layers.mlp count
    narrow = {**SMOLLM2, "layer_configs": [{"intermediate_size": 3000 if l < 3 else 1000} for l in range(30)]}
    assert StructuredOBS(mlp_layers=(3, 27)).unknowns(Geometry.from_config(narrow)) == (1000, "down_proj input")
    tiny = {**SMOLLM2, "intermediate_size": 128}
    assert StructuredOBS().calibration_plan(tiny).shape == (16, 512)  # 21 x 128 = 2,688 < the floor of 8,192
    odd = StructuredOBS(tokens_per_unknown=10, seq_len=500).calibration_plan(SMOLLM2)  # 15,360 -> 31 windows
    assert odd.shape == (31, 500) and odd.tokens == 15500
    capped = StructuredOBS(seq_len=500).calibration_plan(LLAMA3_70B)
    assert capped.tokens <= 262144 and capped.shape == (524, 500)  # rounded down at the cap
    search = StructuredOBS(allocation="search").calibration_plan(SMOLLM2)
    assert search.shape == (63 + 16, 512) and search.rule.endswith("+ 16 for the search's fitness (search_tokens=8192)")
    explicit = StructuredOBS(tokens=131072).calibration_plan(LLAMA3_70B)
    assert explicit.shape == (256, 512) and explicit.rule == "pruner.tokens=131072 (explicit), 256 windows of 512"
    assert StructuredOBS(tokens=None).calibration_plan(SMOLLM2) is None


def test_the_record_says_how_the_calibration_size_was_derived(tiny, data):
    """A batch of the rule's size is recorded with the rule; another one says it was given, and what the rule gives."""
    tiny, _ = tiny
    rule = obs(ratio=0.2, tokens="auto", tokens_per_unknown=8, min_tokens=256, seq_len=32)
    assert rule.calibration_plan(Geometry.of(tiny)).shape == (32, 32)  # 8 x 128 unknowns = 1,024 tokens
    res = rule(copy.deepcopy(tiny), data[:32])
    assert res.details["calibration"] == {"tokens": 1024, "samples": 32, "seq_len": 32, "rule": (
        "8 x 128 unknowns (down_proj input) = 1024, floor 256, cap 262144: 32 windows of 32")}
    res = rule(copy.deepcopy(tiny), data)
    assert res.details["calibration"]["tokens"] == 2048
    assert res.details["calibration"]["rule"].startswith("given by the caller (64 x 32); this pruner would draw 1024")
    assert obs(ratio=0.2)(copy.deepcopy(tiny), data).details["calibration"]["rule"] == \
        "pruner.tokens=null: the data config's 64 samples x 32"


def test_run_py_draws_the_rules_tokens_and_records_the_derivation(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), "model=tiny", "pruner=obs", "ratio=0.2", "layers=all",
           "pruner.tokens_per_unknown=4", "pruner.min_tokens=256", "pruner.seq_len=32", "pruner.rounds=2",
           "eval=none", "logger=none", "save_model=false", f"paths.cache_dir={CACHE_DIR}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and m["pruning"]["calibration_tokens"] == 512  # 4 x 128 = 512 tokens
    rule = "4 x 128 unknowns (down_proj input) = 512, floor 256, cap 262144: 16 windows of 32"
    cal = m["data"]["calibration"]
    assert (cal["num_samples"], cal["seq_len"], cal["tokens"], cal["rule"]) == (16, 32, 512, rule)
    assert m["pruning"]["calibration"] == {"tokens": 512, "samples": 16, "seq_len": 32, "rule": rule}
