"""FLAP (An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models"), GQA-correct.

    python run.py pruner=flap ratio=0.2          # metric WIFV, structure AL-AM, bias compensation (the paper's default)

What is removed: whole KV groups (1 KV head + the query heads sharing it: rows of q/k/v_proj, columns of o_proj)
and MLP channels (rows of gate/up_proj, a column of down_proj), inside the layer ranges.

Score of an input channel ``j`` of ``o_proj`` / ``down_proj`` (``W``: ``[out, in]``, ``x``: the dense model's
input to that projection over every calibration token):
    WIFV  Var_t(x_j) * ||W[:, j]||^2        (the fluctuation metric, the paper's default)
    WIFN  mean_i |W[i, j]| * sqrt(mean_t x_j^2)
    IFV   Var_t(x_j)
Attention scores are squared, as the reference code does (``lib/prune.py``: ``metrics[...] ** 2`` for o_proj).
Each layer's scores are then standardised per kind, ``(s - mean) / std`` over that layer's channels, so that
layers and kinds compare on one scale; a KV group's score is the mean of its channels' standardised scores (the
reference's AL-* structures take the mean over a head's 128 channels; with GQA a group is ``n_rep`` heads),
which keeps a group on the scale of one channel while its size enters through its cost below.

Structure (where the budget is decided):
    AL-AM  one global threshold over all groups and channels: the lowest standardised scores are removed until
           the removed parameters come closest to ``ratio`` of the prunable ones, a group counting
           ``Geometry.group_params(layer)`` and a channel ``Geometry.channel_params()``. (The reference
           weights a head as 512/3 = 4 x 128 / 3 channels: head_dim 128 and one KV head per query head
           hard-coded, wrong for GQA and for any other head size.)
    AL-MM  the same per kind: attention and MLP each lose ``ratio`` of their own parameters.
    UL-UM  uniform: every layer loses ``floor(ratio * n)`` of its KV groups and of its channels.
Every layer keeps at least ``min_groups`` KV groups and ``min_channels`` channels (its best-scored ones); a
ratio no allocation can reach under these minimums is a :class:`~pruning.PruneError` naming the maximum,
raised from the geometry alone, before the calibration pass.

Bias compensation: the removed channels' mean contribution over the calibration tokens, ``W[:, removed] @
mean_t x[removed]``, is added as a bias of ``o_proj`` / ``down_proj`` (created where the model has none; the
checkpoint records ``o_proj_bias`` / ``down_proj_bias`` per layer and plain transformers loads it), so each pruned
sub-block's output keeps its dense mean on the calibration tokens.

Cost: one streamed pass (:func:`pruning.stats.collect`, over :class:`pruning.streaming.LayerStream`) through the
layers up to the last one in range, every layer run once on the dense hidden states (FLAP scores the unpruned
model: the dense outputs are carried forward), with per-channel mean and variance of the ``o_proj`` / ``down_proj``
inputs accumulated in float64 (:class:`pruning.stats.Moments`: Chan et al.'s pairwise update, over blocks of
tokens). Memory: the model, the carried hidden states and
one layer's activations; the statistics are a few vectors per layer. No LM head, no gradients. Deviations from
the reference: the variance is the plain sample variance over all calibration tokens (the reference's running
update drops its first sample and aliases the old mean), and ``ratio`` counts this model's true parameters.
Reference: github.com/CASIA-IVA-Lab/FLAP, ``lib/prune.py`` (``prune_flap``, ``compress``), ``lib/layerwrapper.py``.

Imports: ``core`` (errors, Llama anatomy), ``pruning`` (its result and error), ``pruning.options``,
``pruning.ranges``, ``pruning.stats`` (the scores, shared with pruning/obs/); ``pruning.streaming`` and
``pruning.surgery`` inside the functions that need torch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params, decoder_layers, layer_configs
from pruning import PruneError, PruneResult
from pruning.options import as_range, range_order_errors, resolve_ratio_target, stream_option_errors
from pruning.ranges import resolve_range
from pruning.stats import KINDS, collect, standardise

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the functions that use it: binding FLAP's options (config validation) imports none.

log = logging.getLogger(__name__)

_CHOICES = {"metric": ("WIFV", "WIFN", "IFV"), "structure": ("AL-AM", "AL-MM", "UL-UM")}
# footprint(): float64 copies of a projection's [out, in] weight alive at once while its channels are scored
# (pruning/stats.py channel_scores: the copy, and its square (WIFV) or absolute value (WIFN); IFV makes the copy only)
SCORE_COPIES = {"WIFV": 2, "WIFN": 2, "IFV": 1}


@dataclass(frozen=True)
class FLAP:
    """Remove the KV groups and MLP channels whose output fluctuates least; compensate their mean with a bias.

    ``ratio``: the share of the attention + MLP parameters inside the layer ranges that is removed (FLAP's
    ``pruning_ratio``); with ``structure=UL-UM``, of each layer's KV groups and channels (:attr:`RATIO`).
    Ranges are ``(start, end)``, end exclusive, negative counting from the last layer.
    """

    RATIO: ClassVar[dict[str, str]] = {
        "prunable_params": "share of the attention + MLP parameters inside the layer ranges removed (FLAP's "
                           "pruning_ratio; structure=AL-MM: of each block type's own)",
        "groups": "structure=UL-UM (the default unit there): share of the KV groups and of the MLP channels removed "
                  "in every layer of the ranges (floor)",
    }

    ratio: float = 0.2
    ratio_target: Optional[str] = None  # prunable_params | groups (RATIO); None = the one `structure` implies
    name: str = "flap"
    metric: str = "WIFV"  # WIFV | WIFN | IFV
    structure: str = "AL-AM"  # AL-AM | AL-MM | UL-UM
    bias_compensation: bool = True
    attention_layers: Any = (0, None)
    mlp_layers: Any = (0, None)
    min_groups: int = 1  # KV groups kept in every layer at least
    min_channels: int = 1  # MLP channels kept in every layer at least
    batch_size: int = 8  # calibration samples per layer forward; 0 = all
    offload: bool = False  # keep the model on its device, move one layer at a time to `device`
    device: Optional[str] = None  # where layers run (e.g. "cuda"); None = where the model is
    states: str = "auto"  # where the calibration hidden states live: auto | device | host | disk (docs/scale.md)
    seed: int = 0  # recorded only: FLAP is deterministic

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        errors = [f"pruner.{k}={getattr(self, k)!r} is not one of {', '.join(v)}"
                  for k, v in _CHOICES.items() if getattr(self, k) not in v]
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            errors.append(f"ratio={self.ratio!r} must be in [0, 1) (the share of attention+MLP parameters removed)")
        if not isinstance(self.bias_compensation, bool):
            errors.append(f"pruner.bias_compensation={self.bias_compensation!r} must be true or false")
        for key in ("min_groups", "min_channels"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errors.append(f"pruner.{key}={v!r} must be an integer >= 1")
        errors += stream_option_errors(self.batch_size, self.offload, self.device, self.states)
        errors += range_order_errors(attention=self.attention_layers, mlp=self.mlp_layers)
        uniform = self.structure == "UL-UM"
        errors += resolve_ratio_target(self, {"prunable_params": "structure=UL-UM removes the same share of every "
                                              "layer's KV groups and channels (ratio_target=groups)"} if uniform else
                                       {"groups": f"it needs structure=UL-UM; {self.structure} removes a share of the "
                                                  "prunable parameters (ratio_target=prunable_params)"})
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def needs_calibration(self) -> bool:
        return True

    def ranges(self, depth: int) -> dict[str, tuple[int, int]]:
        """Absolute ``[start, end)`` per kind; one empty range is allowed (that kind is left alone)."""
        out = {k: resolve_range(*getattr(self, f"{k}_layers"), depth, k, 0.0) for k in KINDS}
        if self.ratio > 0 and all(a == b for a, b in out.values()):
            raise PruneError(f"flap: layers.attention {list(out['attention'])} and layers.mlp {list(out['mlp'])} "
                             f"are both empty: nothing to prune at ratio={self.ratio}")
        return out

    def check(self, depth: int) -> None:
        self.ranges(depth)

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: int = 128,
                  free: Optional[tuple[Optional[int], Optional[int]]] = None) -> Any:
        """Peak memory and work of this prune on a model of ``config.json`` ``cfg`` (torch-free; core/run/plan.py):
        the layer stream (pruning/memory.py: weights, the carried hidden states (one copy, where ``states`` puts them), one layer's forward on a
        micro-batch; the moments are a few vectors per layer), and the larger of the float64 scoring of one projection
        (:data:`SCORE_COPIES`) and one layer's surgery. One forward of every layer
        up to the last one in range. The budget is checked here (:func:`check_budget`), before any weight loads."""
        from core.run.plan import dtype_bytes, geometry, span
        from pruning.memory import layer_weight_params, layers_up_to, stream

        geo = geometry(cfg)
        ranges = self.ranges(geo.depth)
        check_budget(geo, ranges, float(self.ratio), self.structure, self.min_groups, self.min_channels)
        p = stream(cfg, tokens=tokens, seq_len=seq_len, batch_size=self.batch_size, dtype=dtype, model_device=device,
                   device=self.device, offload=self.offload, states=self.states, device_free=(free or (None,))[0],
                   host_free=(free or (None, None))[1])
        last = max((e - 1 for s, e in ranges.values() if e > s), default=-1) if self.ratio > 0 else -1
        # after a layer's forward, stats.channel_scores copies each watched projection's weight to float64 and
        # squares it (WIFV) or takes its absolute value (WIFN) beside the copy: SCORE_COPIES x [out, in] float64 of
        # the largest o_proj / down_proj in range, on the device the layer runs on, with the hidden states still
        # held; the surgery (one layer's new weights) comes after the pass, so the larger of the two is the peak
        scored = [geo.hidden * geo.heads[l] * geo.head_dim for l in range(*ranges["attention"])] + \
                 [geo.hidden * geo.widths[l] for l in range(*ranges["mlp"])] if last >= 0 else []
        terms = {f"scoring one projection in float64 (x{SCORE_COPIES[self.metric]} its weight)":
                 SCORE_COPIES[self.metric] * 8 * max(scored, default=0),
                 "one layer's surgery (new weights)":
                 max(layer_weight_params(geo, l) for l in range(geo.depth)) * dtype_bytes(dtype, cfg)}
        p.add(**dict([max(terms.items(), key=lambda kv: kv[1])]))
        widths = None
        if self.structure == "UL-UM":
            cut = {k: {l: min(math.floor(float(self.ratio) * unit_costs(geo, k, l)[0] + 1e-9),
                              unit_costs(geo, k, l)[0] - (self.min_groups if k == "attention" else self.min_channels))
                       for l in range(*ranges[k])} for k in KINDS}
            removes = [f"{sum(cut['attention'].values())} KV groups in layers {span(ranges['attention'])}, "
                       f"{sum(cut['mlp'].values()):,} MLP channels in layers {span(ranges['mlp'])} (UL-UM: floor("
                       f"{self.ratio} x each layer's units))"]
            widths = [{"layer": l, "kv_heads": [geo.kv_heads[l], geo.kv_heads[l] - cut["attention"].get(l, 0)],
                       "intermediate_size": [geo.widths[l], geo.widths[l] - cut["mlp"].get(l, 0)]}
                      for l in range(geo.depth)]
        else:
            prunable = prunable_params(geo, ranges)
            removes = [f"{self.ratio} of the {prunable:,} attention + MLP parameters in layers.attention "
                       f"{span(ranges['attention'])} / layers.mlp {span(ranges['mlp'])} ({self.structure}: about "
                       f"{int(self.ratio * prunable):,}); which KV groups and channels, and so the per-layer widths, "
                       f"follow from the {self.metric} scores of the calibration pass"]
        return p.footprint(layer_forwards=layers_up_to(last), tokens=int(tokens), removes=removes, widths=widths)

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        # local: imports torch, and config validation imports this module
        from pruning.streaming import check_calibration, check_llama_layout, check_stream_device

        check_llama_layout(model, "flap")
        check_calibration(calibration, "flap")
        check_stream_device(model, self.device, self.offload)
        geo = Geometry.of(model)
        ranges = self.ranges(geo.depth)
        check_budget(geo, ranges, float(self.ratio), self.structure, self.min_groups, self.min_channels)
        log.info("flap (%s, %s%s): ratio %.3f of attention+MLP parameters in attention layers [%d, %d), mlp "
                 "layers [%d, %d)", self.metric, self.structure, ", bias compensation" if self.bias_compensation
                 else "", self.ratio, *ranges["attention"], *ranges["mlp"])
        params_before = count_params(model)
        timings: dict[str, float] = {}
        was_training = model.training
        model.eval()
        try:
            t0 = time.perf_counter()
            scores, means = (collect(model, calibration, ranges, self.metric, batch_size=self.batch_size,
                                     device=self.device, offload=self.offload, states=self.states,
                                     seconds=timings)
                             if self.ratio > 0 else ({k: {} for k in KINDS}, {k: {} for k in KINDS}))
            timings["calibration_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            z = {"attention": {l: group_scores(standardise(s), geo.kv_heads[l]) for l, s in scores["attention"].items()},
                 "mlp": {l: standardise(s) for l, s in scores["mlp"].items()}}
            drop, notes = allocate(z, geo, ranges, float(self.ratio), self.structure, self.min_groups,
                                   self.min_channels)
            timings["select_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            biased = cut(model, drop, means, geo, self.bias_compensation)
            timings["surgery_s"] = time.perf_counter() - t0
        finally:
            model.train(was_training)
        model.config.layer_configs = layer_configs(model)
        return self._result(model, geo, ranges, drop, biased, notes, params_before, timings)

    def _result(self, model: nn.Module, geo0: Geometry, ranges: dict[str, tuple[int, int]],
                drop: dict[str, dict[int, list[int]]], biased: dict[str, set[int]], notes: list[str],
                params_before: int, timings: dict[str, float]) -> PruneResult:
        geo1 = Geometry.of(model)
        prunable = prunable_params(geo0, ranges)
        removed = removed_params(geo0, drop)
        a0, a1 = ranges["attention"]
        if self.ratio > 0 and a1 > a0 and not drop["attention"]:
            notes.append(f"ratio {self.ratio} x {geo0.kv_heads[a0]} KV groups rounds down to 0: attention is unchanged"
                         if self.structure == "UL-UM" else
                         "no KV group fell below the threshold: attention is unchanged (a group costs "
                         f"{geo0.group_params(a0) / geo0.channel_params():.0f} MLP channels here)")
        for kind, (s, e) in ranges.items():
            if s == e:
                notes.append(f"layers.{kind} is empty: {kind} is not pruned")
        per_layer = [{"layer": l, "heads": [geo0.heads[l], geo1.heads[l]],
                      "kv_heads": [geo0.kv_heads[l], geo1.kv_heads[l]], "intermediate_size": [geo0.widths[l], geo1.widths[l]],
                      "removed_kv_groups": drop["attention"].get(l, []),
                      "o_proj_bias_added": l in biased["attention"], "down_proj_bias_added": l in biased["mlp"]}
                     for l in range(geo0.depth)]
        params_after = count_params(model)
        for note in notes:
            log.warning(note)
        log.info("flap removed %d KV groups and %d MLP channels: %.4f of the prunable parameters (asked %.4f)",
                 sum(map(len, drop["attention"].values())), sum(map(len, drop["mlp"].values())),
                 removed / prunable if prunable else 0.0, self.ratio)
        return PruneResult(
            params_before=params_before, params_after=params_after,
            compression={"unit": self.ratio_target, "amount": float(self.ratio),
                         "params_removed": 1.0 - params_after / params_before},
            ranges={k: list(v) for k, v in ranges.items()}, layers=per_layer, notes=notes,
            details={"metric": self.metric, "structure": self.structure, "bias_compensation": self.bias_compensation,
                     "ratio": float(self.ratio), "prunable_params": prunable, "removed_prunable_params": removed,
                     "in_range_fraction": removed / prunable if prunable else 0.0,
                     "kv_groups_removed": sum(map(len, drop["attention"].values())),
                     "channels_removed": sum(map(len, drop["mlp"].values())),
                     "group_params": {l: geo0.group_params(l) for l in range(a0, a1)},
                     "channel_params": geo0.channel_params(), "min_groups": self.min_groups,
                     "min_channels": self.min_channels, "attention_layers": list(ranges["attention"]),
                     "mlp_layers": list(ranges["mlp"]), "seed": self.seed,
                     "heads_pruned": any(l["kv_heads"][0] != l["kv_heads"][1] for l in per_layer)},
            timings=timings)


# --------------------------------------------------------------------------- budget


def unit_costs(geo: Geometry, kind: str, layer: int) -> tuple[int, int]:
    """``(units, parameters per unit)`` of one layer's attention (KV groups) or MLP (channels)."""
    if kind == "attention":
        return geo.kv_heads[layer], geo.group_params(layer)
    return geo.widths[layer], geo.channel_params()


def prunable_params(geo: Geometry, ranges: dict[str, tuple[int, int]]) -> int:
    """Parameters of the attention and MLP blocks inside the ranges (what ``ratio`` is a share of)."""
    return sum(math.prod(unit_costs(geo, k, l)) for k in KINDS for l in range(*ranges[k]))


def removed_params(geo: Geometry, drop: dict[str, dict[int, list[int]]]) -> int:
    return sum(len(ix) * unit_costs(geo, k, l)[1] for k in KINDS for l, ix in drop[k].items())


def scopes(geo: Geometry, ranges: dict[str, tuple[int, int]], structure: str) -> list[tuple[str, list[tuple[str, int]]]]:
    """The pools that each lose ``ratio`` of their parameters: ``(label, [(kind, layer)])``."""
    units = [(k, l) for k in KINDS for l in range(*ranges[k])]
    if structure == "AL-AM":
        return [("the attention+MLP parameters in the layer ranges", units)] if units else []
    if structure == "AL-MM":
        return [(f"the {k} parameters in layers.{k}", [u for u in units if u[0] == k])
                for k in KINDS if any(u[0] == k for u in units)]
    return [(f"layer {l}'s {k} parameters", [(k, l)]) for k, l in units]  # UL-UM


def check_budget(geo: Geometry, ranges: dict[str, tuple[int, int]], ratio: float, structure: str,
                 min_groups: int, min_channels: int) -> None:
    """PruneError when ``ratio`` of some pool cannot be removed while every layer keeps its minimums."""
    keep = {"attention": min_groups, "mlp": min_channels}
    worst: Optional[tuple[float, str]] = None
    for label, members in scopes(geo, ranges, structure):
        total = sum(math.prod(unit_costs(geo, k, l)) for k, l in members)
        free = sum(max(0, unit_costs(geo, k, l)[0] - keep[k]) * unit_costs(geo, k, l)[1] for k, l in members)
        top = free / total if total else 0.0
        if worst is None or top < worst[0]:
            worst = (top, label)
    if worst is not None and ratio > worst[0] + 1e-12:
        raise PruneError(f"flap: ratio={ratio} cannot be met with structure={structure}: keeping "
                         f"pruner.min_groups={min_groups} KV group(s) and pruner.min_channels={min_channels} "
                         f"channel(s) per layer, at most {math.floor(worst[0] * 1e4) / 1e4:.4f} of {worst[1]} "
                         "can be removed; lower the ratio or the minimums")


# --------------------------------------------------------------------------- selection


def group_scores(z: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A KV group's score: the mean of its channels' standardised scores (its query heads' channels are
    contiguous in o_proj's input, ``n_rep * head_dim`` of them)."""
    return z.view(kv_heads, -1).mean(1)


def allocate(z: dict[str, dict[int, torch.Tensor]], geo: Geometry, ranges: dict[str, tuple[int, int]], ratio: float,
             structure: str, min_groups: int, min_channels: int) -> tuple[dict[str, dict[int, list[int]]], list[str]]:
    """Which KV groups / channels each layer loses, from standardised scores ``z[kind][layer]``.

    In each pool (:func:`scopes`) the best ``min_groups`` / ``min_channels`` of every layer are kept; the others
    are removed in ascending score order, each costing its parameters, and the prefix whose cost comes closest
    to ``ratio`` of the pool's parameters is taken (the reference's ``argmin |cumsum - target|``). UL-UM takes
    ``floor(ratio * n)`` per layer and kind instead, as the reference does.
    """
    # local: imports torch, and config validation imports this module
    import torch

    keep = {"attention": min_groups, "mlp": min_channels}
    drop: dict[str, dict[int, list[int]]] = {k: {} for k in KINDS}
    notes: list[str] = []
    for _label, members in scopes(geo, ranges, structure):
        members = [(k, l) for k, l in members if l in z[k]]
        total = sum(math.prod(unit_costs(geo, k, l)) for k, l in members)
        cand_s, cand_c, cand_id, kept_best = [], [], [], {}
        for k, l in members:
            s = z[k][l]
            protected = torch.topk(s, min(keep[k], s.numel())).indices
            free = torch.ones(s.numel(), dtype=torch.bool)
            free[protected] = False
            idx = free.nonzero().squeeze(1)
            if structure == "UL-UM":
                n = math.floor(ratio * s.numel() + 1e-9)
                lowest = torch.sort(s[idx], stable=True).indices[:n]
                drop[k][l] = sorted(idx[lowest].tolist())
                continue
            kept_best[(k, l)] = s[protected].min().item() if protected.numel() else math.inf
            cand_s.append(s[idx])
            cand_c.append(torch.full((idx.numel(),), float(unit_costs(geo, k, l)[1]), dtype=torch.float64))
            cand_id += [(k, l, i) for i in idx.tolist()]
        if structure == "UL-UM" or not cand_id:
            continue
        order = torch.sort(torch.cat(cand_s).double(), stable=True)
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.cat(cand_c)[order.indices], 0)])
        n = int(torch.argmin((cum - ratio * total).abs()))
        for j in order.indices[:n].tolist():
            k, l, i = cand_id[j]
            drop[k].setdefault(l, []).append(i)
        threshold = order.values[n - 1].item() if n else -math.inf
        for (k, l), best in kept_best.items():
            if best <= threshold:  # the threshold reached units the minimum holds back
                what, key = ("KV group(s)", "min_groups") if k == "attention" else ("MLP channel(s)", "min_channels")
                notes.append(f"layer {l}: the global threshold reached its last {keep[k]} {what}; kept them "
                             f"(pruner.{key}={keep[k]})")
    drop = {k: {l: sorted(ix) for l, ix in sorted(d.items()) if ix} for k, d in drop.items()}
    return drop, notes


# --------------------------------------------------------------------------- surgery


def _removed_mean(lin: nn.Linear, cols: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Mean contribution of input channels ``cols`` to ``lin``'s output, ``W[:, cols] @ mean[cols]`` (float64 ``[out]``)."""
    w = lin.weight.detach()
    return w[:, cols.to(w.device)].double() @ mean[cols].to(w.device)


def _add_bias(lin: nn.Linear, extra: torch.Tensor) -> None:
    """``lin.bias += extra``, creating the bias where ``lin`` has none."""
    # local: imports torch, and config validation imports this module
    from torch import nn

    extra = extra.to(device=lin.weight.device, dtype=lin.weight.dtype)
    if lin.bias is None:
        lin.bias = nn.Parameter(extra, requires_grad=False)
    else:
        lin.bias.data += extra


def cut(model: nn.Module, drop: dict[str, dict[int, list[int]]], means: dict[str, dict[int, torch.Tensor]],
        geo: Geometry, bias_compensation: bool) -> dict[str, set[int]]:
    """Remove the chosen KV groups and channels; with compensation, add ``W[:, removed] @ mean[removed]`` to the
    output projection's bias first. Returns the layers that gained a bias, per kind."""
    # local: imports torch, and config validation imports this module
    import torch

    from pruning.surgery import remove_channels, remove_kv_groups

    layers = decoder_layers(model)
    biased: dict[str, set[int]] = {k: set() for k in KINDS}
    for l, groups in drop["attention"].items():
        o = layers[l].self_attn.o_proj
        width = geo.heads[l] // geo.kv_heads[l] * geo.head_dim  # o_proj input channels of one KV group
        cols = (torch.tensor(groups)[:, None] * width + torch.arange(width)).reshape(-1)
        extra = _removed_mean(o, cols, means["attention"][l]) if bias_compensation else None
        remove_kv_groups(layers[l], torch.tensor(groups), geo.head_dim)
        if extra is not None:
            _add_bias(o, extra)
            biased["attention"].add(l)
    for l, channels in drop["mlp"].items():
        d = layers[l].mlp.down_proj
        cols = torch.tensor(channels)
        extra = _removed_mean(d, cols, means["mlp"][l]) if bias_compensation else None
        remove_channels(layers[l], cols)
        if extra is not None:
            _add_bias(d, extra)
            biased["mlp"].add(l)
    return biased
