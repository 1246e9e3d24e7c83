"""Depth pruning with a fitted linear map (ReplaceMe, Shopkhoev et al. 2025, "ReplaceMe: Network Simplification
via Layer Pruning and Linear Transformations"): remove whole decoder layers and replace them by one linear map of
the residual stream, fitted on calibration activations and merged into the preceding layer's ``down_proj``, so the
pruned model is a plain Llama with fewer layers and no added parameter.

    python run.py pruner=depth pruner.num_layers=8                   # 8 layers, one at a time, each with its map
    python run.py pruner=depth ratio=0.25                            # 25% of the layers (rounded up)
    python run.py pruner=depth pruner.selection=block                # ReplaceMe's one block, one fitted map
    python run.py pruner=depth pruner.compensate=none                # the plain removal, for comparison

Which layers (``selection``; ``greedy`` by default: on SmolLM2 at 8 of 30 layers it removed the scattered layers
ShortGPT also picks and, with the map, reached 0.54x ShortGPT's damage on the Austen holdout and 0.96x on BoolQ,
where the best block did 3.6x and 5.1x; tests/bench/results/depth.jsonl):

- ``block`` (ReplaceMe's ``select_non_overlapping_blocks`` with one block): the ``n`` consecutive layers
  ``[s, s + n)`` whose input ``x_s`` and output ``x_{s+n}`` are closest, by the mean angular distance
  ``arccos(cos(x_s, x_{s+n})) / pi`` over the calibration tokens. ReplaceMe averages it over the last token of each
  sequence only (its calibration rows are padded); our windows hold no padding, so every token counts, as in
  ShortGPT's Block Influence. One streamed pass scores every start (it keeps ``n + 1`` copies of the states).
- ``greedy``: ``n`` times, the one layer of least angular distance on the current model (already cut and
  compensated) is removed and compensated: ``n`` scoring passes and ``n`` fits.

The map (``compensate=linear``, ReplaceMe's ``lstsq``): with ``m`` the MLP output of layer ``s - 1`` (the last
kept layer before the cut), ``h = x_{s-1} + attn`` the residual stream it is added to, and ``y`` the hidden state
leaving the removed block, ``T`` minimises ``||m T - (y - h)||^2`` over the calibration tokens (the residual ``h``
passes unchanged, ``m`` is mapped):  ``T = (X^T X + lambda I)^{-1} X^T Y`` with ``X = m``, ``Y = y - h``,
``lambda = damp * mean(diag(X^T X))`` (ReplaceMe's ``alpha`` is absolute and 0 by default; ``damp=0`` here takes
the pseudo-inverse). ``X^T X`` and ``X^T Y`` are summed in float64 one micro-batch at a time, never all tokens at
once. Since ``m T = a W_down^T T`` for the MLP's hidden activation ``a``, the map merges as
``W_down <- T^T W_down`` (ReplaceMe's ``transform.T @ down_proj.weight``; a bias would become ``T^T b``). The
pruned layer ``s - 1`` then outputs ``h + m T``: exactly ``y`` when the removed block adds a linear function of
``m`` to the stream. ReplaceMe's other objective (cosine, fitted by Adam) is not implemented.

With a linear map the first layer is never a candidate (nothing before it to merge into: the embedding is tied
to the LM head in SmolLM2); ``compensate=none`` may remove it. Candidates are the layers inside both
``attention_layers`` and ``mlp_layers``. The removed layers leave the model: the rest are renumbered
(``self_attn.layer_idx``), the config follows (``num_hidden_layers``, ``layer_types``, ``layer_configs``) and
``config.removed_layers`` records the original indices, so the checkpoint is a stock Llama.

``search`` (EvoPress, Sieberling et al. 2024): the set of removed layers of least KL divergence of the whole model's
next-token distributions to the dense model's on held-out calibration tokens, searched by the engine's evolution
on plain removal; with ``compensate=linear`` the ``rerank`` best sets are then scored again with their maps fitted
and merged (:meth:`Depth._rerank`), and the least KL with maps wins (EvoPress's ``window_cosine_similarity``
scoring is the ``block`` rule above).

Cost: ``block``: one streamed pass over the layers (``n + 1`` copies of the calibration hidden states, where
``states`` puts them) and one pass up to the block's end (the fit keeps the MLP outputs of layer
``s - 1`` and the residual it is added to: two extra copies; the solve holds four ``hidden x hidden`` float64
matrices, the sums, the solver's factor and the map, and the merge a block of ``down_proj`` columns at a time).
``greedy``: ``n`` times a full pass and a pass up to the cut.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from core.models.llama import count_params, decoder_layers
from core.run.errors import ConfigError
from pruning import PruneError, PruneResult
from pruning.options import as_range, range_order_errors, resolve_ratio_target, stream_option_errors
from pruning.ranges import resolve_range

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the functions that use it: building a Depth from its options (config validation)
# imports no torch.

log = logging.getLogger(__name__)

SELECTIONS = ("block", "greedy", "search")
COMPENSATIONS = ("linear", "none")
SEARCH_OFFSPRING = 8  # selection=search: evolve's lambda (candidates per generation)
MERGE_BLOCK_BYTES = 32 * 2**20  # merge_map: a float64 block of down_proj columns (and its product) at a time


@dataclass(frozen=True)
class Depth:
    """Remove ``num_layers`` whole layers (or ``ratio`` of them, rounded up) chosen by ``selection`` among the
    layers inside both ranges, each cut compensated by a linear map merged into the preceding ``down_proj``
    (``compensate=linear``) or not at all (``none``)."""

    RATIO: ClassVar[dict[str, str]] = {
        "layers": "share of the decoder layers removed, rounded up: ceil(ratio * depth) whole layers "
                  "(pruner.num_layers=n removes exactly n and leaves `ratio` unused)",
    }

    num_layers: Optional[int] = None  # None: ceil(ratio * depth)
    ratio: float = 0.25
    ratio_target: Optional[str] = None  # layers (RATIO)
    name: str = "depth"
    selection: str = "greedy"  # greedy | block (tests/bench/results/depth.jsonl: greedy with the map is the better)
    compensate: str = "linear"  # linear | none
    damp: float = 1e-4  # ridge term, relative to the mean diagonal of X^T X (0: pseudo-inverse)
    attention_layers: Any = (0, None)  # (start, end) or {start, end}
    mlp_layers: Any = (0, None)
    batch_size: int = 8  # calibration samples per layer forward; 0 = all at once
    offload: bool = False  # keep the model where it is, run each layer on `device`
    device: Optional[str] = None  # where layers run (None: the model's device)
    states: str = "auto"  # where the calibration hidden states live: auto | device | host | disk (docs/scale.md)
    search_budget: int = 48  # selection=search: full-fidelity KL evaluations (the starts included)
    search_tokens: int = 1024  # selection=search: fitness tokens, the LAST calibration samples (never fitted on)
    rerank: int = 8  # selection=search, compensate=linear: the best sets by plain removal, scored again with maps
    seed: int = 0  # selection=search: the engine's seed; otherwise recorded only (deterministic)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        errors = []
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
            errors.append(f"pruner.num_layers={n!r} must be a whole number of layers (or null to use ratio)")
        elif n is not None and n <= 0:
            errors.append(f"pruner.num_layers={n} removes no layers: it must be >= 1 (or null to use ratio)")
        elif n is None and not 0.0 < float(self.ratio) < 1.0:
            errors.append(f"ratio={self.ratio} with pruner.num_layers=null: ratio is the share of the layers to "
                          "remove, in (0, 1); or set pruner.num_layers=n")
        if self.selection not in SELECTIONS:
            errors.append(f"pruner.selection={self.selection!r} is not one of {', '.join(SELECTIONS)}")
        if self.compensate not in COMPENSATIONS:
            errors.append(f"pruner.compensate={self.compensate!r} is not one of {', '.join(COMPENSATIONS)}")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d < 0:
            errors.append(f"pruner.damp={d!r} must be a number >= 0 (the ridge term relative to the mean diagonal "
                          "of X^T X; 0 = pseudo-inverse)")
        elif self.compensate == "none" and d != type(self).damp:
            errors.append(f"pruner.damp={d} applies to compensate=linear only, not none")
        if isinstance(self.search_budget, bool) or not isinstance(self.search_budget, int) or self.search_budget < 3:
            errors.append(f"pruner.search_budget={self.search_budget!r} must be an integer >= 3 (full-fidelity "
                          "KL evaluations)")
        if isinstance(self.search_tokens, bool) or not isinstance(self.search_tokens, int) or self.search_tokens < 1:
            errors.append(f"pruner.search_tokens={self.search_tokens!r} must be a positive integer")
        r = self.rerank
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            errors.append(f"pruner.rerank={r!r} must be an integer >= 0 (0: the best set by plain removal)")
        elif r != type(self).rerank and (self.selection != "search" or self.compensate != "linear"):
            errors.append(f"pruner.rerank={r} applies to selection=search with compensate=linear only, not "
                          f"selection={self.selection} compensate={self.compensate}")
        if self.selection == "search" and self.offload:
            errors.append("pruner.selection=search scores each candidate by a forward of the whole model: it needs "
                          "the model on its device (pruner.offload=false; model.device_map spreads a large one)")
        errors += stream_option_errors(self.batch_size, self.offload, self.device, self.states)
        errors += range_order_errors(attention=self.attention_layers, mlp=self.mlp_layers)
        errors += resolve_ratio_target(self)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def needs_calibration(self) -> bool:
        return True

    def search_rows(self, seq_len: int) -> int:
        """selection=search: the calibration samples (the last ones) that are the fitness tokens."""
        return math.ceil(int(self.search_tokens) / max(1, int(seq_len)))

    @property
    def reranks(self) -> bool:
        """Whether the searched sets are scored again with their maps (``rerank``)."""
        return self.selection == "search" and self.compensate == "linear" and self.rerank > 0

    def rerank_rows(self, cfg: dict, seq_len: int) -> int:
        """The calibration samples the finalists' maps are fitted on: the fitness token count, at least 4 per
        unknown of a row of the map (``4 x hidden_size``); the final map takes every sample left."""
        want = max(int(self.search_tokens), 4 * int(cfg["hidden_size"]))
        return math.ceil(want / max(1, int(seq_len)))

    def count(self, depth: int) -> int:
        """How many layers go on a model of ``depth`` layers."""
        if self.num_layers is not None:
            return self.num_layers
        return max(1, math.ceil(float(self.ratio) * depth - 1e-9))

    def candidates(self, depth: int) -> list[int]:
        """The layers that may be removed (original indices), checked against ``depth``."""
        att = resolve_range(*self.attention_layers, depth, "attention", 0.0)
        mlp = resolve_range(*self.mlp_layers, depth, "mlp", 0.0)
        first = max(att[0], mlp[0], 1 if self.compensate == "linear" else 0)
        out = list(range(first, min(att[1], mlp[1])))
        if not out:
            why = " (layer 0 has no layer before it to merge the map into)" if self.compensate == "linear" else ""
            raise PruneError(f"depth: no layer is inside both layers.attention {list(att)} and layers.mlp "
                             f"{list(mlp)} of the model's {depth} layers{why}: nothing can be removed")
        return out

    def check(self, depth: int) -> None:
        units = self.candidates(depth)
        n = self.count(depth)
        if n >= depth:
            raise PruneError(f"pruner.num_layers={n} would remove all {depth} layers of the model: at most "
                             f"{depth - 1}" if self.num_layers is not None else
                             f"ratio={self.ratio} would remove all {depth} layers of the model")
        if n > len(units):
            first = " (never layer 0 with compensate=linear)" if self.compensate == "linear" else ""
            raise PruneError(f"{n} layers to remove, but the layer ranges hold {len(units)} candidates "
                             f"{units[0]}..{units[-1]}{first}; widen layers.attention / layers.mlp or remove fewer")

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: int = 128,
                  free: Optional[tuple[Optional[int], Optional[int]]] = None) -> Any:
        """Peak memory and work on a model of ``config.json`` ``cfg`` (torch-free; core/run/plan.py): the layer
        stream with its copies of the hidden states (``block``: n + 1 while scoring), one micro-batch's float64
        activations and the two ``hidden x hidden`` float64 sums of the fit."""
        from core.run.plan import dtype_bytes
        from pruning.memory import micro_batch, stream

        depth = int(cfg["num_hidden_layers"])
        self.check(depth)
        n = self.count(depth)
        units = self.candidates(depth)
        copies = max(n + 1 if self.selection in ("block", "search") else 2, 3 if self.compensate == "linear" else 1)
        p = stream(cfg, tokens=tokens, seq_len=seq_len, batch_size=self.batch_size, dtype=dtype, model_device=device,
                   device=self.device, offload=self.offload, copies=copies, states=self.states,
                   device_free=(free or (None,))[0], host_free=(free or (None, None))[1])
        d = int(cfg["hidden_size"])
        b = micro_batch(tokens, seq_len, self.batch_size)
        p.add(**{"float64 activations of a micro-batch": 3 * b * int(seq_len) * d * 8})
        if self.compensate == "linear":  # the sums, the solver's factor and the map (the pseudo-inverse: its eigh too)
            p.add(**{"float64 X^T X, X^T Y, the solve and the map": (4 if self.damp > 0 else 6) * d * d * 8
                     + 2 * MERGE_BLOCK_BYTES})
        how = {"block": "one block by angular distance", "greedy": "one at a time by angular distance",
               "search": f"searched by KL to the dense model ({self.search_budget} evaluations on "
                         f"{self.search_rows(seq_len) * int(seq_len):,} held-out tokens)"}[self.selection]
        passes = depth + depth if self.selection == "block" else n * 2 * depth
        notes = []
        if self.selection == "search":  # two scoring passes (the starts), the fits, and the search's forwards
            rows = self.search_rows(seq_len)
            vocab = int(cfg.get("vocab_size") or 0)
            p.add_host(**{"the dense model's log-probabilities on the fitness tokens (float32)":
                          rows * (int(seq_len) - 1) * vocab * 4})
            p.add(**{"one fitness row's logits and log-probabilities (float32)": 2 * int(seq_len) * vocab * 4,
                     "the fitness tokens' hidden states entering the first candidate":
                     rows * int(seq_len) * d * dtype_bytes(dtype, cfg)})
            passes = 2 * depth + n * depth
            notes.append(f"selection=search adds up to {self.search_budget} fitness evaluations (forwards of the "
                         "layers from the first candidate on, over the fitness tokens), not counted in the layer "
                         "forwards")
            if self.reranks:
                p.add(**{"the fitness tokens' hidden states entering the layer before the first candidate":
                         rows * int(seq_len) * d * dtype_bytes(dtype, cfg)})
                # per finalist at most one fit pass per run (runs <= n) over its fit samples, in passes over `tokens`
                fit_tokens = self.rerank_rows(cfg, seq_len) * int(seq_len)
                passes += math.ceil(self.rerank * n * depth * min(1.0, fit_tokens / max(1, int(tokens))))
                notes.append(f"rerank={self.rerank}: the best sets are fitted with their maps on "
                             f"{fit_tokens:,} tokens and scored again (one "
                             "fitness evaluation each, and a pass up to each run of removed layers)")
        removes = [f"{n} whole layers of {len(units)} candidates ({units[0]}..{units[-1]}), {how}, "
                   f"{'compensated by a linear map merged into down_proj' if self.compensate == 'linear' else 'not compensated'}"]
        return p.footprint(layer_forwards=passes, tokens=int(tokens), removes=removes, notes=notes)

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        # local: imports torch, and config validation imports this module
        from pruning.streaming import check_calibration, check_llama_layout, check_stream_device

        check_llama_layout(model, "depth")
        check_calibration(calibration, "depth")
        depth = len(decoder_layers(model))
        self.check(depth)
        check_stream_device(model, self.device, self.offload)
        n = self.count(depth)
        from pruning.surgery import remove_layers  # local: imports torch, and config validation imports this module

        stream_kw = {"batch_size": self.batch_size, "device": self.device, "offload": self.offload,
                     "states": self.states}
        params_before = count_params(model)
        alive = list(range(depth))  # current index -> index before this prune
        allowed = set(self.candidates(depth))
        cuts: list[dict[str, Any]] = []
        timings = {"score_s": 0.0, "fit_s": 0.0, "surgery_s": 0.0}
        search: dict[str, Any] = {}
        runs: list[tuple[int, int]] = []  # selection=search: (first layer, length) of each run to cut, ascending
        if self.selection == "search":
            chosen, search, calibration = self._search(model, calibration, n, sorted(allowed), stream_kw, timings)
            runs = _runs(chosen)
        rounds = [n] if self.selection == "block" else [k for _, k in runs] if runs else [1] * n
        for r, k in enumerate(rounds):
            if runs:
                s = alive.index(runs[r][0])
                cut: dict[str, Any] = {"layers": [alive[s + t] for t in range(k)], "distance": None,
                                       "distances": search["angular_distances"]}
            else:
                starts = [j for j in range(len(alive) - k + 1) if all(alive[j + t] in allowed for t in range(k))]
                t0 = time.perf_counter()
                dist = block_distances(model, calibration, k, starts, **stream_kw)
                timings["score_s"] += time.perf_counter() - t0
                s = min(starts, key=lambda j: (dist[j], j))
                cut = {"layers": [alive[s + t] for t in range(k)], "distance": dist[s],
                       "distances": {alive[j]: dist[j] for j in starts}}
            t0 = time.perf_counter()
            if self.compensate == "linear":
                fit = fit_linear_map(model, calibration, s, s + k, float(self.damp), **stream_kw)
                timings["fit_s"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                merge_map(decoder_layers(model)[s - 1], fit.pop("map"))
                cut.update(merged_into=alive[s - 1], **fit)
            remove_layers(model, list(range(s, s + k)))  # (pruning/surgery.py)
            timings["surgery_s"] += time.perf_counter() - t0
            del alive[s:s + k]
            cuts.append(cut)
            log.info("depth: layers %s removed (%s)%s", cut["layers"],
                     "searched" if runs else f"angular distance {cut['distance']:.4f}",
                     f", map merged into layer {cut['merged_into']}" if "merged_into" in cut else "")
        if search:
            search.pop("angular_distances", None)
        return self._result(cuts, depth, n, params_before, count_params(model), timings, search)

    def _search(self, model: nn.Module, calibration: torch.Tensor, n: int, units: list[int],
                stream_kw: dict[str, Any], timings: dict[str, float]
                ) -> tuple[list[int], dict[str, Any], torch.Tensor]:
        """selection=search: the ``n`` layers of ``units`` whose plain removal gives the least KL to the dense model
        on the fitness tokens (the last ``search_tokens`` of the calibration, never fitted on), searched by the
        engine's ``evolve`` at three fidelities from two starts scored on the other samples: ShortGPT's rule (the
        ``n`` layers of least angular distance, each alone) and the ``block`` rule. Returns the layers, the record
        and the calibration samples left for the maps."""
        # local: imports torch, and config validation imports this module
        from torch import nn

        from core.search import Subsets, search
        from pruning.fitness import KLFitness, fidelity_rows, fitness_chunks

        seq = calibration.shape[1]
        rows = self.search_rows(seq)
        if calibration.shape[0] - rows < 2:
            raise PruneError(f"depth: pruner.search_tokens={self.search_tokens} takes {rows} of the "
                             f"{calibration.shape[0]} calibration samples; at least 2 must stay for the starts and "
                             "the maps: lower it or raise data.num_samples")
        fit, tokens = calibration[:-rows], calibration[-rows:]
        t0 = time.perf_counter()
        single = block_distances(model, fit, 1, units, **stream_kw)
        allowed = set(units)
        block_starts = [j for j in units if all(j + t in allowed for t in range(n))]
        block = block_distances(model, fit, n, block_starts, **stream_kw) if block_starts else {}
        timings["score_s"] += time.perf_counter() - t0
        starts = {"shortgpt": tuple(sorted(sorted(units, key=lambda l: (single[l], l))[:n]))}
        if block:
            b = min(block, key=lambda j: (block[j], j))
            starts["block"] = tuple(range(b, b + n))
        pos = {l: i for i, l in enumerate(units)}
        space = Subsets(len(units), n)
        first, fids = units[0], fidelity_rows(rows)
        chunks = fitness_chunks(rows, fids, self.batch_size or rows)
        layers = decoder_layers(model)

        def apply(c: Any) -> None:  # the candidate's layers left out of the stack (put back in `finally`)
            gone = {units[i] for i in c}
            model.model.layers = nn.ModuleList([layer for j, layer in enumerate(layers) if j not in gone])

        was_training = model.training
        model.eval()
        t0 = time.perf_counter()
        try:
            reference = KLFitness.reference(model, tokens, first, chunks)
            fitness = KLFitness(model, tokens, first, chunks, reference, apply=apply)
            initial = list(dict.fromkeys(tuple(sorted(pos[l] for l in c)) for c in starts.values()))
            res = search(space, fitness, strategy="evolve", budget=self.search_budget, seed=int(self.seed),
                         fidelities=[r * seq for r in fids], offspring=SEARCH_OFFSPRING, initial=initial)
        finally:
            model.model.layers = layers
            model.train(was_training)
        timings["search_s"] = time.perf_counter() - t0
        top = {e.candidate: e.fitness for e in res.history if e.fidelity == fids[-1] * seq}
        start_fit = {name: top.get(tuple(sorted(pos[l] for l in c))) for name, c in starts.items()}
        scored = {k: v for k, v in start_fit.items() if v is not None}
        best_start = min(scored, key=lambda k: scored[k]) if scored else None
        chosen = sorted(units[i] for i in res.best)
        reranked: Optional[dict[str, Any]] = None
        if self.reranks:
            ranked = sorted(top.items(), key=lambda kv: (kv[1], kv[0]))[:self.rerank]
            t0 = time.perf_counter()
            reranked = self._rerank(model, fit, tokens, first, chunks, reference,
                                    [(sorted(units[i] for i in c), f) for c, f in ranked], stream_kw)
            timings["rerank_s"] = time.perf_counter() - t0
            chosen = reranked["layers"]
        full = fitness.seconds.get(rows * seq, [0, 0.0])
        details = {
            "strategy": "evolve", "fitness": "mean per-token KL(dense || candidate), the layers removed plainly",
            "seed": int(self.seed), "fitness_tokens": int(tokens.numel()), "fit_tokens": int(fit.numel()),
            "fidelities": [r * seq for r in fids], "candidates": units, "space_size": space.size(),
            "starts": {k: {"layers": list(c), "fitness": start_fit[k]} for k, c in starts.items()},
            "best_start": best_start, "best_start_fitness": scored.get(best_start) if best_start else None,
            "best_fitness": res.best_fitness, "layers": chosen,
            "gain": (scored[best_start] - res.best_fitness) if best_start else None,
            "evaluations": res.evaluations, "full_fidelity_evaluations": res.cost, "budget": res.budget,
            "cache_hits": res.cache_hits, "stopped": res.stopped, "search_s": res.wall_s,
            "seconds_per_full_evaluation": full[1] / full[0] if full[0] else None,
            "angular_distances": single,
        }
        if reranked is not None:
            details["rerank"] = reranked
            details["fitness"] += "; the best sets scored again with their maps (rerank)"
        log.info("depth: searched layers %s (KL %.4f; best start %s: %s)", chosen, res.best_fitness, best_start,
                 None if best_start is None else f"{scored[best_start]:.4f}")
        return chosen, details, fit

    def _rerank(self, model: nn.Module, fit: torch.Tensor, tokens: torch.Tensor, first: int,
                chunks: list[tuple[int, int]], reference: list[torch.Tensor],
                finalists: list[tuple[list[int], float]], stream_kw: dict[str, Any]) -> dict[str, Any]:
        """The finalists (sets of original layer indices, best plain-removal KL first), each with its maps fitted
        on the first :meth:`rerank_rows` fit samples and merged as the prune will merge them, scored by KL to the
        dense model on the fitness tokens (never fitted on); the model is given back unchanged. The least KL wins,
        the plain order breaking ties. Linear maps change which sets are best: a run whose layers add a nearly
        linear function of the stream costs little with its map, whatever its plain removal costs."""
        # local: imports torch, and config validation imports this module
        import torch
        from torch import nn

        from pruning.fitness import KLFitness

        layers = decoder_layers(model)
        rows = min(fit.shape[0], self.rerank_rows(model.config.to_dict(), fit.shape[1]))
        sub = fit[:rows]
        was_training = model.training
        model.eval()
        # candidates' maps merge into the layer before a removed one: the shared prefix ends one layer earlier
        fitness = KLFitness(model, tokens, first - 1, chunks, reference)
        scored = []
        try:
            for gone, plain in finalists:
                saved: list[tuple[nn.Module, torch.Tensor, Optional[torch.Tensor]]] = []  # down_proj, its weights
                removed: set[int] = set()
                try:
                    for start, k in _runs(gone):
                        kept = [j for j in range(len(layers)) if j not in removed]
                        model.model.layers = nn.ModuleList(layers[j] for j in kept)
                        s = kept.index(start)
                        down = layers[start - 1].mlp.down_proj
                        saved.append((down, down.weight.detach().clone(),
                                      None if down.bias is None else down.bias.detach().clone()))
                        got = fit_linear_map(model, sub, s, s + k, float(self.damp), **stream_kw)
                        merge_map(layers[start - 1], got["map"])
                        removed.update(range(start, start + k))
                    model.model.layers = nn.ModuleList(layer for j, layer in enumerate(layers) if j not in removed)
                    kl = fitness.kl()
                finally:
                    model.model.layers = layers
                    with torch.no_grad():
                        for down, w0, b0 in saved:
                            down.weight.copy_(w0)
                            if b0 is not None:
                                down.bias.copy_(b0)
                scored.append({"layers": gone, "kl_plain": plain, "kl_linear": kl})
        finally:
            model.train(was_training)
        best = min(range(len(scored)), key=lambda i: (scored[i]["kl_linear"], i))
        log.info("depth: rerank of %d sets with their maps: %s (KL %.4f with maps; plain rank %d)", len(scored),
                 scored[best]["layers"], scored[best]["kl_linear"], best + 1)
        return {"fit_tokens": int(sub.numel()), "finalists": scored, "layers": scored[best]["layers"],
                "plain_rank": best + 1, "kl_linear": scored[best]["kl_linear"],
                "kl_linear_of_plain_best": scored[0]["kl_linear"]}

    def _result(self, cuts: list[dict[str, Any]], depth: int, n: int, params_before: int, params_after: int,
                timings: dict[str, float], search: Optional[dict[str, Any]] = None) -> PruneResult:
        gone = sorted(i for c in cuts for i in c["layers"])
        kept = [i for i in range(depth) if i not in set(gone)]
        merged = {c["merged_into"]: c for c in cuts if "merged_into" in c}
        first_scores = cuts[0]["distances"]
        per_layer = []
        for i in range(depth):
            row: dict[str, Any] = {"layer": i, "new_index": kept.index(i) if i in kept else None, "removed": i in gone}
            if self.selection in ("greedy", "search") or n == 1:
                row["angular_distance"] = first_scores.get(i)
            if i in merged:
                row["map_merged"] = True
            per_layer.append(row)
        notes = [f"layers {gone} removed (indices before pruning); the remaining {len(kept)} are renumbered "
                 f"0..{len(kept) - 1}"]
        if merged:
            notes.append(f"linear maps merged into down_proj of layers {sorted(merged)}: no parameter added")
        return PruneResult(
            params_before=params_before, params_after=params_after,
            compression={"unit": self.ratio_target,
                         "amount": float(self.ratio) if self.num_layers is None else n,
                         "layers": n, "params_removed": 1.0 - params_after / params_before},
            ranges={"attention": list(resolve_range(*self.attention_layers, depth, "attention", 0.0)),
                    "mlp": list(resolve_range(*self.mlp_layers, depth, "mlp", 0.0))},
            layers=per_layer, notes=notes,
            details={"selection": self.selection, "compensate": self.compensate,
                     "damp": float(self.damp) if self.compensate == "linear" else None,
                     "num_layers": self.num_layers, "ratio": None if self.num_layers is not None else float(self.ratio),
                     "removed_layers": gone,
                     "cuts": [{k: v for k, v in c.items() if k != "distances"} for c in cuts],
                     "block_distances": {str(k): v for k, v in first_scores.items()},
                     "params_removed": params_before - params_after, **({"search": search} if search else {})},
            timings=timings)


def _runs(layers: list[int]) -> list[tuple[int, int]]:
    """``(first, length)`` of each maximal run of consecutive layers, ascending: [3, 4, 9] -> [(3, 2), (9, 1)]."""
    out: list[tuple[int, int]] = []
    for l in sorted(layers):
        if out and out[-1][0] + out[-1][1] == l:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((l, 1))
    return out


# --------------------------------------------------------------------------- scores


def _angular_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over tokens of ``arccos(cos(a, b)) / pi`` (``[batch, tokens, hidden]``), in float32, summed in float64."""
    # local: imports torch, and config validation imports this module
    import torch
    import torch.nn.functional as F

    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return float(torch.arccos(cos).double().sum() / math.pi)


def block_distances(model: nn.Module, calibration: torch.Tensor, n: int, starts: list[int], *, batch_size: int = 0,
                    device: Optional[str] = None, offload: bool = False, states: str = "auto") -> dict[int, float]:
    """Mean angular distance between the hidden states entering layer ``s`` and leaving layer ``s + n - 1``, for
    every ``s`` in ``starts``, over the calibration tokens: one streamed pass of the unchanged model, keeping a copy
    of the states entering each start until the block's end has run (at most ``n + 1`` copies at once)."""
    # local: imports torch, and config validation imports this module
    from pruning.streaming import LayerStream

    stream = LayerStream(model, calibration, batch_size=batch_size, device=device, offload=offload, states=states,
                         copies=n + 1)
    wanted, last = set(starts), max(starts) + n
    saved: dict[int, Any] = {}
    out: dict[int, float] = {}
    was_training = model.training
    model.eval()
    try:
        for i, _layer in stream:
            if i in wanted:
                copy = stream.new_states()
                for x in stream.hidden:
                    copy.append(x.clone())
                saved[i] = copy
            stream.advance()
            if i + 1 - n in saved:
                inputs = saved.pop(i + 1 - n)
                total = sum(_angular_sum(a, b) for a, b in zip(inputs, stream.hidden))
                inputs.clear()
                out[i + 1 - n] = total / stream.tokens
            if i + 1 >= last:
                break
    finally:
        model.train(was_training)
        for copy in saved.values():
            copy.clear()
        stream.close()
    return out


# --------------------------------------------------------------------------- the map


def fit_linear_map(model: nn.Module, calibration: torch.Tensor, start: int, end: int, damp: float, *,
                   batch_size: int = 0, device: Optional[str] = None, offload: bool = False,
                   states: str = "auto") -> dict[str, Any]:
    """The map ``T`` (float64, ``hidden x hidden``, on the CPU) that best sends the MLP output ``m`` of layer
    ``start - 1`` to what layers ``[start, end)`` add to the stream after it, ``y - h`` (module docstring), from one
    streamed pass up to layer ``end - 1``. Returns ``{"map": T, "fit": {...}}`` with the fit's relative residual on
    the calibration tokens (``||m T - Y||^2 / ||m - Y||^2``: 1 is no better than removing the block plainly)."""
    # local: imports torch, and config validation imports this module
    import torch

    from pruning.streaming import LayerStream, layer_pieces

    if start < 1:
        raise PruneError("depth: a linear map needs a layer before the cut to merge into (start >= 1)")
    stream = LayerStream(model, calibration, batch_size=batch_size, device=device, offload=offload, states=states,
                         copies=3)
    d = int(model.config.hidden_size)
    xtx = torch.zeros(d, d, dtype=torch.float64, device=stream.device)
    xty = torch.zeros_like(xtx)
    yty = torch.zeros((), dtype=torch.float64, device=stream.device)
    mlp_out, residual = stream.new_states(), stream.new_states()
    was_training = model.training
    model.eval()
    try:
        for i, layer in stream:
            if i == start - 1:
                def step(x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
                    h, m = layer_pieces(layer, x, kw)
                    mlp_out.append(m.detach())
                    residual.append(h.detach())
                    return h + m
                stream.update(step)
            else:
                stream.advance()
            if i == end - 1:
                break
        for j, y in enumerate(stream.hidden):  # y: the hidden states leaving the block
            m64 = mlp_out.load(j).reshape(-1, d).double()
            y64 = y.reshape(-1, d).double() - residual.load(j).reshape(-1, d).double()
            xtx.add_(m64.T @ m64)
            xty.add_(m64.T @ y64)
            yty.add_((y64 * y64).sum())
    finally:
        model.train(was_training)
        mlp_out.clear()
        residual.clear()
        stream.close()
    return _solve(xtx, xty, yty, damp)


def _solve(xtx: torch.Tensor, xty: torch.Tensor, yty: torch.Tensor, damp: float) -> dict[str, Any]:
    """``T = (X^T X + lam I)^-1 X^T Y`` (``lam = damp x`` the mean diagonal; ``damp=0``: the pseudo-inverse) and its
    relative residual. ``xtx`` is consumed (its diagonal raised in place, then freed): with ``damp > 0`` the peak is
    four ``hidden x hidden`` float64 matrices (the sums, the solver's factor and ``T``), as the footprint counts."""
    import torch

    d = xtx.shape[0]
    # ||X T - Y||^2 = ||Y||^2 - 2 <T, X^T Y> + <T, X^T X T>. The identity (plain removal of the block's update):
    # ||Y||^2 - 2 tr(X^T Y) + tr(X^T X), read before xtx changes. For the fit, X^T X T = X^T Y - lam T (damped), or
    # X^T Y itself (the pseudo-inverse: X^T Y lies in the range of X^T X), so no d x d product is formed.
    plain = float(yty - 2 * torch.diagonal(xty).sum() + torch.diagonal(xtx).sum())
    if damp > 0:
        lam = damp * float(torch.diagonal(xtx).mean())
        torch.diagonal(xtx).add_(lam)
        t = torch.linalg.solve(xtx, xty)
        del xtx
        fitted = float(yty - torch.dot(t.reshape(-1), xty.reshape(-1)) - lam * torch.dot(t.reshape(-1), t.reshape(-1)))
    else:
        t = torch.linalg.pinv(xtx, hermitian=True) @ xty
        del xtx
        fitted = float(yty - torch.dot(t.reshape(-1), xty.reshape(-1)))
    torch.diagonal(t).sub_(1.0)  # T - I, in place: no identity matrix is built
    off = float(torch.linalg.matrix_norm(t) / math.sqrt(d))
    torch.diagonal(t).add_(1.0)
    return {"map": t.cpu(), "fit": {"residual": max(fitted, 0.0) / plain if plain > 0 else 0.0,
                                    "map_minus_identity": off}}


# --------------------------------------------------------------------------- surgery


def merge_map(layer: nn.Module, t: torch.Tensor) -> None:
    """Merge the row-vector map ``m -> m T`` into ``layer``'s MLP output: ``W_down <- T^T W_down`` (and
    ``b <- T^T b``), computed in float64 and stored in the weight's dtype. No parameter is added."""
    # local: imports torch, and config validation imports this module
    import torch

    down = layer.mlp.down_proj
    w = down.weight
    tt = t.to(device=w.device, dtype=torch.float64).T
    d, cols = w.shape
    step = max(1, MERGE_BLOCK_BYTES // (d * 8))  # column blocks: two float64 d x step blocks at a time, not the matrix
    with torch.no_grad():
        for j in range(0, cols, step):
            w[:, j:j + step] = (tt @ w[:, j:j + step].double()).to(w.dtype)
        if down.bias is not None:
            down.bias.copy_((tt @ down.bias.double()).to(down.bias.dtype))
