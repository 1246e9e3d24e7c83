"""The fit of the compensated pruner: OBS selection, least-squares compensation and the held-out guard of one
projection, and the layer-by-layer pass that applies them to a model.

    records = prune_sequential(model, calibration, att_plan, mlp_plan, options=pruner.fit_options())

:class:`FitOptions` is everything this module reads; the pruner (pruning/obs/pruner.py) builds it from its own
options, and the allocation search (pruning/obs/search.py) passes it on.

One projection ``y = W x (+ b)`` (:class:`ProjectionFit`): from the inputs captured for the fit, the Gram matrix
(float64, augmented by a constant input when the bias is refitted); the weights to prune from (``W``, or with the
dense model's outputs as targets the weights that reproduce them best,
:func:`pruning.compensate.target_weights`); the fixed scores of a criterion (``wanda``, ``flap``, ``magnitude``)
or none (``obs``: the cost after the optimal update). :meth:`ProjectionFit.remove` then removes ``k`` groups of
input columns (:func:`pruning.compensate.prune_columns`) and applies THE guard (:meth:`ProjectionFit.guard`): the
compensated weights are kept only if their output error on the held-out samples (``holdout`` of the calibration
samples, the last ones, never in the fit) is below plain removal's (the removed columns zeroed, nothing else
changed); the decision and both errors go into the projection's record. :func:`fit_projection` is one such fit;
the search fits every width level of a layer from one ``ProjectionFit``.

The pass (:func:`prune_sequential`, one layer at a time over :class:`pruning.streaming.LayerStream`, on the
already-pruned prefix): the layer runs over the calibration samples micro-batch by micro-batch, and the inputs of
``o_proj`` / ``down_proj`` are folded into the projection's sums (:class:`pruning.compensate.ProjectionSums`: the
Gram matrix, the cross term towards the targets, the guard's held-out sums) as they come, never kept whole; the
planned KV groups and MLP channels are fitted away from those sums; then the edited part of the layer runs again
over the carried states (the MLP on the residual after attention, kept in the stream's store meanwhile; the whole
attention block when it was edited) and its outputs replace the inputs in the store, so each layer is fitted to
what the pruned model really feeds it. With ``target=dense`` the dense model's hidden states are carried too (one
more forward per layer, in a second store) and each fit aims at the dense model's outputs, which also undoes what
the pruned layers before it changed (``refit_attention``: ``o_proj`` of every pruned layer is refitted that way
too, nothing removed). ``autocast`` runs the layer forwards' matrix products in a lower precision; the sums, fits
and guard stay in float32 or float64.

Memory (the formula, torch-free: ``pruning.obs.pruner.layer_step_bytes`` and ``StructuredOBS.footprint``): per
pruned projection with ``n`` inputs and ``out`` outputs, its sums (float64: the fit's and the guard's Gram
buffers, ``(n + 1)^2`` each; two ``(n + 1) x out`` cross terms) and, while it is fitted, the inverse OBS
downdates and one temporary (two more ``(n + 1)^2``) and a few ``[out, n + 1]`` weights; one micro-batch of one
layer's activations and captured inputs; and the carried states: ``tokens x hidden`` in the model's dtype, twice
with ``target=dense``, wherever ``states`` puts them. Nothing grows with the calibration tokens but the states.

Imports: torch, ``core.models.llama``, ``pruning`` (PruneError), ``pruning.compensate`` (the numeric kernel),
``pruning.calibration``, ``pruning.streaming``, ``pruning.surgery``. Nothing else of ``pruning.obs``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from core.models.llama import Geometry
from pruning import PruneError
from pruning.calibration import capture_inputs
from pruning.compensate import HeldOut, ProjectionSums, column_scores, prune_columns
from pruning.streaming import LayerStream, States, resolve_autocast
from pruning.surgery import remove_channels, remove_kv_groups


@dataclass(frozen=True)
class FitOptions:
    """What the fit and its pass read (the pruner's options of the same names; their meaning: conf/pruner/obs.yaml)."""

    selection: str  # obs | wanda | flap | magnitude
    compensate: bool  # refit the kept columns (false: plain removal of the selected ones)
    bias: bool  # refit the output bias too (a constant input in the fit)
    guard: bool  # keep an update only if it lowers the output error on the held-out samples
    holdout: float  # share of the calibration samples held out for the guard
    rounds: int  # obs selection: removal steps per projection, the inverse downdated between them
    damp: float  # relative to the mean diagonal of the Gram matrix
    target: str  # dense: fit towards the dense model's outputs | layer: towards the layer's own
    refit_attention: bool  # target=dense: refit o_proj of every pruned layer too
    # how the layers run (pruning.streaming.LayerStream)
    batch_size: int
    device: Optional[str]
    offload: bool
    autocast: Optional[str]  # auto | bfloat16 | float16 | None
    progress: bool
    states: str = "auto"  # where the carried hidden states live: auto | device | host | disk

    @property
    def guarded(self) -> bool:
        """Whether the guard decides (it judges a compensation: none without one)."""
        return self.guard and self.compensate

    @property
    def dense_targets(self) -> bool:
        """Whether the fits aim at the dense model's outputs (a plain removal fits nothing)."""
        return self.target == "dense" and self.compensate


def held_out_samples(samples: int, options: FitOptions) -> int:
    """How many of ``samples`` calibration samples (the last ones) the guard holds out: ``ceil(holdout x samples)``,
    at least one left to fit on. PruneError when the guard would have none to judge by."""
    if not options.guarded:
        return 0
    held = min(samples - 1, math.ceil(options.holdout * samples))
    if held < 1:
        raise PruneError(f"obs: pruner.guard=true holds out pruner.holdout={options.holdout} of the calibration "
                         f"samples, which leaves none of these {samples} to judge the compensation by: give more "
                         "samples (pruner.tokens) or set pruner.guard=false")
    return held


def autocast_dtype(options: FitOptions, model: nn.Module) -> Optional[torch.dtype]:
    """The dtype the layer forwards run their matrix products in (None: the model's own)."""
    p = next(model.parameters())
    low = resolve_autocast(options.autocast, options.device or p.device)
    return low if low is not None and low != p.dtype else None


# --------------------------------------------------------------------------- one projection


@dataclass
class Fitted:
    """One projection after :meth:`ProjectionFit.remove`."""

    removed: list[int]  # removed groups of input columns, sorted
    keep: torch.Tensor  # kept input columns, sorted (on the weight's device)
    weight: torch.Tensor  # [out, kept] float64
    bias: Optional[torch.Tensor]  # [out] (the refitted bias, or the projection's own, or None)
    record: dict[str, Any] = field(default_factory=dict)  # removed, tokens, damp, update, held-out errors


class ProjectionFit:
    """What the fit of one projection ``W`` ``[out, n]`` (bias ``b``) needs whatever the number of groups removed.

    Either the folded sums of its inputs (``sums``: :class:`pruning.compensate.ProjectionSums`, as the pass builds
    them; :meth:`from_sums`), or the captured inputs themselves: ``xs``, its inputs to fit on; ``held``, those held
    out for the guard; ``targets`` / ``held_targets``: the dense model's outputs of this projection for the same
    tokens (``target=dense``), else None. ``group``: input columns per removable unit (1: an MLP channel; a KV
    group's query heads x head_dim). ``summed_guard``: with captured inputs, the guard measures from sums of the
    held-out tokens instead of the tokens (from folded sums it always does); see
    :class:`pruning.compensate.HeldOut`."""

    def __init__(self, w: torch.Tensor, b: Optional[torch.Tensor], xs: Optional[list[torch.Tensor]] = None,
                 held: Optional[list[torch.Tensor]] = None, options: Optional[FitOptions] = None,
                 targets: Optional[list[torch.Tensor]] = None, held_targets: Optional[list[torch.Tensor]] = None, *,
                 group: int = 1, summed_guard: bool = False, sums: Optional[ProjectionSums] = None):
        if options is None:
            raise ValueError("ProjectionFit needs the fit options")
        self.w, self.b, self.options, self.group = w, b, options, group
        self.n = w.shape[1]
        self.use_bias = options.bias and options.compensate
        exact: Optional[HeldOut] = None
        if sums is None:  # captured inputs: folded here, the same sums as the pass folds
            sums = new_sums(w, b, options, targets=targets is not None, held=options.guarded and summed_guard)
            for j, x in enumerate(xs or []):
                sums.add_fit(x, targets[j] if sums.targets else None)
            if options.guarded and held:
                if summed_guard:
                    for j, x in enumerate(held):
                        sums.add_held(x, held_targets[j] if sums.targets and held_targets else None)
                else:
                    exact = HeldOut(w, b, held, held_targets)
        elif sums.use_bias != self.use_bias:
            raise ValueError("the sums were folded with another bias option than these fit options")
        self.sums = sums
        self.gram = sums.gram
        self.h = self.gram.matrix(self.use_bias)
        self.w_fit, self.b_fit = w, sums.bias0
        if sums.targets and options.compensate:  # the weights that best reproduce the targets
            self.w_fit, self.b_fit = sums.fit_weights(self.h, options.damp)
        self.scores = None if options.selection == "obs" else column_scores(self.w_fit, self.gram, options.selection,
                                                                            group)
        self.held: Optional[HeldOut] = None
        if options.guarded:
            if exact is not None:
                self.held = exact
            elif sums.held_gram is not None and sums.held_gram.tokens:
                self.held = sums.held_out()
            else:
                raise ValueError("the guard needs held-out inputs (pruning.obs.fit.held_out_samples)")

    @classmethod
    def from_sums(cls, w: torch.Tensor, b: Optional[torch.Tensor], sums: ProjectionSums, options: FitOptions, *,
                  group: int = 1) -> "ProjectionFit":
        """The fit from inputs folded by the pass (no token kept)."""
        return cls(w, b, options=options, group=group, sums=sums)

    def columns(self, groups: list[int]) -> torch.Tensor:
        """The input columns of ``groups``, in order."""
        cols = torch.arange(self.n, device=self.w.device).view(-1, self.group)
        return cols[groups].reshape(-1)

    def remove(self, k: int) -> Fitted:
        """Choose and remove ``k`` groups, compensate the rest (``compensate``), and let the guard decide."""
        o, n = self.options, self.n
        res = prune_columns(self.w_fit, self.h, k, group=self.group, select=o.selection, scores=self.scores,
                            compensate=o.compensate, rounds=o.rounds, damp=o.damp,
                            bias=self.b_fit if self.use_bias else None)
        record: dict[str, Any] = {"removed": len(res.removed), "tokens": self.gram.tokens, "damp": res.damp}
        new_w, new_b = res.weight[:, :n], (res.weight[:, n] if self.use_bias else self.b)
        if o.compensate:
            new_w, new_b = self.guard(res.weight, res.removed, record)
        gone = set(res.removed)
        keep = self.columns([g for g in range(n // self.group) if g not in gone])
        return Fitted(res.removed, keep, new_w[:, keep], new_b, record)

    def guard(self, fitted: torch.Tensor, removed: list[int], record: dict[str, Any]
              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """THE guard: the compensated weights ``fitted`` (``[out, n (+1 bias)]``) if their held-out error is below
        plain removal's, else plain removal's; ``record`` gets the decision (``update``) and both errors."""
        n, b = self.n, self.b
        kept = fitted[:, :n], (fitted[:, n] if self.use_bias else b)
        if self.held is None:  # guard=false: every update is applied
            record["update"] = "kept"
            return kept
        plain = self.w.detach().double().clone()
        plain[:, self.columns(removed)] = 0
        if b is not None:
            plain = torch.cat([plain, b.detach().double()[:, None]], 1)
        e_new, e_plain = self.held.errors(fitted, plain)
        record.update({"heldout_error": e_new, "heldout_error_plain": e_plain, "heldout_tokens": self.held.tokens})
        if e_new < e_plain:
            record["update"] = "kept"
            return kept
        record["update"] = "rejected"
        return plain[:, :n], b


def new_sums(w: torch.Tensor, b: Optional[torch.Tensor], options: FitOptions, *, targets: bool, held: bool
             ) -> ProjectionSums:
    """Empty sums for the fit of ``w`` with ``options``: towards targets when ``targets`` and the fit compensates,
    the guard's held-out sums when ``held``."""
    return ProjectionSums(w, b, bias=options.bias and options.compensate, targets=targets and options.compensate,
                          held=held)


def fit_projection(w: torch.Tensor, b: Optional[torch.Tensor], xs: list[torch.Tensor], held: list[torch.Tensor],
                   remove: int, group: int, options: FitOptions, targets: Optional[list[torch.Tensor]] = None,
                   held_targets: Optional[list[torch.Tensor]] = None) -> Fitted:
    """Choose, remove and compensate ``remove`` groups of ``group`` input columns of ``w`` from captured inputs,
    guarded on the held-out tokens themselves (the pass folds instead: :func:`fit_sums`)."""
    return ProjectionFit(w, b, xs, held, options, targets, held_targets, group=group).remove(remove)


def fit_sums(w: torch.Tensor, b: Optional[torch.Tensor], sums: ProjectionSums, remove: int, group: int,
             options: FitOptions) -> Fitted:
    """Choose, remove and compensate ``remove`` groups of ``group`` input columns of ``w`` from folded sums, guarded
    (the fit of :func:`prune_sequential`; the allocation search hands it a stand-in with the same signature)."""
    return ProjectionFit.from_sums(w, b, sums, options, group=group).remove(remove)


# --------------------------------------------------------------------------- the layer-by-layer pass


def prune_sequential(model: nn.Module, calibration: torch.Tensor, att_plan: dict[int, int], mlp_plan: dict[int, int],
                     *, options: FitOptions, seconds: Optional[dict[str, float]] = None,
                     fit: Optional[Callable[..., Fitted]] = None,
                     stream_info: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """Prune each planned layer in order on the pruned prefix's hidden states (``att_plan`` / ``mlp_plan``:
    ``{layer: KV groups / MLP channels removed}``); returns one record per pruned projection (layer, kind,
    removed, the guard's errors and decision). ``fit`` replaces :func:`fit_sums` for the projections that lose
    something (the allocation search's variant pass fits every width level of a layer from the same sums).
    ``stream_info`` gets where the hidden states lived (``states``) and their bytes (``states_bytes``, all
    copies)."""
    opt = options
    last = max([l + 1 for l in (*att_plan, *mlp_plan)], default=0)
    if last == 0:
        return []
    held_n = held_out_samples(calibration.shape[0], opt)
    stream = LayerStream(model, calibration, batch_size=opt.batch_size, device=opt.device, offload=opt.offload,
                         progress=opt.progress, autocast=autocast_dtype(opt, model), states=opt.states,
                         copies=2 if opt.dense_targets else 1)
    run = _Pass(stream, opt, fit or fit_sums, calibration.shape[0] - held_n, Geometry.of(model))
    if stream_info is not None:
        stream_info.update({"states": stream.placement,
                            "states_bytes": stream.states_bytes * (2 if opt.dense_targets else 1)})
    try:
        for i, layer in stream:
            if i >= last:
                break
            run.layer(i, layer, att_plan.get(i, 0), mlp_plan.get(i, 0))
    finally:
        stream.close()
        if run.dense is not None:
            run.dense.clear()
    if seconds is not None:
        seconds.update({"embed_s": stream.seconds["embed"], "layers_s": stream.seconds["layers"],
                        "fit_s": run.t_fit})
    return run.records


class _Pass:
    """The state of :func:`prune_sequential`: the stream, the dense model's states once they differ, the records."""

    def __init__(self, stream: LayerStream, options: FitOptions, fit: Callable[..., Fitted], fit_samples: int,
                 geo: Geometry):
        self.stream, self.opt, self.fit, self.geo = stream, options, fit, geo
        self.as_model = stream.dtype  # captured inputs (bfloat16 under autocast) are folded in the model's dtype
        sizes = [c.shape[0] for c in stream.chunks]
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        # per micro-batch, its samples that are fitted on (the last held_n samples of the calibration: the guard's)
        self.fit_rows = [max(0, min(s, fit_samples - a)) for a, s in zip(starts, sizes)]
        self.use_dense = options.dense_targets
        self.dense: Optional[States] = None  # the dense model's hidden states, once they differ (target=dense)
        self.records: list[dict[str, Any]] = []
        self.t_fit = 0.0

    def _fold(self, sums: ProjectionSums, j: int, x: torch.Tensor, t: Optional[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        sums.add(x.to(self.as_model), t, self.fit_rows[j])
        self.t_fit += time.perf_counter() - t0

    def _dense_step(self, layer: nn.Module, j: int, kw: dict[str, Any], watch: Optional[nn.Module] = None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The dense layer on the dense states of micro-batch ``j``: its output (stored as the next dense states)
        and the input of ``watch`` on the way."""
        got: dict[str, torch.Tensor] = {}
        with capture_inputs({"w": watch} if watch is not None else {}, lambda k, x: got.__setitem__(k, x)):
            out = self.stream.call(layer, self.dense.load(j), kw)
        self.dense.put(j, out)
        return out, got.get("w")

    def layer(self, i: int, layer: nn.Module, att: int, mlp: int) -> None:
        stream, opt = self.stream, self.opt
        if not att and not mlp:
            if self.dense is not None:
                stream.update(lambda x, kw: _hidden_of(layer(x, **kw)), states=self.dense)
            stream.advance()
            return
        # target=dense, refit_attention: o_proj's inputs drifted with the pruned layers before it; refit it too
        refit_o = not att and opt.refit_attention and self.use_dense and self.dense is not None
        first = self.use_dense and self.dense is None  # this layer's own (dense) outputs start the dense stream
        if first:
            self.dense = stream.new_states()
        with torch.no_grad():
            if att or refit_o:
                self._attention(i, layer, att, first)
                first = False
                if mlp:
                    self._mlp_after_attention(i, layer, mlp)
                else:
                    stream.advance()  # the edited layer over the carried states, in place
            else:
                self._mlp(i, layer, mlp, first)

    def _attention(self, i: int, layer: nn.Module, att: int, first: bool) -> None:
        """Fold ``o_proj``'s inputs (targets: the dense residual after attention minus the layer's input), fit it
        and edit the attention. The dense states advance by this layer on the way."""
        stream, opt, geo = self.stream, self.opt, self.geo
        o, norm = layer.self_attn.o_proj, layer.post_attention_layernorm
        sums = new_sums(o.weight, o.bias, opt, targets=self.use_dense, held=opt.guarded)
        for j, kw in enumerate(stream.kwargs):
            dense_mid = None
            if self.dense is not None and not first:
                _, dense_mid = self._dense_step(layer, j, kw, norm)
            h = stream.hidden.load(j)
            cap: dict[str, torch.Tensor] = {}
            with capture_inputs({"o": o, "mid": norm}, lambda k, x: cap.__setitem__(k, x)):
                out = stream.call(layer, h, kw)
            if first:
                self.dense.put(j, out)
                dense_mid = cap["mid"]
            self._fold(sums, j, cap["o"], (dense_mid.to(self.as_model) - h) if self.use_dense else None)
            del cap, out
        width = geo.heads[i] // geo.kv_heads[i] * geo.head_dim
        t0 = time.perf_counter()
        f = (self.fit if att else fit_sums)(o.weight, o.bias, sums, att, width, opt)
        self.records.append({"layer": i, "kind": "attention" if att else "attention_refit", **f.record})
        if f.removed:
            remove_kv_groups(layer, torch.tensor(f.removed), geo.head_dim)
        _set_linear(o, f.weight, f.bias)
        self.t_fit += time.perf_counter() - t0

    def _mlp_after_attention(self, i: int, layer: nn.Module, mlp: int) -> None:
        """The edited attention again (the new residual), ``down_proj``'s inputs folded from it; the residual is
        kept in the store until the MLP is fitted."""
        stream, opt = self.stream, self.opt
        d = layer.mlp.down_proj
        sums = new_sums(d.weight, d.bias, opt, targets=self.use_dense, held=opt.guarded)
        for j, kw in enumerate(stream.kwargs):
            h = stream.hidden.load(j)
            with stream.running():
                mid = _attention_residual(layer, h, kw)
                x = _mlp_inner(layer, mid)
            stream.hidden.put(j, mid)
            self._fold(sums, j, x, (self.dense.load(j) - mid) if self.use_dense else None)
            del h, x
        self._fit_mlp(i, layer, mlp, sums)

    def _mlp(self, i: int, layer: nn.Module, mlp: int, first: bool) -> None:
        """Fold ``down_proj``'s inputs (targets: the dense layer output minus the residual after attention); the
        residual after attention replaces the layer's input in the store until the MLP is fitted."""
        stream, opt = self.stream, self.opt
        d, norm = layer.mlp.down_proj, layer.post_attention_layernorm
        sums = new_sums(d.weight, d.bias, opt, targets=self.use_dense, held=opt.guarded)
        for j, kw in enumerate(stream.kwargs):
            dense_out = None
            if self.dense is not None and not first:
                dense_out, _ = self._dense_step(layer, j, kw)
            cap: dict[str, torch.Tensor] = {}
            with capture_inputs({"d": d, "mid": norm}, lambda k, x: cap.__setitem__(k, x)):
                out = stream.call(layer, stream.hidden.load(j), kw)
            if first:
                self.dense.put(j, out)
                dense_out = out
            mid = cap["mid"]
            stream.hidden.put(j, mid)
            self._fold(sums, j, cap["d"], (dense_out - mid) if self.use_dense else None)
            del cap, out, dense_out
        self._fit_mlp(i, layer, mlp, sums)

    def _fit_mlp(self, i: int, layer: nn.Module, mlp: int, sums: ProjectionSums) -> None:
        """Fit and edit the MLP, then its output over the stored residuals: the layer's output, in place."""
        d = layer.mlp.down_proj
        t0 = time.perf_counter()
        f = self.fit(d.weight, d.bias, sums, mlp, 1, self.opt)
        self.records.append({"layer": i, "kind": "mlp", **f.record})
        remove_channels(layer, torch.tensor(f.removed))
        _set_linear(d, f.weight, f.bias)
        self.t_fit += time.perf_counter() - t0
        self.stream.update(lambda m, kw: m + layer.mlp(layer.post_attention_layernorm(m)))


def _hidden_of(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def _attention_residual(layer: nn.Module, x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """``x + attn(input_layernorm(x))``: a Llama decoder layer's residual after attention (the input of
    post_attention_layernorm), as ``LlamaDecoderLayer.forward`` computes it."""
    a = layer.self_attn(hidden_states=layer.input_layernorm(x), **kw)
    return x + (a[0] if isinstance(a, tuple) else a)


def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    lin.weight = nn.Parameter(weight.to(lin.weight), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(lin.weight), requires_grad=False)


def _mlp_inner(layer: nn.Module, mid: torch.Tensor) -> torch.Tensor:
    """``act(gate(x)) * up(x)`` of a Llama MLP at ``x = post_attention_layernorm(mid)``: the input of down_proj."""
    mlp = layer.mlp
    x = layer.post_attention_layernorm(mid)
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
