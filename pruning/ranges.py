"""Layer ranges ``[start, end)`` resolved against a model's depth before anything is pruned (or loaded)."""

from __future__ import annotations

from typing import Optional

from pruning import PruneError


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
