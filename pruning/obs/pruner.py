"""The compensated structured pruner (``pruner=obs``): its options and their checks, the budget, and the run.

    python run.py pruner=obs                                    # 25% of all parameters, MLP channels, compensated
    python run.py pruner=obs ratio=0.1184 pruner.allocation=depth
    python run.py pruner=obs pruner.selection=wanda            # Wanda-sp's choice, compensated
    python run.py pruner=obs pruner.compensate=false           # a criterion alone (the table's "no compensation")

What is removed: whole MLP channels (rows of gate/up_proj, a column of down_proj) and, with ``attention_ratio``,
whole KV groups (a KV head with its query heads: rows of q/k/v_proj, columns of o_proj), inside the layer ranges.

How: one layer at a time on the already-pruned prefix, the groups to remove are chosen by ``selection`` (``obs``:
the cost after the optimal update, in ``rounds`` steps; ``wanda``, ``flap``, ``magnitude``: fixed scores), the
kept columns of ``o_proj`` / ``down_proj`` get the damped least-squares update, and a guard keeps the update only
if it lowers the output error on held-out calibration samples (``holdout`` of them, never in the fit) against
plain removal; every projection's decision and both errors are in the record (pruning/obs/fit.py).

Budget (:meth:`StructuredOBS.budget`): ``ratio_target=params`` (default) removes ``ratio`` of ALL parameters:
``attention_ratio`` of the KV groups of each layer in range (floor), the rest as MLP channels (refitted biases
counted as added parameters); ``ratio_target=groups``: ``ratio`` of each layer's channels (and
``attention_ratio``, default ``ratio``, of its KV groups). ``allocation`` spreads the MLP channels over the
layers: ``uniform``, ``depth``, ``flap`` (pruning/obs/allocate.py) or ``search`` (pruning/obs/search.py:
per-layer width levels around uniform, searched by the engine's evolve with KL to the dense model on the last
calibration samples, kept out of every fit, starting from the other three). The total is exact in every case.

Calibration (:meth:`StructuredOBS.calibration_plan`): ``tokens=auto`` (default) sizes it to what is fitted:
``tokens_per_unknown`` (21) tokens per unknown of a row of the widest compensated projection (``down_proj``'s
input, the MLP width; ``o_proj``'s when KV groups are removed), between ``min_tokens`` (8,192) and ``max_tokens``
(262,144), in whole windows of ``seq_len`` (512): 32,256 tokens on SmolLM2, 172,032 on Llama-3.2-1B, the cap on
Llama-3-8B and 70B-class models. ``allocation=search`` adds its ``search_tokens`` on top; an explicit integer is used as given;
the record's ``pruning.calibration.rule`` says which. The recipe draws them from ``data``, disjoint from every
evaluation text; quality still improves with more (``experiment=obs_quality_131k``, ``obs_quality_196k``). Cost:
one forward of each layer in range over them (two with ``target=dense`` once a layer before was pruned), plus per
projection a Gram accumulation and an ``n x n`` inverse, and the edited part of each pruned layer run again;
memory: the model, the carried hidden states (where ``states`` puts them: device, host or disk), one
micro-batch's captured inputs and one projection's sums (:func:`layer_step_bytes`). ``autocast`` (default
``auto``) runs the layer forwards' matrix products in bfloat16 where the device multiplies it natively (CUDA; x86
CPUs with AVX512-BF16 or AMX: 2.5x a float32 forward of SmolLM2 on one core); the residual stream, the captured
inputs, every Gram matrix, fit and guard stay in float32 or float64.
References: SlimGPT (Ling et al. 2024), ZipLM (Kurtic et al. 2023), OBC (Frantar & Alistarh 2022), FLAP.

Imports at the top: ``core`` (errors, Llama anatomy), ``pruning`` (result, error), ``pruning.options``,
``pruning.ranges``; no torch, because config validation binds this class before torch is imported. The modules
that run the prune (pruning/obs/fit.py, allocate.py, search.py, pruning/streaming.py) all import torch, so
:meth:`StructuredOBS.__call__` and :meth:`StructuredOBS.fit_options` import them where they run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from core.models.llama import Geometry, count_params, layer_configs
from core.run.errors import ConfigError
from pruning import PruneError, PruneResult
from pruning.options import as_range, range_order_errors, resolve_ratio_target, stream_option_errors
from pruning.ranges import resolve_range

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pruning.obs.fit import FitOptions

log = logging.getLogger(__name__)

SELECTIONS = ("obs", "wanda", "flap", "magnitude")
ALLOCATIONS = ("uniform", "depth", "flap", "search")
AUTOCAST = (None, "auto", "bfloat16", "float16")
TOKENS_AUTO = "auto"
# footprint(): what the fit of one projection with n inputs and out outputs holds at once (pruning/obs/fit.py
# fit_sums, pruning/compensate.py), with the defaults (target=dense, guard, bias; fewer buffers otherwise), in float64
# (n+1)^2 matrices and float64 (n+1) x out rows at each of its three peaks; the formula takes the largest.
# Alive throughout: the sums (ProjectionSums), 2 matrices (the fit's and the guard's Gram buffers, bias-augmented in
# place) and 3 rows (w_aug, cross, held_cross); from ProjectionFit on, 1 row more: the target fit (w_fit, b_fit).
#   inverse (prune_columns: damped_inverse's damped copy and Cholesky factor, then the factor and the inverse; then
#     each downdate's hinv[:, S] @ m next to the inverse): 4 matrices; 5 rows: the 4 above and prune_columns' working
#     copy wa (7 with groups of several columns, o_proj's KV groups: the selection's wa[:, c] and its solve stay
#     alive through the downdate).
#   selection (obs, the costs of a round): 3 matrices (the Grams, the inverse); 7 rows: the 5, and for one column
#     per group wa[:, alive] and its square (8 with groups: wa[:, c], its solve and their product).
#   guard (ProjectionFit.guard, the inverse gone): 2 matrices; 9 rows: the 5 (wa is the candidate), the plain removal,
#     its bias-augmented copy and two products of HeldOut._from_sums (w @ H and its product with w).
# down_proj (n = 3.5 out) peaks at the inverse; n = out (o_proj) at the guard.
FIT_PEAKS = {"inverse": (4, 5, 7), "selection": (3, 7, 8), "guard": (2, 9, 9)}  # matrices, rows, rows with groups
BLOCK_TOKENS = 4096  # pruning.compensate.BLOCK_TOKENS: tokens per float32 block folded into the sums


def layer_step_bytes(n: int, out: int, micro_tokens: int, dtype_bytes: int, hidden: int, *, grouped: bool = False
                     ) -> dict[str, int]:
    """What the pass (pruning/obs/fit.py ``prune_sequential``) adds, where the layers run, while it prunes one
    projection with ``n`` inputs and ``out`` outputs (``down_proj``: ``n`` = intermediate; ``o_proj``: heads x
    head_dim), on micro-batches of ``micro_tokens`` tokens in a model of ``dtype_bytes`` per value: the
    projection's sums and fit (float64: the largest of :data:`FIT_PEAKS`, ``(n+1)^2`` matrices + ``(n+1) x out``
    rows; ``grouped``: the removed groups have several columns, o_proj's KV groups), one
    micro-batch's captured inputs with the residual and the target it is folded with, and the float32 block being
    folded. None of it grows with the calibration tokens: the carried states (pruning/memory.py ``stream``) do."""
    block = min(int(micro_tokens), BLOCK_TOKENS)
    fit = max(mats * (n + 1) ** 2 + (grows if grouped else rows) * (n + 1) * out
              for mats, rows, grows in FIT_PEAKS.values())
    return {"one projection's sums and fit (float64)": 8 * fit,
            "one micro-batch's captured inputs, residual and target":
                int(micro_tokens) * (n + 2 * hidden) * dtype_bytes,
            "the float32 block being folded": block * (n + out) * 4}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class CalibrationPlan:
    """The calibration text a prune draws: ``tokens`` in windows of ``seq_len``, and how the number was derived."""

    tokens: int
    seq_len: int
    rule: str

    @property
    def samples(self) -> int:
        return self.tokens // self.seq_len

    @property
    def shape(self) -> tuple[int, int]:
        """``(samples, seq_len)``: the calibration batch's shape."""
        return self.samples, self.seq_len

    def record(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "samples": self.samples, "seq_len": self.seq_len, "rule": self.rule}


@dataclass(frozen=True)
class StructuredOBS:
    """Remove KV groups and MLP channels chosen by their cost after compensation; refit the kept weights.

    The defaults are conf/pruner/obs.yaml's (a test keeps them equal); the keys are explained there."""

    RATIO: ClassVar[dict[str, str]] = {
        "params": "share of ALL the model's parameters removed: pruner.attention_ratio of each layer's KV groups, "
                  "the rest as MLP channels spread by pruner.allocation (refitted biases count as added)",
        "groups": "share of each layer's MLP channels removed (and of its KV groups when pruner.attention_ratio is "
                  "null)",
    }

    ratio: float = 0.25
    name: str = "obs"
    ratio_target: Optional[str] = None  # params | groups (RATIO); None = params
    attention_ratio: Optional[float] = 0.0  # share of KV groups per layer; None = ratio (groups target only)
    attention_layers: Any = (0, None)
    mlp_layers: Any = (0, None)
    selection: str = "obs"  # obs | wanda | flap | magnitude
    compensate: bool = True
    bias: bool = True  # refit the output bias too (a constant input in the fit)
    guard: bool = True  # keep an update only if it lowers the held-out error
    holdout: float = 0.1  # share of calibration samples held out for the guard
    rounds: int = 8  # obs selection: removal steps per layer, the inverse downdated between them
    damp: float = 0.1  # relative to the mean diagonal of the Gram matrix (regularises the change: generalises)
    target: str = "dense"  # dense: refit towards the dense model's outputs (+1 forward/layer) | layer: its own
    refit_attention: bool = False  # target=dense: also refit o_proj of every pruned layer towards the dense outputs
    allocation: str = "uniform"  # uniform | depth | flap | search
    search_budget: int = 48  # allocation=search: full-fidelity evaluations (sensitivity probes and 4 starts first)
    search_tokens: int = 8192  # allocation=search: fitness tokens = the last calibration samples, never fitted on
    min_channels: int = 1
    tokens: Any = "auto"  # calibration tokens: auto (the rule, calibration_plan) | an integer | None (data's)
    tokens_per_unknown: float = 21  # tokens=auto: tokens per unknown of a row of the widest compensated projection
    min_tokens: int = 8192  # tokens=auto: the floor
    max_tokens: int = 262144  # tokens=auto: the cap (the fit's part; allocation=search adds its search_tokens)
    seq_len: int = 512
    batch_size: int = 8
    offload: bool = False
    device: Optional[str] = None
    states: str = "auto"  # where the calibration hidden states live: auto | device | host | disk (docs/scale.md)
    autocast: Optional[str] = "auto"  # auto | bfloat16 | float16 | None: the layer forwards' products (not the fits)
    seed: int = 0  # seeds allocation=search; otherwise recorded only (deterministic)
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        errors = resolve_ratio_target(self) if self.ratio_target is None else []  # (other values: checked below)
        for key, allowed in (("selection", SELECTIONS), ("allocation", ALLOCATIONS),
                             ("ratio_target", ("params", "groups")), ("target", ("dense", "layer"))):
            if getattr(self, key) not in allowed:
                errors.append(f"pruner.{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        for key in ("ratio", "attention_ratio"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0):
                errors.append(f"{'ratio' if key == 'ratio' else 'pruner.' + key}={v!r} must be in [0, 1)")
        if self.attention_ratio is None and self.ratio_target == "params":
            errors.append("pruner.attention_ratio=null means `ratio` of the KV groups, which only ratio_target=groups "
                          "defines; give a share (0 = leave attention alone)")
        for key in ("compensate", "bias", "guard", "refit_attention"):
            if not isinstance(getattr(self, key), bool):
                errors.append(f"pruner.{key}={getattr(self, key)!r} must be true or false")
        if not 0.0 <= float(self.holdout) < 0.5:
            errors.append(f"pruner.holdout={self.holdout} must be in [0, 0.5)")
        elif self.guard is True and self.compensate is True and float(self.holdout) == 0:
            errors.append("pruner.guard=true judges each compensation on held-out samples, but pruner.holdout=0 "
                          "holds out none: give a share in (0, 0.5) or set pruner.guard=false")
        if self.refit_attention is True and (self.target != "dense" or self.compensate is False):
            errors.append(f"pruner.refit_attention=true refits o_proj towards the dense model's outputs: it needs "
                          f"pruner.target=dense and pruner.compensate=true (here target={self.target}, "
                          f"compensate={str(self.compensate).lower()})")
        if not float(self.damp) > 0:
            errors.append(f"pruner.damp={self.damp} must be > 0")
        for key, low in (("rounds", 1), ("min_channels", 1), ("seq_len", 8)):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int) or getattr(self, key) < low:
                errors.append(f"pruner.{key}={getattr(self, key)!r} must be an integer >= {low}")
        errors += self._token_rule_errors()
        if isinstance(self.search_budget, bool) or not isinstance(self.search_budget, int) or self.search_budget < 3:
            errors.append(f"pruner.search_budget={self.search_budget!r} must be an integer >= 3 (full-fidelity "
                          "evaluations; the 3 fixed schedules are scored first, then the sensitivity start if it fits)")
        if isinstance(self.search_tokens, bool) or not isinstance(self.search_tokens, int) or self.search_tokens < 1:
            errors.append(f"pruner.search_tokens={self.search_tokens!r} must be a positive integer")
        elif self.allocation == "search" and _is_int(self.tokens) and _is_int(self.seq_len) and self.seq_len > 0:
            samples, fitness = math.ceil(self.tokens / self.seq_len), math.ceil(self.search_tokens / self.seq_len)
            if samples - fitness < 2:
                errors.append(f"pruner.search_tokens={self.search_tokens} leaves fewer than 2 of the {samples} "
                              "calibration samples to fit on: lower it or raise pruner.tokens")
        # the fewest samples the fit gets: the explicit count's, or the rule's floor (tokens=auto: allocation=search's
        # fitness samples come on top of the rule, so its fit never gets fewer)
        fewest, what = ((self.tokens, f"pruner.tokens={self.tokens}") if _is_int(self.tokens) else
                        (self.min_tokens, f"the rule's floor pruner.min_tokens={self.min_tokens}")
                        if self.tokens == TOKENS_AUTO and _is_int(self.min_tokens) else (None, ""))
        one = fewest is not None and _is_int(self.seq_len) and self.seq_len > 0 and math.ceil(fewest / self.seq_len) < 2
        guarded = self.guard is True and self.compensate is True and bool(self.holdout)
        if one and guarded and (self.allocation != "search" or self.tokens == TOKENS_AUTO):
            errors.append(f"pruner.guard=true holds out calibration samples, but {what} in windows of "
                          f"pruner.seq_len={self.seq_len} is one sample, none to spare: raise "
                          f"{'pruner.tokens' if _is_int(self.tokens) else 'pruner.min_tokens'} or set pruner.guard=false")
        elif one and self.allocation == "search" and self.tokens == TOKENS_AUTO:
            errors.append(f"pruner.allocation=search fits on at least 2 calibration samples, but {what} in windows "
                          f"of pruner.seq_len={self.seq_len} is one: raise pruner.min_tokens")
        if self.allocation == "search" and self.offload:
            errors.append("pruner.allocation=search runs whole-model forwards for its fitness: it needs "
                          "pruner.offload=false (the model on its device)")
        if self.autocast not in AUTOCAST:
            errors.append(f"pruner.autocast={self.autocast!r} is not one of null, {', '.join(AUTOCAST[1:])}")
        errors += stream_option_errors(self.batch_size, self.offload, self.device, self.states)
        errors += range_order_errors(attention=self.attention_layers, mlp=self.mlp_layers)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def needs_calibration(self) -> bool:
        return True

    def _token_rule_errors(self) -> list[str]:
        errors = []
        if not (self.tokens is None or self.tokens == TOKENS_AUTO
                or (_is_int(self.tokens) and _is_int(self.seq_len) and self.tokens >= self.seq_len)):
            errors.append(f"pruner.tokens={self.tokens!r} must be auto, null or an integer >= pruner.seq_len")
        k = self.tokens_per_unknown
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k < math.inf:
            errors.append(f"pruner.tokens_per_unknown={k!r} must be a number > 0")
        for key in ("min_tokens", "max_tokens"):
            v = getattr(self, key)
            if not _is_int(v) or v < 1:
                errors.append(f"pruner.{key}={v!r} must be a positive integer")
            elif self.tokens == TOKENS_AUTO and _is_int(self.seq_len) and v < self.seq_len:
                errors.append(f"pruner.{key}={v} must be >= pruner.seq_len={self.seq_len} (one window)")
        if _is_int(self.min_tokens) and _is_int(self.max_tokens) and self.max_tokens < self.min_tokens:
            errors.append(f"pruner.max_tokens={self.max_tokens} is below pruner.min_tokens={self.min_tokens}")
        return errors

    def calibration_record(self, geo: Geometry, shape: tuple[int, int]) -> dict[str, Any]:
        """The record's ``calibration``: the batch this prune was given and how its size was derived."""
        plan = self.calibration_plan(geo)
        samples, seq_len = int(shape[0]), int(shape[1])
        if plan is None:
            rule = f"pruner.tokens=null: the data config's {samples} samples x {seq_len}"
        elif plan.shape == (samples, seq_len):
            rule = plan.rule
        else:
            rule = f"given by the caller ({samples} x {seq_len}); this pruner would draw {plan.tokens}: {plan.rule}"
        return {"tokens": samples * seq_len, "samples": samples, "seq_len": seq_len, "rule": rule}

    def unknowns(self, geo: Geometry) -> tuple[int, str]:
        """``(n, what)``: the unknowns per output row of the widest projection this prune fits, its input width
        (``down_proj``: the MLP width of the widest layer in ``layers.mlp``; ``o_proj``: heads x head_dim, when KV
        groups are removed or ``refit_attention`` refits it). A refitted bias adds one more, not counted."""
        ranges = self.ranges(geo.depth)
        found = [(max((geo.widths[l] for l in range(*ranges["mlp"])), default=0), "down_proj input")]
        att = self.ratio if self.attention_ratio is None else self.attention_ratio
        o_layers = set(range(*ranges["attention"])) if att else set()
        if self.refit_attention:
            o_layers |= set(range(*ranges["mlp"]))
        found.append((max((geo.heads[l] * geo.head_dim for l in o_layers), default=0), "o_proj input"))
        return max(found, key=lambda f: f[0])

    def calibration_plan(self, model: Any) -> Optional[CalibrationPlan]:
        """How many calibration tokens this prune draws for ``model`` (a ``config.json`` dict or a
        :class:`Geometry`; no weights, no torch), and how that number was derived; None for ``tokens=null`` (the
        ``data`` config's ``num_samples x seq_len``).

        ``tokens=auto``: ``clamp(tokens_per_unknown x n, min_tokens, max_tokens)`` with ``n`` the unknowns per row
        of the widest compensated projection (:meth:`unknowns`), rounded up to whole windows of ``seq_len`` (down at
        the cap); ``allocation=search`` adds its ``search_tokens`` (whole windows) on top, as they are kept out of
        every fit. An explicit integer is used as given (the search's fitness tokens then come out of it)."""
        if self.tokens is None:
            return None
        if self.tokens != TOKENS_AUTO:
            samples = math.ceil(self.tokens / self.seq_len)
            return CalibrationPlan(samples * self.seq_len, self.seq_len,
                                   f"pruner.tokens={self.tokens} (explicit), {samples} windows of {self.seq_len}")
        geo = model if isinstance(model, Geometry) else Geometry.from_config(model)
        n, what = self.unknowns(geo)
        raw = math.ceil(self.tokens_per_unknown * n - 1e-9)
        fit = min(max(raw, self.min_tokens), self.max_tokens)
        samples = math.ceil(fit / self.seq_len)
        if samples * self.seq_len > self.max_tokens:
            samples = self.max_tokens // self.seq_len
        rule = (f"{self.tokens_per_unknown:g} x {n} unknowns ({what}) = {raw}, floor {self.min_tokens}, "
                f"cap {self.max_tokens}: {samples} windows of {self.seq_len}")
        if self.allocation == "search":
            extra = math.ceil(self.search_tokens / self.seq_len)
            samples += extra
            rule += f", + {extra} for the search's fitness (search_tokens={self.search_tokens})"
        return CalibrationPlan(samples * self.seq_len, self.seq_len, rule)

    def fit_options(self) -> FitOptions:
        """The options the fit, its pass and the allocation search read (pruning/obs/fit.py)."""
        # local: imports torch, and config validation imports this module
        from pruning.obs.fit import FitOptions

        return FitOptions(selection=self.selection, compensate=self.compensate, bias=self.bias, guard=self.guard,
                          holdout=self.holdout, rounds=self.rounds, damp=self.damp, target=self.target,
                          refit_attention=self.refit_attention, batch_size=self.batch_size, device=self.device,
                          offload=self.offload, autocast=self.autocast, progress=self.progress, states=self.states)

    def ranges(self, depth: int) -> dict[str, tuple[int, int]]:
        att = self.ratio if self.attention_ratio is None else self.attention_ratio
        out = {"attention": resolve_range(*self.attention_layers, depth, "attention", float(att)),
               "mlp": resolve_range(*self.mlp_layers, depth, "mlp", 0.0)}
        if self.ratio > 0 and out["mlp"][0] == out["mlp"][1]:
            raise PruneError(f"layers.mlp: [{self.mlp_layers[0]}, {self.mlp_layers[1]}) is empty: obs removes MLP "
                             f"channels there to reach ratio={self.ratio}; widen layers.mlp")
        return out

    def check(self, depth: int) -> None:
        self.ranges(depth)

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: Optional[int] = None,
                  free: Optional[tuple[Optional[int], Optional[int]]] = None) -> Any:
        """Peak memory and work of this prune on a model of ``config.json`` ``cfg`` (torch-free; core/run/plan.py).

        As pruning/obs/fit.py's ``prune_sequential`` holds them: the layer stream (pruning/memory.py: weights, the
        carried hidden states, one copy, two with ``target=dense`` (the dense model's), where ``states`` puts them,
        one layer's forward on a micro-batch); per pruned projection :func:`layer_step_bytes` where the layers run
        (its sums and fit, one micro-batch's captured inputs), the larger of ``down_proj`` and ``o_proj``. Nothing
        else grows with the tokens: the inputs are folded into the sums micro-batch by micro-batch. Forwards: one
        per layer up to the last pruned one, one more per layer after the first pruned one with ``target=dense``,
        the edited part of each pruned layer again (counted as one forward), plus one pass for
        ``allocation=flap``."""
        from core.models.llama import Geometry
        from core.run.plan import dtype_bytes, model_params, span
        from pruning.memory import layers_up_to, micro_batch, stream, stream_disk_bytes

        geo = Geometry.from_config(cfg)
        seq_len = int(seq_len or self.seq_len)
        ranges = self.ranges(geo.depth)
        att_plan, channels = self.budget(geo, ranges, model_params(cfg))
        b = dtype_bytes(dtype, cfg)
        t = int(tokens)
        dense = self.target == "dense" and self.compensate
        copies = 2 if dense else 1
        mlp_layers = list(range(*ranges["mlp"])) if channels else []
        pruned = sorted(set(att_plan) | set(mlp_layers))
        p = stream(cfg, tokens=t, seq_len=seq_len, batch_size=self.batch_size, dtype=dtype, model_device=device,
                   device=self.device, offload=self.offload, states=self.states, copies=copies,
                   device_free=(free or (None,))[0], host_free=(free or (None, None))[1])
        disk = stream_disk_bytes(cfg, t, dtype, self.states, copies, device=str(self.device or device),
                                 device_free=(free or (None,))[0], host_free=(free or (None, None))[1])
        m = micro_batch(t, seq_len, self.batch_size) * seq_len
        width = max((geo.widths[l] for l in mlp_layers), default=0)
        q = max((geo.heads[l] * geo.head_dim for l in att_plan), default=0)
        stages = []
        if mlp_layers:
            stages.append(layer_step_bytes(width, geo.hidden, m, b, geo.hidden))
        if att_plan:
            stages.append(layer_step_bytes(q, geo.hidden, m, b, geo.hidden, grouped=True))
        if stages:
            p.add(**max(stages, key=lambda terms: sum(terms.values())))
        last = max(pruned, default=-1)
        forwards = layers_up_to(last) + (last - pruned[0] if dense and pruned else 0) + len(pruned)
        notes = []
        if self.allocation == "flap" and channels:
            forwards += ranges["mlp"][1]
        if self.allocation == "search" and channels:
            notes.append(f"allocation=search adds up to {self.search_budget} fitness evaluations (forwards of the "
                         "layers in range on the search's tokens), not counted in the layer forwards")
        per = f", {channels / len(mlp_layers):,.0f} per layer on average" if mlp_layers else ""
        what = (f"ratio={self.ratio} of all {model_params(cfg):,} parameters" if self.ratio_target == "params"
                else f"ratio={self.ratio} of each layer's MLP channels")
        removes = [f"{what}: {sum(att_plan.values())} KV groups in layers {span(ranges['attention'])}, "
                   f"{channels:,} MLP channels in layers {span(ranges['mlp'])} (allocation={self.allocation}{per}); "
                   f"selection={self.selection}" + (", compensated (least squares" + (", guarded)" if self.guard else ")")
                                                    if self.compensate else "")]
        widths = None
        if not channels:
            widths = [{"layer": l, "kv_heads": [geo.kv_heads[l], geo.kv_heads[l] - att_plan.get(l, 0)],
                       "intermediate_size": [geo.widths[l], geo.widths[l]]} for l in range(geo.depth)]
        return p.footprint(layer_forwards=forwards, tokens=t, removes=removes, widths=widths, notes=notes,
                           disk_bytes=disk)

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        # local: imports torch, and config validation imports this module
        from pruning.obs.allocate import allocate_channels, flap_scores
        from pruning.obs.fit import autocast_dtype, held_out_samples, prune_sequential
        from pruning.obs.search import search_allocation
        from pruning.streaming import check_calibration, check_llama_layout, check_stream_device

        check_llama_layout(model, "obs")
        check_calibration(calibration, "obs")
        check_stream_device(model, self.device, self.offload)
        options = self.fit_options()
        held_out_samples(calibration.shape[0], options)  # a guard with nothing to judge by fails here, not later
        geo = Geometry.of(model)
        ranges = self.ranges(geo.depth)
        calibration_record = self.calibration_record(geo, tuple(calibration.shape))
        params_before = count_params(model)
        att_plan, channels = self.budget(geo, ranges, params_before)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        search: dict[str, Any] = {}
        if self.allocation == "search" and channels:
            found = search_allocation(model, calibration, geo, ranges["mlp"], att_plan, channels, options,
                                      budget=self.search_budget, fitness_tokens=self.search_tokens,
                                      min_channels=self.min_channels, seed=self.seed, seconds=timings)
            # the search's fitness samples stay out of the final fit too (pruning/obs/search.py, "Which tokens")
            mlp_plan, calibration, search = found.plan, found.calibration, found.details
        else:
            scores = (flap_scores(model, calibration, ranges["mlp"], batch_size=self.batch_size, device=self.device,
                                  offload=self.offload, states=self.states)
                      if self.allocation == "flap" and channels else None)
            mlp_plan = allocate_channels(geo, ranges["mlp"], channels, self.allocation, self.min_channels, scores)
        timings["allocation_s"] = time.perf_counter() - t0
        log.info("obs (%s selection%s, %s allocation): %d KV groups and %d MLP channels in attention layers "
                 "[%d, %d), mlp layers [%d, %d); %d calibration tokens", self.selection,
                 ", compensated" if self.compensate else "", self.allocation, sum(att_plan.values()), channels,
                 *ranges["attention"], *ranges["mlp"], calibration.numel())
        was_training = model.training
        model.eval()
        try:
            streamed: dict[str, Any] = {}
            per_layer = prune_sequential(model, calibration, att_plan, mlp_plan, options=options, seconds=timings,
                                         stream_info=streamed)
        finally:
            model.train(was_training)
        model.config.layer_configs = layer_configs(model)
        low = autocast_dtype(options, model)
        params_after = count_params(model)
        geo1 = Geometry.of(model)
        kept = [l for l in per_layer if l.get("update") == "kept"]
        rejected = [l for l in per_layer if l.get("update") == "rejected"]
        notes = []
        if rejected:
            notes.append(f"the guard rejected the compensation of {len(rejected)} projection(s) (held-out error "
                         "higher than plain removal): those keep the selected columns uncompensated")
        return PruneResult(
            params_before=params_before, params_after=params_after,
            compression=({"unit": "params", "amount": 1.0 - params_after / params_before}
                         if self.ratio_target == "params" else {"unit": self.ratio_target, "amount": float(self.ratio),
                                                                "params_removed": 1.0 - params_after / params_before}),
            ranges={k: list(v) for k, v in ranges.items()},
            layers=[{"layer": l, "kv_heads": [geo.kv_heads[l], geo1.kv_heads[l]],
                     "intermediate_size": [geo.widths[l], geo1.widths[l]]} for l in range(geo.depth)],
            notes=notes,
            details={"selection": self.selection, "compensate": self.compensate, "bias": self.bias, "target": self.target,
                     "guard": self.guard, "holdout": self.holdout, "rounds": self.rounds, "damp": self.damp,
                     "allocation": self.allocation, "autocast": self.autocast, **streamed,
                     "forward_dtype": str(low or next(model.parameters()).dtype).removeprefix("torch."),
                     "ratio": float(self.ratio), "ratio_target": self.ratio_target,
                     "attention_ratio": self.attention_ratio, "kv_groups_removed": att_plan,
                     "channels_removed": mlp_plan, "calibration_tokens": int(calibration.numel()),
                     "calibration": calibration_record,
                     "updates_kept": len(kept), "updates_rejected": len(rejected), "projections": per_layer,
                     "seed": self.seed, **({"search": search} if search else {})},
            timings=timings)

    def budget(self, geo: Geometry, ranges: dict[str, tuple[int, int]], params: int) -> tuple[dict[int, int], int]:
        """``({layer: KV groups removed}, MLP channels removed in all)`` for this model (see the module docstring)."""
        att = float(self.ratio if self.attention_ratio is None else self.attention_ratio)
        groups = {}
        for l in range(*ranges["attention"]):
            g = min(math.floor(att * geo.kv_heads[l] + 1e-9), geo.kv_heads[l] - 1)
            if g > 0:
                groups[l] = g
        mlp_layers = list(range(*ranges["mlp"]))
        free = sum(max(0, geo.widths[l] - self.min_channels) for l in mlp_layers)
        if self.ratio_target == "groups":
            channels = sum(min(math.floor(self.ratio * geo.widths[l] + 1e-9), geo.widths[l] - self.min_channels)
                           for l in mlp_layers)
            return groups, channels
        removed_att = sum(g * geo.group_params(l) for l, g in groups.items())
        if self.ratio * params - removed_att <= 0:  # the KV groups alone reach the budget (or nothing to remove)
            return groups, 0
        # a refitted bias is new parameters: one hidden-size vector per pruned projection that had none
        refits = len(groups) + len(mlp_layers)
        if self.refit_attention and self.target == "dense":  # o_proj refitted in MLP-only layers too
            refits += len(set(mlp_layers) - set(groups))
        added = geo.hidden * refits if self.bias and self.compensate else 0
        rest = self.ratio * params - removed_att + added
        channels = max(0, math.ceil(rest / geo.channel_params() - 1e-9))  # at least the budget: <= the target size
        if channels > free:
            most = (removed_att + free * geo.channel_params()) / params
            raise PruneError(f"obs: ratio={self.ratio} of all parameters cannot be removed inside layers.mlp "
                             f"{list(ranges['mlp'])} (at most {math.floor(most * 1e4) / 1e4:.4f} while every layer "
                             f"keeps pruner.min_channels={self.min_channels}); widen the range or lower the ratio")
        return groups, channels
