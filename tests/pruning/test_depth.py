"""Depth pruning with a fitted linear map (pruning/depth.py) on tiny random GQA Llamas: the block and the layer are
the ones of least angular distance, computed here from the plain model; the map is exact when what the removed
layers add is a linear function of the MLP output before them; the merge adds no parameter; compensate=none is the
plain removal; the checkpoint is a stock Llama."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.models.checkpoint import save_checkpoint
from core.models.llama import count_params
from core.models.load import build_tiny
from core.run.errors import ConfigError
from pruning import PruneError
from pruning.depth import Depth, block_distances, fit_linear_map

ALL = (0, None)


def pruner(**kw) -> Depth:
    return Depth(**{"attention_layers": ALL, "mlp_layers": ALL, "selection": "block", **kw})  # (default: greedy)


@pytest.fixture
def deep():
    return build_tiny(num_layers=6, seed=1)


def _hidden_states(model, ids) -> tuple[torch.Tensor, ...]:
    """Every layer's input, then the last layer's raw output (a copy without the final norm is asked)."""
    plain = copy.deepcopy(model)
    plain.model.norm = torch.nn.Identity()
    with torch.no_grad():
        return plain(ids, output_hidden_states=True).hidden_states


def reference_distances(model, ids, n: int) -> list[float]:
    """Mean over tokens of arccos(cos(x_s, x_{s+n})) / pi for every start s (ReplaceMe's angular_distance)."""
    hs = _hidden_states(model, ids)
    out = []
    for s in range(len(hs) - n):
        cos = F.cosine_similarity(hs[s].double(), hs[s + n].double(), dim=-1).clamp(-1, 1)
        out.append((torch.arccos(cos) / math.pi).mean().item())
    return out


def rebuilt(model, kept: list[int]):
    """A fresh Llama of ``len(kept)`` layers holding ``model``'s weights of layers ``kept``."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(kept)
    fresh = LlamaForCausalLM(cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i not in kept:
                continue
            k = k.replace(f"model.layers.{i}.", f"model.layers.{kept.index(i)}.", 1)
        sd[k] = v
    fresh.load_state_dict(sd)
    return fresh


class _Ones(torch.nn.Module):
    """An MLP activation making ``down(act(gate(x)) * up(x))`` the linear ``down(up(x))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)


def linear_block_model(removed: list[int], seed: int = 0):
    """A 5-layer tiny Llama where everything up to layer ``removed[0] - 1``'s attention writes into the first half
    of the hidden dimensions (S) and that layer's MLP into the second half (S⊥); the layers in ``removed`` have no
    attention (o_proj = 0) and add ``x P B`` with P the projection on S⊥ and B mapping S⊥ into S⊥. So what the block
    adds is a linear function of the MLP output m before it, and ``T = prod (I + P B)`` on S⊥ reproduces the block
    exactly. Layers after the block are random."""
    model, tok = build_tiny(num_layers=5, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, seed=seed)
    d, k = 64, 32
    g = torch.Generator().manual_seed(seed + 7)
    s = removed[0]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, k:] = 0
        for layer in model.model.layers[:s - 1]:
            layer.self_attn.o_proj.weight[k:] = 0
            layer.mlp.down_proj.weight[k:] = 0
        prev = model.model.layers[s - 1]
        prev.self_attn.o_proj.weight[k:] = 0
        prev.mlp.down_proj.weight[:k] = 0
        for i in removed:
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.post_attention_layernorm = torch.nn.Identity()
            layer.mlp.act_fn = _Ones()
            up, down = layer.mlp.up_proj.weight, layer.mlp.down_proj.weight  # [128, 64], [64, 128]
            up.copy_(torch.randn(up.shape, generator=g) / math.sqrt(d - k))
            up[:, :k] = 0
            down.copy_(0.3 * torch.randn(down.shape, generator=g) / math.sqrt(up.shape[0]))
            down[:k] = 0
    return model, tok


def _n_params_per_layer(model) -> int:
    return count_params(model.model.layers[0])


# --------------------------------------------------------------------------- selection


def test_block_is_the_one_of_least_angular_distance(deep, calib):
    model, _ = deep
    ref = copy.deepcopy(model)
    want = reference_distances(model, calib, 2)
    got = block_distances(model, calib, 2, list(range(5)), batch_size=3)
    assert [got[s] for s in range(5)] == pytest.approx(want, abs=1e-5)
    res = pruner(num_layers=2, compensate="none")(model, calib)
    best = min(range(5), key=lambda s: want[s])
    assert res.details["removed_layers"] == [best, best + 1] == model.config.removed_layers
    assert res.compression == {"unit": "layers", "amount": 2, "layers": 2,
                               "params_removed": pytest.approx(res.removed_fraction)}
    # compensate=none is the plain removal: the same logits as a fresh model of the remaining layers
    kept = [i for i in range(6) if i not in (best, best + 1)]
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, rebuilt(ref, kept)(calib).logits, rtol=0, atol=0)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]


def test_linear_compensation_never_takes_the_first_layer(deep, calib):
    model, _ = deep
    want = reference_distances(model, calib, 2)
    res = pruner(num_layers=2)(model, calib)
    best = min(range(1, 5), key=lambda s: want[s])
    assert res.details["removed_layers"] == [best, best + 1]
    assert res.details["cuts"][0]["merged_into"] == best - 1
    assert set(res.details["block_distances"]) == {str(s) for s in range(1, 5)}


def test_greedy_rescores_the_cut_model(deep, calib):
    model, _ = deep
    res = pruner(num_layers=2, selection="greedy", compensate="none")(model, calib)
    first = reference_distances(build_tiny(num_layers=6, seed=1)[0], calib, 1)
    one = min(range(6), key=lambda s: first[s])
    once = build_tiny(num_layers=6, seed=1)[0]
    kept = [i for i in range(6) if i != one]
    second = reference_distances(rebuilt(once, kept), calib, 1)
    two = kept[min(range(5), key=lambda s: second[s])]
    assert [c["layers"] for c in res.details["cuts"]] == [[one], [two]]
    assert res.details["removed_layers"] == sorted([one, two])
    assert [r["angular_distance"] for r in res.layers] == pytest.approx(first, abs=1e-5)


def test_ranges_limit_the_candidates(deep, calib):
    model, _ = deep
    res = pruner(num_layers=2, attention_layers=(2, 6), mlp_layers=(0, 5))(model, calib)  # layers 2, 3, 4
    assert set(res.details["removed_layers"]) <= {2, 3, 4}
    assert set(res.details["block_distances"]) == {"2", "3"}


# --------------------------------------------------------------------------- the map


@pytest.mark.parametrize("selection,removed", [("block", [2]), ("block", [2, 3]), ("greedy", [2, 3])])
def test_the_map_is_exact_when_the_removed_layers_are_linear(selection, removed, calib):
    model, _ = linear_block_model(removed)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        want = ref(calib).logits
        plain = rebuilt(ref, [i for i in range(5) if i not in removed])  # (the stand-in layers are dropped anyway)
    # the ranges make the linear layers the only candidates; damp=0: the pseudo-inverse (m spans S⊥ only)
    spec = pruner(num_layers=len(removed), selection=selection, damp=0.0, attention_layers=(removed[0], removed[-1] + 1))
    res = spec(model, calib)
    assert res.details["removed_layers"] == removed
    with torch.no_grad():
        got = model(calib).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (plain(calib).logits - want).abs().max() > 1e-2  # the plain removal is not: the map did the work
    assert all(c["fit"]["residual"] < 1e-8 for c in res.details["cuts"])


def test_the_fit_is_streamed_in_micro_batches(calib):
    model, _ = linear_block_model([2, 3], seed=3)
    whole = fit_linear_map(model, calib, 2, 4, 1e-3)
    split = fit_linear_map(model, calib, 2, 4, 1e-3, batch_size=1, device="cpu", offload=True)
    torch.testing.assert_close(split["map"], whole["map"], rtol=1e-7, atol=1e-9)
    assert split["fit"]["residual"] == pytest.approx(whole["fit"]["residual"], rel=1e-6, abs=1e-12)


def test_the_merge_adds_no_parameter_and_the_checkpoint_is_a_plain_llama(deep, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = deep
    dense = copy.deepcopy(model)
    per_layer = _n_params_per_layer(model)
    names = {k for k, _ in model.named_parameters()}
    res = pruner(num_layers=2)(model, calib)
    gone = res.details["removed_layers"]
    merged = res.details["cuts"][0]["merged_into"]
    assert res.params_after == count_params(model) == count_params(dense) - 2 * per_layer == res.params_before - 2 * per_layer
    assert {k for k, _ in model.named_parameters()} == {k for k in names if not any(
        k.startswith(f"model.layers.{i}.") for i in (4, 5))}  # the names of a 4-layer Llama
    # only the preceding layer's down_proj changed
    kept = [i for i in range(6) if i not in gone]
    fresh = rebuilt(dense, kept).state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, fresh[k])]
    assert changed == [f"model.layers.{kept.index(merged)}.mlp.down_proj.weight"]
    assert model.config.num_hidden_layers == 4 and model.config.removed_layers == gone

    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "depth"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and not (out / "modeling_prunelab.py").exists()
    assert cfg["num_hidden_layers"] == 4 and cfg["removed_layers"] == gone
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, model(calib).logits, rtol=0, atol=0)
    prompt = calib[:1, :6]
    a = loaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    b = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_the_map_lowers_the_error_of_a_random_model(deep, calib):
    """On random weights the block is not linear: the map still fits the calibration tokens better than none."""
    model, _ = deep
    res = pruner(num_layers=2)(model, calib)
    fit = res.details["cuts"][0]["fit"]
    assert 0 < fit["residual"] < 1 and fit["map_minus_identity"] > 0


def test_ratio_counts_layers_rounded_up(deep, calib):
    model, _ = deep
    res = pruner(ratio=0.25, compensate="none")(model, calib)  # 1.5 -> 2
    assert len(res.details["removed_layers"]) == 2 and res.compression["unit"] == "layers"
    assert res.compression["amount"] == 0.25 and res.compression["layers"] == 2


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("kw,match", [
    ({"num_layers": 0}, r"^pruner.num_layers=0 removes no layers: it must be >= 1"),
    ({"num_layers": 2.5}, r"^pruner.num_layers=2.5 must be a whole number"),
    ({"ratio": 1.0}, r"^ratio=1.0 with pruner.num_layers=null: ratio is the share of the layers"),
    ({"selection": "window"}, r"^pruner.selection='window' is not one of block, greedy, search$"),
    ({"search_budget": 2}, r"^pruner.search_budget=2 must be an integer >= 3"),
    ({"search_tokens": 0}, r"^pruner.search_tokens=0 must be a positive integer"),
    ({"selection": "search", "offload": True, "device": "cpu"},
     r"^pruner.selection=search scores each candidate by a forward of the whole model"),
    ({"compensate": "cosine"}, r"^pruner.compensate='cosine' is not one of linear, none$"),
    ({"damp": -1.0}, r"^pruner.damp=-1.0 must be a number >= 0"),
    ({"compensate": "none", "damp": 0.1}, r"^pruner.damp=0.1 applies to compensate=linear only"),
    ({"ratio_target": "params"}, r"^ratio_target='params' is not supported by pruner=depth"),
    ({"offload": True}, r"^pruner.offload=true needs pruner.device"),
    ({"attention_layers": (5, 2)}, r"^layers.attention: start=5 is after end=2"),
])
def test_bad_options_fail_at_build_in_one_line(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        pruner(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,match", [
    ({"num_layers": 4}, r"^pruner.num_layers=4 would remove all 4 layers of the model: at most 3$"),
    ({"num_layers": 4, "compensate": "none"}, r"would remove all 4 layers"),
    ({"num_layers": 2, "attention_layers": (2, 3)}, r"^2 layers to remove, but the layer ranges hold 1 candidates 2..2"),
    ({"num_layers": 1, "attention_layers": (0, 1)}, r"^depth: no layer is inside both .* \(layer 0 has no layer"),
])
def test_impossible_requests_fail_in_check(kw, match):
    with pytest.raises(PruneError, match=match):
        pruner(**kw).check(4)


def test_only_an_uncompensated_cut_may_take_the_first_layer():
    pruner(num_layers=3, compensate="none", attention_layers=(0, 3)).check(4)
    with pytest.raises(PruneError, match=r"^3 layers to remove, but the layer ranges hold 2 candidates 1..2 \(never "
                                         r"layer 0 with compensate=linear\)"):
        pruner(num_layers=3, attention_layers=(0, 3)).check(4)


def test_validation_imports_no_torch():
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; from pruning.depth import Depth; Depth(num_layers=2, selection='greedy').check(6); "
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


@pytest.mark.parametrize("damp", [0.0, 1e-3])
def test_solve_residuals_match_the_explicit_formula(damp):
    """The residuals read without forming X^T X T (the normal equations) equal ||X T - Y||^2 computed directly."""
    from pruning.depth import _solve

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(200, 6, generator=g,
                                                                                 dtype=torch.float64)
    out = _solve(x.T @ x, x.T @ y, (y * y).sum(), damp)
    t = out["map"]
    direct = float(((x @ t - y) ** 2).sum() / ((x - y) ** 2).sum())
    assert out["fit"]["residual"] == pytest.approx(direct, rel=1e-9)
    assert out["fit"]["map_minus_identity"] == pytest.approx(float(torch.linalg.matrix_norm(t - torch.eye(6))
                                                                   / 6 ** 0.5), rel=1e-12)


def test_merge_map_in_column_blocks_equals_the_whole_product(monkeypatch):
    """merge_map works a block of down_proj columns at a time (bounded memory at 70B widths): same weights."""
    import pruning.depth as depth

    model, _ = build_tiny(num_layers=2)
    layer = model.model.layers[1]
    w = layer.mlp.down_proj.weight.detach().clone()
    t = torch.randn(w.shape[0], w.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(depth, "MERGE_BLOCK_BYTES", w.shape[0] * 8 * 3)  # 3 columns per block, a ragged last one
    depth.merge_map(layer, t)
    assert torch.allclose(layer.mlp.down_proj.weight, (t.T @ w.double()).float(), atol=1e-6)


# --------------------------------------------------------------------------- selection=search (EvoPress)


def _kl_of_plain_removal(model, ids, gone: set[int]) -> float:
    """Mean per-token KL(dense || model without layers ``gone``) over next-token predictions, computed with a
    rebuilt stock Llama (an independent check of the search's fitness)."""
    kept = [i for i in range(len(model.model.layers)) if i not in gone]
    cut = rebuilt(model, kept)
    with torch.no_grad():
        p = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        q = torch.log_softmax(cut(ids).logits[:, :-1].float(), -1)
    return float(F.kl_div(q, p, reduction="sum", log_target=True) / (ids.shape[0] * (ids.shape[1] - 1)))


def test_search_finds_the_set_of_least_kl(deep):
    """With a budget above the space's size, the searched set is the best of all C(5, 2) sets by the KL of their
    plain removal on the fitness rows (measured on a rebuilt model), and no start beats it."""
    import itertools

    ids = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(3))
    p = pruner(num_layers=2, selection="search", compensate="none", search_budget=40, search_tokens=64,
               attention_layers=(1, None), mlp_layers=(1, None))
    dense, _ = deep
    model = copy.deepcopy(dense)
    res = p(model, ids)
    fitness_rows = ids[-4:]  # search_tokens=64 in rows of 16: the last 4 samples
    kl = {c: _kl_of_plain_removal(dense, fitness_rows, set(c)) for c in itertools.combinations(range(1, 6), 2)}
    best = min(kl, key=kl.get)
    s = res.details["search"]
    assert res.details["removed_layers"] == list(best) == s["layers"]
    assert s["best_fitness"] == pytest.approx(kl[best], rel=1e-4)
    assert all(v["fitness"] is None or v["fitness"] >= s["best_fitness"] - 1e-12 for v in s["starts"].values())
    assert s["fitness_tokens"] == 64 and s["fit_tokens"] == 8 * 16
    assert len(model.model.layers) == 4 and model.config.removed_layers == list(best)


def test_search_maps_are_fitted_without_the_fitness_rows(deep, monkeypatch):
    """The maps after a search see only the samples before the fitness rows; the cut model is a plain Llama whose
    logits equal the pruned model's."""
    import pruning.depth as depth

    seen = []
    real = depth.fit_linear_map

    def spy(model, calibration, *a, **kw):
        seen.append(calibration.shape[0])
        return real(model, calibration, *a, **kw)

    monkeypatch.setattr(depth, "fit_linear_map", spy)
    ids = torch.randint(0, 256, (10, 16), generator=torch.Generator().manual_seed(4))
    model = copy.deepcopy(deep[0])
    res = pruner(num_layers=2, selection="search", search_budget=6, search_tokens=32)(model, ids)
    runs = depth._runs(res.details["removed_layers"])
    # the finalists' maps (rerank), then the prune's own: every fit sees the 8 samples before the fitness rows
    assert seen and set(seen) == {8} and len(seen) > len(runs)
    assert all(c.get("merged_into") is not None for c in res.details["cuts"])
    kept = [i for i in range(6) if i not in res.details["removed_layers"]]
    assert len(model.model.layers) == len(kept) == model.config.num_hidden_layers


def test_search_needs_samples_to_fit_on(deep):
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(5))
    with pytest.raises(PruneError, match=r"^depth: pruner.search_tokens=32 takes 2 of the 3 calibration samples"):
        pruner(num_layers=1, selection="search", search_tokens=32)(copy.deepcopy(deep[0]), ids)


def test_runs_group_consecutive_layers():
    from pruning.depth import _runs

    assert _runs([9, 3, 4]) == [(3, 2), (9, 1)] and _runs([5]) == [(5, 1)] and _runs([1, 2, 3]) == [(1, 3)]


def test_search_plan_counts_the_reference_log_probabilities():
    cfg = {"num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8,
           "num_key_value_heads": 2, "vocab_size": 256, "model_type": "llama", "tie_word_embeddings": True}
    fp = pruner(num_layers=2, selection="search", search_tokens=64).footprint(cfg, 256, "float32", "cpu", seq_len=16)
    assert fp.host_parts["the dense model's log-probabilities on the fitness tokens (float32)"] == 4 * 15 * 256 * 4
    assert any("searched by KL" in r for r in fp.removes) and fp.notes
    # the rerank: a second prefix of the fitness tokens (one layer earlier) and its fits' passes; none without it
    part = "the fitness tokens' hidden states entering the layer before the first candidate"
    plain = pruner(num_layers=2, selection="search", search_tokens=64, rerank=0).footprint(
        cfg, 256, "float32", "cpu", seq_len=16)
    assert fp.host_parts[part] == 4 * 16 * 64 * 4 and part not in plain.host_parts  # (the model on the CPU)
    assert fp.layer_forwards > plain.layer_forwards and any("rerank=8" in n for n in fp.notes)


def _kl_with_maps(dense, fit, ids, gone: list[int], damp: float) -> float:
    """KL(dense || the model with ``gone`` removed run by run, each run's map fitted on ``fit`` and merged), built
    on a copy with the module's public steps (an independent check of the rerank's fitness)."""
    from pruning.depth import _runs, merge_map
    from pruning.surgery import remove_layers

    model = copy.deepcopy(dense)
    alive = list(range(len(model.model.layers)))
    for start, k in _runs(gone):
        s = alive.index(start)
        merge_map(model.model.layers[s - 1], fit_linear_map(model, fit, s, s + k, damp)["map"])
        remove_layers(model, list(range(s, s + k)))
        del alive[s:s + k]
    with torch.no_grad():
        p = torch.log_softmax(dense(ids).logits[:, :-1].float(), -1)
        q = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    return float(F.kl_div(q, p, reduction="sum", log_target=True) / (ids.shape[0] * (ids.shape[1] - 1)))


def test_rerank_scores_each_finalist_with_the_maps_the_prune_would_merge(deep):
    """Each finalist's KL with maps equals the KL of the model cut and compensated independently (the same fit
    samples), the model comes back bit for bit, and the set of least KL with maps is the one removed."""
    from pruning.fitness import KLFitness, fidelity_rows, fitness_chunks

    ids = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(6))
    fit, tokens = ids[:8], ids[-4:]
    p = pruner(num_layers=2, selection="search", search_budget=6, search_tokens=64, rerank=3)
    assert p.rerank_rows(deep[0].config.to_dict(), 16) >= 8  # 4 x hidden 64 tokens: every fit sample
    dense = deep[0].eval()
    model = copy.deepcopy(dense)
    layers, before = model.model.layers, {k: v.clone() for k, v in model.state_dict().items()}
    chunks = fitness_chunks(4, fidelity_rows(4), 8)
    ref = KLFitness.reference(model, tokens, 1, chunks)
    finalists = [([2, 3], 0.1), ([1, 5], 0.2), ([3, 5], 0.3)]
    out = p._rerank(model, fit, tokens, 1, chunks, ref, finalists, {"batch_size": 8})
    assert model.model.layers is layers and len(layers) == 6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    want = [_kl_with_maps(dense, fit, tokens, gone, p.damp) for gone, _ in finalists]
    assert [f["kl_linear"] for f in out["finalists"]] == pytest.approx(want, rel=1e-4)
    assert [f["kl_plain"] for f in out["finalists"]] == [0.1, 0.2, 0.3] and out["fit_tokens"] == 8 * 16
    best = min(range(3), key=lambda i: want[i])
    assert out["layers"] == finalists[best][0] and out["plain_rank"] == best + 1

    # the whole prune: the set it removes is its rerank's choice, and the pruned model's KL is the one scored
    pruned = copy.deepcopy(dense)
    res = p(pruned, ids)
    r = res.details["search"]["rerank"]
    assert res.details["removed_layers"] == r["layers"] == res.details["search"]["layers"]
    assert len(r["finalists"]) <= 3 and r["kl_linear"] == min(f["kl_linear"] for f in r["finalists"])
    with torch.no_grad():
        lp = torch.log_softmax(dense(tokens).logits[:, :-1].float(), -1)
        lq = torch.log_softmax(pruned(tokens).logits[:, :-1].float(), -1)
    kl = float(F.kl_div(lq, lp, reduction="sum", log_target=True) / (4 * 15))
    assert kl == pytest.approx(r["kl_linear"], rel=1e-4)


@pytest.mark.parametrize("kw,match", [
    ({"rerank": -1}, r"^pruner.rerank=-1 must be an integer >= 0"),
    ({"rerank": 2.5}, r"^pruner.rerank=2.5 must be an integer"),
    ({"rerank": 3, "selection": "greedy"}, r"^pruner.rerank=3 applies to selection=search with compensate=linear"),
    ({"rerank": 3, "selection": "search", "compensate": "none"}, r"^pruner.rerank=3 applies to selection=search"),
])
def test_bad_rerank_is_one_line(kw, match):
    with pytest.raises(ConfigError, match=match):
        pruner(num_layers=2, **kw)


def test_rerank_zero_keeps_the_plain_best(deep):
    ids = torch.randint(0, 256, (10, 16), generator=torch.Generator().manual_seed(4))
    res = pruner(num_layers=2, selection="search", search_budget=6, search_tokens=32, rerank=0)(
        copy.deepcopy(deep[0]), ids)
    assert "rerank" not in res.details["search"]
