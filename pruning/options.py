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


STATES = ("auto", "device", "host", "disk")  # where a layer stream keeps its hidden states (pruning/streaming.py)
STATES_SHARE = 0.5  # states=auto: the share of the free memory (device, then host) the carried states may take


def choose_states(states: str, need: int, accelerator: bool, device_free: Optional[int],
                  host_free: Optional[int]) -> str:
    """Where ``need`` bytes of carried hidden states go (``pruning.streaming.LayerStream``; torch-free, so the
    planner decides as the run will): ``states`` itself unless ``auto``, which takes ``device`` when they fit
    :data:`STATES_SHARE` of ``device_free`` (on a CPU run, the device is the host: ``host_free``), else ``host``
    when they fit that share of ``host_free``, else ``disk``. A free size that is not known (None) counts as
    enough."""
    if states not in STATES:
        raise ValueError(f"states={states!r} is not one of {', '.join(STATES)}")
    if states != "auto":
        return states

    def fits(free: Optional[int]) -> bool:
        return free is None or need <= STATES_SHARE * free

    if accelerator:
        if fits(device_free):
            return "device"
        return "host" if fits(host_free) else "disk"
    return "device" if fits(host_free) else "disk"


def stream_option_errors(batch_size: Any, offload: Any, device: Any, states: Any = "auto") -> list[str]:
    """The options of a layer-streamed method (``pruning.streaming.LayerStream``): ``states`` is where the carried
    hidden states live (docs/scale.md)."""
    errors = []
    if states not in STATES:
        errors.append(f"pruner.states={states!r} is not one of {', '.join(STATES)} (where the calibration hidden "
                      "states live: auto = the device if they fit, else host memory, else disk)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        errors.append(f"pruner.batch_size={batch_size!r} must be an integer >= 0 (0 = all samples at once)")
    if not isinstance(offload, bool):
        errors.append(f"pruner.offload={offload!r} must be true or false")
    if device is not None and not isinstance(device, str):
        errors.append(f"pruner.device={device!r} must be a device name (cpu, cuda, cuda:1) or null")
    if offload is True and not device:
        errors.append("pruner.offload=true needs pruner.device (where each layer runs, e.g. cuda)")
    return errors


def resolve_ratio_target(p: Any, refused: Optional[dict[str, str]] = None) -> list[str]:
    """Fix ``p.ratio_target`` (a pruner dataclass being built) to the unit its ``ratio`` is read in.

    ``type(p).RATIO`` lists the units the class knows, ``{unit: what ratio then means}``; ``refused`` maps the
    ones these options rule out to why. None (the top-level ``ratio_target: null``) becomes the first unit not
    refused; a unit the class does not know, or one that is refused, is an error (one line each).
    """
    units, refused = type(p).RATIO, refused or {}
    asked = p.ratio_target
    if asked is None:
        object.__setattr__(p, "ratio_target", next(u for u in units if u not in refused))
        return []
    if asked not in units:
        return [f"ratio_target={asked!r} is not supported by pruner={p.name}: its `ratio` is read as "
                f"{' or '.join(units)} (docs/options.md); leave ratio_target unset (null) for its default"]
    if asked in refused:
        return [f"ratio_target={asked} cannot be honoured by pruner={p.name} here: {refused[asked]}"]
    return []


def ratio_table(options: dict[str, type]) -> str:
    """Markdown table of what ``ratio`` means: one row per pruner class and ``ratio_target`` unit, from the classes'
    ``RATIO`` declarations; ``options`` maps ``pruner=`` option names to their ``_target_`` class."""
    by_class: dict[type, list[str]] = {}
    for name, cls in options.items():
        by_class.setdefault(cls, []).append(name)
    lines = ["| `pruner=` | class | `ratio_target` | `ratio` means |", "|---|---|---|---|"]
    for cls, names in by_class.items():
        for i, (unit, meaning) in enumerate(cls.RATIO.items()):
            first = i == 0
            lines.append(f"| {', '.join(f'`{n}`' for n in names) if first else ''} "
                         f"| {f'`{cls.__module__}.{cls.__qualname__}`' if first else ''} "
                         f"| `{unit}`{' (default)' if first else ''} | {meaning.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"
