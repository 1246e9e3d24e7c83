"""A searched per-layer allocation of MLP channels under an exact budget (``pruner=obs pruner.allocation=search``).

    python run.py pruner=obs ratio=0.1184 pruner.allocation=search pruner.search_budget=48 pruner.search_tokens=8192

**Space** (:class:`BudgetLevels`): a level in ``0..LEVELS-1`` per MLP layer in range; level ``v`` removes
``center_l + (v - LEVELS // 2) * step`` channels, where ``center`` is the uniform allocation and ``step`` a quarter
of the mean removal (so the levels span 0.25x .. 1.75x the mean). Levels that would remove fewer than 0 or more
than ``width - min_channels`` channels are not in the space. Since every layer moves by the same ``step``, the
budget is exact iff the levels sum to ``n * (LEVELS // 2)``: ``mutate`` moves one layer up and another down,
``crossover`` repairs a child to that sum, ``random`` draws uniformly among the budget-exact candidates and
``validate`` refuses the rest.

**Starts**: ``uniform`` (the centre), ``depth`` and ``flap`` (:func:`pruning.obs.allocate.allocate_channels`; FLAP's
standardised WIFV scores come from the variant pass, on the uniformly pruned prefix, so they cost no extra pass)
projected onto the levels (the nearest level per layer, then the sum repaired one level at a time on the layers
that wanted most to move that way): depth's 0.5x .. 1.5x falls on the grid, FLAP's extremes are cut to its range.
``sensitivity`` (:func:`separable_allocation`) measures each layer alone one level down and one level up from the
centre (``2 n + 1`` evaluations at the highest fidelity below the full one, paid from ``search_budget``; left
out when the budget cannot pay them and the starts), fits each layer a convex quadratic cost and spends the budget
where the sum of those costs is least (a dynamic programme over the levels): the best allocation if the layers'
damages simply added up. They are the search's initial candidates: each is
scored at the full fidelity, and the result is never worse than the best of them (``details["search"]`` has their
fitness, the best one's, the gain over it, and the probes).

**Variant cache** (:func:`build_variants`): one sequential pass, :func:`pruning.obs.fit.prune_sequential` itself
with the uniform allocation, in which the fit of each ``down_proj`` is done for EVERY level from the sums the pass
folds (one :class:`pruning.obs.fit.ProjectionFit` per layer over its :class:`pruning.compensate.ProjectionSums`:
one Gram matrix, the cross term towards the dense targets with ``target=dense``, the guard's held-out sums; the
guard itself is the fit's): the selected channels and the compensated ``down_proj`` (+bias) of each level, with the
pruner's fit options, on the CPU in float32, in memory up to :data:`VARIANT_MEMORY_BYTES` in all and beyond it in
safetensors files of a scratch directory (:class:`VariantStore`). So the variants are fitted exactly as the final
prune fits (on the uniformly pruned prefix). A candidate then costs one forward: its layers' variants are swapped in (gate/up rows of the dense layer, the cached
``down_proj``), only where they changed.

**Fitness** (:class:`pruning.fitness.KLFitness`): the mean per-token KL(dense || candidate) of the next-token distributions on the
fitness tokens, the dense log-probabilities computed once (float32, CPU: ``tokens x vocab x 4`` bytes, 1.6 GB for
SmolLM2 at 8192 tokens); the layers before the first MLP layer in range are the same in every candidate, so their
output is computed once. Multi-fidelity (the engine's ``evolve``, lambda = 8): 1/16, 1/4 and all of the fitness
rows (whole rows, distinct); ``search_budget`` counts full-fidelity evaluations. Needs the model on its device
(no ``offload``): every evaluation is a whole-model forward.

**Which tokens.** The fitness rows are the LAST ``ceil(search_tokens / seq_len)`` calibration samples. They are
kept out of every fit: the variant pass and the final prune use the samples before them (whose own last
``holdout`` share is the guard's), so the fitness measures what the compensation does on text it never saw.

**After the search** the dense layers are put back and the model is pruned by the normal sequential pass with the
best allocation (by :class:`pruning.obs.pruner.StructuredOBS`), so compensation is fitted on the truly pruned
prefix. Cost: one pass like the prune itself plus ``LEVELS - 1`` extra ``prune_columns`` per layer, the budget's
full-fidelity forwards of the fitness tokens, then the final prune. Memory: the dense copies of the layers in
range and ``LEVELS`` float32 ``down_proj`` variants per layer (445 MB for SmolLM2 at ratio 0.12; beyond
:data:`VARIANT_MEMORY_BYTES` on disk), the reference.
References: EvoPress (Sieberling et al. 2024), OWL / FLAP for non-uniform schedules.

Imports: torch, ``core.models.llama``, ``core.search`` (the engine), ``pruning`` (PruneError),
``pruning.compensate`` (FLAP's scores from a Gram matrix), ``pruning.fitness`` (the KL fitness and its
fidelities), ``pruning.stats`` (standardise), ``pruning.streaming``, ``pruning.obs.allocate`` (the fixed starts) and ``pruning.obs.fit`` (the fit, its options
and the pass). Never the pruner.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from random import Random
from typing import Any, Iterator, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.models.llama import Geometry, decoder_layers
from core.search import Candidate, SearchError, search
from pruning import PruneError
from pruning.compensate import column_scores
from pruning.obs.allocate import allocate_channels
from pruning.compensate import ProjectionSums
from pruning.fitness import KLFitness, fidelity_rows, fitness_chunks
from pruning.obs.fit import FitOptions, Fitted, ProjectionFit, fit_sums, prune_sequential
from pruning.stats import standardise
from pruning.streaming import Scratch

LEVELS = 7  # width levels per layer: the centre +- 3 steps
OFFSPRING = 8  # evolve's lambda: candidates per generation
STARTS = ("uniform", "depth", "flap", "sensitivity")


# --------------------------------------------------------------------------------------------------- the space

@dataclass(frozen=True)
class BudgetLevels:
    """Per-layer removal levels whose channels sum to exactly ``sum(center)`` (see the module docstring)."""

    layers: tuple[int, ...]  # the decoder layer of each position
    center: tuple[int, ...]  # channels removed at the middle level (the uniform allocation)
    caps: tuple[int, ...]  # the most each layer may lose (width - min_channels)
    step: int
    levels: int = LEVELS

    def __post_init__(self) -> None:
        if not (len(self.layers) == len(self.center) == len(self.caps)) or not self.layers:
            raise SearchError("BudgetLevels needs one centre and one cap per layer, and at least one layer")
        if self.step < 1 or self.levels < 1 or self.levels % 2 == 0:
            raise SearchError(f"BudgetLevels: step={self.step} must be >= 1 and levels={self.levels} odd")
        if any(not 0 <= c <= m for c, m in zip(self.center, self.caps)):
            raise SearchError("BudgetLevels: every centre must be between 0 and its layer's cap")

    @staticmethod
    def around(geo: Geometry, mlp_range: tuple[int, int], total: int, min_channels: int = 1,
               levels: int = LEVELS) -> "BudgetLevels":
        """The space centred on the uniform allocation of ``total`` channels, ``step`` = a quarter of the mean."""
        layers = tuple(range(*mlp_range))
        uniform = allocate_channels(geo, mlp_range, total, "uniform", min_channels)
        step = max(1, round(total / len(layers) / 4))
        return BudgetLevels(layers, tuple(uniform.get(l, 0) for l in layers),
                            tuple(max(0, geo.widths[l] - min_channels) for l in layers), step, levels)

    # -- levels and counts
    @property
    def mid(self) -> int:
        return self.levels // 2

    @property
    def n(self) -> int:
        return len(self.layers)

    @property
    def target(self) -> int:
        """The sum of levels of every budget-exact candidate."""
        return self.n * self.mid

    @property
    def total(self) -> int:
        return sum(self.center)

    def count(self, i: int, v: int) -> int:
        """Channels removed from position ``i`` at level ``v``."""
        return self.center[i] + (v - self.mid) * self.step

    @cached_property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """The lowest and highest valid level of each position (0 <= count <= cap)."""
        out = []
        for i in range(self.n):
            lo = max(0, self.mid - self.center[i] // self.step)
            hi = min(self.levels - 1, self.mid + (self.caps[i] - self.center[i]) // self.step)
            out.append((lo, hi))
        return tuple(out)

    def menu(self, i: int) -> list[int]:
        """The channel counts position ``i`` can take (one cached variant each)."""
        lo, hi = self.bounds[i]
        return [self.count(i, v) for v in range(lo, hi + 1)]

    def counts(self, c: Sequence[int]) -> dict[int, int]:
        """``{layer: channels removed}`` of a candidate (layers that lose none left out)."""
        return {l: self.count(i, v) for i, (l, v) in enumerate(zip(self.layers, c)) if self.count(i, v)}

    @property
    def centre(self) -> Candidate:
        return (self.mid,) * self.n

    def project(self, allocation: dict[int, int]) -> Candidate:
        """The budget-exact candidate nearest to ``{layer: channels}``: the nearest level per layer, then the sum
        repaired one level at a time where the wanted count lies furthest in that direction."""
        want = [(allocation.get(l, 0) - self.center[i]) / self.step + self.mid for i, l in enumerate(self.layers)]
        c = [min(max(round(w), lo), hi) for w, (lo, hi) in zip(want, self.bounds)]
        while sum(c) != self.target:
            up = sum(c) < self.target
            movable = [i for i, (lo, hi) in enumerate(self.bounds) if (c[i] < hi if up else c[i] > lo)]
            i = max(movable, key=lambda i: ((want[i] - c[i]) if up else (c[i] - want[i]), -i))
            c[i] += 1 if up else -1
        return tuple(c)

    # -- the Space protocol of core.search
    def spec(self) -> dict[str, Any]:
        return {"type": "budget_levels", "layers": list(self.layers), "center": list(self.center),
                "caps": list(self.caps), "step": self.step, "levels": self.levels}

    @cached_property
    def _ways(self) -> list[list[int]]:
        """``ways[i][s]``: budget-exact completions of positions ``i..n-1`` whose levels sum to ``s``."""
        top = self.n * (self.levels - 1)
        ways = [[0] * (top + 1) for _ in range(self.n + 1)]
        ways[self.n][0] = 1
        for i in range(self.n - 1, -1, -1):
            lo, hi = self.bounds[i]
            for s in range(top + 1):
                ways[i][s] = sum(ways[i + 1][s - v] for v in range(lo, min(hi, s) + 1))
        return ways

    def size(self) -> int:
        return self._ways[0][self.target]

    def all(self) -> Iterator[Candidate]:
        ranges = [range(lo, hi + 1) for lo, hi in self.bounds]
        return (c for c in itertools.product(*ranges) if sum(c) == self.target)

    def random(self, rng: Random) -> Candidate:
        """Uniform over the budget-exact candidates (drawn position by position from the completion counts)."""
        out, left = [], self.target
        for i, (lo, hi) in enumerate(self.bounds):
            r = rng.randrange(self._ways[i][left])
            for v in range(lo, min(hi, left) + 1):
                r -= self._ways[i + 1][left - v]
                if r < 0:
                    break
            out.append(v)
            left -= v
        return tuple(out)

    def mutate(self, c: Candidate, rng: Random) -> Candidate:
        """One layer one level up, another one level down (the same candidate when no such pair exists)."""
        ups = [i for i, (lo, hi) in enumerate(self.bounds) if c[i] < hi]
        if not ups:
            return c
        i = rng.choice(ups)
        downs = [j for j, (lo, hi) in enumerate(self.bounds) if j != i and c[j] > lo]
        if not downs:
            return c
        j = rng.choice(downs)
        out = list(c)
        out[i] += 1
        out[j] -= 1
        return tuple(out)

    def crossover(self, a: Candidate, b: Candidate, rng: Random) -> Candidate:
        """Each layer from either parent, then repaired to the budget one level at a time (towards the other
        parent where possible)."""
        child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
        while sum(child) != self.target:
            up = sum(child) < self.target
            step = 1 if up else -1
            ok = [i for i, (lo, hi) in enumerate(self.bounds) if (child[i] < hi if up else child[i] > lo)]
            toward = [i for i in ok if (child[i] < max(a[i], b[i]) if up else child[i] > min(a[i], b[i]))]
            child[rng.choice(toward or ok)] += step
        return tuple(child)

    def items(self) -> list[Candidate]:
        raise SearchError("score_topk needs a space of items that combine (Subsets); BudgetLevels has none")

    def from_items(self, ranked: Sequence[Candidate]) -> Candidate:
        return self.items()[0]

    def validate(self, c: Sequence[int]) -> Candidate:
        out = tuple(c)
        if len(out) != self.n or any(not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi
                                     for x, (lo, hi) in zip(out, self.bounds)):
            raise SearchError(f"{list(c)} is not {self.n} levels within {list(self.bounds)}")
        if sum(out) != self.target:
            removed = sum(self.count(i, v) for i, v in enumerate(out))
            raise SearchError(f"{list(c)} removes {removed} channels, not the budget's {self.total}")
        return out


# --------------------------------------------------------------------------------------------- the variants

VARIANT_MEMORY_BYTES = 2 * 2**30  # variants kept in memory up to this many bytes in all; the rest on disk


@dataclass
class Variant:
    """One layer at one level: kept channels of the dense layer, its compensated ``down_proj`` (CPU, float32), in
    memory or (``path``) in a safetensors file of the variant store's scratch directory."""

    removed: list[int]  # removed channels, sorted
    keep: torch.Tensor  # kept channel indices, sorted
    down: Optional[torch.Tensor]  # [hidden, kept] (None: on disk)
    bias: Optional[torch.Tensor]  # [hidden] or None
    record: dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None  # the safetensors file holding down (and bias) when they are not in memory

    def tensors(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(down, bias)``, read from disk when they live there."""
        if self.path is None:
            return self.down, self.bias
        got = load_file(self.path)
        return got["down"], got.get("bias")


class VariantStore:
    """Keeps variants in memory until they take :data:`VARIANT_MEMORY_BYTES` in all, then writes each new one's
    ``down_proj`` (+ bias) to a safetensors file in a scratch directory (deleted with the store): the cache of
    ``LEVELS x layers`` variants is ``7 x 32 x 4096 x 14336 x 4`` bytes = 53 GB at Llama-3-8B's width."""

    def __init__(self, limit: Optional[int] = None):
        self.limit = VARIANT_MEMORY_BYTES if limit is None else limit
        self.in_memory = 0
        self.on_disk = 0
        self.scratch: Optional[Scratch] = None

    def keep(self, v: Variant) -> Variant:
        size = sum(t.numel() * t.element_size() for t in (v.down, v.bias) if t is not None)
        if self.in_memory + size <= self.limit:
            self.in_memory += size
            return v
        if self.scratch is None:
            self.scratch = Scratch()
        path = self.scratch.file()
        save_file({"down": v.down.contiguous(), **({"bias": v.bias.contiguous()} if v.bias is not None else {})},
                  path)
        self.on_disk += size
        return Variant(v.removed, v.keep, None, None, v.record, path)

    def close(self) -> None:
        if self.scratch is not None:
            self.scratch.close()


@dataclass
class Variants:
    """Every layer's variants (``{layer: {channels removed: Variant}}``), the dense layers they replace and
    FLAP's standardised WIFV scores measured on the way."""

    by_layer: dict[int, dict[int, Variant]]
    dense: dict[int, nn.Module]  # the layers as they were before the pass (deep copies)
    flap: dict[int, torch.Tensor]
    current: dict[int, int] = field(default_factory=dict)  # layer -> channels removed in the model now
    seconds: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)  # the pass's per-projection records
    store: Optional[VariantStore] = None  # where the variants beyond the memory bound live

    def apply(self, model: nn.Module, counts: dict[int, int]) -> None:
        """Put each layer's variant for ``counts`` (missing layers: 0) into ``model``, where it changed."""
        layers = decoder_layers(model)
        for l, options in self.by_layer.items():
            k = counts.get(l, 0)
            if self.current.get(l) == k:
                continue
            v, dense, mlp = options[k], self.dense[l].mlp, layers[l].mlp
            ref = mlp.down_proj.weight
            keep = v.keep.to(dense.gate_proj.weight.device)
            for name in ("gate_proj", "up_proj"):
                src, dst = getattr(dense, name), getattr(mlp, name)
                dst.weight = nn.Parameter(src.weight.detach().index_select(0, keep).to(ref), requires_grad=False)
                if src.bias is not None:
                    dst.bias = nn.Parameter(src.bias.detach().index_select(0, keep).to(ref), requires_grad=False)
                dst.out_features = keep.numel()
            down, (w, b) = mlp.down_proj, v.tensors()
            down.weight = nn.Parameter(w.to(ref), requires_grad=False)
            down.bias = None if b is None else nn.Parameter(b.to(ref), requires_grad=False)
            down.in_features = keep.numel()
            mlp.intermediate_size = keep.numel()
            self.current[l] = k

    def restore(self, model: nn.Module) -> None:
        """Put the dense layers back (the model as it was before :func:`build_variants`)."""
        layers = decoder_layers(model)
        for l, layer in self.dense.items():
            layers[l] = layer
        self.dense, self.current = {}, {}
        if self.store is not None:
            self.store.close()


def _variant(fit: ProjectionFit, remove: int) -> Variant:
    """``remove`` channels chosen, compensated and guarded by the fit (0: the layer unchanged, as the sequential
    prune leaves a layer it removes nothing from), on the CPU in float32."""
    w, b = fit.w, fit.b
    if remove == 0:
        return Variant([], torch.arange(fit.n), w.detach().float().cpu().clone(),
                       None if b is None else b.detach().float().cpu().clone(), {"removed": 0})
    f = fit.remove(remove)
    return Variant(list(f.removed), f.keep.cpu(), f.weight.float().cpu().contiguous(),
                   None if f.bias is None else f.bias.detach().float().cpu().clone(), f.record)


class _VariantFit:
    """Stands in for :func:`pruning.obs.fit.fit_sums` while :func:`pruning.obs.fit.prune_sequential` runs the variant
    pass: for a ``down_proj`` of the space it fits every level's variant from the sums the pass folded (fit and
    held-out tokens, the dense targets when ``target=dense``) with one :class:`ProjectionFit` (the same
    accumulators as the prune: one Gram matrix, one cross term, the guard's held-out sums), records them (in memory
    up to :data:`VARIANT_MEMORY_BYTES`, then on disk: :class:`VariantStore`), and returns the centre level's as the
    fit would; anything else (``o_proj``) goes to ``fit_sums`` itself. So the pass is the sequential prune, whatever
    it does, and the variants are fitted exactly as the final prune will fit them."""

    def __init__(self, model: nn.Module, space: BudgetLevels, store: Optional[VariantStore] = None):
        layers = decoder_layers(model)
        self.weights = [(layers[l].mlp.down_proj.weight, i, l) for i, l in enumerate(space.layers)]  # kept alive
        self.space = space
        self.store = store or VariantStore()
        self.by_layer: dict[int, dict[int, Variant]] = {}
        self.flap: dict[int, torch.Tensor] = {}

    def __call__(self, w: torch.Tensor, b: Optional[torch.Tensor], sums: ProjectionSums, remove: int, group: int,
                 options: FitOptions) -> Fitted:
        found = [(i, l) for p, i, l in self.weights if p is w] if group == 1 else []
        if not found:
            return fit_sums(w, b, sums, remove, group, options)
        (pos, l), = found
        fit = ProjectionFit.from_sums(w, b, sums, options)
        chosen = _variant(fit, remove)
        self.by_layer[l] = {n: self.store.keep(chosen if n == remove else _variant(fit, n))
                            for n in self.space.menu(pos)}
        self.flap[l] = standardise(column_scores(w, fit.gram, "flap")).cpu()
        return Fitted(chosen.removed, chosen.keep.to(w.device), chosen.down, chosen.bias, chosen.record)


def build_variants(model: nn.Module, calibration: torch.Tensor, att_plan: dict[int, int], space: BudgetLevels,
                   options: FitOptions) -> Variants:
    """The variant pass: :func:`pruning.obs.fit.prune_sequential` with the centre allocation (and ``att_plan``),
    every level of every layer of the space recorded on the way (:class:`_VariantFit`). The model ends pruned with
    the centre allocation; the dense layers the pass touched are kept in the result for :meth:`Variants.restore`."""
    if min(space.center) < 1:
        raise PruneError(f"obs: allocation=search needs at least one MLP channel removed per layer in range "
                         f"({space.total} for {space.n} layers): use allocation=uniform or a larger ratio")
    layers = decoder_layers(model)
    dense = {l: copy.deepcopy(layers[l]) for l in sorted({*att_plan, *space.layers})}
    stand_in = _VariantFit(model, space, VariantStore())
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    records = prune_sequential(model, calibration, att_plan, dict(zip(space.layers, space.center)),
                               options=options, seconds=seconds, fit=stand_in)
    missing = [l for l in space.layers if l not in stand_in.by_layer]
    if missing:
        raise RuntimeError(f"the variant pass never fitted the MLP of layers {missing}")
    seconds["variants_pass_s"] = time.perf_counter() - t0
    return Variants(stand_in.by_layer, dense, stand_in.flap, current=dict(zip(space.layers, space.center)),
                    seconds=seconds, records=records, store=stand_in.store)


def separable_allocation(space: BudgetLevels, fitness: Any, fidelity: Optional[float] = None
                         ) -> tuple[Candidate, dict[str, Any]]:
    """The ``sensitivity`` start: each layer's own cost curve, then the budget spent where it costs least.

    From the centre, each layer alone is moved one level down and one level up (``2 n`` evaluations at
    ``fidelity``); the three points give a per-layer quadratic ``c_i(v) = a_i d^2 + b_i d`` (``d = v - mid``,
    ``a_i`` clipped at 0 so every curve is convex), and a dynamic programme over the levels returns the
    budget-exact candidate that minimises ``sum_i c_i(v_i)`` (exact for that separable model; the layers'
    interactions are what the search then corrects). Returns the candidate and the probes (``{"deltas":
    [[down, up] per layer], "evaluations", "seconds"}``)."""
    t0 = time.perf_counter()
    mid, centre = space.mid, space.centre
    base = fitness(centre, fidelity)
    deltas, curves = [], []
    for i, (lo, hi) in enumerate(space.bounds):
        d = []
        for v in (mid - 1, mid + 1):
            if lo <= v <= hi:
                c = list(centre)
                c[i] = v
                d.append(fitness(tuple(c), fidelity) - base)
            else:
                d.append(None)
        deltas.append(d)
        down, up = d
        if down is None and up is None:
            a, b = 0.0, 0.0
        elif down is None:
            a, b = 0.0, up
        elif up is None:
            a, b = 0.0, -down
        else:
            a, b = max(0.0, (up + down) / 2), (up - down) / 2
        curves.append((a, b))
    # dp[s]: (cost, levels) of the best assignment of the positions so far whose levels sum to s
    dp: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for (lo, hi), (a, b) in zip(space.bounds, curves):
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for s, (cost, levels) in dp.items():
            for v in range(lo, hi + 1):
                d = v - mid
                key, val = s + v, cost + a * d * d + b * d
                if key not in nxt or val < nxt[key][0] - 1e-15:
                    nxt[key] = (val, levels + (v,))
        dp = nxt
    best = dp[space.target][1]
    return best, {"deltas": deltas, "evaluations": 1 + sum(x is not None for d in deltas for x in d),
                  "seconds": time.perf_counter() - t0, "fidelity": fidelity}


# ------------------------------------------------------------------------------------------------- the search

@dataclass
class SearchedAllocation:
    """The outcome of :func:`search_allocation`: the plan, the calibration rows to fit the final prune on, and
    the record (``details["search"]`` of the pruner)."""

    plan: dict[int, int]
    calibration: torch.Tensor
    details: dict[str, Any]


def search_allocation(model: nn.Module, calibration: torch.Tensor, geo: Geometry, mlp_range: tuple[int, int],
                      att_plan: dict[int, int], total: int, options: FitOptions, *, budget: int, fitness_tokens: int,
                      min_channels: int = 1, seed: int = 0, seconds: Optional[dict[str, float]] = None
                      ) -> SearchedAllocation:
    """Search the allocation of ``total`` MLP channels over ``mlp_range`` (module docstring) with ``budget``
    full-fidelity evaluations; every fit with ``options``. ``model`` is used and left dense (as it came); the
    fitness rows are the last ``ceil(fitness_tokens / seq_len)`` samples (``pruner.search_tokens``)."""
    seq = calibration.shape[1]
    rows = math.ceil(fitness_tokens / seq)
    if calibration.shape[0] - rows < 2:
        raise PruneError(f"obs: pruner.search_tokens={fitness_tokens} takes {rows} of the {calibration.shape[0]} "
                         f"calibration samples; at least 2 must stay to fit on: lower it or raise pruner.tokens")
    fit, tokens = calibration[:-rows], calibration[-rows:]
    space = BudgetLevels.around(geo, mlp_range, total, min_channels)
    first = space.layers[0]
    fids = fidelity_rows(rows)
    chunks = fitness_chunks(rows, fids, options.batch_size or rows)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        reference = KLFitness.reference(model, tokens, first, chunks)
        t_ref = time.perf_counter() - t0
        variants = build_variants(model, fit, att_plan, space, options)
        store = variants.store
        try:
            t_var = time.perf_counter() - t0 - t_ref
            fitness = KLFitness(model, tokens, first, chunks, reference,
                                apply=lambda c: variants.apply(model, space.counts(c)))
            starts = {"uniform": space.centre,
                      "depth": space.project(allocate_channels(geo, mlp_range, total, "depth", min_channels)),
                      "flap": space.project(allocate_channels(geo, mlp_range, total, "flap", min_channels,
                                                              scores=variants.flap))}
            # the sensitivity probes: 2 n + 1 evaluations at the highest fidelity below the full one, paid from
            # the budget (in full-fidelity equivalents); left out when the budget cannot pay them and the starts
            probe_rows = fids[-2] if len(fids) > 1 else fids[-1]
            probe_cost = math.ceil((2 * space.n + 1) * probe_rows / fids[-1])
            probes: dict[str, Any] = {"skipped": f"search_budget={budget} cannot pay the probes "
                                                 f"({probe_cost}) and {len(starts) + 1} starts"}
            if probe_cost + len(starts) + 1 <= budget:
                starts["sensitivity"], probes = separable_allocation(space, fitness, probe_rows * seq)
                probe_cost = math.ceil(probes["evaluations"] * probe_rows / fids[-1])
            else:
                probe_cost = 0
            res = search(space, fitness, strategy="evolve", budget=budget - probe_cost, seed=seed,
                         fidelities=[r * seq for r in fids], offspring=OFFSPRING, initial=list(starts.values()))
        finally:
            variants.restore(model)
    finally:
        model.train(was_training)
    top = {e.candidate: e.fitness for e in res.history if e.fidelity == fids[-1] * seq}
    start_fit = {name: top[c] for name, c in starts.items()}
    best_start = min(start_fit, key=lambda s: (start_fit[s], STARTS.index(s)))
    plan = space.counts(res.best)
    full = fitness.seconds.get(rows * seq, [0, 0.0])
    details = {
        "strategy": "evolve", "fitness": "mean per-token KL(dense || candidate)", "seed": seed,
        "fitness_tokens": int(tokens.numel()), "fit_tokens": int(fit.numel()),
        "fidelities": [r * seq for r in fids], "levels": space.levels, "step": space.step,
        "layers": list(space.layers), "space_size": space.size(),
        "starts": {name: {"fitness": start_fit[name], "channels": [space.count(i, v) for i, v in enumerate(c)]}
                   for name, c in starts.items()},
        "best_start": best_start, "best_start_fitness": start_fit[best_start], "best_fitness": res.best_fitness,
        "gain": start_fit[best_start] - res.best_fitness,
        "gain_relative": 1.0 - res.best_fitness / start_fit[best_start] if start_fit[best_start] > 0 else 0.0,
        "channels": [space.count(i, v) for i, v in enumerate(res.best)],
        "sensitivity_probes": {**probes, "full_fidelity_equivalents": probe_cost},
        "evaluations": res.evaluations, "full_fidelity_evaluations": res.cost, "budget": res.budget,
        "cache_hits": res.cache_hits, "stopped": res.stopped,
        "seconds_per_evaluation": {str(t): s / n for t, (n, s) in sorted(fitness.seconds.items())},
        "seconds_per_full_evaluation": full[1] / full[0] if full[0] else None,
        "search_s": res.wall_s, "reference_s": t_ref, "variants_s": t_var,
        "variants_bytes": {"memory": store.in_memory, "disk": store.on_disk},
    }
    if seconds is not None:
        seconds.update({"search_reference_s": t_ref, "search_variants_s": t_var, "search_s": res.wall_s})
    return SearchedAllocation(plan, fit, details)
