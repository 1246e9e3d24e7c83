"""pruner=joint (pruning/joint.py): whole layers, KV groups and MLP channels under one exact parameter budget."""

from __future__ import annotations

import copy

import pytest
import torch

from core.models.llama import count_params
from core.models.load import build_tiny
from core.run.errors import ConfigError
from pruning import PruneError
from pruning.joint import Joint
from pruning.obs.pruner import StructuredOBS

ALL = (0, None)
WIDTH = {"tokens": None, "seq_len": 16, "progress": False, "autocast": None, "attention_ratio": 0.5,
         "guard": False}  # every refitted bias is added as planned: the budget is exact (the guard may drop some)
DEPTH = {"selection": "search", "search_budget": 6, "search_tokens": 64}


def joint(**kw) -> Joint:
    return Joint(**{"attention_layers": ALL, "mlp_layers": ALL, "width": WIDTH, "depth": DEPTH, **kw})


@pytest.fixture
def model():
    return build_tiny(num_layers=6, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=4, seed=3)[0]


@pytest.fixture
def data():
    return torch.randint(0, 256, (40, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ratio,layers", [(0.3, 1), (0.5, 2), (0.4, 0)])
def test_the_budget_is_exact_over_both_stages(model, data, ratio, layers):
    """Whatever the split, at least ratio x the original count is removed, and less than one MLP channel more."""
    p0 = count_params(model)
    res = joint(ratio=ratio, num_layers=layers)(model, data)
    channel = 3 * 64
    assert 0 <= (p0 - count_params(model)) - ratio * p0 < channel
    assert res.params_before == p0 and res.params_after == count_params(model)
    assert len(model.model.layers) == 6 - layers and res.details["removed_layers"] == model.config.removed_layers \
        if layers else getattr(model.config, "removed_layers", None) is None
    d = res.details["params_removed"]
    assert d["depth"] + d["width"] == p0 - count_params(model)
    for layer in model.model.layers:  # GQA stays valid in every layer: 2 query heads per KV head
        q, kv = layer.self_attn.q_proj.out_features // 8, layer.self_attn.k_proj.out_features // 8
        assert q == 2 * kv and kv == 2


def test_without_layers_it_is_the_width_stage_alone(model, data):
    """num_layers=0: the same weights as pruner=obs with the width options at the same ratio."""
    other = copy.deepcopy(model)
    joint(ratio=0.3, num_layers=0)(model, data)
    StructuredOBS(**{**WIDTH, "ratio": 0.3, "attention_layers": ALL, "mlp_layers": ALL})(other, data)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_width_ranges_follow_the_cut(model, data):
    """Ranges name the original layers: after the cut, the width stage prunes the same layers, renumbered; the
    record gives each layer by its original index."""
    res = joint(ratio=0.4, num_layers=1, attention_layers=(2, None), mlp_layers=(2, None),
                depth={**DEPTH, "selection": "block"})(model, data)
    gone = res.details["removed_layers"]
    assert len(gone) == 1 and gone[0] >= 2
    rows = {r["layer"]: r for r in res.layers}
    assert rows[gone[0]]["removed"] and sorted(rows) == list(range(6))
    kept = [i for i in range(6) if i not in gone]
    widths = {kept[j]: layer.mlp.down_proj.in_features for j, layer in enumerate(model.model.layers)}
    assert widths[0] == widths[1] == 128 and all(widths[i] < 128 for i in kept if i >= 2)


def test_too_many_layers_for_the_budget_is_one_line(model, data):
    with pytest.raises(PruneError, match=r"^joint: 4 whole layers already remove .* at least ratio=0.3"):
        joint(ratio=0.3, num_layers=4)(model, data)


@pytest.mark.parametrize("kw,match", [
    ({"width": {**WIDTH, "ratio": 0.2}}, r"^pruner.width.ratio: set by pruner=joint itself"),
    ({"depth": {**DEPTH, "num_layers": 3}}, r"^pruner.depth.num_layers: set by pruner=joint itself"),
    ({"depth": {**DEPTH, "selection": "best"}}, r"^pruner.depth: pruner.selection='best' is not one of"),
    ({"width": {**WIDTH, "allocation": "nope"}}, r"^pruner.width: pruner.allocation='nope'"),
    ({"width": {**WIDTH, "colour": 1}}, r"^pruner.width: .*colour"),
    ({"num_layers": -1}, r"^pruner.num_layers=-1 must be a whole number of layers >= 0"),
    ({"ratio": 1.0}, r"^ratio=1.0 must be in \(0, 1\)"),
    ({"ratio_target": "groups"}, r"^ratio_target='groups' is not supported by pruner=joint"),
    ({"num_layers": None}, r"^pruner.num_layers=null needs pruner.layer_ratio in \(0, 1\)"),
    ({"num_layers": 2, "layer_ratio": 0.1}, r"^pruner.layer_ratio=0.1 applies with pruner.num_layers=null only"),
])
def test_bad_options_fail_at_build_in_one_line(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        joint(**kw)
    assert "\n" not in str(e.value)


def test_the_plan_is_the_larger_stage_and_both_stages_work():
    cfg = build_tiny(num_layers=6, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=4)[0].config
    cfg = cfg.to_dict()
    fp = joint(ratio=0.5, num_layers=2).footprint(cfg, 640, "float32", "cpu", seq_len=16)
    alone = joint(ratio=0.5, num_layers=0).footprint(cfg, 640, "float32", "cpu", seq_len=16)
    assert fp.layer_forwards > alone.layer_forwards and fp.host_bytes >= alone.host_bytes * 0.5
    assert any("whole layers" in r for r in fp.removes) and any("KV groups" in r for r in fp.removes)


def test_validation_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; from pruning.joint import Joint; Joint(ratio=0.5, num_layers=2); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_layer_ratio_is_a_share_of_any_depth(model, data):
    """num_layers=null, layer_ratio=0.3: ceil(0.3 x 6) = 2 layers, then the width stage to the same budget."""
    p0 = count_params(model)
    p = joint(ratio=0.5, num_layers=None, layer_ratio=0.3)
    assert p.count(6) == 2 and p.count(32) == 10
    res = p(model, data)
    assert len(res.details["removed_layers"]) == 2 and len(model.model.layers) == 4
    assert 0 <= (p0 - count_params(model)) - 0.5 * p0 < 3 * 64


def test_the_stages_stream_with_offload_and_give_the_same_model(model, data):
    """``pruner.depth.offload`` / ``pruner.width.offload`` (a 70B model on one GPU: greedy depth, the weights on
    the host): each stage moves one layer at a time to its device; the result is the one without offload."""
    stream = {"offload": True, "device": "cpu", "batch_size": 8}
    depth = {"selection": "greedy"}
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    ra = joint(ratio=0.4, num_layers=1, depth=depth)(a, data)
    rb = joint(ratio=0.4, num_layers=1, depth={**depth, **stream}, width={**WIDTH, **stream})(b, data)
    assert ra.details["removed_layers"] == rb.details["removed_layers"] and ra.params_after == rb.params_after
    with torch.no_grad():
        torch.testing.assert_close(a(data[:2]).logits, b(data[:2]).logits, rtol=1e-4, atol=1e-5)


def test_the_stage_device_is_the_pruners_and_one_device():
    assert joint(num_layers=1).device is None
    j = joint(num_layers=1, depth={**DEPTH, "selection": "greedy", "device": "cuda", "offload": True},
              width={**WIDTH, "device": "cuda", "offload": True})
    assert j.device == "cuda"  # the planner counts it among the run's devices (recipes/_plan.py)
    with pytest.raises(ConfigError, match=r"^pruner.depth.device=cuda:0 and pruner.width.device=cuda:1: the stages"):
        joint(num_layers=1, depth={**DEPTH, "device": "cuda:0"}, width={**WIDTH, "device": "cuda:1"})
