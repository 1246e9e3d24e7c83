"""LLM-Pruner (Ma et al. 2023): block-wise structured pruning of Llama models, GQA-correct.

    python run.py pruner=taylor ratio=0.25        # also pruner=l1 | l2 | random (conf/pruner/*.yaml)

Groups (the units removed together):
- attention, layer l, KV group g (g < num_kv_heads): rows of k_proj/v_proj for KV head g, the rows
  of q_proj for the ``n_rep = heads // kv_heads`` query heads that share it, and the matching
  columns of o_proj. Removing whole KV groups keeps ``n_rep`` unchanged, so the stock modules
  (which reshape with -1 heads) run as they are. Without GQA a group is a single head.
- MLP, layer l, channel c: row c of gate_proj and up_proj, column c of down_proj.

Importance of a group = reduce over its coupled weights (sum | mean | max) of the weight's score
summed over the group's rows/columns, where the per-row score of a weight W with gradient G is
(LLM-Pruner's TaylorImportance / MagnitudeImportance):
    vectorize     |sum_row W*G|            param_first   sum_row |W*G|
    param_second  sum_row |W*H*W|          param_mix     sum_row |W*G - 0.5 W*H*W|
    l1            sum_row |W|              l2            sum_row W^2          random: uniform
with H the diagonal Fisher (mean over samples of the per-sample squared gradient).

Cost: one forward+backward over the calibration batch (param_second/mix: one per sample), streamed by
:func:`pruning.calibration.gradient_passes` (each weight's gradient becomes per-row scores the moment it is
ready). This module is importance and selection only: anatomy lives in ``core.models.llama``, the cuts in
``pruning.surgery``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params, decoder_layers, layer_configs
from pruning import PruneError, PruneResult
from pruning.options import as_range, range_order_errors, resolve_ratio_target
from pruning.ranges import resolve_range

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch (and the calibration and surgery helpers that need it) are imported inside the functions that use
# them: building an LLMPruner from its options, which is how run.py validates a config, imports no torch.

log = logging.getLogger(__name__)

IMPORTANCES = ("taylor", "l1", "l2", "random")
TAYLOR_VARIANTS = ("vectorize", "param_first", "param_second", "param_mix")
# footprint(): what the backward of one Taylor pass saves per token and decoder layer, in elements of the model's
# dtype (sdpa attention, the lean SwiGLU MLP of pruning.calibration): the inputs of the norms, of q/k/v, o_proj and
# gate/up, q and k around RoPE, q/k/v and the output of attention (10 x hidden, 3 x kv width), gate and up
# (2 x intermediate); a half-precision model's norms keep float32 copies (TAYLOR_NORM_FLOAT32 x hidden).
TAYLOR_SAVED_PER_TOKEN = {"hidden": 10, "kv": 3, "intermediate": 2}
TAYLOR_NORM_FLOAT32 = 4
TAYLOR_SCORE_TEMPS = 3  # float32 temporaries of one weight's per-row score (w, w * g, its abs)
# float32 temporaries of one weight's score per importance (_row_scores: l1 / l2 hold the float copy and its
# abs / square; random draws a vector per layer)
SCORE_TEMPS = {"taylor": TAYLOR_SCORE_TEMPS, "l1": 2, "l2": 2, "random": 0}
_CHOICES = {"importance": IMPORTANCES, "taylor": TAYLOR_VARIANTS, "group_reduction": ("sum", "mean", "max"),
            "rounding": ("floor", "nearest", "ceil")}


@dataclass(frozen=True)
class LLMPruner:
    """Remove whole KV groups and MLP channels inside layer ranges, ranked by ``importance``.

    ``ratio`` is read as :attr:`RATIO` says for ``ratio_target``. Ranges are ``(start, end)``, end exclusive,
    negative counting from the last layer, ``None`` = the end.
    """

    RATIO: ClassVar[dict[str, str]] = {
        "groups": "share of the KV groups and of the MLP channels removed in each layer of the ranges "
                  "(LLM-Pruner's --pruning_ratio; pruner.attention_ratio / mlp_ratio override it per block type)",
        "params": "share of ALL the model's parameters removed; the group ratio that reaches it is solved for "
                  "(ratios fixed by pruner.attention_ratio / mlp_ratio stay fixed)",
    }

    ratio: float = 0.25
    name: str = "taylor"
    importance: str = "taylor"  # taylor | l1 | l2 | random
    taylor: str = "param_second"  # vectorize | param_first | param_second | param_mix (taylor only)
    group_reduction: str = "sum"  # sum | mean | max over the coupled weights of a group
    global_ranking: bool = False  # rank groups across layers instead of per layer
    iterative_steps: int = 1
    attention_ratio: Optional[float] = None  # None = ratio
    mlp_ratio: Optional[float] = None  # None = ratio
    attention_layers: Any = (0, None)  # (start, end) or {start, end}
    mlp_layers: Any = (0, None)
    round_to: int = 1  # MLP width removed in multiples of this
    rounding: str = "floor"  # floor | nearest | ceil: whole KV groups / round_to channel multiples
    batch_size: int = 0  # calibration micro-batch; 0 = all samples in one pass
    ratio_target: Optional[str] = None  # a unit of RATIO; None = the first (groups)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        errors = [f"pruner.{k}={getattr(self, k)!r} is not one of {', '.join(v)}"
                  for k, v in _CHOICES.items() if getattr(self, k) not in v]
        for key in ("ratio", "attention_ratio", "mlp_ratio"):
            v = getattr(self, key)
            if v is not None and not 0.0 <= float(v) < 1.0:
                errors.append(f"{'ratio' if key == 'ratio' else 'pruner.' + key}={v} must be in [0, 1)")
        for key, low in (("iterative_steps", 1), ("round_to", 1), ("batch_size", 0)):
            if getattr(self, key) < low:
                errors.append(f"pruner.{key}={getattr(self, key)} must be >= {low}")
        errors += range_order_errors(attention=self.attention_layers, mlp=self.mlp_layers)
        errors += resolve_ratio_target(self)
        errors += self._ignored()
        if errors:
            raise ConfigError("; ".join(errors))

    def _ignored(self) -> list[str]:
        """Options set away from their default where these settings would not read them. (``taylor`` is not
        checked: like LLM-Pruner's ``--taylor`` it is carried by l1 / l2 / random, which never read it.)"""
        if self.batch_size != 0 and not (self.importance == "taylor" and self.taylor in ("vectorize", "param_first")):
            return [f"pruner.batch_size={self.batch_size} applies to taylor=vectorize | param_first only "
                    "(param_second / param_mix take one sample per backward pass; l1, l2, random none)"]
        return []

    @property
    def needs_calibration(self) -> bool:
        return self.importance == "taylor"

    def resolved(self, depth: int) -> "LLMPruner":
        """A copy with absolute ``[start, end)`` ranges and explicit per-part ratios (checked against ``depth``).

        The planning, scoring and surgery functions below take resolved specs only.
        """
        att = float(self.ratio if self.attention_ratio is None else self.attention_ratio)
        mlp = float(self.ratio if self.mlp_ratio is None else self.mlp_ratio)
        return dataclasses.replace(
            self, attention_ratio=att, mlp_ratio=mlp,
            attention_layers=resolve_range(*self.attention_layers, depth, "attention", att),
            mlp_layers=resolve_range(*self.mlp_layers, depth, "mlp", mlp))

    def check(self, depth: int) -> None:
        self.resolved(depth)

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: int = 128,
                  free: Any = None) -> Any:
        """Peak memory and work of this prune on a model of ``config.json`` ``cfg`` (torch-free; core/run/plan.py).

        ``l1`` / ``l2`` / ``random``: the weights and the larger of one linear's float32 scores
        (:data:`SCORE_TEMPS`) and one layer's surgery (they come one after the other). ``taylor``: a
        full forward + backward (pruning.calibration.gradient_passes) on the model's device: the weights, the
        activations every layer saves for backward (:data:`TAYLOR_SAVED_PER_TOKEN` per token and layer) for one
        pass (``param_second`` / ``param_mix``: one sample per pass; ``vectorize`` / ``param_first``:
        ``batch_size`` samples, 0 = all), one weight's gradient at a time, and for ``param_mix`` the float32 mean
        gradient and Fisher diagonal of every scored weight. Nothing is streamed: a model larger than one GPU
        needs ``model.device_map=auto`` (accelerate spreads the layers, and their activations, over the GPUs)."""
        from core.run.plan import (LOGITS_CHUNK_BYTES, LOGITS_LIVE_TENSORS, Placement, accelerator, dtype_bytes,
                                   geometry, hidden_bytes, model_bytes, model_params, span)

        geo = geometry(cfg)
        spec = self.resolved(geo.depth)
        if self.ratio_target == "params":
            spec = solve_params_ratio(geo, spec, float(self.ratio), model_params(cfg),
                                      fixed_attention=self.attention_ratio is not None,
                                      fixed_mlp=self.mlp_ratio is not None)
        heads, chans, notes = plan_counts(geo, spec)
        b = dtype_bytes(dtype, cfg)
        largest = max(geo.hidden * max(geo.widths or (0,)), geo.hidden * max(geo.heads or (0,)) * geo.head_dim)
        on_device = accelerator(device)
        p = Placement({"weights": model_bytes(cfg, dtype)}, {}, on_device, device)
        layer_max = max((geo.group_params(l) * geo.kv_heads[l] + geo.channel_params() * geo.widths[l]
                         for l in range(geo.depth)), default=0)
        scores = {"one linear's float32 scores": SCORE_TEMPS[self.importance] * 4 * largest}
        surgery = {"one layer's surgery (new weights)": layer_max * b}
        if self.importance == "taylor":  # scored inside the backward pass, next to its gradients and activations
            p.add(**scores, **surgery)
        else:  # scored before the surgery starts: the larger of the two is the peak
            p.add(**max((scores, surgery), key=lambda d: sum(d.values())))
        forwards = 0
        samples = max(1, math.ceil(int(tokens) / max(1, int(seq_len)))) if tokens else 0
        if self.importance == "taylor":
            per_sample = self.taylor in ("param_second", "param_mix")
            micro = 1 if per_sample else (self.batch_size if self.batch_size and self.batch_size < samples else samples)
            t = micro * int(seq_len)
            h, k, i = geo.hidden, max(geo.kv_heads or (0,)) * geo.head_dim, max(geo.widths or (0,))
            saved = t * geo.depth * (TAYLOR_SAVED_PER_TOKEN["hidden"] * h + TAYLOR_SAVED_PER_TOKEN["kv"] * k
                                     + TAYLOR_SAVED_PER_TOKEN["intermediate"] * i) * b
            if b < 4:  # RMSNorm computes in float32: its saved input and output are float32 copies
                saved += t * geo.depth * TAYLOR_NORM_FLOAT32 * h * (4 - b)
            p.add(**{"activations saved for backward (all layers)": saved,
                     "one weight's gradient": largest * b,
                     "LM-head loss chunk": LOGITS_LIVE_TENSORS * LOGITS_CHUNK_BYTES + 2 * hidden_bytes(t, cfg, dtype)})
            if self.taylor == "param_mix":
                scored = sum(4 * geo.group_params(l) * geo.kv_heads[l] for l in range(*spec.attention_layers)) \
                    + sum(4 * geo.channel_params() * geo.widths[l] for l in range(*spec.mlp_layers))
                p.add(**{"mean gradient + Fisher diagonal (float32)": 2 * scored})
            passes = samples if per_sample else math.ceil(samples / max(1, micro))
            forwards = 2 * geo.depth * passes * self.iterative_steps  # forward + backward
            notes = notes + [
                f"taylor needs a full backward pass: weights + the activations of all {geo.depth} layers for "
                f"{micro} sample(s) x {seq_len} tokens + one gradient at a time, all on the model's device; spread a "
                "model larger than one GPU with model.device_map=auto (accelerate), as users of LLM-Pruner do"]
        removed_h, removed_c = sum(heads.values()), sum(chans.values())
        removes = [f"{removed_h} KV groups in layers {span(spec.attention_layers)} (group ratio "
                   f"{spec.attention_ratio:.4g}), {removed_c:,} MLP channels in layers {span(spec.mlp_layers)} "
                   f"(group ratio {spec.mlp_ratio:.4g}), {self.importance}"
                   + (f" ({self.taylor})" if self.importance == "taylor" else "")]
        widths = [{"layer": l, "kv_heads": [geo.kv_heads[l], geo.kv_heads[l] - heads.get(l, 0)],
                   "intermediate_size": [geo.widths[l], geo.widths[l] - chans.get(l, 0)]} for l in range(geo.depth)]
        return p.footprint(layer_forwards=forwards, tokens=int(tokens) if self.needs_calibration else 0, notes=notes,
                           removes=removes, widths=widths)

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        spec = self.resolved(len(decoder_layers(model)))
        if self.ratio_target == "params":
            spec = solve_params_ratio(Geometry.of(model), spec, float(self.ratio), count_params(model),
                                      fixed_attention=self.attention_ratio is not None,
                                      fixed_mlp=self.mlp_ratio is not None)
            log.info("ratio_target=params: group ratios attention %.4f, mlp %.4f", spec.attention_ratio, spec.mlp_ratio)
        log.info("pruning %s (%s) attention layers [%d, %d) ratio %.3f, mlp layers [%d, %d) ratio %.3f", self.name,
                 spec.taylor if spec.importance == "taylor" else spec.importance,
                 *spec.attention_layers, spec.attention_ratio, *spec.mlp_layers, spec.mlp_ratio)
        return prune(model, calibration, spec)


# --------------------------------------------------------------------------- planning


def _round(x: float, mode: str) -> int:
    if mode == "floor":
        return math.floor(x + 1e-9)
    if mode == "ceil":
        return math.ceil(x - 1e-9)
    return int(math.floor(x + 0.5))


def plan_counts(geo: Geometry, spec: LLMPruner, fraction: float = 1.0) -> tuple[dict[int, int], dict[int, int], list[str]]:
    """How many KV groups / MLP channels each layer loses (``fraction`` of the way, for iterative steps)."""
    notes: list[str] = []
    heads: dict[int, int] = {}
    a0, a1 = spec.attention_layers
    for l in range(a0, a1):
        kv = geo.kv_heads[l]
        n = _round(spec.attention_ratio * fraction * kv, spec.rounding)
        if n >= kv:
            n = kv - 1
            notes.append(f"layer {l}: attention ratio would remove all {kv} KV groups; keeping one")
        heads[l] = n
    if a1 > a0 and spec.attention_ratio > 0 and fraction == 1.0 and all(v == 0 for v in heads.values()):
        kv = geo.kv_heads[a0]
        notes.append(
            f"attention ratio {spec.attention_ratio} x {kv} KV groups rounds ({spec.rounding}) to 0 whole "
            f"groups per layer: no attention heads are pruned (each group is {geo.heads[a0] // kv} query heads "
            f"+ 1 KV head; the smallest non-zero ratio is {1 / kv:.3f} with rounding=floor)")
    chans: dict[int, int] = {}
    m0, m1 = spec.mlp_layers
    for l in range(m0, m1):
        w = geo.widths[l]
        n = _round(spec.mlp_ratio * fraction * w / spec.round_to, spec.rounding) * spec.round_to
        n = min(n, w - spec.round_to)
        chans[l] = max(n, 0)
    if m1 > m0 and spec.mlp_ratio > 0 and fraction == 1.0 and all(v == 0 for v in chans.values()):
        notes.append(f"MLP ratio {spec.mlp_ratio} rounds to 0 channels with round_to={spec.round_to}: MLP not pruned")
    return heads, chans, notes


def planned_params_removed(geo: Geometry, heads: dict[int, int], chans: dict[int, int]) -> int:
    return sum(n * geo.group_params(l) for l, n in heads.items()) + sum(n * geo.channel_params() for n in chans.values())


def solve_params_ratio(geo: Geometry, spec: LLMPruner, target: float, total_params: int,
                       fixed_attention: bool, fixed_mlp: bool, tol: float = 0.01) -> LLMPruner:
    """Find the group ratio that removes ``target`` of all parameters (``ratio_target=params``).

    Ratios not fixed by ``pruner.attention_ratio``/``mlp_ratio`` move together. The removed count is a
    step function of the ratio (whole heads, multiples of round_to), so we scan the achievable steps and
    take the closest; if it misses the target by more than ``tol`` of all parameters, that is an error.
    """
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


# --------------------------------------------------------------------------- importance


def _coupled(model: nn.Module, spec: LLMPruner, attention: bool = True, mlp: bool = True
             ) -> list[tuple[str, int, nn.Parameter, str]]:
    """(kind, layer, weight, orientation) of every weight whose rows/cols form pruning groups (of attention and / or
    the MLP).

    orientation 'out': groups are rows (q/k/v, gate/up); 'in': groups are columns (o, down).
    """
    out = []
    layers = decoder_layers(model)
    for l in range(*spec.attention_layers) if attention else ():
        a = layers[l].self_attn
        out += [("q", l, a.q_proj.weight, "out"), ("k", l, a.k_proj.weight, "out"),
                ("v", l, a.v_proj.weight, "out"), ("o", l, a.o_proj.weight, "in")]
    for l in range(*spec.mlp_layers) if mlp else ():
        m = layers[l].mlp
        out += [("gate", l, m.gate_proj.weight, "out"), ("up", l, m.up_proj.weight, "out"),
                ("down", l, m.down_proj.weight, "in")]
    return out


def _row_scores(w: torch.Tensor, g: Optional[torch.Tensor], h: Optional[torch.Tensor], orient: str,
                spec: LLMPruner) -> torch.Tensor:
    """Per-row (out) or per-column (in) score of one weight, float32 ``[n_rows]``."""
    w = w.detach().float()
    dim = 1 if orient == "out" else 0
    if spec.importance == "l1":
        return w.abs().sum(dim)
    if spec.importance == "l2":
        return w.pow(2).sum(dim)
    t = spec.taylor
    if t == "vectorize":
        return (w * g.float()).sum(dim).abs()
    if t == "param_first":
        return (w * g.float()).abs().sum(dim)
    if t == "param_second":
        return (w * h * w).abs().sum(dim)
    return (w * g.float() - 0.5 * w * h * w).abs().sum(dim)  # param_mix


def importance(model: nn.Module, batch: Optional[torch.Tensor], spec: LLMPruner, progress: bool = True,
               attention: bool = True, mlp: bool = True) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Group scores: ``{layer: [kv_groups]}`` for attention and ``{layer: [width]}`` for MLP. ``attention`` /
    ``mlp`` false: that kind is not scored (nothing of it is removed; its weights' gradients are never formed, which
    leaves the other kind's gradients as they are)."""
    # local: imports torch, and config validation imports this module
    import torch

    from pruning.calibration import gradient_passes

    geo = Geometry.of(model)
    coupled = _coupled(model, spec, attention, mlp)
    weights = [w for _, _, w, _ in coupled]
    rows: list[Optional[torch.Tensor]] = [None] * len(coupled)

    if spec.importance == "random":
        gen = torch.Generator().manual_seed(spec.seed)
        att_r = {l: torch.rand(geo.kv_heads[l], generator=gen) for l in range(*spec.attention_layers)}
        mlp_r = {l: torch.rand(geo.widths[l], generator=gen) for l in range(*spec.mlp_layers)}
        return att_r, mlp_r  # (both drawn whatever is removed: the same seed picks the same groups)

    if spec.importance in ("l1", "l2"):
        rows = [_row_scores(w, None, None, o, spec) for _, _, w, o in coupled]
    else:
        if batch is None:
            raise PruneError("Taylor importance needs calibration data")
        n = batch.shape[0]
        if spec.taylor in ("vectorize", "param_first"):
            def on_grad(i: int, g: torch.Tensor) -> None:
                rows[i] = _row_scores(weights[i], g, None, coupled[i][3], spec)
            gradient_passes(model, batch, weights, on_grad, False, spec.batch_size, progress)
        elif spec.taylor == "param_second":
            # sum_row |W*H*W| with H = mean_j g_j^2 is linear in H: accumulate per row, per sample.
            def on_grad(i: int, g: torch.Tensor) -> None:
                w = weights[i].detach().float()
                s = (w * w * g.float().pow(2) / n).sum(1 if coupled[i][3] == "out" else 0)
                rows[i] = s if rows[i] is None else rows[i] + s
            gradient_passes(model, batch, weights, on_grad, True, 0, progress)
        else:  # param_mix needs the full mean gradient and Fisher diagonal before the abs
            gsum = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
            hsum = [torch.zeros_like(w, dtype=torch.float32) for w in weights]

            def on_grad(i: int, g: torch.Tensor) -> None:
                gf = g.float()
                gsum[i].add_(gf, alpha=1.0 / n)
                hsum[i].addcmul_(gf, gf, value=1.0 / n)
            gradient_passes(model, batch, weights, on_grad, True, 0, progress)
            rows = [_row_scores(w, gsum[i], hsum[i], coupled[i][3], spec) for i, w in enumerate(weights)]
            del gsum, hsum

    # Reduce rows -> groups per weight, then across the coupled weights of a group.
    att_parts: dict[int, list[torch.Tensor]] = {}
    mlp_parts: dict[int, list[torch.Tensor]] = {}
    for (kind, l, _, _), r in zip(coupled, rows):
        assert r is not None, f"no gradient reached layer {l} {kind}: is the layer range right?"
        if kind in ("gate", "up", "down"):
            mlp_parts.setdefault(l, []).append(r)
        else:
            kv = geo.kv_heads[l]
            att_parts.setdefault(l, []).append(r.view(kv, -1).sum(1))  # rows of a KV group are contiguous
    red = {"sum": lambda t: t.sum(0), "mean": lambda t: t.mean(0), "max": lambda t: t.max(0).values}[spec.group_reduction]
    return ({l: red(torch.stack(p)) for l, p in att_parts.items()},
            {l: red(torch.stack(p)) for l, p in mlp_parts.items()})


# --------------------------------------------------------------------------- selection


def _select(scores: dict[int, torch.Tensor], counts: dict[int, int], global_ranking: bool, round_to: int,
            min_keep: int) -> dict[int, torch.Tensor]:
    """Indices to remove per layer: lowest scores per layer, or lowest across layers (global)."""
    # local: imports torch, and config validation imports this module
    import torch

    if not global_ranking:
        return {l: torch.topk(scores[l], counts[l], largest=False).indices.sort().values
                for l in scores if counts.get(l, 0) > 0}
    total = sum(counts.get(l, 0) for l in scores)
    if total == 0:
        return {}
    layers = sorted(scores)
    flat = torch.cat([scores[l] for l in layers])
    owner = torch.cat([torch.full((scores[l].numel(),), l) for l in layers])
    order = torch.argsort(flat)
    per_layer = {l: 0 for l in layers}
    for idx in order[:total].tolist():
        per_layer[int(owner[idx])] += 1
    out = {}
    for l in layers:
        n = per_layer[l] // round_to * round_to
        n = min(n, scores[l].numel() - min_keep)
        if n > 0:
            out[l] = torch.topk(scores[l], n, largest=False).indices.sort().values
    return out


# --------------------------------------------------------------------------- driver


def prune(model: nn.Module, batch: Optional[torch.Tensor], spec: LLMPruner) -> PruneResult:
    """Prune ``model`` in place with a resolved ``spec`` (absolute ranges); ``batch``: ``[n, seq_len]`` ids."""
    # local: imports torch, and config validation imports this module
    from pruning.surgery import remove_channels, remove_kv_groups

    progress = spec.progress
    geo0 = Geometry.of(model)
    depth = geo0.depth
    for name, (a, b) in (("attention", spec.attention_layers), ("mlp", spec.mlp_layers)):
        if not 0 <= a <= b <= depth:
            raise PruneError(f"{name} layer range [{a}, {b}) is outside the model's {depth} layers")
    final_heads, final_chans, notes = plan_counts(geo0, spec)
    for note in notes:
        log.warning(note)
    params_before = count_params(model)
    removed_groups: dict[int, list[int]] = {l: [] for l in final_heads}
    t_score = t_cut = 0.0
    was_training = model.training
    model.eval()  # no dropout during calibration (LLM-Pruner also scores in eval mode)
    for step in range(1, spec.iterative_steps + 1):
        frac = step / spec.iterative_steps
        heads, chans, _ = plan_counts(geo0, spec, frac)
        geo = Geometry.of(model)
        # Groups still to remove at this step = cumulative target - already removed.
        want_h = {l: max(0, heads[l] - (geo0.kv_heads[l] - geo.kv_heads[l])) for l in heads}
        want_c = {l: max(0, chans[l] - (geo0.widths[l] - geo.widths[l])) for l in chans}
        if not any(want_h.values()) and not any(want_c.values()):
            continue
        t0 = time.perf_counter()
        att, mlp = importance(model, batch, spec, progress, attention=any(want_h.values()),
                              mlp=any(want_c.values()))
        t1 = time.perf_counter()
        drop_h = _select(att, want_h, spec.global_ranking, 1, 1)
        drop_c = _select(mlp, want_c, spec.global_ranking, spec.round_to, spec.round_to)
        layers = decoder_layers(model)
        for l, g in drop_h.items():
            # Map indices of the current (already shrunk) layer back to original group ids for the record.
            alive = [i for i in range(geo0.kv_heads[l]) if i not in removed_groups[l]]
            removed_groups[l] += [alive[i] for i in g.tolist()]
            remove_kv_groups(layers[l], g, geo.head_dim)
        for l, c in drop_c.items():
            remove_channels(layers[l], c)
        t_cut += time.perf_counter() - t1
        t_score += t1 - t0
    model.train(was_training)
    model.config.layer_configs = layer_configs(model)
    geo1 = Geometry.of(model)
    per_layer = [{"layer": l, "heads": [geo0.heads[l], geo1.heads[l]], "kv_heads": [geo0.kv_heads[l], geo1.kv_heads[l]],
                  "intermediate_size": [geo0.widths[l], geo1.widths[l]],
                  "removed_kv_groups": sorted(removed_groups.get(l, []))} for l in range(depth)]
    params_after = count_params(model)
    ranges = {"attention": list(spec.attention_layers), "mlp": list(spec.mlp_layers)}
    return PruneResult(
        params_before=params_before, params_after=params_after,
        compression={"unit": spec.ratio_target,
                     "amount": float(spec.ratio), "attention_group_ratio": spec.attention_ratio,
                     "mlp_group_ratio": spec.mlp_ratio, "params_removed": 1.0 - params_after / params_before},
        ranges=ranges, layers=per_layer, notes=list(notes),
        details={"importance": spec.importance, "taylor": spec.taylor, "group_reduction": spec.group_reduction,
                 "global_ranking": spec.global_ranking, "iterative_steps": spec.iterative_steps,
                 "attention_ratio": spec.attention_ratio, "mlp_ratio": spec.mlp_ratio,
                 "attention_layers": ranges["attention"], "mlp_layers": ranges["mlp"],
                 "round_to": spec.round_to, "rounding": spec.rounding,
                 "heads_pruned": any(l["kv_heads"][0] != l["kv_heads"][1] for l in per_layer)},
        timings={"importance_s": t_score, "surgery_s": t_cut})
