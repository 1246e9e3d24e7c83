"""The search engine's initial candidates (core/search.py, ``initial=``): ga and evolve start from known ones."""

from __future__ import annotations

import json
import zlib

import pytest

from core.search import ResumeError, SearchError, Subsets, search

FIDS = [64, 256, 1024]


def rough(c, fidelity=None) -> float:
    """Structureless values; lower fidelities add noise (so a low-fidelity screen can wrongly drop a candidate)."""
    base = zlib.crc32(repr(c).encode()) % 10_000 / 10_000
    noise = 0.0 if fidelity in (None, FIDS[-1]) else (zlib.crc32(repr((c, fidelity)).encode()) % 1000 / 1000 - 0.5)
    return base + noise


def top_values(res) -> dict:
    return {e.candidate: e.fitness for e in res.history if e.fidelity == res.fidelities[-1]}


@pytest.mark.parametrize("seed", range(5))
def test_evolve_scores_every_initial_candidate_at_the_top_and_never_ends_worse(seed):
    seeds = [(0, 1, 2), (3, 4, 5), (2, 7, 9)]
    res = search(Subsets(12, 3), rough, strategy="evolve", budget=12, seed=seed, fidelities=FIDS, initial=seeds)
    top = top_values(res)
    assert all(s in top for s in seeds)
    assert res.best_fitness <= min(top[s] for s in seeds)
    assert [e.candidate for e in res.history[:3]] == seeds and all(e.fidelity == FIDS[-1] for e in res.history[:3])
    assert res.cost <= 12


def test_ga_starts_from_the_initial_candidates():
    seeds = [(0, 1, 2), (9, 10, 11)]
    res = search(Subsets(12, 3), rough, strategy="ga", budget=20, seed=0, population=4, offspring=2, initial=seeds)
    assert [e.candidate for e in res.history[:2]] == seeds
    assert len({e.candidate for e in res.history[:4]}) == 4  # then random ones up to the population


def test_initial_candidates_are_canonicalised_and_deduplicated():
    res = search(Subsets(12, 3), rough, strategy="evolve", budget=5, seed=0, initial=[(2, 1, 0), (0, 1, 2)])
    assert res.history[0].candidate == (0, 1, 2) and (0, 1, 2) not in [e.candidate for e in res.history[1:]]


def test_an_evolve_budget_spent_on_the_initial_candidates_returns_the_best_of_them():
    seeds = [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    res = search(Subsets(12, 3), rough, strategy="evolve", budget=3, seed=0, fidelities=FIDS, initial=seeds)
    assert res.evaluations == 3 and res.stopped == "budget"
    assert res.best == min(seeds, key=lambda s: rough(s, FIDS[-1]))


@pytest.mark.parametrize("kw, match", [
    ({"strategy": "evolve", "initial": [(0, 1, 1)]}, "not in the space"),
    ({"strategy": "evolve", "initial": [(0, 1)]}, "not in the space"),
    ({"strategy": "random", "initial": [(0, 1, 2)]}, "ga and evolve only"),
])
def test_bad_initial_candidates_are_refused(kw, match):
    with pytest.raises(SearchError, match=match):
        search(Subsets(12, 3), rough, budget=5, **kw)


def test_initial_candidates_are_part_of_the_resume_fingerprint(tmp_path):
    state = tmp_path / "s.json"
    kw = {"strategy": "evolve", "budget": 6, "seed": 0, "fidelities": FIDS, "state_path": state}
    first = search(Subsets(12, 3), rough, initial=[(0, 1, 2)], **kw)
    assert json.loads(state.read_text())["fingerprint"]["initial"] == [[0, 1, 2]]
    again = search(Subsets(12, 3), rough, initial=[(0, 1, 2)], **kw)
    assert again.restored == again.evaluations and again.best == first.best
    with pytest.raises(ResumeError, match="initial"):
        search(Subsets(12, 3), rough, initial=[(3, 4, 5)], **kw)
    plain = tmp_path / "plain.json"
    search(Subsets(12, 3), rough, **{**kw, "state_path": plain})
    assert "initial" not in json.loads(plain.read_text())["fingerprint"]  # old states stay resumable
