"""LLM-Pruner-style block-wise structured pruning of Llama models, GQA-correct.

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

Cost: one forward+backward over the calibration batch (param_second/mix: one per sample). Only the
prunable weights require grad, and a post-accumulate hook turns each weight's gradient into per-row
scores the moment it is ready and frees it, so peak memory is weights + activations + one gradient.
Activations are trimmed further without changing any gradient: the LM-head loss runs over chunks of
tokens (``_lm_loss_backward``) and SwiGLU MLPs recompute ``silu(g) * u`` in backward (``_SwiGLUDown``).
"""

from __future__ import annotations

import logging
import math
import time
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from transformers.activations import SiLUActivation

log = logging.getLogger(__name__)

TAYLOR_VARIANTS = ("vectorize", "param_first", "param_second", "param_mix")


class PruneError(ValueError):
    """A pruning request that cannot be honoured; raised before the model is modified."""


@dataclass
class PruneSpec:
    importance: str = "taylor"  # taylor | l1 | l2 | random
    taylor: str = "param_first"
    group_reduction: str = "sum"  # sum | mean | max
    global_ranking: bool = False
    iterative_steps: int = 1
    attention_ratio: float = 0.25
    mlp_ratio: float = 0.25
    attention_layers: tuple[int, int] = (0, 0)  # [start, end), absolute
    mlp_layers: tuple[int, int] = (0, 0)
    round_to: int = 1
    rounding: str = "floor"  # floor | nearest | ceil, for heads and channel multiples
    batch_size: int = 0  # calibration micro-batch (0 = whole batch at once)
    seed: int = 0


@dataclass
class PruneResult:
    params_before: int
    params_after: int
    layers: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.params_after / self.params_before


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    hidden: int
    head_dim: int
    heads: tuple[int, ...]  # per layer
    kv_heads: tuple[int, ...]
    widths: tuple[int, ...]
    attn_bias: bool
    mlp_bias: bool

    @staticmethod
    def of(model: nn.Module) -> "Geometry":
        cfg = model.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layers = model.model.layers
        return Geometry(
            hidden=cfg.hidden_size, head_dim=hd,
            heads=tuple(l.self_attn.q_proj.out_features // hd for l in layers),
            kv_heads=tuple(l.self_attn.k_proj.out_features // hd for l in layers),
            widths=tuple(l.mlp.gate_proj.out_features for l in layers),
            attn_bias=layers[0].self_attn.q_proj.bias is not None,
            mlp_bias=layers[0].mlp.gate_proj.bias is not None,
        )

    def group_params(self, layer: int) -> int:
        """Parameters in one KV group of ``layer`` (q, k, v rows + o columns, + biases)."""
        n_rep = self.heads[layer] // self.kv_heads[layer]
        q = n_rep * self.head_dim * self.hidden
        kv = 2 * self.head_dim * self.hidden
        bias = (n_rep * self.head_dim + 2 * self.head_dim) if self.attn_bias else 0
        return 2 * q + kv + bias

    def channel_params(self) -> int:
        return 3 * self.hidden + (2 if self.mlp_bias else 0)


def _round(x: float, mode: str) -> int:
    if mode == "floor":
        return math.floor(x + 1e-9)
    if mode == "ceil":
        return math.ceil(x - 1e-9)
    return int(math.floor(x + 0.5))


def plan_counts(geo: Geometry, spec: PruneSpec, fraction: float = 1.0) -> tuple[dict[int, int], dict[int, int], list[str]]:
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


# --------------------------------------------------------------------------- importance


def _coupled(model: nn.Module, spec: PruneSpec) -> list[tuple[str, int, nn.Parameter, str]]:
    """(kind, layer, weight, orientation) of every weight whose rows/cols form pruning groups.

    orientation 'out': groups are rows (q/k/v, gate/up); 'in': groups are columns (o, down).
    """
    out = []
    layers = model.model.layers
    for l in range(*spec.attention_layers):
        a = layers[l].self_attn
        out += [("q", l, a.q_proj.weight, "out"), ("k", l, a.k_proj.weight, "out"),
                ("v", l, a.v_proj.weight, "out"), ("o", l, a.o_proj.weight, "in")]
    for l in range(*spec.mlp_layers):
        m = layers[l].mlp
        out += [("gate", l, m.gate_proj.weight, "out"), ("up", l, m.up_proj.weight, "out"),
                ("down", l, m.down_proj.weight, "in")]
    return out


def _row_scores(w: torch.Tensor, g: Optional[torch.Tensor], h: Optional[torch.Tensor], orient: str,
                spec: PruneSpec) -> torch.Tensor:
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


class _SwiGLUDown(torch.autograd.Function):
    """``down(silu(g) * u)`` that saves only ``g`` and ``u`` for backward and recomputes the product.

    Autograd would keep silu(g), silu(g) * u as well: two more ``[tokens, intermediate]`` tensors per layer,
    a quarter of all calibration activations of a Llama. Gradients are those of the stock module.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u, w)
        return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u, w = ctx.saved_tensors
        s = torch.sigmoid(g)
        a = g * s
        dp = dy @ w
        dw = None
        if ctx.needs_input_grad[2]:
            dw = dy.reshape(-1, dy.shape[-1]).T @ (a * u).reshape(-1, u.shape[-1])
        du = dp * a if ctx.needs_input_grad[1] else None
        dg = dp * u * s * (1 + g * (1 - s)) if ctx.needs_input_grad[0] else None
        return dg, du, dw


def _lean_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _SwiGLUDown.apply(mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj.weight)


def _lean_mlps(model: nn.Module) -> list[nn.Module]:
    """Stock SwiGLU MLPs (SiLU, no biases) whose forward can be swapped for the lean one."""
    out = []
    for layer in model.model.layers:
        m = getattr(layer, "mlp", None)
        if (m is not None and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj"))
                and "forward" not in vars(m) and not hasattr(m, "_hf_hook")  # accelerate's hooks wrap forward
                and isinstance(getattr(m, "act_fn", None), (nn.SiLU, SiLUActivation))
                and all(getattr(m, k).bias is None for k in ("gate_proj", "up_proj", "down_proj"))):
            out.append(m)
    return out


LOGITS_CHUNK_BYTES = 32 * 2**20


def _lm_loss_backward(model: nn.Module, ids: torch.Tensor, scale: float = 1.0) -> None:
    """Backward of ``scale * model(ids, labels=ids).loss`` without holding the whole batch's logits.

    The decoder runs once; the LM head and the cross-entropy run over chunks of tokens, each chunk's
    backward accumulating into the gradient of the final hidden states, which is then pushed through the
    decoder once. Same gradients as the plain loss (next-token mean over all positions), but the
    ``[tokens, vocab]`` fp32 logits and their gradient never exist all at once (10 x 64 tokens of a
    49k-token vocabulary: 126 MB each).
    """
    import torch.nn.functional as F

    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    if not hidden.requires_grad:
        return
    h = hidden.detach().reshape(-1, hidden.shape[-1]).requires_grad_(True)
    targets = ids[:, 1:].reshape(-1)
    n = targets.numel()
    step = max(1, LOGITS_CHUNK_BYTES // (4 * model.config.vocab_size))
    for s in range(0, n, step):
        logits = model.lm_head(h[s:s + step]).float()  # (device_map: the head may sit on another device)
        (F.cross_entropy(logits, targets[s:s + step].to(logits.device), reduction="sum") * (scale / n)).backward()
    hidden.reshape(-1, hidden.shape[-1]).backward(h.grad)


def _calibration_passes(model: nn.Module, batch: torch.Tensor, weights: list[nn.Parameter],
                        on_grad: Callable[[int, torch.Tensor], None], per_sample: bool, micro: int,
                        progress: bool) -> None:
    """Run forward+backward; call ``on_grad(i, grad)`` once per weight per pass (per sample if asked).

    Each weight's gradient is handed over by a post-accumulate hook and freed at once.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in weights:
        p.requires_grad_(True)
    live = {"on": True}
    handles = []
    for i, p in enumerate(weights):
        def hook(param: torch.Tensor, i: int = i) -> None:
            if live["on"]:
                on_grad(i, param.grad)
                param.grad = None
        handles.append(p.register_post_accumulate_grad_hook(hook))
    lean = _lean_mlps(model)
    for m in lean:  # instance attribute shadows the class forward; deleted in `finally`
        m.forward = types.MethodType(_lean_mlp_forward, m)
    try:
        if per_sample:
            chunks = [batch[j:j + 1] for j in range(batch.shape[0])]
        else:
            step = micro if micro and micro < batch.shape[0] else batch.shape[0]
            chunks = [batch[j:j + step] for j in range(0, batch.shape[0], step)]
        for k, chunk in enumerate(tqdm(chunks, desc="calibration fwd+bwd", disable=not progress)):
            # Whole-batch scores (first-order terms) need the summed gradient: let micro-batches accumulate,
            # and hand the gradient over on the last one only.
            live["on"] = per_sample or k == len(chunks) - 1
            scale = 1.0 if per_sample else chunk.shape[0] / batch.shape[0]
            with torch.autocast(device_type=device.type, enabled=False):
                _lm_loss_backward(model, chunk.to(device), scale)
    finally:
        for m in lean:
            del m.forward
        for h in handles:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
            p.grad = None


def importance(model: nn.Module, batch: Optional[torch.Tensor], spec: PruneSpec, progress: bool = True
               ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Group scores: ``{layer: [kv_groups]}`` for attention and ``{layer: [width]}`` for MLP."""
    geo = Geometry.of(model)
    coupled = _coupled(model, spec)
    weights = [w for _, _, w, _ in coupled]
    rows: list[Optional[torch.Tensor]] = [None] * len(coupled)

    if spec.importance == "random":
        gen = torch.Generator().manual_seed(spec.seed)
        att = {l: torch.rand(geo.kv_heads[l], generator=gen) for l in range(*spec.attention_layers)}
        mlp = {l: torch.rand(geo.widths[l], generator=gen) for l in range(*spec.mlp_layers)}
        return att, mlp

    if spec.importance in ("l1", "l2"):
        rows = [_row_scores(w, None, None, o, spec) for _, _, w, o in coupled]
    else:
        if batch is None:
            raise PruneError("Taylor importance needs calibration data")
        n = batch.shape[0]
        if spec.taylor in ("vectorize", "param_first"):
            def on_grad(i: int, g: torch.Tensor) -> None:
                rows[i] = _row_scores(weights[i], g, None, coupled[i][3], spec)
            _calibration_passes(model, batch, weights, on_grad, False, spec.batch_size, progress)
        elif spec.taylor == "param_second":
            # sum_row |W*H*W| with H = mean_j g_j^2 is linear in H: accumulate per row, per sample.
            def on_grad(i: int, g: torch.Tensor) -> None:
                w = weights[i].detach().float()
                s = (w * w * g.float().pow(2) / n).sum(1 if coupled[i][3] == "out" else 0)
                rows[i] = s if rows[i] is None else rows[i] + s
            _calibration_passes(model, batch, weights, on_grad, True, 0, progress)
        else:  # param_mix needs the full mean gradient and Fisher diagonal before the abs
            gsum = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
            hsum = [torch.zeros_like(w, dtype=torch.float32) for w in weights]

            def on_grad(i: int, g: torch.Tensor) -> None:
                gf = g.float()
                gsum[i].add_(gf, alpha=1.0 / n)
                hsum[i].addcmul_(gf, gf, value=1.0 / n)
            _calibration_passes(model, batch, weights, on_grad, True, 0, progress)
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
    att = {l: red(torch.stack(p)) for l, p in att_parts.items()}
    mlp = {l: red(torch.stack(p)) for l, p in mlp_parts.items()}
    return att, mlp


# --------------------------------------------------------------------------- selection


def _select(scores: dict[int, torch.Tensor], counts: dict[int, int], global_ranking: bool, round_to: int,
            min_keep: int) -> dict[int, torch.Tensor]:
    """Indices to remove per layer: lowest scores per layer, or lowest across layers (global)."""
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


# --------------------------------------------------------------------------- surgery


def _keep(n: int, drop: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[drop] = False
    return mask.nonzero().squeeze(1)


def _shrink(lin: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    keep = keep.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(dim, keep).contiguous(), requires_grad=False)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, keep).contiguous(), requires_grad=False)
        lin.out_features = keep.numel()
    else:
        lin.in_features = keep.numel()


def remove_kv_groups(layer: nn.Module, groups: torch.Tensor, head_dim: int) -> None:
    """Remove KV groups (each: 1 KV head + its n_rep query heads) from a Llama attention block."""
    attn = layer.self_attn
    kv = attn.k_proj.out_features // head_dim
    n_rep = attn.q_proj.out_features // head_dim // kv
    keep_groups = _keep(kv, groups)
    kv_rows = (keep_groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    q_rows = (keep_groups[:, None] * (n_rep * head_dim) + torch.arange(n_rep * head_dim)).reshape(-1)
    _shrink(attn.q_proj, q_rows, 0)
    _shrink(attn.k_proj, kv_rows, 0)
    _shrink(attn.v_proj, kv_rows, 0)
    _shrink(attn.o_proj, q_rows, 1)
    attn.num_key_value_groups = n_rep  # unchanged by construction


def remove_channels(layer: nn.Module, channels: torch.Tensor) -> None:
    mlp = layer.mlp
    keep = _keep(mlp.gate_proj.out_features, channels)
    _shrink(mlp.gate_proj, keep, 0)
    _shrink(mlp.up_proj, keep, 0)
    _shrink(mlp.down_proj, keep, 1)
    mlp.intermediate_size = keep.numel()


# --------------------------------------------------------------------------- driver


def prune(model: nn.Module, batch: Optional[torch.Tensor], spec: PruneSpec, progress: bool = True) -> PruneResult:
    """Prune ``model`` in place; ``batch`` is ``[num_samples, seq_len]`` calibration token ids."""
    from core.checkpoint import layer_configs
    from core.models import count_params

    if spec.importance not in ("taylor", "l1", "l2", "random"):
        raise PruneError(f"unknown importance {spec.importance!r}")
    if spec.importance == "taylor" and spec.taylor not in TAYLOR_VARIANTS:
        raise PruneError(f"unknown taylor variant {spec.taylor!r} ({', '.join(TAYLOR_VARIANTS)})")
    geo0 = Geometry.of(model)
    depth = len(geo0.heads)
    for name, (a, b) in (("attention", spec.attention_layers), ("mlp", spec.mlp_layers)):
        if not 0 <= a <= b <= depth:
            raise PruneError(f"{name} layer range [{a}, {b}) is outside the model's {depth} layers")
    final_heads, final_chans, notes = plan_counts(geo0, spec)
    for note in notes:
        log.warning(note)
    result = PruneResult(params_before=count_params(model), params_after=0, notes=list(notes))
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
        att, mlp = importance(model, batch, spec, progress)
        t1 = time.perf_counter()
        drop_h = _select(att, want_h, spec.global_ranking, 1, 1)
        drop_c = _select(mlp, want_c, spec.global_ranking, spec.round_to, spec.round_to)
        layers = model.model.layers
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
    for l in range(depth):
        result.layers.append({
            "layer": l,
            "heads": [geo0.heads[l], geo1.heads[l]],
            "kv_heads": [geo0.kv_heads[l], geo1.kv_heads[l]],
            "intermediate_size": [geo0.widths[l], geo1.widths[l]],
            "removed_kv_groups": sorted(removed_groups.get(l, [])),
        })
    result.params_after = count_params(model)
    result.timings = {"importance_s": t_score, "surgery_s": t_cut}
    return result
