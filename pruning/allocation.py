"""A searched per-layer allocation of MLP channels under an exact budget (``pruner=obs pruner.allocation=search``).

    python run.py pruner=obs ratio=0.1184 pruner.allocation=search pruner.search_budget=48 pruner.search_tokens=8192

**Space** (:class:`BudgetLevels`): a level in ``0..LEVELS-1`` per MLP layer in range; level ``v`` removes
``center_l + (v - LEVELS // 2) * step`` channels, where ``center`` is the uniform allocation and ``step`` a quarter
of the mean removal (so the levels span 0.25x .. 1.75x the mean). Levels that would remove fewer than 0 or more
than ``width - min_channels`` channels are not in the space. Since every layer moves by the same ``step``, the
budget is exact iff the levels sum to ``n * (LEVELS // 2)``: ``mutate`` moves one layer up and another down,
``crossover`` repairs a child to that sum, ``random`` draws uniformly among the budget-exact candidates and
``validate`` refuses the rest.

**Starts**: ``uniform`` (the centre), ``depth`` and ``flap`` (:func:`pruning.obs.allocate_channels`; FLAP's
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

**Variant cache** (:func:`build_variants`): one sequential pass, :func:`pruning.obs.prune_sequential` itself with
the uniform allocation, in which the fit of each ``down_proj`` is done for EVERY level from the inputs the pass
hands it (one Gram matrix per layer, the dense targets with ``target=dense``, the guard's held-out samples): the
selected channels and the compensated ``down_proj`` (+bias) of each level, with the pruner's options, kept on the
CPU in float32. So the variants are fitted exactly as the final prune fits (on the uniformly pruned prefix). A
candidate then costs one forward: its layers' variants are swapped in (gate/up rows of the dense layer, the cached
``down_proj``), only where they changed.

**Fitness** (:class:`KLFitness`): the mean per-token KL(dense || candidate) of the next-token distributions on the
fitness tokens, the dense log-probabilities computed once (float32, CPU: ``tokens x vocab x 4`` bytes, 1.6 GB for
SmolLM2 at 8192 tokens); the layers before the first MLP layer in range are the same in every candidate, so their
output is computed once. Multi-fidelity (the engine's ``evolve``, lambda = 8): 1/16, 1/4 and all of the fitness
rows (whole rows, distinct); ``search_budget`` counts full-fidelity evaluations. Needs the model on its device
(no ``offload``): every evaluation is a whole-model forward.

**Which tokens.** The fitness rows are the LAST ``ceil(search_tokens / seq_len)`` calibration samples. They are
kept out of every fit: the variant pass and the final prune use the samples before them (whose own last
``holdout`` share is the guard's), so the fitness measures what the compensation does on text it never saw.

**After the search** the dense layers are put back and the model is pruned by the normal sequential pass with the
best allocation (the recipe of :class:`pruning.obs.StructuredOBS`), so compensation is fitted on the truly pruned
prefix. Cost: one pass like the prune itself plus ``LEVELS - 1`` extra ``prune_columns`` per layer, the budget's
full-fidelity forwards of the fitness tokens, then the final prune. Memory: the dense copies of the layers in
range and ``LEVELS`` float32 ``down_proj`` variants per layer (445 MB for SmolLM2 at ratio 0.12), the reference.
References: EvoPress (Sieberling et al. 2024), OWL / FLAP for non-uniform schedules.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from random import Random
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

from core.llama import Geometry, decoder_layers
from core.search import Candidate, SearchError, search
from pruning import PruneError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pruning.obs import StructuredOBS

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
        from pruning.obs import allocate_channels

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

@dataclass
class Variant:
    """One layer at one level: kept channels of the dense layer, its compensated ``down_proj`` (CPU, float32)."""

    removed: list[int]  # removed channels, sorted
    keep: "torch.Tensor"  # kept channel indices, sorted
    down: "torch.Tensor"  # [hidden, kept]
    bias: Optional["torch.Tensor"]  # [hidden] or None
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class Variants:
    """Every layer's variants (``{layer: {channels removed: Variant}}``), the dense layers they replace and
    FLAP's standardised WIFV scores measured on the way."""

    by_layer: dict[int, dict[int, Variant]]
    dense: dict[int, "nn.Module"]  # the layers as they were before the pass (deep copies)
    flap: dict[int, "torch.Tensor"]
    current: dict[int, int] = field(default_factory=dict)  # layer -> channels removed in the model now
    seconds: dict[str, float] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)  # the pass's per-projection records

    def apply(self, model: "nn.Module", counts: dict[int, int]) -> None:
        """Put each layer's variant for ``counts`` (missing layers: 0) into ``model``, where it changed."""
        from torch import nn

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
            down = mlp.down_proj
            down.weight = nn.Parameter(v.down.to(ref), requires_grad=False)
            down.bias = None if v.bias is None else nn.Parameter(v.bias.to(ref), requires_grad=False)
            down.in_features = keep.numel()
            mlp.intermediate_size = keep.numel()
            self.current[l] = k

    def restore(self, model: "nn.Module") -> None:
        """Put the dense layers back (the model as it was before :func:`build_variants`)."""
        layers = decoder_layers(model)
        for l, layer in self.dense.items():
            layers[l] = layer
        self.dense, self.current = {}, {}


class _LayerFit:
    """What :func:`pruning.obs._fit` computes for one ``down_proj`` that does not depend on how many channels go
    (the Gram matrix, the weights to prune from, the guard's held-out statistics), so that every level costs one
    :func:`pruning.compensate.prune_columns`. Same inputs, same arithmetic as ``_fit``; the guard's errors come
    from the held-out tokens' Gram matrices instead of their outputs (equal up to rounding, ~100x cheaper)."""

    def __init__(self, w: "torch.Tensor", b: Optional["torch.Tensor"], xs: list["torch.Tensor"],
                 held: list["torch.Tensor"], opt: "StructuredOBS", targets: Optional[list["torch.Tensor"]] = None,
                 held_targets: Optional[list["torch.Tensor"]] = None):
        import torch

        from pruning.compensate import Gram, column_scores, damped_inverse

        self.w, self.b, self.opt = w, b, opt
        n = self.n = w.shape[1]
        self.gram = Gram(n, device=w.device)
        for x in xs:
            self.gram.add(x)
        self.use_bias = opt.bias and opt.compensate
        bias0 = b if b is not None else (torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                                         if self.use_bias else None)
        self.h = self.gram.matrix(self.use_bias)
        self.w_fit, self.b_fit = w, bias0
        if targets is not None and opt.compensate:  # as _fit: the weights that best reproduce the targets
            from pruning.obs import target_weights

            self.w_fit, self.b_fit = target_weights(w, bias0, xs, targets, self.h, opt.damp)
        self.scores = None if opt.selection == "obs" else column_scores(self.w_fit, self.gram, opt.selection, 1)
        self.held: Optional[tuple[torch.Tensor, torch.Tensor, float, int]] = None  # H, C = X^T T, ||T||^2, tokens
        if opt.compensate and opt.guard and held:
            hg = Gram(n, device=w.device)
            for x in held:
                hg.add(x)
            h_aug = hg.matrix(True)
            if held_targets:
                c = torch.zeros(n + 1, w.shape[0], dtype=torch.float64, device=w.device)
                for x, t in zip(held, held_targets):
                    x2, t2 = x.reshape(-1, n).float(), t.reshape(-1, w.shape[0]).float()
                    c[:n] += (x2.T @ t2).double()
                    c[n] += t2.double().sum(0)
                tt = float(sum(t.double().pow(2).sum() for t in held_targets))
            else:
                ref = self._augmented(torch.cat([w.detach().double(), self._bias_column(b)], 1))
                c = h_aug @ ref.T
                tt = float(((ref @ h_aug) * ref).sum())
            self.held = (h_aug, c, tt, hg.tokens)

    def _bias_column(self, b: Optional["torch.Tensor"]) -> "torch.Tensor":
        import torch

        return (b.detach().double() if b is not None else torch.zeros(self.w.shape[0], dtype=torch.float64,
                                                                       device=self.w.device))[:, None]

    def _augmented(self, w_new: "torch.Tensor") -> "torch.Tensor":
        """``[W, b]`` (a missing bias column is 0, as in :func:`pruning.compensate.relative_error`)."""
        import torch

        w_new = w_new.double()
        return w_new if w_new.shape[1] == self.n + 1 else torch.cat([w_new, torch.zeros_like(w_new[:, :1])], 1)

    def held_error(self, w_new: "torch.Tensor") -> float:
        """``||T - [x, 1] W_new^T||^2 / ||T||^2`` on the held-out tokens (T: the targets, or the layer's outputs)."""
        h, c, tt, _ = self.held
        wa = self._augmented(w_new)
        return float((tt - 2 * (wa * c.T).sum() + ((wa @ h) * wa).sum()) / max(tt, 1e-30))

    def variant(self, remove: int) -> Variant:
        """``remove`` channels chosen and compensated as ``_fit`` would, guard included (0: the layer unchanged,
        as the sequential prune leaves a layer it removes nothing from)."""
        import torch

        from pruning.compensate import prune_columns

        w, b, opt, n = self.w, self.b, self.opt, self.n
        if remove == 0:
            return Variant([], torch.arange(n), w.detach().float().cpu().clone(),
                           None if b is None else b.detach().float().cpu().clone(), {"removed": 0})
        res = prune_columns(self.w_fit, self.h, remove, select=opt.selection, scores=self.scores,
                            compensate=opt.compensate, rounds=opt.rounds, damp=opt.damp,
                            bias=self.b_fit if self.use_bias else None)
        record: dict[str, Any] = {"removed": len(res.removed), "tokens": self.gram.tokens, "damp": res.damp}
        new_w, new_b = res.weight[:, :n], (res.weight[:, n] if self.use_bias else b)
        if opt.compensate:
            plain = w.detach().double().clone()
            plain[:, res.removed] = 0
            if b is not None:
                plain = torch.cat([plain, b.detach().double()[:, None]], 1)
            decision = "kept"
            if self.held is not None:
                e_new, e_plain = self.held_error(res.weight), self.held_error(plain)
                record.update({"heldout_error": e_new, "heldout_error_plain": e_plain, "heldout_tokens": self.held[3]})
                if not e_new < e_plain:
                    decision = "rejected"
                    new_w, new_b = plain[:, :n], b
            elif opt.guard:
                decision = "kept (no held-out samples to check)"
            record["update"] = decision
        mask = torch.ones(n, dtype=torch.bool)
        mask[res.removed] = False
        keep = mask.nonzero().squeeze(1)
        return Variant(list(res.removed), keep, new_w[:, keep.to(new_w.device)].float().cpu().contiguous(),
                       None if new_b is None else new_b.detach().float().cpu().clone(), record)


class _VariantFit:
    """Stands in for :func:`pruning.obs._fit` while :func:`pruning.obs.prune_sequential` runs the variant pass: for
    a ``down_proj`` of the space it computes every level's variant from the inputs the pass hands it (fit and
    held-out samples, the dense targets when ``target=dense``), records them, and returns the centre level's as
    ``_fit`` would; anything else (``o_proj``) goes to ``_fit`` itself. So the pass is the sequential prune,
    whatever it does, and the variants are fitted exactly as the final prune will fit them."""

    def __init__(self, model: "nn.Module", space: BudgetLevels, fit: Any):
        layers = decoder_layers(model)
        self.weights = [(layers[l].mlp.down_proj.weight, i, l) for i, l in enumerate(space.layers)]  # kept alive
        self.space, self.fit = space, fit
        self.by_layer: dict[int, dict[int, Variant]] = {}
        self.flap: dict[int, torch.Tensor] = {}

    def __call__(self, w: "torch.Tensor", b: Optional["torch.Tensor"], xs: list["torch.Tensor"],
                 held: list["torch.Tensor"], remove: int, group: int, opt: "StructuredOBS", *args: Any, **kwargs: Any
                 ) -> tuple[list[int], "torch.Tensor", Optional["torch.Tensor"], dict[str, Any]]:
        from pruning.compensate import column_scores
        from pruning.flap import standardise

        found = [(i, l) for p, i, l in self.weights if p is w] if group == 1 else []
        if not found:
            return self.fit(w, b, xs, held, remove, group, opt, *args, **kwargs)
        (pos, l), = found
        stats = _LayerFit(w, b, xs, held, opt, *args, **kwargs)
        self.by_layer[l] = {n: stats.variant(n) for n in self.space.menu(pos)}
        self.flap[l] = standardise(column_scores(w, stats.gram, "flap")).cpu()
        v = self.by_layer[l][remove]
        return v.removed, v.down, v.bias, v.record


def build_variants(model: "nn.Module", calibration: "torch.Tensor", att_plan: dict[int, int], space: BudgetLevels,
                   opt: "StructuredOBS") -> Variants:
    """The variant pass: :func:`pruning.obs.prune_sequential` with the centre allocation (and ``att_plan``), every
    level of every layer of the space recorded on the way (:class:`_VariantFit`). The model ends pruned with the
    centre allocation; the dense layers the pass touched are kept in the result for :meth:`Variants.restore`."""
    from pruning import obs

    if min(space.center) < 1:
        raise PruneError(f"obs: allocation=search needs at least one MLP channel removed per layer in range "
                         f"({space.total} for {space.n} layers): use allocation=uniform or a larger ratio")
    layers = decoder_layers(model)
    dense = {l: copy.deepcopy(layers[l]) for l in sorted({*att_plan, *space.layers})}
    stand_in = _VariantFit(model, space, obs._fit)
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    records = obs.prune_sequential(model, calibration, att_plan, dict(zip(space.layers, space.center)),
                                   options=opt, seconds=seconds, fit=stand_in)
    missing = [l for l in space.layers if l not in stand_in.by_layer]
    if missing:
        raise RuntimeError(f"the variant pass never fitted the MLP of layers {missing}")
    seconds["variants_pass_s"] = time.perf_counter() - t0
    return Variants(stand_in.by_layer, dense, stand_in.flap, current=dict(zip(space.layers, space.center)),
                    seconds=seconds, records=records)


# ----------------------------------------------------------------------------------------------- the fitness

def fitness_chunks(rows: int, fidelity_rows: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of at most ``batch`` rows that never straddle a fidelity's row count, so that every
    fidelity is a prefix of whole chunks (and the reference and a candidate see the same shapes)."""
    cuts = sorted({r for r in fidelity_rows if 0 < r < rows} | {rows})
    out, a = [], 0
    for cut in cuts:
        while a < cut:
            out.append((a, min(cut, a + max(1, batch))))
            a = out[-1][1]
    return out


class KLFitness:
    """``fitness(candidate, tokens) -> float``: mean per-token KL(dense || candidate) on the first ``tokens``
    fitness tokens (whole rows). ``reference`` is :meth:`reference` of the dense model on the same tokens."""

    def __init__(self, model: "nn.Module", tokens: "torch.Tensor", first: int, chunks: list[tuple[int, int]],
                 reference: list["torch.Tensor"], variants: Optional[Variants] = None,
                 space: Optional[BudgetLevels] = None):
        self.model, self.tokens, self.first, self.chunks = model, tokens, first, chunks
        self.reference, self.variants, self.space = reference, variants, space
        self.prefix = _prefix(model, tokens, first, chunks)  # the layers every candidate shares, run once
        self.seconds: dict[int, list[float]] = {}  # tokens -> [evaluations, seconds]

    @staticmethod
    def reference(model: "nn.Module", tokens: "torch.Tensor", first: int, chunks: list[tuple[int, int]]
                  ) -> list["torch.Tensor"]:
        """The dense model's next-token log-probabilities per row, ``[seq - 1, vocab]`` float32 (CPU)."""
        return [lp.cpu() for lp in _logprobs(model, _prefix(model, tokens, first, chunks), first)]

    def __call__(self, candidate: Sequence[int], fidelity: Optional[float] = None) -> float:
        t0 = time.perf_counter()
        if self.variants is not None and self.space is not None:
            self.variants.apply(self.model, self.space.counts(candidate))
        value = self.kl(fidelity)
        spent = self.seconds.setdefault(self.tokens_of(fidelity), [0, 0.0])
        spent[0] += 1
        spent[1] += time.perf_counter() - t0
        return value

    def tokens_of(self, fidelity: Optional[float]) -> int:
        return self.rows_of(fidelity) * self.tokens.shape[1]

    def rows_of(self, fidelity: Optional[float]) -> int:
        rows = self.tokens.shape[0]
        return rows if fidelity is None else min(rows, max(1, math.ceil(fidelity / self.tokens.shape[1])))

    def kl(self, fidelity: Optional[float] = None) -> float:
        """KL of the model as it is now (no variant applied)."""
        import torch
        import torch.nn.functional as F

        rows = self.rows_of(fidelity)
        n = sum(1 for a, b in self.chunks if b <= rows)
        total, count = 0.0, 0
        with torch.no_grad():
            for q, p in zip(_logprobs(self.model, self.prefix[:n], self.first), self.reference):
                total += float(F.kl_div(q, p.to(q.device), reduction="sum", log_target=True))  # sum e^p (p - q)
                count += q.shape[0]
        return total / count


def _prefix(model: "nn.Module", tokens: "torch.Tensor", first: int, chunks: list[tuple[int, int]]
            ) -> list[tuple["torch.Tensor", dict[str, Any]]]:
    """Per chunk: the hidden states entering layer ``first`` and the keyword arguments the model passes a layer."""
    from pruning.streaming import LayerStream

    out = []
    for a, b in chunks:
        stream = LayerStream(model, tokens[a:b], batch_size=0)
        for i, _ in stream:
            if i >= first:
                break
            stream.advance()
        out.append((stream.hidden[0], stream.kwargs[0]))
    return out


def _logprobs(model: "nn.Module", prefix: list[tuple["torch.Tensor", dict[str, Any]]], first: int
              ) -> Iterator["torch.Tensor"]:
    """Next-token log-probabilities ``[seq - 1, vocab]`` (float32) of each row of the prefix chunks, in order, from
    layer ``first`` (one row's logits at a time: a chunk's would be ``rows x seq x vocab``)."""
    import torch

    layers = decoder_layers(model)
    with torch.no_grad():
        for h, kw in prefix:
            for layer in layers[first:]:
                y = layer(h, **kw)
                h = y[0] if isinstance(y, tuple) else y
            h = model.model.norm(h)
            for r in h:
                yield torch.log_softmax(model.lm_head(r[:-1]).float(), -1)


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
    calibration: "torch.Tensor"
    details: dict[str, Any]


def fidelity_rows(rows: int) -> list[int]:
    """The fitness rows of each fidelity: 1/16, 1/4 and all (whole rows, distinct)."""
    return sorted({max(1, rows // 16), max(1, rows // 4), rows})


def search_allocation(model: "nn.Module", calibration: "torch.Tensor", geo: Geometry, mlp_range: tuple[int, int],
                      att_plan: dict[int, int], total: int, opt: "StructuredOBS",
                      seconds: Optional[dict[str, float]] = None) -> SearchedAllocation:
    """Search the allocation of ``total`` MLP channels over ``mlp_range`` (module docstring). ``model`` is used and
    left dense (as it came); the fitness rows are the last ``ceil(opt.search_tokens / seq_len)`` samples."""
    from pruning.obs import allocate_channels

    seq = calibration.shape[1]
    rows = math.ceil(opt.search_tokens / seq)
    if calibration.shape[0] - rows < 2:
        raise PruneError(f"obs: pruner.search_tokens={opt.search_tokens} takes {rows} of the {calibration.shape[0]} "
                         f"calibration samples; at least 2 must stay to fit on: lower it or raise pruner.tokens")
    fit, tokens = calibration[:-rows], calibration[-rows:]
    space = BudgetLevels.around(geo, mlp_range, total, opt.min_channels)
    first = space.layers[0]
    fids = fidelity_rows(rows)
    chunks = fitness_chunks(rows, fids, opt.batch_size or rows)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        reference = KLFitness.reference(model, tokens, first, chunks)
        t_ref = time.perf_counter() - t0
        variants = build_variants(model, fit, att_plan, space, opt)
        try:
            t_var = time.perf_counter() - t0 - t_ref
            fitness = KLFitness(model, tokens, first, chunks, reference, variants, space)
            starts = {"uniform": space.centre,
                      "depth": space.project(allocate_channels(geo, mlp_range, total, "depth", opt.min_channels)),
                      "flap": space.project(allocate_channels(geo, mlp_range, total, "flap", opt.min_channels,
                                                              scores=variants.flap))}
            # the sensitivity probes: 2 n + 1 evaluations at the highest fidelity below the full one, paid from
            # the budget (in full-fidelity equivalents); left out when the budget cannot pay them and the starts
            probe_rows = fids[-2] if len(fids) > 1 else fids[-1]
            probe_cost = math.ceil((2 * space.n + 1) * probe_rows / fids[-1])
            probes: dict[str, Any] = {"skipped": f"search_budget={opt.search_budget} cannot pay the probes "
                                                 f"({probe_cost}) and {len(starts) + 1} starts"}
            if probe_cost + len(starts) + 1 <= opt.search_budget:
                starts["sensitivity"], probes = separable_allocation(space, fitness, probe_rows * seq)
                probe_cost = math.ceil(probes["evaluations"] * probe_rows / fids[-1])
            else:
                probe_cost = 0
            budget = opt.search_budget - probe_cost
            res = search(space, fitness, strategy="evolve", budget=budget, seed=opt.seed,
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
        "strategy": "evolve", "fitness": "mean per-token KL(dense || candidate)", "seed": opt.seed,
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
    }
    if seconds is not None:
        seconds.update({"search_reference_s": t_ref, "search_variants_s": t_var, "search_s": res.wall_s})
    return SearchedAllocation(plan, fit, details)
