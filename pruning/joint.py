"""Whole layers, KV groups and MLP channels under one parameter budget (``pruner=joint``).

    python run.py pruner=joint ratio=0.5 pruner.num_layers=2                   # 2 layers, then heads + channels
    python run.py pruner=joint ratio=0.5 pruner.num_layers=2 pruner.width.allocation=search
    python run.py -m pruner=joint ratio=0.5 pruner.num_layers=0,1,2,3,4          # the split, swept
    python run.py pruner=joint ratio=0.5 pruner.num_layers=null pruner.layer_ratio=0.13   # a share of the depth

Two stages on the same calibration batch, each the project's own pruner with its own compensation:

1. **Depth** (:class:`pruning.depth.Depth`, options under ``depth``): ``num_layers`` whole layers removed, chosen
   by ``depth.selection`` (default ``search``: the set whose plain removal has the least KL to the dense model) and
   each run of them replaced by a linear map merged into the preceding ``down_proj`` (``depth.compensate=linear``).
   ``num_layers=0`` skips the stage; ``num_layers=null`` with ``layer_ratio`` removes ``ceil(layer_ratio x depth)``
   layers, the same share of any model's depth (a preset for every model).
2. **Width** (:class:`pruning.obs.pruner.StructuredOBS`, options under ``width``): KV groups with their query heads
   (``width.attention_ratio`` per layer) and MLP channels, compensated by OBS on ``o_proj`` / ``down_proj``, until
   ``ratio`` of the ORIGINAL model's parameters are gone: the width stage's own ratio is computed after the depth
   stage, ``(ratio x P0 - (P0 - P1)) / P1`` of the ``P1`` parameters left, so the total is exact to the width
   stage's unit (one MLP channel) as for ``pruner=obs``.

Both stages read the layer ranges ``attention_layers`` / ``mlp_layers``: the depth stage's candidates are the layers
inside both, and the width stage's ranges are the same layers renumbered after the cut. ``ratio_target`` is
``params`` only.

How many layers to remove is the split between the stages. It is a plain option, so a sweep searches it (the line
above; Optuna through Hydra's sweeper, ``optimized_metric`` perplexity); the benchmark's rows are such a scan
(tests/bench/results/quality.jsonl, docs/quality.md).

Imports: ``core`` (errors, Llama anatomy), ``pruning`` (result, error), ``pruning.options``, ``pruning.ranges``,
``pruning.depth`` and ``pruning.obs.pruner`` (the two stages, both torch-free at import).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional

from core.models.llama import count_params
from core.run.errors import ConfigError
from pruning import PruneError, PruneResult
from pruning.depth import Depth
from pruning.obs.pruner import StructuredOBS
from pruning.options import as_range, range_order_errors, resolve_ratio_target
from pruning.ranges import resolve_range

if TYPE_CHECKING:
    import torch
    from torch import nn

# the stages' options where they differ from pruner=depth's and pruner=obs's own defaults; given ones go on top
DEPTH_DEFAULTS = {"selection": "search", "compensate": "linear", "search_budget": 48, "search_tokens": 1024,
                  "rerank": 8}
WIDTH_DEFAULTS = {"attention_ratio": 0.34, "allocation": "uniform"}
# options the joint pruner sets on both stages itself (a stage's own copy would be ignored: refused instead)
_SHARED = ("ratio", "ratio_target", "name", "attention_layers", "mlp_layers", "num_layers", "seed")


@dataclass(frozen=True)
class Joint:
    """``num_layers`` whole layers (the depth stage), then KV groups and MLP channels (the width stage) until
    ``ratio`` of all parameters are removed. ``depth`` / ``width``: the stages' own options
    (conf/pruner/depth.yaml, conf/pruner/obs.yaml keys), on top of :data:`DEPTH_DEFAULTS` / :data:`WIDTH_DEFAULTS`."""

    RATIO: ClassVar[dict[str, str]] = {
        "params": "share of ALL the model's parameters removed: pruner.num_layers whole layers first, then KV groups "
                  "(pruner.width.attention_ratio per layer) and MLP channels for the rest",
    }

    ratio: float = 0.5
    ratio_target: Optional[str] = None  # params (RATIO)
    name: str = "joint"
    num_layers: Optional[int] = 0  # whole layers removed by the depth stage (0: width only; null: layer_ratio)
    layer_ratio: Optional[float] = None  # with num_layers=null: ceil(layer_ratio x depth) whole layers
    attention_layers: Any = (0, None)
    mlp_layers: Any = (0, None)
    seed: int = 0
    depth: Mapping[str, Any] = field(default_factory=lambda: dict(DEPTH_DEFAULTS))  # Depth options over these
    width: Mapping[str, Any] = field(default_factory=lambda: dict(WIDTH_DEFAULTS))  # StructuredOBS options over these

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        object.__setattr__(self, "depth", {**DEPTH_DEFAULTS, **dict(self.depth or {})})
        object.__setattr__(self, "width", {**WIDTH_DEFAULTS, **dict(self.width or {})})
        errors = []
        n, share = self.num_layers, self.layer_ratio
        if n is None:
            if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
                errors.append(f"pruner.num_layers=null needs pruner.layer_ratio in (0, 1) (the share of the layers "
                              f"removed whole), not {share!r}")
        elif isinstance(n, bool) or not isinstance(n, int) or n < 0:
            errors.append(f"pruner.num_layers={n!r} must be a whole number of layers >= 0")
        elif share is not None:
            errors.append(f"pruner.layer_ratio={share} applies with pruner.num_layers=null only (it is {n})")
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) < 1.0:
            errors.append(f"ratio={r!r} must be in (0, 1): the share of all parameters removed")
        for stage in ("depth", "width"):
            shared = sorted(set(getattr(self, stage)) & set(_SHARED))
            if shared:
                errors.append(f"{', '.join(f'pruner.{stage}.{k}' for k in shared)}: set by pruner=joint itself "
                              f"(use pruner.{shared[0]} or the top-level key)")
        devices = {str(d) for d in (self.depth.get("device"), self.width.get("device")) if d is not None}
        if len(devices) > 1:
            errors.append(f"pruner.depth.device={self.depth.get('device')} and pruner.width.device="
                          f"{self.width.get('device')}: the stages run one after the other on one device; give both "
                          "the same")
        errors += range_order_errors(attention=self.attention_layers, mlp=self.mlp_layers)
        errors += resolve_ratio_target(self)
        if errors:
            raise ConfigError("; ".join(errors))
        self._depth_stage(validate=True)  # the stages' own checks: a bad option is one line now, not after the depth stage
        self._width_stage(float(self.ratio), self.attention_layers, self.mlp_layers)

    # ------------------------------------------------------------------ the stages
    def count(self, depth: int) -> int:
        """Whole layers the depth stage removes from a model of ``depth`` layers."""
        if self.num_layers is not None:
            return int(self.num_layers)
        return math.ceil(float(self.layer_ratio) * depth - 1e-9)

    def _depth_stage(self, validate: bool = False) -> Optional[Depth]:
        """The depth stage (None with ``num_layers=0``; ``validate``: built anyway, so that its options are checked
        even when unused)."""
        if self.num_layers == 0 and not validate:
            return None
        n = None if self.num_layers is None else max(1, self.num_layers)
        try:
            return Depth(**{**self.depth, "num_layers": n, "ratio": float(self.layer_ratio or 0.25),
                            "attention_layers": self.attention_layers, "mlp_layers": self.mlp_layers,
                            "seed": self.seed})
        except (TypeError, ConfigError) as e:  # an unknown key, or the stage's own check: one line, named
            raise ConfigError(f"pruner.depth: {e}") from None

    def _width_stage(self, ratio: float, attention_layers: Any, mlp_layers: Any) -> StructuredOBS:
        try:
            return StructuredOBS(**{**self.width, "ratio": ratio, "ratio_target": "params",
                                    "attention_layers": attention_layers, "mlp_layers": mlp_layers,
                                    "seed": self.seed})
        except (TypeError, ConfigError) as e:  # an unknown key, or the stage's own check: one line, named
            raise ConfigError(f"pruner.width: {e}") from None

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def device(self) -> Optional[str]:
        """Where the stages run their layers (``pruner.depth.device`` / ``pruner.width.device``, one device): the
        planner counts it among the run's devices, as a streaming pruner's ``device``."""
        return next((str(d) for d in (self.width.get("device"), self.depth.get("device")) if d is not None), None)

    def check(self, depth: int) -> None:
        stage = self._depth_stage()
        if stage is not None:
            stage.check(depth)
        self._width_stage(float(self.ratio), *self._renumbered_ranges(depth, self._guess_gone(depth))).check(
            depth - self.count(depth))

    def calibration_plan(self, model: Any) -> Any:
        """The width stage's (``pruner.width.tokens``: the token rule by default): the larger of the two needs;
        the depth stage's search takes its fitness samples from the end of the same batch."""
        return self._width_stage(float(self.ratio), self.attention_layers, self.mlp_layers).calibration_plan(model)

    # ------------------------------------------------------------------ budget and plan
    def width_ratio(self, params_before: int, params_after_depth: int, layers: int) -> float:
        """The width stage's share of the parameters left after the depth stage that brings the total to
        ``ratio`` of ``params_before``."""
        left = float(self.ratio) * params_before - (params_before - params_after_depth)
        if left <= 0:
            raise PruneError(f"joint: {layers} whole layers already remove "
                             f"{1 - params_after_depth / params_before:.2%} of the parameters, at least ratio="
                             f"{self.ratio}: remove fewer layers (pruner.num_layers) or use pruner=depth")
        return left / params_after_depth

    def _cut_config(self, cfg: dict) -> tuple[dict, int, int]:
        """``(config after the depth stage, P0, P1)`` from config.json alone (no weights): ``num_layers`` of the
        depth stage's candidate layers (the most common layer size) taken out of the parameter count."""
        from core.models.llama import Geometry
        from core.run.plan import model_params
        from pruning.memory import layer_weight_params

        p0 = model_params(cfg)
        geo = Geometry.from_config(cfg)
        n = self.count(geo.depth)
        if n == 0:
            return cfg, p0, p0
        units = self._depth_stage().candidates(geo.depth)
        per_layer = sorted(layer_weight_params(geo, l) + 2 * geo.hidden for l in units)
        p1 = p0 - sum(per_layer[:n])  # the smallest candidates: the most the width stage can need
        return {**cfg, "num_hidden_layers": geo.depth - n}, p0, p1

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: Optional[int] = None,
                  free: Optional[tuple[Optional[int], Optional[int]]] = None) -> Any:
        """The larger peak of the two stages (they run one after the other); their work added."""
        depth = int(cfg["num_hidden_layers"])
        self.check(depth)
        cut, p0, p1 = self._cut_config(cfg)
        width = self._width_stage(self.width_ratio(p0, p1, self.count(depth)),
                                  *self._renumbered_ranges(depth, self._guess_gone(depth)))
        wf = width.footprint(cut, tokens, dtype, device, seq_len=seq_len, free=free)
        stage = self._depth_stage()
        if stage is None:
            return wf
        df = stage.footprint(cfg, tokens, dtype, device, seq_len=seq_len or width.seq_len, free=free)
        peak = max((df, wf), key=lambda f: (f.device_bytes, f.host_bytes))
        return dataclasses.replace(peak, layer_forwards=df.layer_forwards + wf.layer_forwards,
                                   removes=[*df.removes, *wf.removes], notes=[*df.notes, *wf.notes],
                                   widths=wf.widths)

    def _guess_gone(self, depth: int) -> list[int]:
        """For the plan (no weights): the last ``num_layers`` candidates, which shifts no range start."""
        stage = self._depth_stage()
        n = self.count(depth)
        return [] if stage is None or n == 0 else stage.candidates(depth)[-n:]

    def _renumbered_ranges(self, depth: int, gone: list[int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The configured ranges, resolved on the original model, renumbered after ``gone`` left it."""
        out = []
        for rng, kind in ((self.attention_layers, "attention"), (self.mlp_layers, "mlp")):
            start, end = resolve_range(*rng, depth, kind, 0.0)
            out.append((start - sum(g < start for g in gone), end - sum(g < end for g in gone)))
        return out[0], out[1]

    # ------------------------------------------------------------------ the run
    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        from core.models.llama import decoder_layers

        depth = len(decoder_layers(model))
        self.check(depth)
        p0 = count_params(model)
        stage = self._depth_stage()
        first = stage(model, calibration) if stage is not None else None
        gone = first.details["removed_layers"] if first is not None else []
        p1 = count_params(model)
        ratio = self.width_ratio(p0, p1, len(gone))
        width = self._width_stage(ratio, *self._renumbered_ranges(depth, gone))
        second = width(model, calibration)
        kept = [i for i in range(depth) if i not in set(gone)]
        layers = [{**row, "layer": kept[row["layer"]], "new_index": row["layer"]} if "layer" in row else row
                  for row in second.layers]
        layers += [{"layer": i, "new_index": None, "removed": True} for i in gone]
        layers.sort(key=lambda row: row.get("layer", -1))
        params_after = count_params(model)
        return PruneResult(
            params_before=p0, params_after=params_after,
            compression={"unit": "params", "amount": float(self.ratio), "layers": len(gone),
                         "width_ratio": ratio, "params_removed": 1.0 - params_after / p0},
            ranges={"attention": list(resolve_range(*self.attention_layers, depth, "attention", 0.0)),
                    "mlp": list(resolve_range(*self.mlp_layers, depth, "mlp", 0.0))},
            layers=layers,
            notes=[*(first.notes if first else []), *second.notes,
                   f"depth stage: {len(gone)} layers ({p0 - p1:,} parameters); width stage: {ratio:.4f} of the "
                   f"{p1:,} left ({p1 - params_after:,} parameters)"],
            details={"num_layers": len(gone), "layer_ratio": self.layer_ratio, "removed_layers": gone,
                     "width_ratio": ratio,
                     "params_removed": {"depth": p0 - p1, "width": p1 - params_after},
                     "depth": first.details if first else None, "width": second.details},
            timings={**{f"depth_{k}": v for k, v in (first.timings if first else {}).items()},
                     **{f"width_{k}": v for k, v in second.timings.items()}})
