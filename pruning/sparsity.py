"""Masks and selections shared by the weight-level pruners (``pruning.magnitude``, ``pruning.wanda``).

Three kinds of request, one meaning each (the options of both pruners, parsed and checked here):

- ``unstructured``: zero the lowest-scoring ``sparsity`` of the weights of each linear (``scope=layer``), of each
  output row (``scope=row``, Wanda's comparison group) or of all targeted linears together (``scope=global``).
  Counts are exact: ``floor(sparsity * n)`` entries per group, ties broken by position (first ones go).
- ``N:M``: in every run of M consecutive input columns of every row, zero the N lowest-scoring entries (Wanda's
  ``prune_n:prune_m`` convention; 2:4 and 4:8 read the same as NVIDIA's "N kept of M"). The pattern fixes the
  sparsity at N/M, so a ratio only switches a block type on (0 skips it). ``pruner.attention_ratio`` /
  ``mlp_ratio`` other than 0 or N/M are errors; ``ratio`` itself is not checked, because the top-level ``ratio``
  (default 0.25) reaches every pruner and a typed value cannot be told from that default (the record's
  ``compression`` gives the sparsity reached).
- ``structured``: remove whole KV groups (1 KV head + the query heads sharing it) and MLP channels per layer, the
  lowest-scoring ``ratio`` of them (rounded to whole units), with ``pruning.surgery``.

Tensor functions take float32 scores ``>= 0`` (``|W|``, ``|W| * ||x||``) and return boolean masks, True = zero it.
They work one linear at a time; :func:`global_threshold` finds the exact k-th smallest score over many linears
without holding them at once (a radix select on the float bits: two counting passes, a 32 K and a 64 K bin
histogram), so a global threshold over an 8B model costs two extra scoring passes and no ``[all weights]`` sort.

torch is imported inside the functions: the pruners' options bind (config validation) without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params, layer_configs
from pruning import PruneError
from pruning.options import range_order_errors, resolve_ratio_target
from pruning.ranges import resolve_range

if TYPE_CHECKING:
    # local: imports torch, and config validation imports this module
    import torch
    from torch import nn

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
TARGETS = ATTENTION + MLP
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ROUNDINGS = ("floor", "nearest")
CHUNK = 1 << 22  # entries per step of the counting and selection loops (bounds their temporaries to ~50 MB)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Pattern:
    """A parsed ``pruner.pattern``: ``kind`` unstructured | nm | structured; ``n`` zeros per ``m`` for nm."""

    kind: str
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    @property
    def sparsity(self) -> Optional[float]:
        """The sparsity an N:M pattern fixes (None for the others: their ratio sets it)."""
        return self.n / self.m if self.kind == "nm" else None


def parse_pattern(value: Any) -> Pattern:
    """``unstructured`` | ``structured`` | ``"N:M"`` with 1 <= N < M. An int is what YAML 1.1 makes of an
    unquoted ``2:4`` in a file (base 60: 124) and is read back as N:M; the command line gives the string."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
        value = f"{value // 60}:{value % 60}"
    text = str(value).strip().strip("'\"")
    if text in ("unstructured", "structured"):
        return Pattern(text)
    n_text, sep, m_text = text.partition(":")
    if not sep or not n_text.isdigit() or not m_text.isdigit():
        raise ConfigError(f"pruner.pattern={value!r} is not one of unstructured, structured or N:M (e.g. 2:4, 4:8)")
    n, m = int(n_text), int(m_text)
    if not 1 <= n < m:
        raise ConfigError(f"pruner.pattern='{n}:{m}': N:M zeroes N of every M consecutive weights of a row, "
                          f"so it needs 1 <= N < M (e.g. 2:4, 4:8)")
    return Pattern("nm", n, m)


def option_errors(p: Any, scopes: tuple[str, ...]) -> list[str]:
    """The checks both pruners share, one message per bad key (``p``: a Magnitude or Wanda being built)."""
    errors = []
    for key in ("ratio", "attention_ratio", "mlp_ratio"):
        v = getattr(p, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) < 1.0):
            errors.append(f"{'ratio' if key == 'ratio' else 'pruner.' + key}={v!r} must be a number in [0, 1)")
    ratios_ok = not errors
    if p.scope not in scopes:
        errors.append(f"pruner.scope={p.scope!r} is not one of {', '.join(scopes)}")
    if p.rounding not in ROUNDINGS:
        errors.append(f"pruner.rounding={p.rounding!r} is not one of {', '.join(ROUNDINGS)}")
    bad = [t for t in p.targets if t not in TARGETS]
    if bad or not p.targets or len(set(p.targets)) != len(p.targets):
        errors.append(f"pruner.targets={list(p.targets)!r} must be distinct names from {', '.join(TARGETS)}")
    try:
        pattern = parse_pattern(p.pattern)
    except ConfigError as e:
        errors.append(str(e))
        pattern = None
    if pattern is not None and pattern.kind == "structured" and set(p.targets) != set(TARGETS):
        errors.append("pruner.targets applies to unstructured and N:M patterns; structured removes whole KV groups "
                      "(q, k, v, o) and MLP channels (gate, up, down): skip one with pruner.attention_ratio=0 or "
                      "pruner.mlp_ratio=0")
    if pattern is not None and pattern.kind != "unstructured" and p.scope == "global":
        errors.append(f"pruner.scope='global' applies to pattern=unstructured only, not {pattern}")
    elif pattern is not None and pattern.kind != "unstructured" and p.scope != _default(p, "scope"):
        errors.append(f"pruner.scope={p.scope!r} applies to pattern=unstructured only, not {pattern} "
                      f"({'rows of M consecutive weights' if pattern.kind == 'nm' else 'whole units'} are compared)")
    if pattern is not None and pattern.kind != "structured" and p.rounding != _default(p, "rounding"):
        errors.append(f"pruner.rounding={p.rounding!r} applies to pattern=structured only (whole KV groups / "
                      f"channels), not {pattern}")
    if pattern is not None and pattern.kind == "nm":
        for key in ("attention_ratio", "mlp_ratio"):
            v = getattr(p, key)
            if ratios_ok and v is not None and v > 0 and abs(v - pattern.sparsity) > 1e-9:
                errors.append(f"pruner.{key}={v} cannot be honoured with pattern={pattern}: the pattern fixes each "
                              f"pruned linear's sparsity at {pattern.sparsity:g}; 0 skips the block type, null "
                              "follows `ratio`")
    if pattern is not None:
        refused = {"groups": f"it needs pattern=structured; pattern={pattern} zeroes weights (ratio_target=sparsity)"}
        if pattern.kind == "structured":
            refused = {"sparsity": "pattern=structured removes whole KV groups / MLP channels (ratio_target=groups)"}
        errors += resolve_ratio_target(p, refused)
    ratios = [p.ratio if r is None else r for r in (p.attention_ratio, p.mlp_ratio)]
    if p.scope == "global" and ratios_ok and 0 < ratios[0] != ratios[1] > 0:
        errors.append("pruner.scope='global' ranks every targeted weight against one threshold: attention_ratio and "
                      "mlp_ratio must be equal (or 0 to skip a block type)")
    return errors + range_order_errors(attention=p.attention_layers, mlp=p.mlp_layers)


def _default(p: Any, key: str) -> Any:
    """The class default of option ``key`` of pruner ``p`` (a value set away from it was asked for)."""
    return type(p).__dataclass_fields__[key].default


def count_of(n: int, fraction: float) -> int:
    """``floor(n * fraction)``, immune to ``0.29 * 100 = 28.999...``."""
    return math.floor(n * fraction + 1e-9)


def rounded(x: float, rounding: str) -> int:
    return math.floor(x + 1e-9) if rounding == "floor" else math.floor(x + 0.5)


def _first_ratio(units: int, count: int, rounding: str) -> float:
    """The smallest ratio that removes ``count`` of ``units`` with this rounding."""
    return (count if rounding == "floor" else count - 0.5) / units


def plan_units(kind: str, key: str, ratio: float, sizes: dict[int, int], rounding: str) -> dict[int, int]:
    """How many KV groups (``kind="KV groups"``) or MLP channels each layer loses, ``{layer: count}``.

    ``sizes``: ``{layer: units it has}``. PruneError when a layer would lose all of them, or when the ratio is
    positive but rounds to nothing in every layer; both messages give the ratios that are possible.
    """
    counts = {l: rounded(ratio * u, rounding) for l, u in sizes.items()}
    for l, n in counts.items():
        if n >= sizes[l]:
            u = sizes[l]
            raise PruneError(
                f"{key}={ratio} removes all {u} {kind} of layer {l} (rounding={rounding}); one must stay: use a "
                f"ratio below {_first_ratio(u, u, rounding):.4g}" + (" or rounding=floor" if rounding != "floor" else ""))
    if ratio > 0 and counts and not any(counts.values()):
        options = []
        for u in sorted(set(sizes.values())):
            steps = [f">= {_first_ratio(u, j, rounding):.4g} removes {j}" for j in range(1, min(u, 4))]
            options.append(f"with {u} {kind} per layer: " + ", ".join(steps) + (" ..." if u > 4 else ""))
        raise PruneError(f"{key}={ratio} rounds ({rounding}) to 0 {kind} in every layer of the range, so nothing would "
                         f"be removed; possible: 0 (skip: {key}=0), or " + "; ".join(options))
    return counts


# --------------------------------------------------------------------------- masks


def lowest_last(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries along the last dim (ties: the first positions), exactly ``k`` each.

    A partial selection (``topk``, ~3x faster than a sort) gives each row's k-th value; the rare rows with
    more entries equal to it than needed are fixed by position.
    """
    # local: imports torch, and config validation imports this module
    import torch

    t = score.topk(k, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
    mask = score <= t
    if int(torch.count_nonzero(mask)) > k * t.numel():  # one full count (a sum over a short last dim is slow)
        over = mask.sum(-1) > k
        sub, tt = score[over], t[over]
        less, eq = sub < tt, sub == tt
        need = k - less.sum(-1, keepdim=True)
        mask[over] = less | (eq & (eq.cumsum(-1) <= need))
    return mask


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """The ``floor(sparsity * n)`` lowest entries of each row (``per_row``) or of the whole matrix, exactly
    (ties: the first positions, row-major)."""
    # local: imports torch, and config validation imports this module
    import torch

    rows, cols = score.shape
    if not per_row:  # a radix select (two counting passes) beats topk over a whole matrix 4x
        return threshold_mask(score, global_threshold(lambda: [score], count_of(score.numel(), sparsity)))
    k = count_of(cols, sparsity)
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    step = max(1, CHUNK // cols)
    return torch.cat([lowest_last(score[r:r + step], k) for r in range(0, rows, step)])


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every run of ``m`` consecutive columns of every row, the ``n`` lowest entries (ties: the first ones)."""
    # local: imports torch, and config validation imports this module
    import torch

    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{cols} columns are not a multiple of {m}")
    step = max(1, CHUNK // cols)
    return torch.cat([lowest_last(score[r:r + step].reshape(-1, cols // m, m), n).reshape(-1, cols)
                      for r in range(0, rows, step)])


@dataclass
class Threshold:
    """Entries ``< value`` go, and the first ``ties`` entries ``== value`` in visiting order (exact counts).

    :func:`threshold_mask` consumes ``ties`` as it visits the tensors, so visit them in the order that
    :func:`global_threshold` counted them, once.
    """

    value: float
    ties: int


def _keys(score: torch.Tensor) -> torch.Tensor:
    """Order-preserving int32 keys of float32 scores >= 0 (the float bits read as an integer)."""
    # local: imports torch, and config validation imports this module
    import torch

    keys = score.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32)
    if keys.numel() and int(keys.min()) < 0:
        raise ValueError("scores must be >= 0 (|W|, |W| * ||x||)")
    return keys


def global_threshold(scores: Callable[[], Iterable[torch.Tensor]], k: int) -> Threshold:
    """The threshold that selects exactly the ``k`` lowest entries over every tensor ``scores()`` yields.

    ``scores`` is called twice (two counting passes) and must yield the same tensors in the same order each
    time; they need not exist all at once. First pass: a histogram of the top 15 bits of each key; second: the
    low 16 bits of the keys in the bin holding the k-th entry. Exact for any ties; ``k = 0`` selects nothing.
    """
    # local: imports torch, and config validation imports this module
    import torch

    if k <= 0:
        return Threshold(value=0.0, ties=0)  # nothing is < 0 and no tie is taken
    hist = torch.zeros(1 << 15, dtype=torch.int64)
    for s in scores():
        keys = _keys(s)
        for j in range(0, keys.numel(), CHUNK):
            hist += torch.bincount(keys[j:j + CHUNK] >> 16, minlength=1 << 15).cpu()
    cum = hist.cumsum(0)
    if int(cum[-1]) < k:
        raise ValueError(f"k={k} is more than the {int(cum[-1])} entries scored")
    hi = int(torch.searchsorted(cum, k))  # first bin whose cumulative count reaches k
    below = int(cum[hi - 1]) if hi else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for s in scores():
        keys = _keys(s)
        for j in range(0, keys.numel(), CHUNK):
            part = keys[j:j + CHUNK]
            low += torch.bincount(part[(part >> 16) == hi] & 0xFFFF, minlength=1 << 16).cpu()
    cum_low = low.cumsum(0) + below
    lo = int(torch.searchsorted(cum_low, k))
    less = int(cum_low[lo - 1]) if lo else below
    value = torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return Threshold(value=value, ties=k - less)


def threshold_mask(score: torch.Tensor, th: Threshold) -> torch.Tensor:
    """Entries below ``th.value``, plus as many entries equal to it as ``th.ties`` still allows (consumed)."""
    s = score.float()
    mask = s < th.value
    if th.ties > 0:
        eq = (s == th.value).reshape(-1).nonzero().squeeze(1)[:th.ties]
        mask.view(-1)[eq] = True
        th.ties -= eq.numel()
    return mask


def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero ``linear.weight`` where ``mask`` is True (in place; shape and dtype unchanged). A multiply by the
    complement, 5x faster than ``masked_fill_`` on CPU; a weight that is inf or NaN would not become 0."""
    # local: imports torch, and config validation imports this module
    import torch

    with torch.no_grad():
        linear.weight.mul_(mask.logical_not().to(linear.weight.device))


def count_zeros(t: torch.Tensor) -> int:
    """Entries of ``t`` equal to 0 (``-0.0`` included)."""
    # local: imports torch, and config validation imports this module
    import torch

    return int(torch.count_nonzero(t == 0))


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` lowest scores (ties: the first ones), sorted ascending."""
    # local: imports torch, and config validation imports this module
    import torch

    return torch.sort(torch.sort(scores, stable=True).indices[:count]).values


# --------------------------------------------------------------------------- plans and records


@dataclass(frozen=True)
class Plan:
    """A pruner's options resolved against a model's depth: what is pruned where, and how much.

    A block type whose ratio is 0, or none of whose linears are targeted, is off (its range may then be empty).
    """

    pattern: Pattern
    attention_ratio: float
    mlp_ratio: float
    attention_layers: tuple[int, int]  # absolute [start, end)
    mlp_layers: tuple[int, int]
    targets: tuple[str, ...]  # the linears pruned (structured: all seven)

    @staticmethod
    def of(p: Any, depth: int) -> "Plan":
        pattern = parse_pattern(p.pattern)
        ratios = {"attention": float(p.ratio if p.attention_ratio is None else p.attention_ratio),
                  "mlp": float(p.ratio if p.mlp_ratio is None else p.mlp_ratio)}
        names = {"attention": ATTENTION, "mlp": MLP}
        on = {part: ratios[part] > 0 and any(t in names[part] for t in p.targets) for part in ratios}
        spans = {part: resolve_range(*getattr(p, f"{part}_layers"), depth, part, ratios[part] if on[part] else 0.0)
                 for part in ratios}
        targets = tuple(t for t in TARGETS if t in p.targets and on["attention" if t in ATTENTION else "mlp"])
        return Plan(pattern, ratios["attention"], ratios["mlp"], spans["attention"], spans["mlp"], targets)

    def names(self, layer: int) -> list[str]:
        """The targeted linears of ``layer`` (inside their block's range)."""
        a0, a1 = self.attention_layers
        m0, m1 = self.mlp_layers
        return [t for t in self.targets if (a0 <= layer < a1 if t in ATTENTION else m0 <= layer < m1)]

    def sparsity(self, name: str) -> float:
        """The share of ``name``'s weights to zero (N:M: fixed by the pattern)."""
        if self.pattern.kind == "nm":
            return self.pattern.sparsity
        return self.attention_ratio if name in ATTENTION else self.mlp_ratio

    @property
    def last_layer(self) -> int:
        """The last layer with something to prune (-1: none)."""
        spans = [r for r, part in ((self.attention_layers, ATTENTION), (self.mlp_layers, MLP))
                 if r[1] > r[0] and any(t in part for t in self.targets)]
        return max((r[1] - 1 for r in spans), default=-1)

    @property
    def ranges(self) -> dict[str, list[int]]:
        return {"attention": list(self.attention_layers), "mlp": list(self.mlp_layers)}


def linear(layer: nn.Module, name: str) -> nn.Linear:
    """``q`` -> ``layer.self_attn.q_proj`` etc."""
    block, attr = MODULES[name].split(".")
    return getattr(getattr(layer, block), attr)


def check_nm_widths(model: nn.Module, plan: Plan) -> None:
    """PruneError naming the first targeted linear whose input width is not a multiple of M (before any change)."""
    if plan.pattern.kind != "nm":
        return
    m = plan.pattern.m
    for l, layer in enumerate(model.model.layers):
        for name in plan.names(l):
            cols = linear(layer, name).in_features
            if cols % m:
                raise PruneError(f"pruner.pattern='{plan.pattern}': layer {l} {MODULES[name]} has {cols} input "
                                 f"columns, not a multiple of M={m}; pick an M dividing it or drop it from "
                                 f"pruner.targets / the layer range")


def plan_structured(model: nn.Module, plan: Plan, rounding: str) -> tuple[dict[int, int], dict[int, int]]:
    """``({layer: KV groups to remove}, {layer: MLP channels to remove})``, checked before any change."""
    geo = Geometry.of(model)
    heads: dict[int, int] = {}
    chans: dict[int, int] = {}
    if plan.attention_ratio > 0:
        heads = plan_units("KV groups", "pruner.attention_ratio", plan.attention_ratio,
                           {l: geo.kv_heads[l] for l in range(*plan.attention_layers)}, rounding)
    if plan.mlp_ratio > 0:
        chans = plan_units("MLP channels", "pruner.mlp_ratio", plan.mlp_ratio,
                           {l: geo.widths[l] for l in range(*plan.mlp_layers)}, rounding)
    return heads, chans


def dense_note(pattern: Pattern) -> str:
    """What zeros in dense shapes buy, said plainly."""
    base = ("the zeros are stored in dense weight shapes: dense kernels gain no speed and no memory from them "
            "(the checkpoint is as large as the base model's)")
    if (pattern.n, pattern.m) == (2, 4):
        return base + ("; 2:4 is the one pattern PyTorch has sparse kernels for: on Ampere or newer GPUs, "
                       "torch.sparse.to_sparse_semi_structured turns these weights into semi-structured sparse "
                       "tensors (fp16/bf16) that do run faster; prunelab does not convert them")
    return base + ("; PyTorch's only sparse matmul kernels for weights are semi-structured 2:4 on GPUs "
                   "(torch.sparse.to_sparse_semi_structured, Ampere or newer), which this pattern does not fit")


def mask_record(model: nn.Module, plan: Plan, stats: list[dict],
                params_before: int) -> tuple[dict, list[dict], dict, list[str]]:
    """``(compression, layers, details, notes)`` of a mask run from per-linear ``stats``
    (``{"layer", "name", "weights", "zeros_before", "zeros_after"}``)."""
    weights = sum(s["weights"] for s in stats)
    zeros = sum(s["zeros_after"] for s in stats)
    new_zeros = sum(s["zeros_after"] - s["zeros_before"] for s in stats)
    counted = {(s["layer"], s["name"]): s["zeros_after"] for s in stats}
    all_weights = all_zeros = 0
    for l, layer in enumerate(model.model.layers):
        for name in TARGETS:
            w = linear(layer, name).weight
            all_weights += w.numel()
            all_zeros += counted[(l, name)] if (l, name) in counted else count_zeros(w)
    per_layer: dict[int, dict[str, float]] = {}
    for s in stats:
        per_layer.setdefault(s["layer"], {})[s["name"]] = s["zeros_after"] / s["weights"]
    layers = [{"layer": l, "sparsity": v} for l, v in sorted(per_layer.items())]
    compression = {"unit": "sparsity", "amount": zeros / weights if weights else 0.0, "pattern": str(plan.pattern)}
    details = {"pattern": str(plan.pattern), "targets": list(plan.targets), "attention_layers": plan.ranges["attention"],
               "mlp_layers": plan.ranges["mlp"], "attention_ratio": plan.attention_ratio, "mlp_ratio": plan.mlp_ratio,
               "pruned_weights": weights, "zeros": zeros, "zeros_added": new_zeros,
               "sparsity_of_all_linears": all_zeros / all_weights if all_weights else 0.0,
               "params_zeroed_fraction": new_zeros / params_before if params_before else 0.0}
    notes = [dense_note(plan.pattern),
             f"no parameter is removed (params_after = params_before): {new_zeros:,} weights set to zero, "
             f"{new_zeros / params_before:.2%} of all {params_before:,} parameters"]
    if plan.pattern.kind == "nm":
        notes.append(f"pattern {plan.pattern} fixes the sparsity of each pruned linear at {plan.pattern.sparsity:g}; "
                     f"the ratio only switches block types on (0 = skip)")
    return compression, layers, details, notes


def structured_record(model: nn.Module, geo0: Geometry, removed: dict[int, list[int]], params_before: int,
                      plan: Plan, ratio: float) -> tuple[int, dict, list[dict], dict]:
    """``(params_after, compression, layers, details)`` of a structured run; ``geo0``: the geometry before,
    ``removed``: the KV-group ids removed per layer, ``ratio``: the pruner's (``ratio_target=groups``). Also
    writes ``config.layer_configs`` for the checkpoint."""
    model.config.layer_configs = layer_configs(model)
    geo1 = Geometry.of(model)
    layers = [{"layer": l, "heads": [geo0.heads[l], geo1.heads[l]], "kv_heads": [geo0.kv_heads[l], geo1.kv_heads[l]],
               "intermediate_size": [geo0.widths[l], geo1.widths[l]], "removed_kv_groups": removed.get(l, [])}
              for l in range(geo0.depth)]
    params_after = count_params(model)
    compression = {"unit": "groups", "amount": float(ratio), "pattern": "structured",
                   "attention_group_ratio": plan.attention_ratio, "mlp_group_ratio": plan.mlp_ratio,
                   "params_removed": 1.0 - params_after / params_before}
    details = {"pattern": "structured", "attention_layers": plan.ranges["attention"], "mlp_layers": plan.ranges["mlp"],
               "attention_ratio": plan.attention_ratio, "mlp_ratio": plan.mlp_ratio,
               "heads_pruned": any(e["kv_heads"][0] != e["kv_heads"][1] for e in layers)}
    return params_after, compression, layers, details


def remove_lowest(layer: nn.Module, group_scores: Optional[torch.Tensor], channel_scores: Optional[torch.Tensor],
                  groups: int, channels: int, head_dim: int) -> list[int]:
    """Remove the ``groups`` lowest-scoring KV groups and ``channels`` lowest MLP channels of ``layer``
    (``pruning.surgery``, GQA-consistent); returns the removed group ids. A score is only read (and may be
    None) when its count is positive."""
    # local: imports torch, and config validation imports this module
    from pruning.surgery import remove_channels, remove_kv_groups

    drop: list[int] = []
    if groups:
        idx = lowest(group_scores, groups)
        drop = idx.tolist()
        remove_kv_groups(layer, idx.cpu(), head_dim)
    if channels:
        remove_channels(layer, lowest(channel_scores, channels).cpu())
    return drop
