"""Magnitude pruning: zero (or remove) the weights with the smallest ``|W|``; no calibration text.

    python run.py pruner=magnitude ratio=0.5                          # 50% of each linear's weights zeroed
    python run.py pruner=magnitude ratio=0.5 pruner.scope=global      # one threshold over all targeted linears
    python run.py pruner=magnitude pruner.pattern=2:4                 # 2 of every 4 consecutive weights of a row
    python run.py pruner=magnitude pruner.pattern=structured ratio=0.34   # whole KV groups and MLP channels

The baseline of Wanda (Sun et al. 2023; github.com/locuslab/wanda, ``lib/prune.py: prune_magnitude``): score
``|W|``, one threshold per linear (``scope=layer``, the original's), N:M within runs of M input columns. Counts
are exact here (``floor(ratio * n)`` per linear, ties broken by position; the original's ``<= threshold`` takes
one more and all ties). ``scope=row`` compares within each output row, ``scope=global`` across every targeted
linear (an exact k-th smallest over all of them, :func:`pruning.sparsity.global_threshold`), so layers with
smaller weights lose more.

``pattern=structured`` removes whole units, GQA-consistently (``pruning.surgery``): a KV group (1 KV head + the
query heads sharing it) scored by the norm (``norm=l2``: sqrt of the sum of squares; ``l1``: sum of ``|W|``) of
all its coupled weights (q, k, v rows + o columns), an MLP channel by that of its gate and up rows and down
column. (FLAP's ``prune_magnitude_sp`` scores o_proj / down_proj columns only; LLM-Pruner's ``l2`` ranks the
same coupled weights by their summed squares, the same order as ``norm=l2`` here.) ``ratio`` is then the share of
KV groups / channels removed in each layer of the ranges, rounded to whole units.

Cost: one pass over the targeted weights, one linear at a time (its float32 ``|W|`` and boolean mask are the
only extra memory); ``scope=global`` adds two counting passes. Zeros stay in dense shapes (see the record's note).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params
from pruning import PruneResult
from pruning.options import as_range
from pruning.sparsity import (TARGETS, Plan, apply_mask, check_nm_widths, count_of, count_zeros, global_threshold,
                              linear, mask_record, nm_mask, option_errors, parse_pattern,
                              plan_structured, remove_lowest, structured_record, threshold_mask, unstructured_mask)

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

SCOPES = ("layer", "row", "global")
NORMS = ("l1", "l2")


@dataclass(frozen=True)
class Magnitude:
    """Zero the smallest ``|W|`` of the targeted linears (unstructured, N:M), or remove the KV groups and MLP
    channels of smallest weight norm (structured), inside the layer ranges.

    ``ratio`` is read as :attr:`RATIO` says: ``sparsity`` for unstructured and N:M patterns, ``groups`` for
    ``pattern=structured``. Ranges are ``(start, end)`` or ``{start, end}``, end exclusive, negative counting
    from the last layer, ``None`` = the end.
    """

    RATIO: ClassVar[dict[str, str]] = {
        "sparsity": "share of each targeted linear's weights zeroed (scope=row: of each output row's; scope=global: "
                    "of all targeted linears together); N:M: the pattern fixes it at N/M, and 0 skips a block type",
        "groups": "pattern=structured (the default unit there): share of the KV groups / MLP channels removed in "
                  "each layer of the ranges, rounded to whole units",
    }

    ratio: float = 0.5
    name: str = "magnitude"
    pattern: Any = "unstructured"  # unstructured | N:M (2:4, 4:8, ...) | structured
    scope: str = "layer"  # layer | row | global: where an unstructured threshold is drawn
    targets: Any = TARGETS  # linears pruned (unstructured, N:M): q k v o gate up down
    attention_ratio: Optional[float] = None  # None = ratio
    mlp_ratio: Optional[float] = None  # None = ratio
    attention_layers: Any = (0, None)
    mlp_layers: Any = (0, None)
    norm: str = "l2"  # structured: l1 | l2 over a unit's coupled weights
    rounding: str = "floor"  # structured: floor | nearest to whole KV groups / channels
    ratio_target: Optional[str] = None  # sparsity | groups (RATIO); None = the one `pattern` implies
    seed: int = 0  # recorded only: every choice is deterministic (ties go by position)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        errors = option_errors(self, SCOPES)
        if self.norm not in NORMS:
            errors.append(f"pruner.norm={self.norm!r} is not one of {', '.join(NORMS)}")
        elif self.norm != "l2" and self.ratio_target == "sparsity":  # resolved: the pattern is not structured
            errors.append(f"pruner.norm={self.norm} applies to pattern=structured only (unstructured and N:M "
                          "patterns score each weight by |W|)")
        if errors:
            raise ConfigError("; ".join(errors))
        object.__setattr__(self, "pattern", str(parse_pattern(self.pattern)))

    @property
    def needs_calibration(self) -> bool:
        return False

    def check(self, depth: int) -> None:
        Plan.of(self, depth)

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: int = 128,
                  free: Any = None) -> Any:
        """Peak memory of this prune on a model of ``config.json`` ``cfg`` (torch-free; core/run/plan.py): the
        weights where the model is, one linear's float32 ``|W|`` and boolean mask (unstructured, N:M; a
        half-precision ``|W|`` first), or one layer's surgery (structured). No calibration, no forward."""
        from core.run.plan import Placement, accelerator, dtype_bytes, geometry, model_bytes
        from pruning.memory import largest_linear, layer_weight_params, weight_level_summary

        geo = geometry(cfg)
        plan = Plan.of(self, geo.depth)
        b = dtype_bytes(dtype, cfg)
        p = Placement({"weights": model_bytes(cfg, dtype)}, {}, accelerator(device), device)
        if plan.pattern.kind == "structured":
            p.add(**{"one layer's surgery (new weights)": max(layer_weight_params(geo, l) for l in range(geo.depth)) * b})
        else:
            p.add(**{"one linear's |W| score and mask": largest_linear(geo) * (4 + 1 + (b if b < 4 else 0))})
        removes, widths = weight_level_summary(plan, geo, self.rounding)
        return p.footprint(removes=removes, widths=widths)

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor] = None) -> PruneResult:
        # local: imports torch, and config validation imports this module
        from pruning.streaming import check_llama_layout

        check_llama_layout(model, f"pruner={self.name}")
        plan = Plan.of(self, len(model.model.layers))
        log.info("pruning %s (%s%s) attention layers [%d, %d) ratio %.3f, mlp layers [%d, %d) ratio %.3f",
                 self.name, plan.pattern, f", scope {self.scope}" if plan.pattern.kind == "unstructured" else "",
                 *plan.attention_layers, plan.attention_ratio, *plan.mlp_layers, plan.mlp_ratio)
        params_before = count_params(model)
        if plan.pattern.kind == "structured":
            return self._structured(model, plan, params_before)
        check_nm_widths(model, plan)
        return self._masks(model, plan, params_before)

    def _masks(self, model: nn.Module, plan: Plan, params_before: int) -> PruneResult:
        t0 = time.perf_counter()
        items = [(l, name, linear(layer, name)) for l, layer in enumerate(model.model.layers) for name in plan.names(l)]
        th = None
        if self.scope == "global" and plan.pattern.kind == "unstructured" and items:
            k = count_of(sum(lin.weight.numel() for _, _, lin in items), plan.sparsity(items[0][1]))
            th = global_threshold(lambda: (lin.weight.detach().abs().float() for _, _, lin in items), k)
        t1 = time.perf_counter()
        stats = []
        for l, name, lin in items:
            w = lin.weight.detach()
            zeros_before = count_zeros(w)
            score = w.abs().float()
            if th is not None:
                mask = threshold_mask(score, th)
            elif plan.pattern.kind == "nm":
                mask = nm_mask(score, plan.pattern.n, plan.pattern.m)
            else:
                mask = unstructured_mask(score, plan.sparsity(name), per_row=self.scope == "row")
            del score
            apply_mask(lin, mask)
            stats.append({"layer": l, "name": name, "weights": w.numel(), "zeros_before": zeros_before,
                          "zeros_after": count_zeros(lin.weight)})
        t2 = time.perf_counter()
        compression, layers, details, notes = mask_record(model, plan, stats, params_before)
        if th is not None:
            notes.append("scope=global: one |W| threshold across all targeted linears, so each linear's own "
                         "sparsity differs (see layers)")
        return PruneResult(params_before=params_before, params_after=params_before,  # dense shapes kept
                           compression=compression, ranges=plan.ranges, layers=layers, notes=notes,
                           details={**details, "score": "|W|", "scope": self.scope, "seed": self.seed},
                           timings={"threshold_s": t1 - t0, "mask_s": t2 - t1})

    def _structured(self, model: nn.Module, plan: Plan, params_before: int) -> PruneResult:
        t0 = time.perf_counter()
        geo0 = Geometry.of(model)
        heads, chans = plan_structured(model, plan, self.rounding)
        removed = {}
        for l, layer in enumerate(model.model.layers):
            g, c = heads.get(l, 0), chans.get(l, 0)
            if g or c:
                removed[l] = remove_lowest(layer, group_norms(layer, geo0.head_dim, self.norm) if g else None,
                                           channel_norms(layer, self.norm) if c else None, g, c, geo0.head_dim)
        params_after, compression, layers, details = structured_record(model, geo0, removed, params_before, plan,
                                                                       self.ratio)
        return PruneResult(params_before=params_before, params_after=params_after, compression=compression,
                           ranges=plan.ranges, layers=layers,
                           details={**details, "score": f"{self.norm} norm of the coupled weights",
                                    "rounding": self.rounding, "seed": self.seed},
                           timings={"prune_s": time.perf_counter() - t0})


def _power_sum(w: torch.Tensor, dim: int, norm: str) -> torch.Tensor:
    """Sum over ``dim`` of ``|w|`` (l1) or ``w^2`` (l2), float32."""
    w = w.detach().float()
    return (w.abs() if norm == "l1" else w * w).sum(dim)


def group_norms(layer: nn.Module, head_dim: int, norm: str) -> torch.Tensor:
    """Per KV group ``[kv_heads]``: the norm of its q, k, v rows and o columns together (rows of a group are
    contiguous: query heads ``g * n_rep .. (g + 1) * n_rep - 1`` share KV head ``g``)."""
    a = layer.self_attn
    kv = a.k_proj.out_features // head_dim
    total = (_power_sum(a.q_proj.weight, 1, norm).view(kv, -1).sum(1)
             + _power_sum(a.k_proj.weight, 1, norm).view(kv, -1).sum(1)
             + _power_sum(a.v_proj.weight, 1, norm).view(kv, -1).sum(1)
             + _power_sum(a.o_proj.weight, 0, norm).view(kv, -1).sum(1))
    return total.sqrt() if norm == "l2" else total


def channel_norms(layer: nn.Module, norm: str) -> torch.Tensor:
    """Per MLP channel ``[width]``: the norm of its gate and up rows and its down column together."""
    m = layer.mlp
    total = _power_sum(m.gate_proj.weight, 1, norm) + _power_sum(m.up_proj.weight, 1, norm) \
        + _power_sum(m.down_proj.weight, 0, norm)
    return total.sqrt() if norm == "l2" else total
