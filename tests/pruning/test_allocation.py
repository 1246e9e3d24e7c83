"""The searched allocation (pruning/obs/search.py): the budget-exact space, the variant pass, the KL fitness and
``pruner=obs pruner.allocation=search`` end to end on a tiny random Llama."""

from __future__ import annotations

import random

import pytest
import torch

from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params
from core.search import SearchError
from pruning.compensate import relative_error
from pruning.obs.allocate import allocate_channels
from pruning.obs.fit import ProjectionFit, prune_sequential
from pruning.obs.pruner import StructuredOBS
from pruning.fitness import KLFitness, fidelity_rows, fitness_chunks
from pruning.obs.search import (BudgetLevels, build_variants,
                                separable_allocation)

SPACES = [
    BudgetLevels((3, 4, 5, 6, 7), (10, 10, 11, 11, 11), (60, 60, 60, 60, 60), 3),
    BudgetLevels((0, 1, 2), (2, 1, 2), (3, 9, 4), 1),  # tight caps: many levels out of the space
    BudgetLevels((0, 1, 2, 3), (40, 40, 40, 40), (47, 100, 47, 100), 10),  # some layers cannot go up
    BudgetLevels((5,), (7,), (9,), 2),  # one layer: the centre is the only candidate
]


def removed(space: BudgetLevels, c) -> int:
    return sum(space.count(i, v) for i, v in enumerate(c))


@pytest.mark.parametrize("space", SPACES, ids=lambda s: f"n{s.n}")
def test_every_move_keeps_the_exact_budget(space):
    rng = random.Random(0)
    pool = [space.centre]
    for _ in range(600):
        kind = rng.choice(("random", "mutate", "crossover"))
        if kind == "random":
            c = space.random(rng)
        elif kind == "mutate":
            c = space.mutate(rng.choice(pool), rng)
        else:
            c = space.crossover(rng.choice(pool), rng.choice(pool), rng)
        assert space.validate(c) == c
        assert removed(space, c) == space.total
        assert all(0 <= space.count(i, v) <= space.caps[i] for i, v in enumerate(c))
        pool.append(c)


@pytest.mark.parametrize("space", SPACES[:3], ids=lambda s: f"n{s.n}")
def test_size_all_and_random_agree(space):
    members = set(space.all())
    assert len(members) == space.size() > 1
    rng = random.Random(1)
    drawn = {space.random(rng) for _ in range(40 * space.size())}
    assert drawn == members  # every member reachable; nothing else drawn


@pytest.mark.parametrize("space", SPACES, ids=lambda s: f"n{s.n}")
def test_the_sensitivity_start_is_the_optimum_of_a_separable_convex_fitness(space):
    """Per-layer quadratic costs (convex, different per layer): three probes per layer recover them exactly, and
    the dynamic programme returns the budget-exact candidate of least total cost (checked against every one)."""
    rng = random.Random(len(space.layers))
    curve = [(rng.uniform(0.1, 2.0), rng.uniform(-1.0, 3.0)) for _ in space.layers]
    calls = []

    def fitness(c, fidelity=None):
        calls.append(fidelity)
        return 5.0 + sum(a * (v - space.mid) ** 2 + b * (v - space.mid) for (a, b), v in zip(curve, c))

    best, probes = separable_allocation(space, fitness, fidelity=64)
    assert space.validate(best) == best
    want = min(fitness(c) for c in space.all())
    assert fitness(best) == pytest.approx(want)
    assert set(calls[:probes["evaluations"]]) == {64} and probes["evaluations"] == 1 + sum(
        (lo <= space.mid - 1) + (space.mid + 1 <= hi) for lo, hi in space.bounds)


def test_the_sensitivity_start_moves_channels_from_sensitive_layers_to_robust_ones():
    space = SPACES[0]
    weight = [8.0, 4.0, 1.0, 0.5, 0.25]  # removing channels costs most in the first layer

    def fitness(c, fidelity=None):
        return sum(w * space.count(i, v) ** 2 for i, (w, v) in enumerate(zip(weight, c)))

    best, _ = separable_allocation(space, fitness)
    counts = [space.count(i, v) for i, v in enumerate(best)]
    assert counts == sorted(counts) and counts[0] < space.center[0] < space.center[-1] < counts[-1]


def test_mutate_moves_one_layer_up_and_another_down():
    space, rng = SPACES[0], random.Random(2)
    for _ in range(100):
        c = space.random(rng)
        m = space.mutate(c, rng)
        diff = sorted(b - a for a, b in zip(c, m))
        assert diff == [-1] + [0] * (space.n - 2) + [1]


def test_validate_refuses_an_off_budget_candidate():
    space = SPACES[0]
    c = list(space.centre)
    c[0] += 1  # one step more removed somewhere, nothing less elsewhere
    with pytest.raises(SearchError, match="not the budget"):
        space.validate(c)
    with pytest.raises(ValueError):  # the engine treats any ValueError as "not a member"
        space.validate(c[:-1])
    tight = SPACES[1]
    with pytest.raises(SearchError, match="within"):
        tight.validate((0, 6, 3))  # level 0 would remove -1 channels from layer 0


def test_projection_is_budget_exact_and_exact_on_the_grid():
    space = SPACES[0]
    on_grid = {3: 4, 4: 13, 5: 11, 6: 14, 7: 11}  # centre +- one step, summing to the budget
    assert sum(on_grid.values()) == space.total
    assert space.counts(space.project(on_grid)) == on_grid
    far = {3: 0, 4: 0, 5: 0, 6: 0, 7: 53}  # off the grid and beyond it: nearest levels, then repaired
    c = space.project(far)
    assert removed(space, c) == space.total and c[-1] == space.levels - 1


def test_around_centres_on_the_uniform_allocation(tiny):
    geo = Geometry.of(tiny[0])
    space = BudgetLevels.around(geo, (0, 4), 100)
    assert space.counts(space.centre) == allocate_channels(geo, (0, 4), 100, "uniform")
    assert space.step == round(100 / 4 / 4) and space.total == 100


def test_fitness_chunks_never_straddle_a_fidelity():
    assert fidelity_rows(16) == [1, 4, 16] and fidelity_rows(3) == [1, 3]
    chunks = fitness_chunks(16, [1, 4, 16], 8)
    assert chunks == [(0, 1), (1, 4), (4, 12), (12, 16)]


# ---------------------------------------------------------------------------------------------- with a model

def _tiny(seed: int = 0):
    from core.models.load import build_tiny

    return build_tiny(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, seed=seed)[0]


@pytest.fixture
def calib16():
    return torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(0))


def _obs(**kw) -> StructuredOBS:
    base = dict(ratio=0.2, tokens=None, seq_len=32, allocation="search", search_budget=8, search_tokens=128,
                progress=False, autocast=None)  # float32 forwards on every CPU (auto: bfloat16 on AMX ones)
    return StructuredOBS(**{**base, **kw})


def test_kl_of_the_dense_model_to_itself_is_zero(calib16):
    model = _tiny()
    chunks = fitness_chunks(4, [1, 4], 2)
    ref = KLFitness.reference(model, calib16[-4:], 1, chunks)
    fit = KLFitness(model, calib16[-4:], 1, chunks, ref)
    assert fit.kl() == 0.0 and fit.kl(32) == 0.0
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(0.5)
    assert fit.kl() > 1e-6  # and a changed model is not


def test_the_variant_pass_is_the_sequential_prune_and_apply_swaps_exactly(calib16):
    """After the pass the model equals the uniform sequential prune; any candidate applied and the centre applied
    again gives the same weights back; restore gives the dense model back."""
    opt = _obs()
    a, b, dense = _tiny(), _tiny(), _tiny()
    geo = Geometry.of(a)
    space = BudgetLevels.around(geo, (0, 4), 100)
    variants = build_variants(a, calib16[:12], {}, space, opt.fit_options())
    prune_sequential(b, calib16[:12], {}, space.counts(space.centre), options=opt.fit_options())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert all(len(v) == len(space.menu(i)) for i, v in enumerate(variants.by_layer.values()))
    far = space.random(random.Random(3))
    variants.apply(a, space.counts(far))
    assert [a.model.layers[l].mlp.down_proj.in_features for l in space.layers] == \
        [geo.widths[l] - space.count(i, v) for i, (l, v) in enumerate(zip(space.layers, far))]
    variants.apply(a, space.counts(space.centre))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, sb[k], rtol=1e-5, atol=1e-6, msg=k)
    variants.restore(a)
    x = calib16[:2]
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, dense(x).logits)


@pytest.mark.parametrize("targets", [False, True])
def test_the_guard_error_from_gram_matrices_is_relative_error(targets):
    torch.manual_seed(0)
    w, b = torch.randn(6, 10, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    xs, held = [torch.randn(2, 50, 10, dtype=torch.float64)], [torch.randn(2, 30, 10, dtype=torch.float64)]
    th = [torch.randn(2, 30, 6, dtype=torch.float64)] if targets else None
    tf = [torch.randn(2, 50, 6, dtype=torch.float64)] if targets else None
    fit = ProjectionFit(w, b, xs, held, _obs().fit_options(), tf, th, summed_guard=True)
    w_new = torch.randn(6, 11, dtype=torch.float64)
    xh = held[0].reshape(-1, 10)
    want = relative_error(xh, w, w_new, b, target=th[0].reshape(-1, 6) if targets else None)
    assert fit.held.errors(w_new) == [pytest.approx(want, rel=1e-6)]  # (float32 products, summed in float64)


def test_allocation_search_prunes_to_the_plan_and_beats_every_start(calib16):
    model = _tiny()
    res = _obs()(model, calib16)
    s = res.details["search"]
    assert res.details["allocation"] == "search" and set(s["starts"]) == {"uniform", "depth", "flap", "sensitivity"}
    assert all(s["best_fitness"] <= st["fitness"] for st in s["starts"].values())
    assert s["gain"] == pytest.approx(s["best_start_fitness"] - s["best_fitness"]) and s["gain"] >= 0
    assert s["full_fidelity_evaluations"] <= 8 and s["evaluations"] >= 3 and s["fitness_tokens"] == 128
    probes = s["sensitivity_probes"]  # the probes are paid from the same budget
    assert probes["evaluations"] == 1 + 2 * len(s["layers"]) and probes["fidelity"] == 32  # one of the 4 rows
    assert probes["full_fidelity_equivalents"] == 3 and s["budget"] == 8 - 3
    plan = res.details["channels_removed"]
    assert [plan.get(l, 0) for l in s["layers"]] == s["channels"]
    geo = Geometry.of(model)
    assert [geo.widths[l] for l in range(4)] == [128 - plan.get(l, 0) for l in range(4)]
    assert res.params_after == count_params(model)
    uniform = _obs(allocation="uniform")(_tiny(), calib16[:12])
    # the same channels, spread differently; the parameter counts differ only by refitted bias vectors the guard
    # kept in one run and rejected in the other
    biases = lambda r: sum(1 for p in r.details["projections"] if p.get("update") == "kept")  # noqa: E731
    assert res.params_after - 64 * biases(res) == uniform.params_after - 64 * biases(uniform)
    assert sum(plan.values()) == sum(uniform.details["channels_removed"].values())
    assert res.details["calibration_tokens"] == 12 * 32  # the fitness rows never fitted on


def test_a_budget_too_small_for_the_sensitivity_probes_searches_from_the_fixed_starts(calib16):
    s = _obs(search_budget=4)(_tiny(), calib16).details["search"]
    assert set(s["starts"]) == {"uniform", "depth", "flap"} and "cannot pay" in s["sensitivity_probes"]["skipped"]
    assert s["full_fidelity_evaluations"] <= 4 and s["budget"] == 4


def test_allocation_search_is_deterministic_for_a_seed(calib16):
    one = _obs(seed=3)(_tiny(), calib16).details["search"]
    two = _obs(seed=3)(_tiny(), calib16).details["search"]
    keys = ("channels", "best_fitness", "starts", "evaluations")
    assert {k: one[k] for k in keys} == {k: two[k] for k in keys}


@pytest.mark.parametrize("kw, match", [
    ({"search_budget": 2}, "search_budget"),
    ({"search_tokens": 0}, "search_tokens"),
    ({"tokens": 128, "search_tokens": 100}, "fewer than 2"),
    ({"offload": True, "device": "cpu"}, "offload"),
])
def test_bad_search_options_fail_at_construction(kw, match):
    with pytest.raises(ConfigError, match=match):
        _obs(**kw)


def test_too_few_calibration_samples_for_the_fitness_rows_is_one_clear_error(calib16):
    from pruning import PruneError

    with pytest.raises(PruneError, match="at least 2 must stay"):
        _obs(search_tokens=15 * 32)(_tiny(), calib16)
