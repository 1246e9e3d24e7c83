"""Wanda (Sun et al. 2023): prune by ``|W| * ||x||``, weights times the norm of their input feature.

    python run.py pruner=wanda ratio=0.5                          # 50% of each output row, unstructured
    python run.py pruner=wanda pruner.pattern=2:4                 # 2 of every 4 consecutive weights of a row
    python run.py pruner=wanda pruner.pattern=structured ratio=0.34   # Wanda-sp: KV groups and MLP channels

Score of weight ``W[i, j]`` of a linear: ``|W[i, j]| * ||X[:, j]||_2``, the L2 norm of input feature ``j`` over
every calibration token (accumulated in float32). As in github.com/locuslab/wanda ``lib/prune.py: prune_wanda``
the comparison group is each output row (``scope=row``; ``scope=layer``: the whole linear), N:M zeroes the N
lowest of every M consecutive input columns of a row, and the statistics of all seven linears of a layer come from
one pass of the dense layer; then the layer is pruned and the dense layer's outputs are carried on to the next
layer: one forward per layer (default). ``sequential=true`` is the original's way: the pruned layer runs again
so the next layer sees the pruned model's hidden states, a second forward of every pruned layer; it zeroes exactly
the weights the original code zeroes (tests/bench/peers_bench.py runs the original beside it). On SmolLM2 at 50% the
default's perplexity is within about 1% of the original's, sometimes below it (BoolQ: 60.17 against 60.83, 97.6%
of the same zeros; tests/bench/results/peers.jsonl), and it takes 0.99x one model forward instead of 1.74x. The original divides ``||x||^2`` by the number of samples: a constant per linear
that changes no ranking, left out here. Counts are exact (``floor(ratio * columns)`` per row, ties by position).

``pattern=structured`` is Wanda-sp (An et al., FLAP, github.com/CASIA-IVA-Lab/FLAP ``prune_wanda_sp``): an MLP
channel ``c`` scores ``sum_i |W_down[i, c]| * ||x_c||`` over down_proj's column ``c`` (its input norms), a query
head the same sum over its o_proj columns; with GQA a KV group (1 KV head + the query heads sharing it, removed
together by ``pruning.surgery``) scores the sum over its query heads. FLAP averages over rows instead of summing:
the same order. ``ratio`` is then the share of KV groups / channels removed per layer, rounded to whole units.

Cost: one forward of every decoder layer up to the last pruned one over the calibration tokens (``sequential``: a
second one of each pruned layer), never the LM head, plus per linear one float32 score and one mask. Memory: the
model, the carried hidden states (:class:`pruning.streaming.LayerStream`), one layer's activations and one
linear's score. ``offload=true`` with ``device=cuda`` keeps the model on the CPU and moves one layer at a time.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from core.run.errors import ConfigError
from core.models.llama import Geometry, count_params
from pruning import PruneResult
from pruning.options import as_range, stream_option_errors
from pruning.sparsity import (TARGETS, Plan, apply_mask, check_nm_widths, count_zeros, linear, mask_record,
                              nm_mask, option_errors, parse_pattern, plan_structured, remove_lowest, structured_record,
                              unstructured_mask)

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

SCOPES = ("row", "layer")
# Linears that read the same input share one statistic: q/k/v read input_layernorm's output, gate/up
# post_attention_layernorm's.
INPUT_OF = {"q": "q", "k": "q", "v": "q", "o": "o", "gate": "gate", "up": "gate", "down": "down"}


@dataclass(frozen=True)
class Wanda:
    """Zero the weights of smallest ``|W| * ||x||`` (unstructured per row or per linear, N:M), or remove the KV
    groups and MLP channels of smallest summed score (structured, Wanda-sp), inside the layer ranges.

    ``ratio`` is read as :attr:`RATIO` says: ``sparsity`` for unstructured and N:M patterns, ``groups`` for
    ``pattern=structured``.
    """

    RATIO: ClassVar[dict[str, str]] = {
        "sparsity": "share of each output row's weights zeroed (scope=layer: of each targeted linear's); N:M: the "
                    "pattern fixes it at N/M, and 0 skips a block type",
        "groups": "pattern=structured, Wanda-sp (the default unit there): share of the KV groups / MLP channels "
                  "removed in each layer of the ranges, rounded to whole units",
    }

    ratio: float = 0.5
    name: str = "wanda"
    pattern: Any = "unstructured"  # unstructured | N:M (2:4, 4:8, ...) | structured
    scope: str = "row"  # row | layer: the comparison group of unstructured pruning
    targets: Any = TARGETS  # linears pruned (unstructured, N:M): q k v o gate up down
    attention_ratio: Optional[float] = None  # None = ratio
    mlp_ratio: Optional[float] = None  # None = ratio
    attention_layers: Any = (0, None)
    mlp_layers: Any = (0, None)
    rounding: str = "floor"  # structured: floor | nearest to whole KV groups / channels
    sequential: bool = False  # true: run each pruned layer again so later layers see pruned inputs (the original)
    batch_size: int = 8  # calibration samples per layer forward (0 = all)
    offload: bool = False  # keep the model where it is, move one layer at a time to `device`
    device: Optional[str] = None  # where layers run (None = the model's device)
    states: str = "auto"  # where the calibration hidden states live: auto | device | host | disk (docs/scale.md)
    ratio_target: Optional[str] = None  # sparsity | groups (RATIO); None = the one `pattern` implies
    seed: int = 0  # recorded only: every choice is deterministic (ties go by position)
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        errors = option_errors(self, SCOPES)
        errors += stream_option_errors(self.batch_size, self.offload, self.device, self.states)
        for key in ("sequential", "progress"):
            if not isinstance(getattr(self, key), bool):
                errors.append(f"pruner.{key}={getattr(self, key)!r} must be true or false")
        if errors:
            raise ConfigError("; ".join(errors))
        object.__setattr__(self, "pattern", str(parse_pattern(self.pattern)))

    @property
    def needs_calibration(self) -> bool:
        return True

    def check(self, depth: int) -> None:
        Plan.of(self, depth)

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: int = 128,
                  free: Optional[tuple[Optional[int], Optional[int]]] = None) -> Any:
        """Peak memory and work of this prune on a model of ``config.json`` ``cfg`` (torch-free; core/run/plan.py):
        the layer stream (pruning/memory.py: weights, the carried hidden states (one copy, where ``states`` puts them), one layer's forward on a
        micro-batch), then one linear's float32 score and mask. Forwards: every layer up to the last pruned one
        (``sequential``: the pruned ones twice)."""
        from core.run.plan import dtype_bytes, geometry
        from pruning.memory import largest_linear, layer_weight_params, layers_up_to, stream, weight_level_summary

        geo = geometry(cfg)
        plan = Plan.of(self, geo.depth)
        removes, widths = weight_level_summary(plan, geo, self.rounding)
        last = plan.last_layer
        if widths is not None:
            last = max((w["layer"] for w in widths if w["kv_heads"][0] != w["kv_heads"][1]
                        or w["intermediate_size"][0] != w["intermediate_size"][1]), default=-1)
        p = stream(cfg, tokens=tokens, seq_len=seq_len, batch_size=self.batch_size, dtype=dtype, model_device=device,
                   device=self.device, offload=self.offload, states=self.states, device_free=(free or (None,))[0],
                   host_free=(free or (None, None))[1])
        b = dtype_bytes(dtype, cfg)
        if plan.pattern.kind == "structured":
            p.add(**{"one layer's scores and surgery": max(layer_weight_params(geo, l) for l in range(geo.depth)) * b
                     + largest_linear(geo) * 8})
        else:
            p.add(**{"one linear's score and mask": largest_linear(geo) * (4 + 4 + 1)})
        pruned = len([l for l in range(last + 1) if plan.names(l)]) if widths is None else \
            len([w for w in widths if w["kv_heads"][0] != w["kv_heads"][1]
                 or w["intermediate_size"][0] != w["intermediate_size"][1]])
        forwards = layers_up_to(last) + (pruned if self.sequential else 0)
        return p.footprint(layer_forwards=forwards, tokens=int(tokens), removes=removes, widths=widths)

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        # local: imports torch, and config validation imports this module
        import torch

        from pruning.streaming import check_calibration, check_llama_layout, check_stream_device

        check_llama_layout(model, f"pruner={self.name}")
        plan = Plan.of(self, len(model.model.layers))
        check_calibration(calibration, f"pruner={self.name}")
        check_stream_device(model, self.device, self.offload)
        geo0 = Geometry.of(model)
        if plan.pattern.kind == "structured":
            heads, chans = plan_structured(model, plan, self.rounding)  # every refusal before any change
            todo = {l: (heads.get(l, 0), chans.get(l, 0)) for l in range(geo0.depth) if heads.get(l) or chans.get(l)}
            last = max(todo, default=-1)
        else:
            check_nm_widths(model, plan)
            todo = {}
            last = plan.last_layer
        log.info("pruning %s (%s%s, %s) attention layers [%d, %d) ratio %.3f, mlp layers [%d, %d) ratio %.3f",
                 self.name, plan.pattern, f", scope {self.scope}" if plan.pattern.kind == "unstructured" else "",
                 "sequential" if self.sequential else "dense inputs", *plan.attention_layers, plan.attention_ratio,
                 *plan.mlp_layers, plan.mlp_ratio)
        params_before = count_params(model)
        run = _Run(self, plan, model, calibration, geo0.head_dim, todo, last)
        run.go()
        base = {"score": "|W| * ||x||_2", "sequential": self.sequential, "batch_size": self.batch_size,
                "offload": self.offload, "device": self.device, "seed": self.seed,
                "calibration": {"samples": int(calibration.shape[0]), "tokens": int(calibration.numel())}}
        if plan.pattern.kind == "structured":
            params_after, compression, layers, details = structured_record(model, geo0, run.removed, params_before,
                                                                           plan, self.ratio)
            notes = ["Wanda-sp: a KV group scores the sum over its query heads' o_proj columns of |W| * ||x||, an "
                     "MLP channel the sum over its down_proj column"]
            details = {**details, **base, "rounding": self.rounding}
        else:
            compression, layers, details, notes = mask_record(model, plan, run.stats, params_before)
            params_after = params_before  # dense shapes kept: nothing removed
            details = {**details, **base, "scope": self.scope}
        return PruneResult(params_before=params_before, params_after=params_after, compression=compression,
                           ranges=plan.ranges, layers=layers, notes=notes, details=details, timings=run.timings)


class _Run:
    """One pass of Wanda over the model, layer by layer (the state of ``Wanda.__call__``)."""

    def __init__(self, spec: Wanda, plan: Plan, model: nn.Module, calibration: torch.Tensor, head_dim: int,
                 todo: dict[int, tuple[int, int]], last: int):
        self.spec, self.plan, self.model, self.calibration = spec, plan, model, calibration
        self.head_dim, self.todo, self.last = head_dim, todo, last
        self.stats: list[dict] = []  # per pruned linear (masks)
        self.removed: dict[int, list[int]] = {}  # per layer, removed KV groups (structured)
        self.timings: dict[str, float] = {}

    def go(self) -> None:
        # local: imports torch, and config validation imports this module
        from pruning.calibration import capture_inputs
        from pruning.streaming import LayerStream

        if self.last < 0:
            return  # nothing to prune (ratios 0): no calibration pass either
        t0 = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        spec, prune_s = self.spec, 0.0
        try:
            stream = LayerStream(self.model, self.calibration, batch_size=spec.batch_size, device=spec.device,
                                 offload=spec.offload, progress=spec.progress, states=spec.states)
            with closing(iter(stream)) as layers:
                for i, layer in layers:
                    work = self._inputs_needed(i)
                    if not work:
                        stream.advance()
                        continue
                    sums = {key: None for key in work}

                    def accumulate(key: str, x: torch.Tensor) -> None:  # sum over tokens of x_j^2, float32
                        s = x.reshape(-1, x.shape[-1]).float().square().sum(0)
                        sums[key] = s if sums[key] is None else sums[key] + s

                    def statistics_only(x: torch.Tensor, kw: dict) -> None:
                        layer(x, **kw)  # (sequential: the next layer's inputs come from the pruned layer)

                    with capture_inputs({key: linear(layer, key) for key in work}, accumulate):
                        if spec.sequential:
                            stream.run(statistics_only)
                        else:  # the dense layer's outputs replace its inputs before it is pruned
                            stream.advance()
                    t1 = time.perf_counter()
                    norms = {key: s.sqrt() for key, s in sums.items()}
                    self._prune_layer(i, layer, norms)
                    prune_s += time.perf_counter() - t1
                    if i == self.last:
                        break  # later layers are unchanged: no need to run them
                    if spec.sequential:
                        stream.advance()  # the pruned layer's outputs
        finally:
            self.model.train(was_training)
        self.timings = {"embed_s": stream.seconds["embed"], "layer_forward_s": stream.seconds["layers"],
                        "prune_s": prune_s, "total_s": time.perf_counter() - t0}

    def _inputs_needed(self, i: int) -> list[str]:
        """The linears of layer ``i`` whose inputs are captured (one per distinct input)."""
        if self.plan.pattern.kind == "structured":
            g, c = self.todo.get(i, (0, 0))
            return (["o"] if g else []) + (["down"] if c else [])
        return sorted({INPUT_OF[name] for name in self.plan.names(i)}, key=TARGETS.index)

    def _prune_layer(self, i: int, layer: nn.Module, norms: dict[str, torch.Tensor]) -> None:
        plan = self.plan
        if plan.pattern.kind == "structured":
            g, c = self.todo[i]
            groups = channels = None
            if g:  # o_proj columns of KV group k: its query heads', contiguous
                kv = layer.self_attn.k_proj.out_features // self.head_dim
                groups = wanda_scores(linear(layer, "o").weight.detach(), norms["o"]).sum(0).view(kv, -1).sum(1)
            if c:
                channels = wanda_scores(linear(layer, "down").weight.detach(), norms["down"]).sum(0)
            self.removed[i] = remove_lowest(layer, groups, channels, g, c, self.head_dim)
            return
        for name in plan.names(i):
            lin = linear(layer, name)
            zeros_before = count_zeros(lin.weight)
            score = wanda_scores(lin.weight.detach(), norms[INPUT_OF[name]])
            if plan.pattern.kind == "nm":
                mask = nm_mask(score, plan.pattern.n, plan.pattern.m)
            else:
                mask = unstructured_mask(score, plan.sparsity(name), per_row=self.spec.scope == "row")
            del score
            apply_mask(lin, mask)
            self.stats.append({"layer": i, "name": name, "weights": lin.weight.numel(), "zeros_before": zeros_before,
                               "zeros_after": count_zeros(lin.weight)})


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``|W[i, j]| * ||x_j||`` in float32, ``[out, in]``."""
    return weight.float().abs() * input_norm.to(weight.device)[None, :]
