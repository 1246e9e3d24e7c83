"""LLM-Pruner-style structured pruning on tiny random GQA Llamas: groups, GQA mapping, ranges, determinism."""

from __future__ import annotations

import copy

import pytest
import torch

from core.models.llama import count_params
from core.models.load import build_tiny
from core.models.llama import Geometry
from pruning import PruneError
from pruning.llm_pruner import LLMPruner, importance, plan_counts, solve_params_ratio
from pruning.ranges import resolve_range
from pruning.surgery import remove_channels, remove_kv_groups

HD = 8  # head_dim of the tiny model (64 / 8 heads)


def spec(**kw) -> LLMPruner:
    base = dict(attention_ratio=0.5, mlp_ratio=0.25, attention_layers=(1, 3), mlp_layers=(1, 3), taylor="param_first",
                progress=False)
    base.update(kw)
    return LLMPruner(**base)


@pytest.mark.parametrize("importance_name,taylor", [
    ("taylor", "vectorize"), ("taylor", "param_first"), ("taylor", "param_second"), ("taylor", "param_mix"),
    ("l1", "param_first"), ("l2", "param_first"), ("random", "param_first"),
])
def test_each_pruner_removes_expected_group_counts(tiny, calib, importance_name, taylor):
    model, _ = tiny
    res = spec(importance=importance_name, taylor=taylor)(model, calib)
    for entry in res.layers:
        l = entry["layer"]
        inside = 1 <= l < 3
        # 2 KV groups x 0.5 -> 1 group = 1 KV head + 4 query heads; MLP 128 x 0.25 -> 32 channels.
        assert entry["kv_heads"] == [2, 1 if inside else 2]
        assert entry["heads"] == [8, 4 if inside else 8]
        assert entry["intermediate_size"] == [128, 96 if inside else 128]
        assert len(entry["removed_kv_groups"]) == (1 if inside else 0)
    geo = Geometry.of(model)
    per_group = 2 * 4 * HD * 64 + 2 * HD * 64  # q rows + o cols (4 heads) + k and v rows (1 head)
    assert res.params_before - res.params_after == 2 * per_group + 2 * 32 * 3 * 64
    assert res.params_after == count_params(model)
    assert geo.kv_heads == (2, 1, 1, 2)


def test_l1_removes_exactly_the_smallest_channels(tiny):
    model, _ = tiny
    ref = copy.deepcopy(model)
    spec(importance="l1", attention_ratio=0.0, mlp_layers=(2, 3))(model, None)
    mlp = ref.model.layers[2].mlp
    score = mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1) + mlp.down_proj.weight.abs().sum(0)
    keep = torch.sort(torch.topk(score, 96).indices).values
    assert torch.equal(model.model.layers[2].mlp.gate_proj.weight, mlp.gate_proj.weight[keep])
    assert torch.equal(model.model.layers[2].mlp.down_proj.weight, mlp.down_proj.weight[:, keep])


def test_l2_head_groups_ranked_by_coupled_weights(tiny):
    model, _ = tiny
    a = model.model.layers[1].self_attn
    with torch.no_grad():  # make KV group 1 clearly the least important across q, k, v, o
        a.q_proj.weight[32:] *= 0.01
        a.k_proj.weight[8:] *= 0.01
        a.v_proj.weight[8:] *= 0.01
        a.o_proj.weight[:, 32:] *= 0.01
    res = spec(importance="l2", mlp_ratio=0.0, attention_layers=(1, 2))(model, None)
    assert res.layers[1]["removed_kv_groups"] == [1]


def test_gqa_group_removal_equals_silencing_that_group(tiny):
    """Removing KV group g must equal zeroing the o_proj columns of g's query heads: head by head."""
    model, _ = tiny
    x = torch.randint(0, 256, (2, 16))
    for g in (0, 1):
        pruned, silenced = copy.deepcopy(model), copy.deepcopy(model)
        remove_kv_groups(pruned.model.layers[2], torch.tensor([g]), HD)
        with torch.no_grad():
            silenced.model.layers[2].self_attn.o_proj.weight[:, g * 4 * HD:(g + 1) * 4 * HD] = 0
        attn, orig = pruned.model.layers[2].self_attn, model.model.layers[2].self_attn
        keep = 1 - g
        q_rows = slice(keep * 4 * HD, (keep + 1) * 4 * HD)  # the 4 query heads sharing KV head `keep`
        assert torch.equal(attn.q_proj.weight, orig.q_proj.weight[q_rows])
        assert torch.equal(attn.k_proj.weight, orig.k_proj.weight[keep * HD:(keep + 1) * HD])
        assert torch.equal(attn.v_proj.weight, orig.v_proj.weight[keep * HD:(keep + 1) * HD])
        assert torch.equal(attn.o_proj.weight, orig.o_proj.weight[:, q_rows])
        assert attn.num_key_value_groups == 4
        torch.testing.assert_close(pruned(x).logits, silenced(x).logits, rtol=1e-5, atol=1e-5)


def test_mlp_channel_removal_equals_silencing_channels(tiny):
    model, _ = tiny
    x = torch.randint(0, 256, (2, 16))
    pruned, silenced = copy.deepcopy(model), copy.deepcopy(model)
    drop = torch.tensor([3, 17, 64, 127])
    remove_channels(pruned.model.layers[1], drop)
    with torch.no_grad():
        silenced.model.layers[1].mlp.down_proj.weight[:, drop] = 0
    torch.testing.assert_close(pruned(x).logits, silenced(x).logits, rtol=1e-5, atol=1e-5)


def test_mha_without_gqa(calib):
    model, _ = build_tiny(num_heads=4, num_kv_heads=4)
    res = spec(attention_ratio=0.5)(model, calib)
    assert res.layers[1]["heads"] == [4, 2] and res.layers[1]["kv_heads"] == [4, 2]
    model(calib)


def test_layers_outside_ranges_untouched(tiny, calib):
    model, _ = tiny
    ref = copy.deepcopy(model)
    spec(attention_layers=(1, 2), mlp_layers=(2, 4))(model, calib)
    sd, ref_sd = model.state_dict(), ref.state_dict()
    for name, t in ref_sd.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        attn_in = layer == 1 and "self_attn" in name
        mlp_in = layer in (2, 3) and ".mlp." in name
        if attn_in or mlp_in:
            assert sd[name].shape != t.shape, name
        else:
            assert torch.equal(sd[name], t), name


def test_forward_and_generate_with_kv_cache_after_pruning(tiny, calib):
    model, _ = tiny
    spec()(model, calib)
    prompt = calib[:1, :6]
    with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    assert model.config.layer_configs[1] == {"num_attention_heads": 4, "num_key_value_heads": 1,
                                             "intermediate_size": 96}


def test_deterministic_for_a_seed(calib):
    runs = []
    for _ in range(2):
        model, _ = build_tiny(seed=3)
        res = spec(importance="random", seed=7)(model, calib)
        runs.append(([l["removed_kv_groups"] for l in res.layers], model.model.layers[1].mlp.gate_proj.weight))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_iterative_steps_and_global_ranking(tiny, calib):
    model, _ = tiny
    res = spec(iterative_steps=2, global_ranking=True, round_to=8)(model, calib)
    removed = sum(l["intermediate_size"][0] - l["intermediate_size"][1] for l in res.layers)
    assert removed % 8 == 0 and 0 < removed <= 64
    assert all((l["intermediate_size"][1]) % 8 == 0 for l in res.layers)
    model(calib)


def test_taylor_scores_use_calibration_gradients(tiny, calib):
    model, _ = tiny
    att, mlp = importance(model, calib, spec(), progress=False)
    assert set(att) == {1, 2} and att[1].shape == (2,) and mlp[1].shape == (128,)
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in att.values())
    assert all(p.grad is None for p in model.parameters())  # hooks freed every gradient


def test_a_kind_with_nothing_to_remove_is_not_scored(tiny, calib, monkeypatch):
    """Attention ratio rounding to zero KV groups: no attention weight takes a gradient, and the MLP's scores (so the
    channels chosen) are exactly those of the pass that also formed the attention gradients."""
    import pruning.calibration as calibration

    model, _ = tiny
    seen = []
    real = calibration.gradient_passes

    def spy(model, batch, weights, *a, **k):
        seen.append(len(weights))
        return real(model, batch, weights, *a, **k)
    monkeypatch.setattr(calibration, "gradient_passes", spy)
    _, both = importance(model, calib, spec(), progress=False)
    att, mlp_only = importance(model, calib, spec(), progress=False, attention=False)
    assert att == {} and seen[1] == seen[0] - 4 * 2  # q, k, v, o of the 2 attention layers left out
    for l in both:
        assert torch.equal(both[l], mlp_only[l])
    pruned = spec(attention_ratio=0.25)(model, calib)  # rounds to 0 groups: the run scores the MLP alone
    assert seen[-1] == 3 * 2 and all(l["kv_heads"][0] == l["kv_heads"][1] for l in pruned.layers)


def test_rounding_to_zero_heads_is_reported(tiny):
    model, _ = tiny
    heads, _, notes = plan_counts(Geometry.of(model), spec(attention_ratio=0.25))
    assert all(v == 0 for v in heads.values())
    assert any("rounds (floor) to 0 whole groups" in n for n in notes)
    heads, _, _ = plan_counts(Geometry.of(model), spec(attention_ratio=0.25, rounding="nearest"))
    assert all(v == 1 for v in heads.values())


@pytest.mark.parametrize("start,end,depth,msg", [
    (3, 1, 4, "is after end"), (0, 9, 4, "beyond the model's depth"), (2, 2, 4, "is empty"),
    (-9, 2, 4, "beyond the model's depth"),
])
def test_bad_ranges(start, end, depth, msg):
    with pytest.raises(PruneError, match=msg):
        resolve_range(start, end, depth, "attention", 0.25)


def test_negative_range_counts_from_end():
    assert resolve_range(3, -3, 30, "mlp", 0.25) == (3, 27)
    assert resolve_range(0, None, 4, "mlp", 0.25) == (0, 4)
    assert resolve_range(2, 2, 4, "mlp", 0.0) == (2, 2)  # empty on purpose: ratio 0


def test_ratio_target_params(tiny):
    model, _ = tiny
    geo, total = Geometry.of(model), count_params(model)
    s = solve_params_ratio(geo, spec(mlp_layers=(0, 4), attention_ratio=0.0), 0.10, total,
                           fixed_attention=True, fixed_mlp=False)
    heads, chans, _ = plan_counts(geo, s)
    removed = sum(chans.values()) * 3 * 64
    assert abs(removed / total - 0.10) < 0.01
    with pytest.raises(PruneError, match="cannot be removed"):
        solve_params_ratio(geo, spec(mlp_ratio=0.0, attention_layers=(1, 2)), 0.30, total,
                           fixed_attention=False, fixed_mlp=True)


@pytest.mark.parametrize("taylor", ["vectorize", "param_first", "param_second", "param_mix"])
def test_taylor_scores_match_plain_autograd(tiny, calib, taylor):
    """Hooks + chunked LM-head loss give the scores of the textbook computation on full gradients."""
    import pruning.calibration as lp

    model, _ = tiny
    ref = copy.deepcopy(model)
    n = calib.shape[0]

    def grads(ids):
        ref.zero_grad()
        ref(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {k: p.grad.detach().double().clone() for k, p in ref.named_parameters() if p.grad is not None}

    g = grads(calib)
    h = {k: 0 for k in g}
    for j in range(n):
        for k, v in grads(calib[j:j + 1]).items():
            h[k] = h[k] + v * v / n
    s = spec()

    def row(name, orient):
        w, gg, hh = dict(ref.named_parameters())[name].detach().double(), g[name], h[name]
        full = {"vectorize": w * gg, "param_first": (w * gg).abs(), "param_second": (w * hh * w).abs(),
                "param_mix": (w * gg - 0.5 * w * hh * w).abs()}[taylor]
        d = 1 if orient == "out" else 0
        return full.sum(d).abs() if taylor == "vectorize" else full.sum(d)

    old = lp.LOGITS_CHUNK_BYTES
    lp.LOGITS_CHUNK_BYTES = 4 * model.config.vocab_size * 7  # 7 tokens per chunk: several chunks
    try:
        att, mlp = importance(model, calib, spec(taylor=taylor), progress=False)
    finally:
        lp.LOGITS_CHUNK_BYTES = old
    for l in range(*s.mlp_layers):
        p = f"model.layers.{l}.mlp."
        want = row(p + "gate_proj.weight", "out") + row(p + "up_proj.weight", "out") + row(p + "down_proj.weight", "in")
        torch.testing.assert_close(mlp[l].double(), want, rtol=2e-4, atol=1e-12)
    for l in range(*s.attention_layers):
        p = f"model.layers.{l}.self_attn."
        parts = [row(p + f"{x}_proj.weight", "out") for x in "qkv"] + [row(p + "o_proj.weight", "in")]
        want = sum(r.view(2, -1).sum(1) for r in parts)
        torch.testing.assert_close(att[l].double(), want, rtol=2e-4, atol=1e-12)


@pytest.mark.parametrize("taylor", ["vectorize", "param_first"])
def test_micro_batches_give_the_whole_batch_scores(tiny, calib, taylor):
    model, _ = tiny
    whole = importance(model, calib, spec(taylor=taylor), progress=False)
    micro = importance(model, calib, spec(taylor=taylor, batch_size=1), progress=False)
    for a, b in zip(whole, micro):
        for l in a:
            torch.testing.assert_close(a[l], b[l], rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())


def test_wrapped_mlp_forward_is_left_alone(tiny, calib):
    """An MLP whose forward is already wrapped (accelerate's dispatch hooks) keeps its wrapper and is called."""
    from pruning.calibration import lean_mlps

    model, _ = tiny
    assert len(lean_mlps(model)) == 4  # stock Llama MLPs get the lean calibration forward
    mlp = model.model.layers[1].mlp
    calls = []
    stock = mlp.forward

    def wrapped(x):
        calls.append(1)
        return stock(x)
    mlp.forward = wrapped
    importance(model, calib, spec(), progress=False)
    assert calls and vars(mlp)["forward"] is wrapped
    assert mlp not in lean_mlps(model)
    assert "forward" not in vars(model.model.layers[2].mlp)  # the lean forward is removed again
