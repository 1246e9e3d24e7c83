"""The search engine on synthetic fitness functions (no model): optimum, fidelities, cache, budget, resume."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest

from core.run.errors import UserError
from core.search import STRATEGIES, Levels, ResumeError, SearchError, Subsets, search

TARGET = (1, 4, 9)  # the hidden optimum of Subsets(16, 3) / Subsets(12, 3)
FULL = 1024
FIDS = [64, 256, FULL]


def jitter(*key) -> float:
    """Deterministic pseudo-random number in [0, 1) per key."""
    return zlib.crc32(repr(key).encode()) % 100_000 / 100_000


def distance(c, fidelity=None) -> float:
    """|c ^ TARGET| (steps of 2) plus a unique small tie-breaker: one optimum, TARGET."""
    return len(set(c) ^ set(TARGET)) + 0.01 * jitter(c)


def noisy(c, fidelity) -> float:
    """``distance`` exactly at the top fidelity; lower fidelities add noise of up to 3 (more than one step)."""
    return distance(c) + 3.0 * (1 - fidelity / FULL) * (jitter(c, fidelity) - 0.5)


def hashed(c, fidelity=None) -> float:
    """No structure at all: only a search that sees everything is sure to find the optimum."""
    return jitter("h", c)


class Counted:
    """A fitness that counts its calls per (candidate, fidelity); raises Killed after ``kill_after`` calls."""

    def __init__(self, fn, kill_after=None):
        self.fn, self.kill_after, self.calls = fn, kill_after, Counter()

    def __call__(self, c, fidelity=None):
        if self.kill_after is not None and sum(self.calls.values()) >= self.kill_after:
            raise Killed
        self.calls[(c, fidelity)] += 1
        return self.fn(c, fidelity)


class Killed(Exception):
    pass


def comparable(res) -> dict:
    out = res.to_json()
    del out["wall_s"], out["restored"]
    return out


# ------------------------------------------------------------------------------------------------ spaces

def test_subsets_space_operations():
    import random

    s, rng = Subsets(8, 3), random.Random(0)
    everything = list(s.all())
    assert s.size() == len(everything) == len(set(everything)) == 56
    for _ in range(200):
        a, b = s.random(rng), s.random(rng)
        assert a == tuple(sorted(set(a))) and len(a) == 3 and s.validate(a) == a
        m = s.mutate(a, rng)
        assert len(m) == 3 and m == tuple(sorted(m)) and len(set(a) & set(m)) == 2  # one member swapped
        x = s.crossover(a, b, rng)
        assert len(set(x)) == 3 and set(a) & set(b) <= set(x) <= set(a) | set(b) and x == tuple(sorted(x))
    assert s.items() == [(i,) for i in range(8)]
    assert s.from_items([(5,), (2,), (7,), (0,)]) == (2, 5, 7)
    assert s.validate([6, 1, 3]) == (1, 3, 6)
    for bad in ([1, 1, 2], [0, 1, 8], [0, 1], [-1, 2, 3]):
        with pytest.raises(ValueError, match="3 distinct integers in 0..7"):
            s.validate(bad)
    assert Subsets(4, 4).mutate((0, 1, 2, 3), rng) == (0, 1, 2, 3)


def test_levels_space_operations():
    import random

    s, rng = Levels(4, 3), random.Random(0)
    assert s.size() == len(set(s.all())) == 81
    for _ in range(200):
        a, b = s.random(rng), s.random(rng)
        assert s.validate(a) == a
        m = s.mutate(a, rng)
        diff = [i for i in range(4) if m[i] != a[i]]
        assert len(diff) == 1 and abs(m[diff[0]] - a[diff[0]]) == 1 and s.validate(m) == m
        assert all(x in (p, q) for x, p, q in zip(s.crossover(a, b, rng), a, b))
    with pytest.raises(ValueError, match="4 levels in 0..2"):
        s.validate((0, 1, 3, 0))
    with pytest.raises(SearchError, match="score_topk needs a space of items"):
        s.items()


@pytest.mark.parametrize("make,match", [(lambda: Subsets(3, 4), r"k must be at most n"),
                                        (lambda: Subsets(3, 0), r"Subsets k=0 must be an integer >= 1"),
                                        (lambda: Subsets(3, -1), r"Subsets k=-1 must be"),
                                        (lambda: Subsets(0, 1), r"Subsets n=0 must be an integer >= 1"),
                                        (lambda: Subsets(2.5, 1), r"Subsets n=2.5"),
                                        (lambda: Levels(0, 3), r"Levels n=0"),
                                        (lambda: Levels(3, 0), r"Levels levels=0")])
def test_invalid_spaces_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------------------------ optimum

@pytest.mark.parametrize("strategy,budget", [("exhaustive", 560), ("random", 560), ("score_topk", 17),
                                             ("ga", 100), ("evolve", 100)])
def test_every_strategy_finds_the_optimum(strategy, budget):
    for seed in range(3):  # ga/evolve: 100 of 560 candidates (random's chance of finding TARGET: 18% per seed)
        res = search(Subsets(16, 3), distance, strategy=strategy, budget=budget, seed=seed)
        assert res.best == TARGET and res.best_fitness == distance(TARGET), (strategy, seed)
        assert res.evaluations <= budget


def test_strategies_agree_on_a_tiny_space():
    for space in (Subsets(6, 2), Levels(3, 3)):
        size = space.size()
        truth = search(space, hashed, strategy="exhaustive", budget=size)
        assert truth.evaluations == size and truth.stopped == "done"
        assert truth.best_fitness == min(hashed(c) for c in space.all())
        for strategy in ("random", "ga", "evolve"):
            for fids in (None, [1, 2]):
                res = search(space, hashed, strategy=strategy, budget=size, fidelities=fids)
                assert (res.best, res.best_fitness) == (truth.best, truth.best_fitness), (space, strategy)
    weights = [3, 0, 5, 1, 4, 2]  # additive: score_topk's singletons rank the items right, best {1, 3}

    def additive(c, f=None):
        return sum(weights[i] for i in c) + 0.01 * jitter(c)

    truth = search(Subsets(6, 2), additive, strategy="exhaustive", budget=15)
    topk = search(Subsets(6, 2), additive, strategy="score_topk", budget=15)
    assert topk.best == truth.best == (1, 3) and topk.evaluations == 7


def test_levels_space_with_every_strategy_but_score_topk():
    target = (2, 0, 1, 2)

    def fit(c, f=None):
        return sum(abs(a - b) for a, b in zip(c, target)) + 0.01 * jitter(c)

    for strategy, budget in (("exhaustive", 81), ("random", 81), ("ga", 40), ("evolve", 40)):
        res = search(Levels(4, 3), fit, strategy=strategy, budget=budget, seed=1,
                     fidelities=[1, 4] if strategy == "evolve" else None)
        assert res.best == target, strategy
    with pytest.raises(SearchError, match="score_topk needs a space of items .*Levels"):
        search(Levels(4, 3), fit, strategy="score_topk", budget=81)


# ------------------------------------------------------------------------------------------------ fidelities

def test_evolve_with_noisy_low_fidelities_finds_the_optimum_and_accounts_costs():
    for seed in range(3):
        fit = Counted(noisy)
        res = search(Subsets(16, 3), fit, strategy="evolve", budget=30, seed=seed, fidelities=FIDS)
        assert res.best == TARGET and res.best_fitness == distance(TARGET), seed
        per_level = Counter(e.fidelity for e in res.history)
        assert set(per_level) == set(FIDS) and per_level[64] > per_level[256] > per_level[FULL]
        assert res.evaluations == len(res.history) == sum(fit.calls.values()) > 30  # cheap screening: more evaluations
        assert res.cost == pytest.approx(sum(f / FULL * n for f, n in per_level.items()))
        assert res.cost == res.history[-1].cost <= 30
        costs = [e.cost for e in res.history]
        assert costs == sorted(costs) and costs[0] == pytest.approx(64 / FULL)
        assert all(e.best is None or e.best == min(h.fitness for h in res.history[:e.index + 1] if h.fidelity == FULL)
                   for e in res.history)
    # the other strategies score at the top fidelity only
    for strategy in ("random", "ga", "score_topk"):
        res = search(Subsets(16, 3), noisy, strategy=strategy, budget=20, fidelities=FIDS)
        assert {e.fidelity for e in res.history} == {FULL} and res.cost == res.evaluations


def test_evolve_mutates_the_best_so_far():
    """Elitist (1 + lambda): every generation's offspring are mutants of the best candidate found so far."""
    res = search(Subsets(20, 4), hashed, strategy="evolve", budget=80, offspring=8)  # one level: 8 per generation
    near = 0
    for start in range(8, 80, 8):
        best = min(res.history[:start], key=lambda e: e.fitness).candidate
        near += sum(len(set(e.candidate) & set(best)) >= 3 for e in res.history[start:start + 8])
    assert near >= 0.8 * 72  # one swap away (a second mutation 1 time in 10)


def test_evolve_with_budget_to_spare_scores_the_whole_space_at_the_top():
    with deadline(10):  # well over 1000 cache hits in all, never 1000 in a row
        res = search(Subsets(12, 3), noisy, strategy="evolve", budget=10**6, fidelities=FIDS)
    assert res.cache_hits > 1000 and res.best == TARGET and res.cost < 300
    # it goes on until new candidates are hard to find (a few random draws per generation at the end)
    assert res.stopped == "stalled" and len({e.candidate for e in res.history if e.fidelity == FULL}) > 200


def test_one_level_passes_fidelity_none():
    seen = Counted(distance)
    res = search(Subsets(5, 2), seen, strategy="evolve", budget=4)
    assert {f for _, f in seen.calls} == {None} and res.cost == res.evaluations == 4 and res.fidelities == [None]


# ------------------------------------------------------------------------------------------------ cache, budget

@pytest.mark.parametrize("strategy", ["ga", "evolve"])
def test_cache_answers_repeats_without_calling_fitness(strategy):
    fit = Counted(noisy)
    res = search(Subsets(7, 2), fit, strategy=strategy, budget=100, fidelities=FIDS)
    assert max(fit.calls.values()) == 1  # never twice for the same (candidate, fidelity)
    assert res.evaluations == len(fit.calls) == len({(e.candidate, e.fidelity) for e in res.history})
    assert res.stopped == "exhausted" and res.best == (1, 4) and res.cost < 100
    if strategy == "evolve":  # mutants screened before are asked for again: answered by the cache, counted
        assert res.cache_hits > 50


def test_score_topk_with_k1_reuses_the_best_singleton():
    fit = Counted(distance)
    res = search(Subsets(10, 1), fit, strategy="score_topk", budget=11)
    assert res.evaluations == 10 and res.cache_hits == 1 and sum(fit.calls.values()) == 10
    assert res.best in {(1,), (4,), (9,)} and res.stopped == "done"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("budget", [1, 7.5, 23])
def test_budget_is_never_exceeded(strategy, budget):
    fids = FIDS if strategy == "evolve" else None
    space = Subsets(5 if strategy in ("exhaustive", "score_topk") else 16, 2)
    if strategy == "exhaustive" and space.size() > budget or strategy == "score_topk" and 6 > budget:
        with pytest.raises(SearchError, match="does not fit budget|needs 6 evaluations"):
            search(space, noisy if fids else distance, strategy=strategy, budget=budget, fidelities=fids)
        return
    fit = Counted(noisy if fids else distance)
    res = search(space, fit, strategy=strategy, budget=budget, fidelities=fids)
    spent = sum(1 if f is None else f / FULL for _, f in fit.calls)
    assert res.cost == pytest.approx(spent) and spent <= budget
    if strategy in ("random", "ga"):
        assert res.evaluations == math.floor(budget) and res.stopped == "budget"
    if strategy == "evolve":  # it plans its last generations to fit, so little is left over
        assert budget - res.cost < 3.5 and res.stopped == "budget"


def test_bad_arguments_are_refused():
    for kwargs, match in [({"strategy": "annealing"}, "strategy='annealing' is not one of exhaustive"),
                          ({"budget": 0.5}, "budget=0.5 must be at least 1"),
                          ({"fidelities": [256, 64]}, "increasing order"),
                          ({"fidelities": [0, 64]}, "positive numbers"),
                          ({"population": 1, "strategy": "ga"}, "population=1"),
                          ({"fingerprint": {"seed": 3}}, r"fingerprint keys \['seed'\] are set by the search"),
                          ({"strategy": "exhaustive", "budget": 100}, "exhaustive search of 120 candidates")]:
        with pytest.raises(SearchError, match=match):
            search(Subsets(10, 3), distance, **{"strategy": "random", "budget": 10, **kwargs})
    assert issubclass(SearchError, UserError) and issubclass(SearchError, ValueError)


def test_nan_never_wins_and_ties_go_to_the_first_found():
    res = search(Subsets(6, 2), lambda c, f: math.nan if 0 in c else distance(c), strategy="exhaustive", budget=15)
    assert 0 not in res.best and not math.isnan(res.best_fitness)
    assert search(Subsets(4, 2), lambda c, f: 1.0, strategy="exhaustive", budget=6).best == (0, 1)


@contextlib.contextmanager
def deadline(seconds: float):
    """A search that never ends fails instead of hanging the suite."""
    def expire(*_):
        raise TimeoutError(f"still searching after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_searches_on_tiny_spaces_end():
    best = search(Subsets(5, 2), distance, strategy="exhaustive", budget=10).best
    for strategy in ("random", "ga", "evolve"):
        with deadline(5):
            res = search(Subsets(5, 2), distance, strategy=strategy, budget=10**6, fidelities=[1, 2])
        assert res.stopped == "exhausted" and res.best == best, strategy

    class Stuck(Subsets):  # operators that never leave the parent, random() reaches 6 of the 435 candidates
        def mutate(self, c, rng):
            return c

        def crossover(self, a, b, rng):
            return a

        def random(self, rng):
            return (rng.randrange(3), 29 - rng.randrange(2))

    for strategy in STRATEGIES[1:]:
        with deadline(5):
            res = search(Stuck(30, 2), distance, strategy=strategy, budget=10**6, population=4, offspring=4)
        expected = ("done", 31) if strategy == "score_topk" else ("stalled", 6)
        assert (res.stopped, res.evaluations) == expected, strategy


# ------------------------------------------------------------------------------------------------ determinism

@pytest.mark.parametrize("strategy", ["random", "ga", "evolve"])
def test_same_seed_same_result(strategy):
    fids = FIDS if strategy == "evolve" else None
    runs = [search(Subsets(16, 3), noisy if fids else distance, strategy=strategy, budget=12, seed=s, fidelities=fids)
            for s in (5, 5, 6, 7)]
    assert comparable(runs[0]) == comparable(runs[1])
    assert len({json.dumps(comparable(r)["history"]) for r in runs}) == 3  # other seeds, other searches


# ------------------------------------------------------------------------------------------------ resume

CASES = {"exhaustive": (Subsets(8, 2), 28, None), "random": (Subsets(16, 3), 20, None),
         "score_topk": (Subsets(12, 3), 13, None), "ga": (Subsets(16, 3), 40, None),
         "evolve": (Subsets(16, 3), 20, FIDS)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_killed_search_resumes_to_the_uninterrupted_result(strategy, tmp_path):
    space, budget, fids = CASES[strategy]
    kw = {"strategy": strategy, "budget": budget, "seed": 3, "fidelities": fids, "fingerprint": {"model": "m"}}
    fn = noisy if fids else distance
    whole = search(space, Counted(fn), **kw)
    state = tmp_path / "state.json"
    with pytest.raises(Killed):
        search(space, Counted(fn, kill_after=6), state_path=state, **kw)
    saved = json.loads(state.read_text())
    assert saved["done"] is False and len(saved["history"]) == 6  # saved on the way out
    saved_keys = {(tuple(e["candidate"]), e["fidelity"]) for e in saved["history"]}
    new, seen = Counted(fn), []
    resumed = search(space, new, state_path=state, on_eval=seen.append, **kw)
    assert comparable(resumed) == comparable(whole)
    assert resumed.evaluations > 6 and resumed.restored == 6
    assert not saved_keys & set(new.calls) and sum(new.calls.values()) == whole.evaluations - 6
    assert [e.index for e in seen] == list(range(6, whole.evaluations))  # on_eval: real evaluations only
    final = json.loads(state.read_text())
    assert final["done"] is True and final["evaluations"] == whole.evaluations == len(final["history"])
    # a finished state replays without a single call
    again = Counted(fn)
    assert comparable(search(space, again, state_path=state, **kw)) == comparable(whole) and not again.calls


def test_killed_twice_resumes_to_the_same_result(tmp_path):
    kw = {"strategy": "evolve", "budget": 25, "seed": 4, "fidelities": FIDS, "state_path": tmp_path / "s.json"}
    whole = search(Subsets(16, 3), noisy, **{**kw, "state_path": None})
    with pytest.raises(Killed):
        search(Subsets(16, 3), Counted(noisy, kill_after=10), **kw)
    with pytest.raises(Killed):  # killed again during the resumed run (after the replay)
        search(Subsets(16, 3), Counted(noisy, kill_after=10), **kw)
    assert len(json.loads(kw["state_path"].read_text())["history"]) == 20
    last = Counted(noisy)
    res = search(Subsets(16, 3), last, **kw)
    assert comparable(res) == comparable(whole) and res.restored == 20
    assert sum(last.calls.values()) == whole.evaluations - 20


def test_resume_interrupted_during_its_replay_loses_nothing(tmp_path):
    class Fragile(Subsets):  # raises while the resumed run is still replaying the saved evaluations
        calls = 0

        def mutate(self, c, rng):
            Fragile.calls += 1
            if Fragile.calls > 3:
                raise Killed
            return super().mutate(c, rng)

    kw = {"strategy": "evolve", "budget": 20, "seed": 2, "fidelities": FIDS, "state_path": tmp_path / "s.json"}
    with pytest.raises(Killed):
        search(Subsets(16, 3), Counted(noisy, kill_after=15), **kw)
    with pytest.raises(Killed):
        search(Fragile(16, 3), Counted(noisy), **kw)
    assert len(json.loads(kw["state_path"].read_text())["history"]) == 15
    res = search(Subsets(16, 3), noisy, **kw)
    whole = search(Subsets(16, 3), noisy, **{**kw, "state_path": None})
    assert res.restored == 15 and comparable(res) == comparable(whole)


def test_hard_killed_process_resumes_from_its_last_save(tmp_path):
    """os._exit in the middle of a search (no exception handler runs): the atomic saves are all there is."""
    state = tmp_path / "state.json"
    here = Path(__file__).resolve()
    code = (f"import os, sys; sys.path[:0] = [{str(here.parents[2])!r}, {str(here.parent)!r}]\n"
            "from test_search import noisy, FIDS\nfrom core.search import Subsets, search\ncalls = []\n"
            "def fit(c, f):\n    calls.append(c)\n    if len(calls) > 7: os._exit(9)\n    return noisy(c, f)\n"
            f"search(Subsets(16, 3), fit, strategy='evolve', budget=20, seed=1, fidelities=FIDS, "
            f"state_path={str(state)!r}, save_every_s=0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 9, out.stderr
    assert len(json.loads(state.read_text())["history"]) == 7
    kw = {"strategy": "evolve", "budget": 20, "seed": 1, "fidelities": FIDS}
    fit = Counted(noisy)
    res = search(Subsets(16, 3), fit, state_path=state, **kw)
    assert comparable(res) == comparable(search(Subsets(16, 3), noisy, **kw)) and res.restored == 7
    assert sum(fit.calls.values()) == res.evaluations - 7


def test_state_is_written_before_the_first_evaluation(tmp_path):
    state = tmp_path / "deep" / "state.json"

    def fit(c, f):
        saved = json.loads(state.read_text())  # a kill during the first evaluation still leaves a state
        assert saved["fingerprint"]["model"] == "m" and saved["done"] is False
        return distance(c)

    search(Subsets(6, 2), fit, strategy="random", budget=3, state_path=state, fingerprint={"model": "m"})
    assert json.loads(state.read_text())["done"] is True


def test_state_of_another_configuration_is_refused(tmp_path):
    state = tmp_path / "state.json"
    kw = {"strategy": "ga", "budget": 20, "seed": 0, "fingerprint": {"base": "a", "fitness": "kl"}}
    search(Subsets(10, 3), distance, state_path=state, **kw)
    before = state.read_text()
    for change, names, not_named in [({"budget": 30}, ["budget: 20 in the state, 30 now"], ["seed"]),
                                     ({"fingerprint": {"base": "b", "fitness": "kl"}}, ["base: 'a' in the state, 'b'"],
                                      ["fitness", "budget"]),
                                     ({"fingerprint": {"base": "a"}}, ["fitness: 'kl' in the state, '<absent>' now"],
                                      ["base"]),
                                     ({"strategy": "evolve"}, ["strategy", "population"], ["budget"]),
                                     ({"seed": 1, "fidelities": [1, 2]}, ["seed", "fidelities"], ["budget"])]:
        with pytest.raises(ResumeError, match="another search configuration") as err:
            search(Subsets(10, 3), distance, state_path=state, **{**kw, **change})
        assert all(n in str(err.value) for n in names) and not any(f"{n}:" in str(err.value) for n in not_named)
        assert isinstance(err.value, UserError)
    with pytest.raises(ResumeError, match="space: .*'k': 3.* in the state, .*'k': 2"):
        search(Subsets(10, 2), distance, state_path=state, **kw)
    assert state.read_text() == before  # a refused resume leaves the state alone
    state.write_text("{not json")
    with pytest.raises(ResumeError, match="is not a readable search state"):
        search(Subsets(10, 3), distance, state_path=state, **kw)


def test_on_eval_and_json():
    seen = []
    res = search(Subsets(8, 2), distance, strategy="ga", budget=12, population=4, offspring=4, on_eval=seen.append)
    assert seen == res.history and [e.index for e in seen] == list(range(12))
    out = json.loads(json.dumps(res.to_json()))
    assert out["best"] == list(res.best) and out["evaluations"] == 12 and out["cost"] == 12.0
    assert set(out["history"][0]) == {"index", "candidate", "fidelity", "fitness", "best", "cost"}
    assert out["history"][-1]["best"] == res.best_fitness
