"""Option checks the pruners share, run while a pruner's dataclass is built (config validation): no torch here."""

from __future__ import annotations

from typing import Any, Optional


def as_range(r: Any) -> tuple[Optional[int], Optional[int]]:
    """``(start, end)`` from a pair or a ``{start, end}`` mapping (conf/layers/*.yaml)."""
    if isinstance(r, dict):
        return r.get("start"), r.get("end")
    start, end = r
    return start, end


def range_order_errors(**ranges: tuple[Optional[int], Optional[int]]) -> list[str]:
    """``layers.<part>`` ranges whose start comes after their end (same sign: decidable without the depth)."""
    return [f"layers.{part}: start={start} is after end={end} (start inclusive, end exclusive)"
            for part, (start, end) in ranges.items()
            if start is not None and end is not None and (start >= 0) == (end >= 0) and end < start]


def stream_option_errors(batch_size: Any, offload: Any, device: Any) -> list[str]:
    """The options of a layer-streamed method (``pruning.streaming.LayerStream``)."""
    errors = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        errors.append(f"pruner.batch_size={batch_size!r} must be an integer >= 0 (0 = all samples at once)")
    if not isinstance(offload, bool):
        errors.append(f"pruner.offload={offload!r} must be true or false")
    if device is not None and not isinstance(device, str):
        errors.append(f"pruner.device={device!r} must be a device name (cpu, cuda, cuda:1) or null")
    if offload is True and not device:
        errors.append("pruner.offload=true needs pruner.device (where each layer runs, e.g. cuda)")
    return errors
