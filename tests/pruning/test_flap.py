"""FLAP on tiny random GQA Llamas: fluctuation scores, the cost-weighted global threshold, bias compensation,
the pruned model and its checkpoint, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch

from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params
from pruning import PruneError
from pruning.flap import FLAP, allocate, check_budget, group_scores
from pruning.stats import collect, standardise

HD = 8  # head_dim of the tiny model (64 / 8 heads); a KV group = 4 query heads = 32 o_proj input channels


def dense_io(model: torch.nn.Module, calib: torch.Tensor) -> list[dict]:
    """Per layer, from one plain forward of the (dense) model: the attention sub-block's call (args, kwargs), the
    MLP's input, and the inputs and outputs of o_proj and down_proj."""
    seen: list[dict] = [{} for _ in model.model.layers]
    handles = []
    for rec, layer in zip(seen, model.model.layers):
        def attn_in(_m, args, kw, rec=rec):
            rec["attn"] = (args, dict(kw))

        def keep(name, rec=rec):
            def hook(_m, args, out):
                rec[name + "_in"], rec[name + "_out"] = args[0].detach(), out.detach()
            return hook
        handles += [layer.self_attn.register_forward_pre_hook(attn_in, with_kwargs=True),
                    layer.mlp.register_forward_pre_hook(lambda _m, args, rec=rec: rec.__setitem__("mlp", args[0])),
                    layer.self_attn.o_proj.register_forward_hook(keep("o")),
                    layer.mlp.down_proj.register_forward_hook(keep("down"))]
    try:
        with torch.no_grad():
            model(calib, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def sub_block_means(model: torch.nn.Module, seen: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the mean over tokens of the o_proj and down_proj outputs when the layer's attention and MLP are
    fed the dense model's inputs."""
    out = []
    for layer, rec in zip(model.model.layers, seen):
        got = {}
        h = [layer.self_attn.o_proj.register_forward_hook(lambda _m, _a, y: got.__setitem__("o", y)),
             layer.mlp.down_proj.register_forward_hook(lambda _m, _a, y: got.__setitem__("down", y))]
        with torch.no_grad():
            args, kw = rec["attn"]
            layer.self_attn(*args, **kw)
            layer.mlp(rec["mlp"])
        for x in h:
            x.remove()
        out.append((got["o"].mean((0, 1)), got["down"].mean((0, 1))))
    return out


# --------------------------------------------------------------------------- bias compensation


@pytest.mark.parametrize("structure", ["AL-AM", "UL-UM"])
def test_bias_compensation_keeps_each_sub_blocks_mean(tiny, calib, structure):
    model, _ = tiny
    dense = copy.deepcopy(model)
    seen = dense_io(dense, calib)
    plain = copy.deepcopy(model)
    res = FLAP(ratio=0.5, structure=structure)(model, calib)
    FLAP(ratio=0.5, structure=structure, bias_compensation=False)(plain, calib)
    cut_heads = [l["kv_heads"][1] < 2 for l in res.layers]
    cut_channels = [l["intermediate_size"][1] < 128 for l in res.layers]
    assert sum(cut_heads) >= 3 and all(cut_channels)
    for l, ((o, d), (o_plain, d_plain), rec) in enumerate(zip(sub_block_means(model, seen),
                                                               sub_block_means(plain, seen), seen)):
        o_dense, d_dense = rec["o_out"].mean((0, 1)), rec["down_out"].mean((0, 1))
        torch.testing.assert_close(o, o_dense, rtol=1e-5, atol=1e-7, msg=f"layer {l} o_proj")
        torch.testing.assert_close(d, d_dense, rtol=1e-5, atol=1e-7, msg=f"layer {l} down_proj")
        # without compensation the means move by far more than the tolerance: the test can tell
        if cut_heads[l]:
            assert (o_plain - o_dense).abs().max() > 100 * (o - o_dense).abs().max() + 1e-5
        assert (d_plain - d_dense).abs().max() > 100 * (d - d_dense).abs().max() + 1e-5
        assert (model.model.layers[l].self_attn.o_proj.bias is not None) == cut_heads[l]
        assert model.model.layers[l].mlp.down_proj.bias is not None and plain.model.layers[l].mlp.down_proj.bias is None


def test_compensation_adds_to_an_existing_bias(calib):
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.models.ref import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config(num_layers=2), attention_bias=True, mlp_bias=True)).eval()
    for p in model.parameters():  # biases start at zero: make them matter
        if p.ndim == 1:
            p.data.normal_(0, 0.05)
    dense = copy.deepcopy(model)
    seen = dense_io(dense, calib)
    FLAP(ratio=0.4)(model, calib)
    assert model.model.layers[0].mlp.down_proj.in_features < 128
    for (o, d), rec in zip(sub_block_means(model, seen), seen):
        torch.testing.assert_close(o, rec["o_out"].mean((0, 1)), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(d, rec["down_out"].mean((0, 1)), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("metric", ["WIFV", "WIFN", "IFV"])
def test_scores_are_the_fluctuation_of_the_dense_inputs(tiny, calib, metric):
    model, _ = tiny
    seen = dense_io(model, calib)
    scores, means = collect(model, calib, {"attention": (1, 3), "mlp": (0, 2)}, metric, batch_size=3)
    assert sorted(scores["attention"]) == [1, 2] and sorted(scores["mlp"]) == [0, 1]
    for kind, proj, key in (("attention", "o_proj", "o_in"), ("mlp", "down_proj", "down_in")):
        for l in scores[kind]:
            x = seen[l][key].reshape(-1, seen[l][key].shape[-1]).double()  # [96 tokens, channels]
            mod = model.model.layers[l].self_attn.o_proj if proj == "o_proj" else model.model.layers[l].mlp.down_proj
            w = mod.weight.double()
            want = {"IFV": x.var(0), "WIFV": x.var(0) * (w ** 2).sum(0),
                    "WIFN": w.abs().mean(0) * x.pow(2).mean(0).sqrt()}[metric]
            if kind == "attention":
                want = want ** 2  # the reference squares the attention metric
            torch.testing.assert_close(scores[kind][l], want, rtol=1e-4, atol=0)
            torch.testing.assert_close(means[kind][l], x.mean(0), rtol=1e-4, atol=1e-9)


def test_standardisation_and_group_scores():
    s = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64)
    z = standardise(s)
    torch.testing.assert_close(z, (s - 3.0) / s.std())
    assert torch.equal(standardise(torch.full((4,), 5.0)), torch.zeros(4))  # no spread: no preference
    # two KV groups of 2 channels each: mean of their channels' standardised scores
    torch.testing.assert_close(group_scores(z, 2), torch.stack([z[:2].mean(), z[2:].mean()]))


# --------------------------------------------------------------------------- the global threshold, by hand

# 2 layers, hidden 4, head_dim 2, 4 heads / 2 KV heads (n_rep 2), MLP width 4:
#   one KV group = q rows 2*2*4 + o columns 16 + k, v rows 2*2*4 = 48 parameters; one channel = 3*4 = 12.
#   prunable: 2 layers x (2 groups x 48 + 4 channels x 12) = 288.
GEO = Geometry(hidden=4, head_dim=2, heads=(4, 4), kv_heads=(2, 2), widths=(4, 4), attn_bias=False, mlp_bias=False)
RANGES = {"attention": (0, 2), "mlp": (0, 2)}
Z = {"attention": {0: torch.tensor([0.9, -1.2]), 1: torch.tensor([0.3, 0.8])},
     "mlp": {0: torch.tensor([-1.5, 0.2, 1.0, 0.5]), 1: torch.tensor([-1.0, 0.1, 0.4, -0.2])}}


def test_hand_geometry():
    assert GEO.group_params(0) == 48 and GEO.channel_params() == 12


@pytest.mark.parametrize("ratio,attention,mlp", [
    # ascending (cost, running total): mlp0c0 -1.5 (12, 12), att0g1 -1.2 (48, 60), mlp1c0 -1.0 (12, 72),
    # mlp1c3 -0.2 (12, 84), mlp1c1 0.1 (12, 96), mlp0c1 0.2 (12, 108), att1g0 0.3 (48, 156), mlp0c3 0.5 (12, 168);
    # the best group and channel of each layer (att0g0, att1g1, mlp0c2, mlp1c2) are kept by the minimums.
    (0.25, {0: [1]}, {0: [0], 1: [0]}),                        # 72 of 288: exactly the first three
    (1 / 6, {0: [1]}, {0: [0]}),                               # 48: 60 is closer than 12
    (0.5, {0: [1], 1: [0]}, {0: [0, 1], 1: [0, 1, 3]}),        # 144: 156 is closer than 108
    (0.03, {}, {0: [0]}),                                      # 8.6: one channel (12), not a group
    (0.01, {}, {}),                                            # 2.9: nothing comes closer than removing nothing
])
def test_global_threshold_weights_groups_by_their_parameters(ratio, attention, mlp):
    drop, notes = allocate(Z, GEO, RANGES, ratio, "AL-AM", 1, 1)
    assert drop == {"attention": attention, "mlp": mlp} and notes == []


def test_al_mm_and_ul_um_by_hand():
    # AL-MM: attention (192) and MLP (96) each lose 25%: 48 = the lowest group; 24 = the two lowest channels.
    drop, _ = allocate(Z, GEO, RANGES, 0.25, "AL-MM", 1, 1)
    assert drop == {"attention": {0: [1]}, "mlp": {0: [0], 1: [0]}}
    # UL-UM: floor(0.5 * 2) = 1 group and floor(0.5 * 4) = 2 channels per layer, each layer's lowest.
    drop, _ = allocate(Z, GEO, RANGES, 0.5, "UL-UM", 1, 1)
    assert drop == {"attention": {0: [1], 1: [0]}, "mlp": {0: [0, 1], 1: [0, 3]}}


def test_the_minimum_holds_back_a_layer_the_threshold_would_empty():
    z = {"attention": {0: torch.tensor([-2.0, -1.9]), 1: torch.tensor([0.3, 0.8])},
         "mlp": {0: torch.tensor([1.5, 0.2, 1.0, 0.5]), 1: torch.tensor([1.0, 0.1, 0.4, 1.2])}}
    # budget 80.6: without the minimum, both groups of layer 0 (96) would be the two lowest; with it: -2.0 (48),
    # then channels 0.1 (60) and 0.2 (72); the next one, att1g0 (120), is farther from 80.6
    drop, notes = allocate(z, GEO, RANGES, 0.28, "AL-AM", 1, 1)
    assert drop == {"attention": {0: [0]}, "mlp": {0: [1], 1: [1]}}  # the better group of layer 0 (-1.9) stays
    assert notes == ["layer 0: the global threshold reached its last 1 KV group(s); kept them (pruner.min_groups=1)"]


def test_a_ratio_beyond_the_minimums_names_the_maximum():
    # at most (1 group + 3 channels) x 2 layers = 168 of 288 = 0.5833 can go
    check_budget(GEO, RANGES, 0.58, "AL-AM", 1, 1)
    with pytest.raises(PruneError, match=r"ratio=0.6 cannot be met .* at most 0.5833 of the attention\+MLP"):
        check_budget(GEO, RANGES, 0.6, "AL-AM", 1, 1)
    with pytest.raises(PruneError, match=r"at most 0.5000 of the attention parameters"):
        check_budget(GEO, RANGES, 0.55, "AL-MM", 1, 1)
    with pytest.raises(PruneError, match=r"at most 0.0000 of layer 0's attention parameters"):
        check_budget(GEO, RANGES, 0.1, "UL-UM", 2, 1)


# --------------------------------------------------------------------------- the pruned model


def test_pruned_model_runs_generates_and_round_trips(tiny, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    from core.models.checkpoint import save_checkpoint

    model, tok = tiny
    ref = copy.deepcopy(model)
    res = FLAP(ratio=0.3, attention_layers=(1, 3), mlp_layers={"start": 1, "end": -1})(model, calib)
    assert res.compression["unit"] == "prunable_params" and res.compression["amount"] == 0.3
    assert res.compression["params_removed"] == pytest.approx(1 - count_params(model) / count_params(ref))
    assert res.details["in_range_fraction"] == pytest.approx(0.3, abs=0.01)
    assert res.details["removed_prunable_params"] == pytest.approx(0.3 * res.details["prunable_params"], rel=0.02)
    for l in (0, 3):  # outside the ranges: untouched, bit for bit
        for (name, p), q in zip(model.model.layers[l].named_parameters(), ref.model.layers[l].parameters()):
            assert torch.equal(p, q), (l, name)
    lcs = model.config.layer_configs
    assert [bool(lc.get("down_proj_bias")) for lc in lcs] == [False, True, True, False]
    assert all(bool(lc.get("o_proj_bias")) == (l in (1, 2) and lc["num_key_value_heads"] < 2) for l, lc in enumerate(lcs))
    with torch.no_grad():
        logits = model(calib).logits
    assert torch.isfinite(logits).all()
    out = model.generate(calib[:1, :5], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    path = save_checkpoint(model, tok, tmp_path / "model", {"method": "flap"})
    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()  # plain transformers
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, logits, rtol=0, atol=0)


def test_micro_batches_and_offload_give_the_same_result(tiny, calib):
    model, _ = tiny
    other = copy.deepcopy(model)
    a = FLAP(ratio=0.4)(model, calib)
    b = FLAP(ratio=0.4, batch_size=3, offload=True, device="cpu")(other, calib)  # (offload to the model's device)
    assert [l["kv_heads"] for l in a.layers] == [l["kv_heads"] for l in b.layers]
    assert [l["intermediate_size"] for l in a.layers] == [l["intermediate_size"] for l in b.layers]
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, other(calib).logits, rtol=1e-4, atol=1e-5)


def test_ratio_zero_changes_nothing(tiny, calib):
    model, _ = tiny
    ref = copy.deepcopy(model)
    res = FLAP(ratio=0.0)(model, calib)
    assert res.params_after == res.params_before and res.compression == {"unit": "prunable_params", "amount": 0.0,
                                                                 "params_removed": 0.0}
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,match", [
    ({"ratio": 1.0}, r"ratio=1.0 must be in \[0, 1\)"),
    ({"ratio": -0.1}, r"ratio=-0.1 must be in \[0, 1\)"),
    ({"metric": "wifv"}, r"pruner.metric='wifv' is not one of WIFV, WIFN, IFV"),
    ({"structure": "UL-MM"}, r"pruner.structure='UL-MM' is not one of AL-AM, AL-MM, UL-UM"),
    ({"min_groups": 0}, r"pruner.min_groups=0 must be an integer >= 1"),
    ({"min_channels": 0}, r"pruner.min_channels=0 must be an integer >= 1"),
    ({"batch_size": -1}, r"pruner.batch_size=-1 must be an integer >= 0"),
    ({"bias_compensation": "yes"}, r"pruner.bias_compensation='yes' must be true or false"),
    ({"offload": True}, r"pruner.offload=true needs pruner.device"),
    ({"device": 0}, r"pruner.device=0 must be a device name"),
    ({"attention_layers": (3, 1)}, r"layers.attention: start=3 is after end=1"),
])
def test_bad_options_are_one_config_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        FLAP(**kw)


def test_building_from_options_needs_no_torch():
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys; from pruning.flap import FLAP; FLAP(ratio=0.2).check(30); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("kw,match", [
    ({"attention_layers": (0, 9)}, r"layers.attention: \[0, 9\) is beyond the model's depth of 4"),
    ({"attention_layers": (2, 2), "mlp_layers": (1, 1)}, r"both empty: nothing to prune"),
])
def test_bad_ranges_fail_in_check(kw, match):
    with pytest.raises(PruneError, match=match):
        FLAP(ratio=0.2, **kw).check(4)


@pytest.mark.parametrize("kw,calibration,match", [
    # tiny: a layer can lose 1 of 2 KV groups (5,120 params) and 127 of 128 channels (192 each) of 34,816
    ({"ratio": 0.9}, True, r"ratio=0.9 cannot be met with structure=AL-AM: .* at most 0.8474 of the attention\+MLP"),
    ({"ratio": 0.6, "structure": "UL-UM"}, True, r"at most 0.5000 of layer 0's attention parameters"),
    ({"ratio": 0.2, "min_groups": 2, "structure": "AL-MM"}, True, r"at most 0.0000 of the attention parameters"),
    ({"ratio": 0.2}, False, r"flap needs calibration tokens"),
    ({"ratio": 0.2, "device": "nodevice"}, True, r"pruner.device='nodevice' is not a device"),
    ({"ratio": 0.2, "device": "meta"}, True, r"pruner.device=meta differs from the model's device cpu: set pruner.offload"),
])
def test_impossible_requests_fail_before_the_model_changes(tiny, calib, kw, calibration, match):
    model, _ = tiny
    ref = copy.deepcopy(model)
    with pytest.raises(PruneError, match=match):
        FLAP(**kw)(model, calib if calibration else None)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert all(p.shape == q.shape for p, q in zip(model.parameters(), ref.parameters()))


def test_unsupported_architecture_is_named(calib):
    class Odd(torch.nn.Module):
        pass

    with pytest.raises(PruneError, match="flap: unsupported architecture Odd"):
        FLAP(ratio=0.2)(Odd(), calib)
