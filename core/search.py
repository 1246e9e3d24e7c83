"""A generic, resumable search over a discrete space; the fitness is passed in and lower is better.

    from core.search import Subsets, search
    res = search(Subsets(30, 2), fitness, strategy="evolve", budget=64, fidelities=[256, 1024, 4096],
                 state_path="search/state/k2_evolve.json", fingerprint={"base": ..., "donor": ..., "fitness": "kl"})
    res = search(space, fitness, strategy="evolve", budget=48, initial=[uniform, depth])   # seeded with known ones
    res.best, res.best_fitness, res.evaluations, res.cost, res.cache_hits, res.to_json()

**Spaces.** A candidate is a hashable canonical ``tuple[int, ...]``. :class:`Subsets` ``(n, k)``: the k-subsets
of ``range(n)`` as sorted tuples (which k of n layers to replace, or to drop). :class:`Levels` ``(n, levels)``: a
level in ``range(levels)`` per position (per-layer width choices). Anything with the :class:`Space` methods works.

**Fitness and fidelities.** ``fitness(candidate, fidelity) -> float``. ``fidelities`` is an increasing list of
levels (e.g. calibration token counts ``[256, 1024, 4096]``); without it there is one level and fitness receives
``fidelity=None`` (= full). Only ``evolve`` uses the lower levels; every other strategy scores at the top one.

**Budget** = the most fitness evaluations, counted in full-fidelity equivalents: an evaluation at fidelity f costs
``f / max(fidelities)`` (1 with one level). It is never exceeded. ``SearchResult`` reports both the raw number of
evaluations (``evaluations``) and the equivalents spent (``cost``); cache hits are free.

**Strategies** (one engine, one budget):

- ``exhaustive``: every candidate once; refused (:class:`SearchError`) when the space is larger than the budget.
- ``random``: distinct uniformly random candidates until the budget (or the space) is used up.
- ``score_topk``: each item alone (for Subsets the singletons {i}), ranked, and the top-k combination: n + 1
  evaluations (refused when the budget is smaller; not defined for Levels). A heuristic: it ignores interactions.
- ``ga``: ``population`` distinct random candidates, then generations of ``offspring`` children: tournament
  selection of ``tournament`` (3), crossover, mutation with probability ``mutation`` (1/2) or until the child is new (in neither the population
  nor the earlier top-fidelity scores, where it lost already), else a new random one. The next population is
  the best ``population`` of parents and children together (elitist, (mu + lambda)).
- ``evolve`` (EvoPress-style (1 + lambda)): generation 0 is ``offspring`` random candidates, later generations
  ``offspring`` distinct new mutants of the parent (1 mutation, a 2nd with probability 1/10, a 3rd 1/100; one
  more per 4 * offspring draws when few are new, at last random candidates). Multi-fidelity selection: all of
  a generation are scored at the lowest fidelity, the best ``m**(1 - i/L)`` of its m go on to level i (of
  0..L), and so on up to one survivor at the top level (a level that would keep everyone is skipped). The
  survivor replaces the parent only if better at the top fidelity (the parent's top value is cached, so it is
  scored there once). When the budget cannot pay for a whole generation, the generation is made smaller.

**Initial candidates** (``initial``, ``ga`` and ``evolve`` only): known candidates (e.g. hand-made schedules) that
the search starts from and must beat. ``ga``: the first population is them, then random ones up to
``population`` (all of them when there are more: the best ``population`` go on). ``evolve``: each is scored at the
top fidelity first (they are the references: the result is never worse than the best of them), then random
candidates fill generation 0 up to ``offspring`` and go through the multi-fidelity selection; the parent of
generation 1 is the best of both. They must be members of the space (``validate``); duplicates count once; they
are part of the resume fingerprint. Without them every strategy behaves exactly as before.

A search ends when the next evaluation would exceed the budget (``stopped="budget"``), every candidate has been
scored at the top fidelity (``"exhausted"``), 1000 requests in a row were answered from the cache or no new
candidate was found to propose (``"stalled"``), or the strategy is complete (``"done"``: exhaustive,
score_topk). ``best`` is the best candidate of the space scored at the top fidelity, the first found among
equals (score_topk's single items are not candidates unless k = 1); NaN ranks as +inf.

**Cache.** Every evaluation is cached by (candidate, fidelity): a repeated request is a cache hit (counted in
``cache_hits``), never a second call to fitness.

**Resume.** With ``state_path`` the state (fingerprint, counters, and the history, which is the cache: one entry
per evaluated (candidate, fidelity) with its fitness) is written atomically when the search starts, at most every
``save_every_s`` seconds after an evaluation (0: after every one), and when it ends or raises. Every strategy is a
deterministic function of the seed and the fitness values, so ``search(..., state_path=p)`` on an existing state
re-runs the strategy from the start with the saved values: those evaluations are answered from the state (no
fitness call), the run continues past the point where it was killed, and the result (best, fitness, evaluations,
cost, cache hits, history) is exactly that of an uninterrupted run; ``restored`` counts the answers from the state
and ``wall_s`` is this call's time. A state whose fingerprint (space, strategy, seed, budget, fidelities,
population/offspring where used, plus the caller's ``fingerprint`` dict, e.g. model names and fitness) differs
is refused with :class:`ResumeError`, naming the differing keys.

``on_eval(evaluation)`` is called after each real fitness call (not for cache hits or answers from the state).
Only the standard library and ``core`` are used.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

from core.run.errors import UserError
from core.run.io import atomic_write_text

Candidate = tuple[int, ...]
Fidelity = Optional[float]  # None: the only (full) level
Fitness = Callable[[Candidate, Fidelity], float]

STRATEGIES = ("exhaustive", "random", "score_topk", "ga", "evolve")
STATE_FORMAT = "prunelab-search/1"
STALL = 1000  # requests in a row answered from the cache before a search counts as stalled
TOURNAMENT = 3
MUTATION = 0.5
RETRIES = 20
DRAWS = 100_000  # random draws for one new candidate before a search counts as stalled


class SearchError(UserError, ValueError):
    """A search that cannot run as asked (bad space, strategy, budget or fidelities)."""


class ResumeError(SearchError):
    """A state file that cannot be resumed: another configuration, or not a search state."""


class Space(Protocol):
    """A discrete search space of canonical candidates."""

    def spec(self) -> dict[str, Any]: ...  # JSON description, part of the resume fingerprint
    def size(self) -> int: ...
    def all(self) -> Iterator[Candidate]: ...
    def random(self, rng: random.Random) -> Candidate: ...
    def mutate(self, c: Candidate, rng: random.Random) -> Candidate: ...
    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate: ...
    def items(self) -> list[Candidate]: ...  # score_topk: what is scored alone
    def from_items(self, ranked: Sequence[Candidate]) -> Candidate: ...  # score_topk: best items first
    def validate(self, c: Sequence[int]) -> Candidate: ...  # canonical form, or ValueError


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SearchError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


@dataclass(frozen=True)
class Subsets:
    """The k-subsets of ``range(n)``, as sorted tuples of distinct ints."""

    n: int
    k: int

    def __post_init__(self) -> None:
        _positive_int("Subsets n", self.n)
        _positive_int("Subsets k", self.k)
        if self.k > self.n:
            raise SearchError(f"Subsets(n={self.n}, k={self.k}): k must be at most n")

    def spec(self) -> dict[str, Any]:
        return {"type": "subsets", "n": self.n, "k": self.k}

    def size(self) -> int:
        return math.comb(self.n, self.k)

    def all(self) -> Iterator[Candidate]:
        return itertools.combinations(range(self.n), self.k)

    def random(self, rng: random.Random) -> Candidate:
        return tuple(sorted(rng.sample(range(self.n), self.k)))

    def mutate(self, c: Candidate, rng: random.Random) -> Candidate:
        """Swap one member for a non-member (the same candidate when k = n)."""
        outside = [i for i in range(self.n) if i not in c]
        if not outside:
            return c
        out, new = rng.choice(c), rng.choice(outside)
        return tuple(sorted([i for i in c if i != out] + [new]))

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
        """Members common to both parents, the rest sampled from the other members of either."""
        common = sorted(set(a) & set(b))
        rest = sorted(set(a) ^ set(b))
        return tuple(sorted(common + rng.sample(rest, self.k - len(common))))

    def items(self) -> list[Candidate]:
        return [(i,) for i in range(self.n)]

    def from_items(self, ranked: Sequence[Candidate]) -> Candidate:
        return tuple(sorted(i for (i,) in ranked[:self.k]))

    def validate(self, c: Sequence[int]) -> Candidate:
        out = tuple(sorted(c))
        if (len(out) != self.k or len(set(out)) != self.k
                or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.n for i in out)):
            raise SearchError(f"{list(c)} is not a set of {self.k} distinct integers in 0..{self.n - 1}")
        return out


@dataclass(frozen=True)
class Levels:
    """A level in ``range(levels)`` for each of ``n`` positions (e.g. a width choice per layer)."""

    n: int
    levels: int

    def __post_init__(self) -> None:
        _positive_int("Levels n", self.n)
        _positive_int("Levels levels", self.levels)

    def spec(self) -> dict[str, Any]:
        return {"type": "levels", "n": self.n, "levels": self.levels}

    def size(self) -> int:
        return self.levels ** self.n

    def all(self) -> Iterator[Candidate]:
        return itertools.product(range(self.levels), repeat=self.n)

    def random(self, rng: random.Random) -> Candidate:
        return tuple(rng.randrange(self.levels) for _ in range(self.n))

    def mutate(self, c: Candidate, rng: random.Random) -> Candidate:
        """One position one level up or down (the same candidate when there is one level)."""
        if self.levels == 1:
            return c
        i = rng.randrange(self.n)
        step = 1 if c[i] == 0 else -1 if c[i] == self.levels - 1 else rng.choice((-1, 1))
        return c[:i] + (c[i] + step,) + c[i + 1:]

    def crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
        """Each position from either parent."""
        return tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b))

    def items(self) -> list[Candidate]:
        raise SearchError("score_topk needs a space of items that combine (Subsets); Levels has none: "
                          "use exhaustive, random, ga or evolve")

    def from_items(self, ranked: Sequence[Candidate]) -> Candidate:
        return self.items()[0]

    def validate(self, c: Sequence[int]) -> Candidate:
        out = tuple(c)
        if len(out) != self.n or any(not isinstance(x, int) or isinstance(x, bool) or not 0 <= x < self.levels
                                     for x in out):
            raise SearchError(f"{list(c)} is not {self.n} levels in 0..{self.levels - 1}")
        return out


@dataclass(frozen=True)
class Evaluation:
    """One fitness evaluation: ``best`` is the best top-fidelity fitness so far (None before the first) and
    ``cost`` the full-fidelity equivalents spent so far, this one included."""

    index: int
    candidate: Candidate
    fidelity: Fidelity
    fitness: float
    best: Optional[float]
    cost: float

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "candidate": list(self.candidate), "fidelity": self.fidelity,
                "fitness": self.fitness, "best": self.best, "cost": self.cost}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Evaluation":
        return cls(d["index"], tuple(d["candidate"]), d["fidelity"], d["fitness"], d["best"], d["cost"])


@dataclass
class SearchResult:
    strategy: str
    best: Candidate
    best_fitness: float  # at the top fidelity
    evaluations: int  # fitness evaluations (each (candidate, fidelity) once)
    cost: float  # the same in full-fidelity equivalents (<= budget)
    cache_hits: int
    budget: float
    fidelities: list[Fidelity]
    stopped: str  # budget | exhausted | stalled | done
    restored: int = 0  # evaluations answered from the state file instead of fitness
    wall_s: float = 0.0  # this call's time
    history: list[Evaluation] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "best": list(self.best), "best_fitness": self.best_fitness,
                "evaluations": self.evaluations, "cost": self.cost, "cache_hits": self.cache_hits,
                "budget": self.budget, "fidelities": list(self.fidelities), "stopped": self.stopped,
                "restored": self.restored, "wall_s": self.wall_s, "history": [e.to_json() for e in self.history]}


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _rank(v: float) -> float:
    return math.inf if math.isnan(v) else v


class _Run:
    """The state of one search: the budget, the cache, the history, the best so far and the state file."""

    def __init__(self, space: Space, fitness: Fitness, fidelities: list[Fidelity], budget: float,
                 restored: list[Evaluation], state_path: Optional[Path], fingerprint: dict[str, Any],
                 on_eval: Optional[Callable[[Evaluation], None]], save_every_s: float,
                 initial: Sequence[Candidate] = ()):
        self.space, self.fitness, self.fids, self.top = space, fitness, fidelities, fidelities[-1]
        self.initial = list(initial)  # ga / evolve: the candidates to start from
        self.full = 1.0 if self.top is None else float(self.top)
        self.budget_units = budget * self.full
        self.saved = restored  # what the state file holds (a prefix of this run's evaluations)
        self.known = {(e.candidate, e.fidelity): e.fitness for e in restored}
        self.state_path, self.fingerprint = state_path, fingerprint
        self.on_eval, self.save_every_s = on_eval, save_every_s
        self.values: dict[tuple[Candidate, Fidelity], float] = {}
        self.history: list[Evaluation] = []
        self.spent = 0.0  # sum of the fidelities evaluated (1 per evaluation with one level)
        self.hits = self.idle = self.restored = 0
        self.best: Optional[Candidate] = None
        self.best_value: Optional[float] = None
        self.scored_top: set[Candidate] = set()  # members of the space scored at the top fidelity
        self.size = space.size()
        self.members: dict[Candidate, bool] = {}
        self.last_save = -math.inf
        self.tournament, self.mutation = TOURNAMENT, MUTATION  # ga's (search() sets them)
        self.stopped = ""

    def units(self, fidelity: Fidelity) -> float:
        return 1.0 if fidelity is None else float(fidelity)

    def affords(self, units: float) -> bool:
        return self.spent + units <= self.budget_units * (1 + 1e-12)

    @property
    def exhausted(self) -> bool:
        return len(self.scored_top) >= self.size

    def new(self, c: Candidate, seen: set[Candidate]) -> bool:
        """Worth proposing: not in ``seen`` and not yet scored at the top fidelity (where it lost already)."""
        return c not in seen and (c, self.top) not in self.values

    def _member(self, c: Candidate) -> bool:
        if c not in self.members:
            try:
                self.members[c] = self.space.validate(c) == c
            except ValueError:
                self.members[c] = False
        return self.members[c]

    def score(self, c: Candidate, fidelity: Fidelity) -> float:
        key = (c, fidelity)
        if key in self.values:
            self.hits += 1
            self.idle += 1
            if self.idle >= STALL:
                raise _Stop("stalled")
            return self.values[key]
        units = self.units(fidelity)
        if not self.affords(units):
            raise _Stop("budget")
        real = key not in self.known
        value = float(self.fitness(c, fidelity)) if real else self.known[key]
        self.restored += not real
        self.idle = 0
        self.spent += units
        self.values[key] = value
        if fidelity == self.top and self._member(c):
            self.scored_top.add(c)
            if self.best is None or _rank(value) < _rank(self.best_value):
                self.best, self.best_value = c, value
        entry = Evaluation(len(self.history), c, fidelity, value, self.best_value, self.spent / self.full)
        self.history.append(entry)
        if real:
            if self.on_eval is not None:
                self.on_eval(entry)
            if time.monotonic() - self.last_save >= self.save_every_s:
                self.save()
        return value

    def save(self, done: bool = False) -> None:
        if self.state_path is None:
            return
        pending = [e for e in self.saved if (e.candidate, e.fidelity) not in self.values]
        state = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "done": done,
                 "stopped": self.stopped or None, "evaluations": len(self.history), "cost": self.spent / self.full,
                 "cache_hits": self.hits, "history": [e.to_json() for e in self.history + pending]}
        atomic_write_text(self.state_path, json.dumps(state) + "\n")
        self.last_save = time.monotonic()


# ---------------------------------------------------------------------------------------------- strategies

def _distinct_random(run: _Run, rng: random.Random, count: int, exclude: set[Candidate]) -> list[Candidate]:
    """``count`` distinct random candidates not in ``exclude`` (fewer if the space has fewer left)."""
    count = min(count, run.size - len(exclude))
    out: list[Candidate] = []
    seen = set(exclude)
    draws = 0
    while len(out) < count:
        draws += 1
        if draws > DRAWS:  # a space whose random() cannot reach what its size() promises
            raise _Stop("stalled")
        c = run.space.random(rng)
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def _exhaustive(run: _Run, rng: random.Random, population: int, offspring: int) -> None:
    for c in run.space.all():
        run.score(tuple(c), run.top)


def _random(run: _Run, rng: random.Random, population: int, offspring: int) -> None:
    drawn: set[Candidate] = set()
    while len(drawn) < run.size:
        (c,) = _distinct_random(run, rng, 1, drawn)
        drawn.add(c)
        run.score(c, run.top)
    raise _Stop("exhausted")


def _score_topk(run: _Run, rng: random.Random, population: int, offspring: int) -> None:
    items = run.space.items()
    values = [run.score(item, run.top) for item in items]
    ranked = [items[j] for j in sorted(range(len(items)), key=lambda j: (_rank(values[j]), j))]
    run.score(run.space.from_items(ranked), run.top)


def _ga(run: _Run, rng: random.Random, population: int, offspring: int) -> None:
    space, top = run.space, run.top
    pop = run.initial + _distinct_random(run, rng, max(0, population - len(run.initial)), set(run.initial))
    value = {c: run.score(c, top) for c in pop}

    def order(cs: Sequence[Candidate]) -> list[Candidate]:
        return sorted(cs, key=lambda c: (_rank(value[c]), c))

    def tournament() -> Candidate:
        return order(rng.sample(pop, min(run.tournament, len(pop))))[0]

    pop = order(pop)[:population]
    while not run.exhausted:
        seen, children = set(pop), []
        for _ in range(offspring):
            child = space.crossover(tournament(), tournament(), rng)
            if rng.random() < run.mutation or not run.new(child, seen):
                child = space.mutate(child, rng)
            for attempt in range(2 * RETRIES):
                if run.new(child, seen):
                    break
                child = space.mutate(child, rng) if attempt < RETRIES else space.random(rng)  # then an immigrant
            if run.new(child, seen):
                seen.add(child)
                children.append(child)
        for c in children:
            value[c] = run.score(c, top)
        if not children:
            raise _Stop("stalled")
        pop = order(set(pop) | set(children))[:population]
    raise _Stop("exhausted")


def _schedule(m: int, levels: int) -> tuple[list[int], list[int]]:
    """How many of ``m`` candidates reach each fidelity level, and the levels actually scored."""
    last = levels - 1
    counts = [max(1, round(m ** ((last - i) / last))) for i in range(levels)] if last else [m]
    return counts, [i for i in range(levels) if i == last or counts[i + 1] < counts[i]]


def _affordable(run: _Run, wanted: int) -> int:
    """The largest generation (<= wanted) whose multi-fidelity selection the remaining budget can pay for."""
    for m in range(wanted, 0, -1):
        counts, stages = _schedule(m, len(run.fids))
        if run.affords(sum(counts[i] * run.units(run.fids[i]) for i in stages)):
            return m
    raise _Stop("budget")


def _select(run: _Run, cands: list[Candidate]) -> tuple[Candidate, float]:
    """Multi-fidelity selection: the best share goes on to the next level; one survivor at the top."""
    counts, stages = _schedule(len(cands), len(run.fids))
    current = list(cands)
    for i in stages:
        values = [run.score(c, run.fids[i]) for c in current]
        ranked = sorted(range(len(current)), key=lambda j: (_rank(values[j]), j))
        if i == len(run.fids) - 1:
            return current[ranked[0]], values[ranked[0]]
        current = [current[j] for j in ranked[:counts[i + 1]]]
    raise AssertionError("the top level is always scored")


def _evolve(run: _Run, rng: random.Random, population: int, offspring: int) -> None:
    parent: Optional[Candidate] = None
    parent_value = math.inf
    for c in run.initial:  # the references, at the top fidelity
        value = run.score(c, run.top)
        if parent is None or _rank(value) < _rank(parent_value):
            parent, parent_value = c, value
    fill = offspring - len(run.initial)
    if fill > 0:
        first = _distinct_random(run, rng, _affordable(run, fill), set(run.initial))
        if first:
            child, value = _select(run, first)
            if parent is None or _rank(value) < _rank(parent_value):
                parent, parent_value = child, value
    if parent is None:
        raise _Stop("exhausted")
    while not run.exhausted:
        lam = _affordable(run, offspring)
        seen, children = {parent}, []
        for attempt in range(RETRIES * lam):
            if len(children) == lam:
                break
            if attempt < 3 * RETRIES * lam // 4:
                mutations = 1 + attempt // (4 * lam)  # reach further once the near neighbourhood is used up
                if rng.random() < 0.1:
                    mutations += 1 + (rng.random() < 0.1)
                child = parent
                for _ in range(mutations):
                    child = run.space.mutate(child, rng)
            else:
                child = run.space.random(rng)  # and at last anywhere
            if run.new(child, seen):
                seen.add(child)
                children.append(child)
        if not children:
            raise _Stop("stalled")
        child, value = _select(run, children)
        if _rank(value) < _rank(parent_value):
            parent, parent_value = child, value
    raise _Stop("exhausted")


_STRATEGY = {"exhaustive": _exhaustive, "random": _random, "score_topk": _score_topk, "ga": _ga, "evolve": _evolve}


# ---------------------------------------------------------------------------------------------- the engine

def _check(space: Space, strategy: str, budget: float, fidelities: Optional[Sequence[float]],
           population: int, offspring: int) -> list[Fidelity]:
    if strategy not in _STRATEGY:
        raise SearchError(f"strategy={strategy!r} is not one of {', '.join(STRATEGIES)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 1:
        raise SearchError(f"budget={budget!r} must be at least 1 full-fidelity evaluation")
    _positive_int("population", population, 2)
    _positive_int("offspring", offspring)
    if fidelities is None:
        fids: list[Fidelity] = [None]
    else:
        fids = list(fidelities)
        if (not fids or any(isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0 for f in fids)
                or any(a >= b for a, b in zip(fids, fids[1:]))):
            raise SearchError(f"fidelities={fids} must be positive numbers in increasing order")
    if strategy == "exhaustive" and space.size() > budget:
        raise SearchError(f"exhaustive search of {space.size()} candidates does not fit budget={budget}: "
                          "raise the budget or use another strategy")
    if strategy == "score_topk" and len(space.items()) + 1 > budget:
        raise SearchError(f"score_topk needs {len(space.items()) + 1} evaluations (each item alone, then the top "
                          f"combination), budget={budget}")
    return fids


def _initial(space: Space, strategy: str, initial: Sequence[Sequence[int]]) -> list[Candidate]:
    """The initial candidates in canonical form, duplicates dropped (first kept); SearchError for a non-member."""
    out: list[Candidate] = []
    for c in initial:
        try:
            canonical = space.validate(c)
        except ValueError as e:
            raise SearchError(f"initial candidate {list(c)} is not in the space: {e}") from None
        if canonical not in out:
            out.append(canonical)
    if out and strategy not in ("ga", "evolve"):
        raise SearchError(f"initial candidates are used by ga and evolve only, not {strategy}")
    return out


def _plain(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise SearchError(f"{what} must be JSON-serialisable: {e}") from None


def _load_state(path: Path, fingerprint: dict[str, Any]) -> list[Evaluation]:
    try:
        state = json.loads(path.read_text())
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"format {state.get('format')!r}")
        history = [Evaluation.from_json(e) for e in state["history"]]
        saved = state["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ResumeError(f"{path} is not a readable search state ({e}); remove it to start over") from None
    keys = sorted(set(saved) | set(fingerprint))
    differ = [k for k in keys if saved.get(k, "<absent>") != fingerprint.get(k, "<absent>")]
    if differ:
        what = "; ".join(f"{k}: {saved.get(k, '<absent>')!r} in the state, {fingerprint.get(k, '<absent>')!r} now"
                         for k in differ)
        raise ResumeError(f"{path} is the state of another search configuration ({what}); resume with the same "
                          "settings, or remove it / use another state path to start over")
    return history


def search(space: Space, fitness: Fitness, *, strategy: str, budget: float, seed: int = 0,
           fidelities: Optional[Sequence[float]] = None, state_path: str | Path | None = None,
           fingerprint: Optional[dict[str, Any]] = None, population: int = 16, offspring: int = 8,
           on_eval: Optional[Callable[[Evaluation], None]] = None, save_every_s: float = 1.0,
           initial: Sequence[Sequence[int]] = (), tournament: int = TOURNAMENT,
           mutation: float = MUTATION) -> SearchResult:
    """Search ``space`` for the candidate of lowest ``fitness`` (see the module docstring).

    ``population``: ga's population size. ``offspring``: ga's children and evolve's lambda per generation.
    ``initial``: candidates ga / evolve start from (see "Initial candidates"). ``tournament``: ga's tournament
    size; ``mutation``: the probability that ga mutates a child (it always does when the child is not new).
    """
    if not (isinstance(tournament, int) and tournament >= 1) or not 0.0 <= float(mutation) <= 1.0:
        raise SearchError(f"tournament={tournament} must be >= 1 and mutation={mutation} in [0, 1]")
    t0 = time.perf_counter()
    fids = _check(space, strategy, budget, fidelities, population, offspring)
    seeds = _initial(space, strategy, initial)
    mine = {"space": space.spec(), "strategy": strategy, "seed": seed, "budget": budget, "fidelities": fids}
    if strategy == "ga":
        mine["population"] = population
        if (tournament, float(mutation)) != (TOURNAMENT, MUTATION):  # states written before these were settable
            mine["tournament"], mine["mutation"] = tournament, float(mutation)
    if strategy in ("ga", "evolve"):
        mine["offspring"] = offspring
    if seeds:
        mine["initial"] = [list(c) for c in seeds]
    extra = _plain(fingerprint or {}, "fingerprint")
    clash = sorted(set(extra) & set(mine))
    if clash:
        raise SearchError(f"fingerprint keys {clash} are set by the search itself; name them differently")
    fp = _plain({**mine, **extra}, "fingerprint")
    path = Path(state_path) if state_path is not None else None
    restored = _load_state(path, fp) if path is not None and path.exists() else []

    run = _Run(space, fitness, fids, float(budget), restored, path, fp, on_eval, save_every_s, seeds)
    run.tournament, run.mutation = tournament, float(mutation)
    run.save()
    completed = False
    try:
        try:
            _STRATEGY[strategy](run, random.Random(seed), population, offspring)
            run.stopped = "done"
        except _Stop as stop:
            run.stopped = stop.reason
        completed = True
    finally:
        run.save(done=completed)
    if run.best is None or run.best_value is None:
        raise SearchError(f"{strategy} scored no candidate at the top fidelity within budget={budget}")
    return SearchResult(strategy=strategy, best=run.best, best_fitness=run.best_value, evaluations=len(run.history),
                        cost=run.spent / run.full, cache_hits=run.hits, budget=budget, fidelities=fids,
                        stopped=run.stopped, restored=run.restored, wall_s=time.perf_counter() - t0,
                        history=run.history)
