"""Layer ranges and ratio targets, resolved against a model's geometry before anything is pruned."""

from __future__ import annotations

from typing import Optional

from pruning.llm_pruner import Geometry, PruneError, PruneSpec, plan_counts, planned_params_removed


def resolve_range(start: Optional[int], end: Optional[int], depth: int, name: str, ratio: float) -> tuple[int, int]:
    """``[start, end)`` with negative values counted from the end (LLM-Pruner's block_*_layer_start/end)."""
    s = 0 if start is None else start
    e = depth if end is None else end
    s_abs = s + depth if s < 0 else s
    e_abs = e + depth if e < 0 else e
    if not (0 <= s_abs <= depth) or not (0 <= e_abs <= depth):
        raise PruneError(f"layers.{name}: [{s}, {e}) is beyond the model's depth of {depth} layers "
                         f"(valid: -{depth}..{depth}, end exclusive)")
    if e_abs < s_abs:
        raise PruneError(f"layers.{name}: start {s} (layer {s_abs}) is after end {e} (layer {e_abs}); "
                         "start is inclusive, end exclusive")
    if e_abs == s_abs and ratio > 0:
        raise PruneError(f"layers.{name}: [{s}, {e}) is empty but its ratio is {ratio}; to skip {name} pruning "
                         f"set pruner.{name}_ratio=0")
    return s_abs, e_abs


def solve_params_ratio(geo: Geometry, spec: PruneSpec, target: float, total_params: int,
                       fixed_attention: bool, fixed_mlp: bool, tol: float = 0.01) -> PruneSpec:
    """Find the group ratio that removes ``target`` of all parameters (``ratio_target=params``).

    Ratios not fixed by ``pruner.attention_ratio``/``mlp_ratio`` move together. The removed count is a
    step function of the ratio (whole heads, multiples of round_to), so we scan the achievable steps and
    take the closest; if it misses the target by more than ``tol`` of all parameters, that is an error.
    """
    import dataclasses

    def removed(r: float) -> int:
        s = dataclasses.replace(spec, attention_ratio=spec.attention_ratio if fixed_attention else r,
                                mlp_ratio=spec.mlp_ratio if fixed_mlp else r)
        h, c, _ = plan_counts(geo, s)
        return planned_params_removed(geo, h, c)

    goal = target * total_params
    lo, hi = 0.0, 0.999999
    for _ in range(60):  # removed() is monotone in r: bisect for the first r reaching the goal
        mid = (lo + hi) / 2
        if removed(mid) >= goal:
            hi = mid
        else:
            lo = mid
    best = min((lo, hi), key=lambda r: abs(removed(r) - goal))
    got = removed(best) / total_params
    if abs(got - target) > tol:
        raise PruneError(
            f"ratio_target=params: {target:.3f} of all parameters cannot be removed with this head layout and "
            f"these ranges (closest achievable: {removed(lo) / total_params:.4f} or {removed(hi) / total_params:.4f}); "
            "widen the layer ranges, set pruner.round_to lower, or pick a reachable ratio")
    return dataclasses.replace(spec, attention_ratio=spec.attention_ratio if fixed_attention else best,
                               mlp_ratio=spec.mlp_ratio if fixed_mlp else best)
