"""Structured pruning with weight compensation: select by the error left after the update, refit what stays.

    python run.py pruner=obs                                    # 25% of all parameters, MLP channels, compensated
    python run.py pruner=obs ratio=0.1184 pruner.allocation=depth
    python run.py pruner=obs pruner.selection=wanda            # Wanda-sp's choice, compensated
    python run.py pruner=obs pruner.compensate=false           # a criterion alone (the table's "no compensation")

What is removed: whole MLP channels (rows of gate/up_proj, a column of down_proj) and, with ``attention_ratio``,
whole KV groups (a KV head with its query heads: rows of q/k/v_proj, columns of o_proj), inside the layer ranges.

How (one layer at a time, :class:`pruning.streaming.LayerStream`, on the already-pruned prefix): the layer runs
once over the calibration tokens; the inputs of ``o_proj`` / ``down_proj`` give their Gram matrices
(:class:`pruning.compensate.Gram`, float64, augmented by a constant input so the bias is refitted too); the
groups to remove are chosen by ``selection`` (``obs``: the cost after the optimal update, in ``rounds`` steps with
the inverse downdated between them; ``wanda``, ``flap``, ``magnitude``: fixed scores) and the kept columns get the
damped least-squares update (:func:`pruning.compensate.prune_columns`). A guard keeps the update only if it
lowers the output error on held-out calibration samples (``holdout`` of them, never in the fit) against plain
removal; every layer's decision and both errors are in the record. The layer's new output is computed from the
captured inputs (no second forward) and carried to the next layer, so each layer is fitted to what the pruned
model really feeds it.

Budget: ``ratio_target=params`` (default) removes ``ratio`` of ALL parameters: ``attention_ratio`` of the KV
groups of each layer in range (floor), the rest as MLP channels; ``ratio_target=groups``: ``ratio`` of each
layer's channels (and ``attention_ratio``, default ``ratio``, of its KV groups). ``allocation`` spreads the MLP
channels over the layers: ``uniform``; ``depth`` (linearly from 0.5x the mean at the first layer in range to 1.5x
at the last: later layers change the residual stream less); ``flap`` (FLAP's global ranking of standardised
WIFV scores on the dense model: one more pass); ``search`` (pruning/allocation.py: per-layer width levels around
uniform, searched by the engine's evolve with KL to the dense model on the last calibration samples, kept out of
every fit, starting from the three). The total is exact in every case.

Calibration: ``tokens`` tokens in windows of ``seq_len`` (default 131,072 tokens of 512: 85x more tokens than
unknowns per row of SmolLM2's down_proj; the recipe draws them from ``data``, disjoint from every evaluation
text; quality still improves with more, up to the 196,608 the default mix holds at this window length). Cost:
one forward of each layer in range over them, plus per layer a Gram accumulation and an ``n x n`` inverse;
memory: the model, the carried hidden states, one layer's captured inputs and its Gram matrix.
``autocast`` (option file default ``auto``) runs the layer forwards' matrix products in bfloat16 where the device
multiplies it natively (CUDA; x86 CPUs with AVX512-BF16 or AMX: 2.5x a float32 forward of SmolLM2 on one core);
the residual stream, the captured inputs, every Gram matrix, fit and guard stay in float32 or float64.
References: SlimGPT (Ling et al. 2024), ZipLM (Kurtic et al. 2023), OBC (Frantar & Alistarh 2022), FLAP.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from core.errors import ConfigError
from core.llama import Geometry, count_params, decoder_layers, layer_configs
from pruning import PruneError, PruneResult
from pruning.options import as_range, range_order_errors, stream_option_errors
from pruning.ranges import resolve_range

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

SELECTIONS = ("obs", "wanda", "flap", "magnitude")
ALLOCATIONS = ("uniform", "depth", "flap", "search")
KINDS = ("attention", "mlp")
AUTOCAST = (None, "auto", "bfloat16", "float16")


@dataclass(frozen=True)
class StructuredOBS:
    """Remove KV groups and MLP channels chosen by their cost after compensation; refit the kept weights."""

    ratio: float = 0.25
    name: str = "obs"
    ratio_target: str = "params"  # params (share of ALL parameters) | groups (share of each layer's units)
    attention_ratio: Optional[float] = 0.0  # share of KV groups per layer; None = ratio (groups target only)
    attention_layers: Any = (0, None)
    mlp_layers: Any = (0, None)
    selection: str = "obs"  # obs | wanda | flap | magnitude
    compensate: bool = True
    bias: bool = True  # refit the output bias too (a constant input in the fit)
    guard: bool = True  # keep an update only if it lowers the held-out error
    holdout: float = 0.1  # share of calibration samples held out for the guard
    rounds: int = 8  # obs selection: removal steps per layer, the inverse downdated between them
    damp: float = 0.01  # relative to the mean diagonal of the Gram matrix
    target: str = "dense"  # dense: refit towards the dense model's outputs (+1 forward/layer) | layer: its own
    refit_attention: bool = False  # target=dense: also refit o_proj of every pruned layer towards the dense outputs
    allocation: str = "uniform"  # uniform | depth | flap | search (pruning/allocation.py)
    search_budget: int = 48  # allocation=search: full-fidelity evaluations (sensitivity probes and 4 starts first)
    search_tokens: int = 8192  # allocation=search: fitness tokens = the last calibration samples, never fitted on
    min_channels: int = 1
    tokens: Optional[int] = 131072  # calibration tokens (None: data.num_samples x data.seq_len)
    seq_len: int = 512
    batch_size: int = 8
    offload: bool = False
    device: Optional[str] = None
    autocast: Optional[str] = None  # auto | bfloat16 | float16: the layer forwards' matrix products (not the fits)
    seed: int = 0  # seeds allocation=search; otherwise recorded only (deterministic)
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        errors = []
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
        if not float(self.damp) > 0:
            errors.append(f"pruner.damp={self.damp} must be > 0")
        for key, low in (("rounds", 1), ("min_channels", 1), ("seq_len", 8)):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), int) or getattr(self, key) < low:
                errors.append(f"pruner.{key}={getattr(self, key)!r} must be an integer >= {low}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < self.seq_len):
            errors.append(f"pruner.tokens={self.tokens!r} must be null or an integer >= pruner.seq_len")
        if isinstance(self.search_budget, bool) or not isinstance(self.search_budget, int) or self.search_budget < 3:
            errors.append(f"pruner.search_budget={self.search_budget!r} must be an integer >= 3 (full-fidelity "
                          "evaluations; the 3 fixed schedules are scored first, then the sensitivity start if it fits)")
        if isinstance(self.search_tokens, bool) or not isinstance(self.search_tokens, int) or self.search_tokens < 1:
            errors.append(f"pruner.search_tokens={self.search_tokens!r} must be a positive integer")
        elif self.allocation == "search" and isinstance(self.tokens, int) and isinstance(self.seq_len, int) \
                and self.seq_len > 0:
            samples, fitness = math.ceil(self.tokens / self.seq_len), math.ceil(self.search_tokens / self.seq_len)
            if samples - fitness < 2:
                errors.append(f"pruner.search_tokens={self.search_tokens} leaves fewer than 2 of the {samples} "
                              "calibration samples to fit on: lower it or raise pruner.tokens")
        if self.allocation == "search" and self.offload:
            errors.append("pruner.allocation=search runs whole-model forwards for its fitness: it needs "
                          "pruner.offload=false (the model on its device)")
        if self.autocast not in AUTOCAST:
            errors.append(f"pruner.autocast={self.autocast!r} is not one of null, {', '.join(AUTOCAST[1:])}")
        errors += stream_option_errors(self.batch_size, self.offload, self.device)
        errors += range_order_errors(attention=self.attention_layers, mlp=self.mlp_layers)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def calibration_shape(self) -> Optional[tuple[int, int]]:
        """``(samples, seq_len)`` the recipe draws for this pruner (None: the data config's)."""
        return None if self.tokens is None else (math.ceil(self.tokens / self.seq_len), self.seq_len)

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

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        from pruning.streaming import check_calibration, check_llama_layout, check_stream_device

        check_llama_layout(model, "obs")
        check_calibration(calibration, "obs")
        check_stream_device(model, self.device, self.offload)
        geo = Geometry.of(model)
        ranges = self.ranges(geo.depth)
        params_before = count_params(model)
        att_plan, channels = self._budget(geo, ranges, params_before)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        search: dict[str, Any] = {}
        if self.allocation == "search" and channels:
            from pruning.allocation import search_allocation

            found = search_allocation(model, calibration, geo, ranges["mlp"], att_plan, channels, self, timings)
            # the search's fitness samples stay out of the final fit too (pruning/allocation.py, "Which tokens")
            mlp_plan, calibration, search = found.plan, found.calibration, found.details
        else:
            mlp_plan = allocate_channels(geo, ranges["mlp"], channels, self.allocation, self.min_channels,
                                         scores=self._flap_scores(model, calibration, ranges, timings)
                                         if self.allocation == "flap" and channels else None)
        timings["allocation_s"] = time.perf_counter() - t0
        log.info("obs (%s selection%s, %s allocation): %d KV groups and %d MLP channels in attention layers "
                 "[%d, %d), mlp layers [%d, %d); %d calibration tokens", self.selection,
                 ", compensated" if self.compensate else "", self.allocation, sum(att_plan.values()), channels,
                 *ranges["attention"], *ranges["mlp"], calibration.numel())
        was_training = model.training
        model.eval()
        try:
            per_layer = prune_sequential(model, calibration, att_plan, mlp_plan, options=self, seconds=timings)
        finally:
            model.train(was_training)
        model.config.layer_configs = layer_configs(model)
        low = autocast_dtype(self, model)
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
            compression={"unit": "params", "amount": 1.0 - params_after / params_before},
            ranges={k: list(v) for k, v in ranges.items()},
            layers=[{"layer": l, "kv_heads": [geo.kv_heads[l], geo1.kv_heads[l]],
                     "intermediate_size": [geo.widths[l], geo1.widths[l]]} for l in range(geo.depth)],
            notes=notes,
            details={"selection": self.selection, "compensate": self.compensate, "bias": self.bias, "target": self.target,
                     "guard": self.guard, "holdout": self.holdout, "rounds": self.rounds, "damp": self.damp,
                     "allocation": self.allocation, "autocast": self.autocast,
                     "forward_dtype": str(low or next(model.parameters()).dtype).removeprefix("torch."),
                     "ratio": float(self.ratio), "ratio_target": self.ratio_target,
                     "attention_ratio": self.attention_ratio, "kv_groups_removed": att_plan,
                     "channels_removed": mlp_plan, "calibration_tokens": int(calibration.numel()),
                     "updates_kept": len(kept), "updates_rejected": len(rejected), "projections": per_layer,
                     "seed": self.seed, **({"search": search} if search else {})},
            timings=timings)

    def _budget(self, geo: Geometry, ranges: dict[str, tuple[int, int]], params: int) -> tuple[dict[int, int], int]:
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

    def _flap_scores(self, model: nn.Module, calibration: torch.Tensor, ranges: dict[str, tuple[int, int]],
                     timings: dict[str, float]) -> dict[int, torch.Tensor]:
        from pruning.flap import collect, standardise

        scores, _ = collect(model, calibration, {"attention": (0, 0), "mlp": ranges["mlp"]}, "WIFV",
                            batch_size=self.batch_size, device=self.device, offload=self.offload)
        return {l: standardise(s) for l, s in scores["mlp"].items()}


def allocate_channels(geo: Geometry, mlp_range: tuple[int, int], total: int, allocation: str, min_channels: int = 1,
                      scores: Optional[dict[int, torch.Tensor]] = None) -> dict[int, int]:
    """``{layer: channels removed}`` summing to exactly ``total`` over the layers of ``mlp_range``, each layer
    keeping at least ``min_channels``: ``uniform``, ``depth`` (weights 0.5 .. 1.5 along the range) or ``flap``
    (the ``total`` lowest standardised ``scores`` over all layers)."""
    layers = list(range(*mlp_range))
    if not layers or total == 0:
        return {}
    cap = {l: max(0, geo.widths[l] - min_channels) for l in layers}
    if total > sum(cap.values()):
        raise PruneError(f"obs: {total} MLP channels cannot be removed while each layer keeps {min_channels}")
    if allocation == "flap":
        import torch

        if scores is None:
            raise ValueError("flap allocation needs the layers' standardised scores")
        flat = torch.cat([scores[l].double() for l in layers])
        owner = torch.cat([torch.full((scores[l].numel(),), l) for l in layers])
        counts = {l: 0 for l in layers}
        for j in torch.sort(flat, stable=True).indices.tolist():
            l = int(owner[j])
            if counts[l] < cap[l]:
                counts[l] += 1
                total -= 1
                if total == 0:
                    break
        return {l: c for l, c in counts.items() if c}
    n = len(layers)
    weights = [1.0] * n if allocation == "uniform" else [0.5 + (i / (n - 1) if n > 1 else 0.5) for i in range(n)]
    counts = {l: 0 for l in layers}
    left, open_ = total, list(layers)
    while left > 0 and open_:  # largest remainder, capped layers' share redistributed
        w = {l: weights[layers.index(l)] for l in open_}
        share = {l: left * w[l] / sum(w.values()) for l in open_}
        give = {l: min(cap[l] - counts[l], math.floor(share[l])) for l in open_}
        rest = left - sum(give.values())
        for l in sorted(open_, key=lambda l: (-(share[l] - math.floor(share[l])), -l)):
            if rest <= 0:
                break
            if counts[l] + give[l] < cap[l]:
                give[l] += 1
                rest -= 1
        for l, g in give.items():
            counts[l] += g
            left -= g
        open_ = [l for l in open_ if counts[l] < cap[l]]
        if not any(give.values()):
            break
    return {l: c for l, c in counts.items() if c}


# --------------------------------------------------------------------------- the layer-by-layer pass


def _set_linear(lin: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    from torch import nn

    lin.weight = nn.Parameter(weight.to(lin.weight), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(lin.weight), requires_grad=False)


def target_weights(w: torch.Tensor, bias0: Optional[torch.Tensor], xs: list[torch.Tensor], targets: list[torch.Tensor],
                   h: torch.Tensor, damp: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weights (and bias, when ``h`` is augmented) whose outputs best match ``targets`` on all columns, damped
    towards ``w`` (not towards 0): ``W_eff^T = W^T + (H + d I)^-1 [X, 1]^T (T - [X, 1] W^T)``. Removing columns
    from ``W_eff`` with the OBS update then gives the least-squares fit of the kept columns to the targets."""
    import torch

    from pruning.compensate import BLOCK_TOKENS, damped_inverse

    n, out = w.shape[1], w.shape[0]
    use_bias = h.shape[0] == n + 1
    w_aug = w.detach().double()
    if use_bias:
        w_aug = torch.cat([w_aug, bias0.detach().double()[:, None]], 1)
    cross = torch.zeros(h.shape[0], out, dtype=torch.float64, device=w.device)
    for x, t in zip(xs, targets):  # float32 products of blocks of tokens, summed in float64 (as the Gram matrix)
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        wc = w_aug.to(ct)
        x2, t2 = x.reshape(-1, n), t.reshape(-1, out)
        for s in range(0, x2.shape[0], BLOCK_TOKENS):
            xb = x2[s:s + BLOCK_TOKENS].to(ct)
            r = t2[s:s + BLOCK_TOKENS].to(ct) - xb @ wc[:, :n].T
            if use_bias:
                r = r - wc[:, n]
            cross[:n] += (xb.T @ r).double()
            if use_bias:
                cross[n] += r.double().sum(0)
    hinv, _ = damped_inverse(h, damp)
    w_eff = w_aug + (hinv @ cross).T
    return w_eff[:, :n], (w_eff[:, n] if use_bias else None)


def _fit(w: torch.Tensor, b: Optional[torch.Tensor], xs: list[torch.Tensor], held: list[torch.Tensor], remove: int,
         group: int, opt: StructuredOBS, targets: Optional[list[torch.Tensor]] = None,
         held_targets: Optional[list[torch.Tensor]] = None
         ) -> tuple[list[int], torch.Tensor, Optional[torch.Tensor], dict[str, Any]]:
    """Choose and remove ``remove`` groups of input columns of ``w`` from the captured inputs ``xs`` (fit) and
    ``held`` (guard). With ``targets`` (the dense model's outputs of this projection for the same tokens) the kept
    columns are refitted towards them instead of towards ``w``'s own outputs: the fit then also undoes what the
    pruned layers before it changed. Returns (removed groups, kept weight, bias or None, record)."""
    import torch

    from pruning.compensate import Gram, column_scores, prune_columns, relative_error

    n = w.shape[1]
    gram = Gram(n, device=w.device)
    for x in xs:
        gram.add(x)
    use_bias = opt.bias and opt.compensate
    bias0 = b if b is not None else (torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if use_bias else None)
    h = gram.matrix(use_bias)
    w_fit, b_fit = w, bias0
    if targets is not None and opt.compensate:
        w_fit, b_fit = target_weights(w, bias0, xs, targets, h, opt.damp)
    scores = None if opt.selection == "obs" else column_scores(w_fit, gram, opt.selection, group)
    res = prune_columns(w_fit, h, remove, group=group, select=opt.selection, scores=scores,
                        compensate=opt.compensate, rounds=opt.rounds, damp=opt.damp,
                        bias=b_fit if use_bias else None)
    cols = torch.arange(n, device=w.device).view(-1, group)
    keep_groups = [g for g in range(n // group) if g not in set(res.removed)]
    keep = cols[keep_groups].reshape(-1)
    record: dict[str, Any] = {"removed": len(res.removed), "tokens": gram.tokens, "damp": res.damp}
    new_w, new_b = res.weight[:, :n], (res.weight[:, n] if use_bias else b)
    if opt.compensate:
        plain = w.detach().double().clone()
        plain[:, cols[res.removed].reshape(-1)] = 0
        if b is not None:
            plain = torch.cat([plain, b.detach().double()[:, None]], 1)
        decision = "kept"
        if opt.guard and held:
            xh = torch.cat([x.reshape(-1, n) for x in held])
            th = torch.cat([t.reshape(-1, w.shape[0]) for t in held_targets]) if held_targets else None
            e_new = relative_error(xh, w, res.weight, b, target=th)
            e_plain = relative_error(xh, w, plain, b, target=th)
            record.update({"heldout_error": e_new, "heldout_error_plain": e_plain, "heldout_tokens": xh.shape[0]})
            if not e_new < e_plain:
                decision = "rejected"
                new_w, new_b = plain[:, :n], b
        elif opt.guard:
            decision = "kept (no held-out samples to check)"
        record["update"] = decision
    return res.removed, new_w[:, keep], new_b, record


def prune_sequential(model: nn.Module, calibration: torch.Tensor, att_plan: dict[int, int], mlp_plan: dict[int, int],
                     *, options: StructuredOBS, seconds: Optional[dict[str, float]] = None,
                     fit: Optional[Callable[..., tuple]] = None) -> list[dict[str, Any]]:
    """Prune each planned layer in order on the pruned prefix's hidden states; returns one record per pruned
    projection (layer, kind, removed, the guard's errors and decision). ``fit`` replaces :func:`_fit` (the
    allocation search's variant pass fits every width level of a layer from the same inputs)."""
    fit_fn = fit or _fit
    import torch

    from pruning.calibration import capture_inputs
    from pruning.streaming import LayerStream
    from pruning.surgery import remove_channels, remove_kv_groups

    opt = options
    geo = Geometry.of(model)
    last = max([l + 1 for l in (*att_plan, *mlp_plan)], default=0)
    records: list[dict[str, Any]] = []
    if last == 0:
        return records
    samples = calibration.shape[0]
    held_n = min(samples - 1, math.ceil(opt.holdout * samples)) if opt.guard and opt.compensate else 0
    stream = LayerStream(model, calibration, batch_size=opt.batch_size, device=opt.device, offload=opt.offload,
                         progress=opt.progress, autocast=autocast_dtype(opt, model))
    as_model = stream.dtype  # captured inputs (bfloat16 under autocast) are fitted in the model's dtype or better
    sizes = [c.shape[0] for c in stream.chunks]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    fit_rows = [max(0, min(s, samples - held_n - a)) for a, s in zip(starts, sizes)]  # the last held_n samples: guard

    def split(xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [x[:k] for x, k in zip(xs, fit_rows) if k], [x[k:] for x, k in zip(xs, fit_rows) if k < x.shape[0]]

    t_fit = 0.0
    dense: Optional[list[torch.Tensor]] = None  # the dense model's hidden states, once they differ (target=dense)
    use_dense = opt.target == "dense" and opt.compensate
    for i, layer in stream:
        if i >= last:
            break
        att, mlp = att_plan.get(i, 0), mlp_plan.get(i, 0)
        if not att and not mlp:
            if dense is not None:
                dense = stream.forward(inputs=dense)
            stream.advance()
            continue
        cap: dict[str, list[torch.Tensor]] = {"o": [], "mid": [], "d": []}
        watch = {"mid": layer.post_attention_layernorm}
        # target=dense, refit_attention: o_proj's inputs drifted with the pruned layers before it; refit it too
        refit_o = not att and opt.refit_attention and use_dense and dense is not None
        if att or refit_o:
            watch["o"] = layer.self_attn.o_proj
        else:
            watch["d"] = layer.mlp.down_proj
        with capture_inputs(watch, lambda k, x: cap[k].append(x.to(as_model))):
            outs = stream.forward()
        mid = cap["mid"]
        dense_mid, dense_out = mid, outs  # the same while no layer before this one was pruned
        if use_dense and dense is not None:  # this layer's dense outputs on the dense states, before it changes
            got: dict[str, list[torch.Tensor]] = {"mid": []}
            with capture_inputs({"mid": layer.post_attention_layernorm}, lambda k, x: got[k].append(x.to(as_model))):
                dense_out = stream.forward(inputs=dense)
            dense_mid = got["mid"]
        t0 = time.perf_counter()
        grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)  # fits and guards are plain arithmetic: no autograd graph over the inputs
        if att or refit_o:
            o = layer.self_attn.o_proj
            width = geo.heads[i] // geo.kv_heads[i] * geo.head_dim
            fit, held = split(cap["o"])
            targets = split([dm - h for dm, h in zip(dense_mid, stream.hidden)]) if use_dense else (None, None)
            removed, w_new, b_new, rec = (fit_fn if att else _fit)(o.weight, o.bias, fit, held, att, width, opt,
                                                                   *targets)
            records.append({"layer": i, "kind": "attention" if att else "attention_refit", **rec})
            with torch.no_grad():
                old = [torch.nn.functional.linear(x, o.weight, o.bias) for x in cap["o"]]
                if removed:
                    remove_kv_groups(layer, torch.tensor(removed), geo.head_dim)
                _set_linear(o, w_new, b_new)
                mid = [m + o(x.index_select(-1, _kept_cols(x.shape[-1], removed, width, x.device))) - y
                       for m, x, y in zip(mid, cap["o"], old)]
            cap["o"] = []
        with torch.no_grad():
            if att or refit_o:  # the MLP's inputs changed with the attention: recompute them from the new residual
                cap["d"] = [_mlp_inner(layer, m) for m in mid]
            if mlp:
                d = layer.mlp.down_proj
                fit, held = split(cap["d"])
                targets = split([do - m for do, m in zip(dense_out, mid)]) if use_dense else (None, None)
                removed, w_new, b_new, rec = fit_fn(d.weight, d.bias, fit, held, mlp, 1, opt, *targets)
                records.append({"layer": i, "kind": "mlp", **rec})
                remove_channels(layer, torch.tensor(removed))
                _set_linear(d, w_new, b_new)
                keep = _kept_cols(cap["d"][0].shape[-1], removed, 1, cap["d"][0].device)
                outs = [m + d(x.index_select(-1, keep)) for m, x in zip(mid, cap["d"])]
            elif att or refit_o:
                outs = [m + layer.mlp.down_proj(x) for m, x in zip(mid, cap["d"])]
        torch.set_grad_enabled(grad)
        t_fit += time.perf_counter() - t0
        cap.clear()
        if use_dense:
            dense = dense_out
        stream.advance(outs)
    if seconds is not None:
        seconds.update({"embed_s": stream.seconds["embed"], "layers_s": stream.seconds["layers"], "fit_s": t_fit})
    return records


def autocast_dtype(opt: StructuredOBS, model: nn.Module) -> Optional[torch.dtype]:
    """The dtype the layer forwards run their matrix products in (None: the model's own)."""
    from pruning.streaming import resolve_autocast

    p = next(model.parameters())
    low = resolve_autocast(opt.autocast, opt.device or p.device)
    return low if low is not None and low != p.dtype else None


def _kept_cols(n: int, removed: list[int], group: int, device: Any) -> torch.Tensor:
    import torch

    mask = torch.ones(n // group, dtype=torch.bool)
    if removed:
        mask[torch.tensor(removed)] = False
    return (mask.nonzero().squeeze(1)[:, None] * group + torch.arange(group)).reshape(-1).to(device)


def _mlp_inner(layer: nn.Module, mid: torch.Tensor) -> torch.Tensor:
    """``act(gate(x)) * up(x)`` of a Llama MLP at ``x = post_attention_layernorm(mid)``: the input of down_proj."""
    mlp = layer.mlp
    x = layer.post_attention_layernorm(mid)
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
