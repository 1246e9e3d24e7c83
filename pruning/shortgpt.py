"""ShortGPT (Men et al. 2024, "Layers in Large Language Models are More Redundant Than You Expect"): remove the
decoder layers that change the hidden states least.

    python run.py pruner=shortgpt pruner.num_layers=7            # the 7 least influential layers of the ranges
    python run.py pruner=shortgpt ratio=0.25                     # the fewest of them that remove 25% of all params
    python run.py pruner=shortgpt pruner.granularity=sublayer pruner.num_layers=8   # attention / MLP sub-blocks

Block Influence of layer i over the calibration tokens: ``BI_i = 1 - mean_tokens cos(x_i, x_{i+1})``, with
``x_i`` the hidden state entering layer i and ``x_{i+1}`` the one leaving it. A layer whose output points where
its input did only rescales the residual stream, and the next RMSNorm undoes the scale: removing it changes
little. The ``n`` layers with the smallest BI go; the remaining ones are renumbered (``self_attn.layer_idx``,
``config.num_hidden_layers``, ``config.layer_types``) so the KV cache and ``generate()`` index them right, and
``config.removed_layers`` records the original indices (the analysis aligns layers by it). A model whose layers
all keep the config's widths saves as a stock Llama checkpoint.

``granularity=sublayer`` scores each sub-block on its own, ``BI = 1 - mean_tokens cos(h, h + f(h))`` with ``h``
the residual stream entering it (attention: the layer input; MLP: the layer input plus the attention output),
and removes the ``n`` lowest of the attention sub-blocks in ``attention_layers`` and the MLP sub-blocks in
``mlp_layers`` together: a removed sub-block becomes ``RemovedAttention`` / ``RemovedMLP``
(``core.models.modeling_pruned``, adding nothing to the residual), a layer losing both is removed entirely.

How many: ``num_layers`` = exactly n units (layers; sub-blocks for ``sublayer``). ``num_layers=null`` reads
``ratio`` as the share of ALL the model's parameters to remove and takes the units in increasing BI until
their parameters reach it: the count rounds up (SmolLM2-135M, ratio 0.25: 10 layers, 26.3%; ratio 0.2:
8 layers, 21.1%), never down to zero.

Compared with the authors' code (github.com/icip-cas/ShortGPT; github.com/sramshetty/ShortGPT is the same code;
``metrics.block_influence``,
``ShortLlama.compute_bi``): same per-token cosine between a layer's input and output over every position (no
token skipped, not even the first; it sums over tokens, we average, which ranks identically; it counts pad
positions too, and our calibration windows have none). Its HF branch reads ``output_hidden_states``,
whose last entry is after the final norm; here the last layer's raw output is used, like its Llama branch.
Scores come from one pass over the dense model, removal happens once (not iteratively), as in the paper.

Cost: one forward of the decoder layers over the calibration tokens (no LM head), streamed one layer at a time
by :class:`pruning.streaming.LayerStream`: memory is the model plus one copy of the calibration hidden
states (where ``states`` puts them) plus one micro-batch of one layer's activations (``batch_size``;
``offload`` + ``device`` run each layer on ``device`` while the model stays where it is). Cosines are taken in float32, their sums kept in float64.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from core.run.errors import ConfigError
from core.models.llama import count_params, decoder_layers, head_dim
from pruning import PruneError, PruneResult
from pruning.options import as_range, range_order_errors, resolve_ratio_target, stream_option_errors
from pruning.ranges import resolve_range

if TYPE_CHECKING:
    import torch
    from torch import nn

# torch is imported inside the functions that use it: building a ShortGPT from its options, which is how
# run.py validates a config, imports no torch.

log = logging.getLogger(__name__)

GRANULARITIES = ("layer", "sublayer")
Unit = tuple[int, str]  # (layer index, "layer" | "attention" | "mlp")


@dataclass(frozen=True)
class ShortGPT:
    """Remove the ``num_layers`` least influential layers (or sub-blocks), or the fewest reaching ``ratio`` of
    all parameters; candidates are the layers inside both ranges (``sublayer``: attention sub-blocks of
    ``attention_layers``, MLP sub-blocks of ``mlp_layers``). Ranges are ``(start, end)``, end exclusive,
    negative counting from the last layer, ``None`` = the end. ``ratio`` is read as :attr:`RATIO` says."""

    RATIO: ClassVar[dict[str, str]] = {
        "params": "share of ALL the model's parameters removed: the fewest least influential layers (sub-blocks) "
                  "whose parameters reach it, so the count rounds up (pruner.num_layers=null)",
        "layers": "unused: pruner.num_layers=n removes exactly n whole layers (the unit whenever num_layers is set)",
        "sublayers": "unused: pruner.num_layers=n with granularity=sublayer removes exactly n attention / MLP "
                     "sub-blocks",
    }

    num_layers: Optional[int] = None  # None: remove `ratio` of all parameters
    ratio: float = 0.25
    ratio_target: Optional[str] = None  # params | layers | sublayers (RATIO); None = the one num_layers implies
    name: str = "shortgpt"
    granularity: str = "layer"  # layer | sublayer
    attention_layers: Any = (0, None)  # (start, end) or {start, end}
    mlp_layers: Any = (0, None)
    seed: int = 0  # recorded only: ShortGPT draws nothing at random
    batch_size: int = 8  # calibration samples per layer forward; 0 = all at once
    offload: bool = False  # keep the model where it is, run each layer on `device`
    device: Optional[str] = None  # where layers run (None: the model's device)
    states: str = "auto"  # where the calibration hidden states live: auto | device | host | disk (docs/scale.md)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_layers", as_range(self.attention_layers))
        object.__setattr__(self, "mlp_layers", as_range(self.mlp_layers))
        errors = []
        if self.granularity not in GRANULARITIES:
            errors.append(f"pruner.granularity={self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
            errors.append(f"pruner.num_layers={n!r} must be a whole number of layers (or null to use ratio)")
        elif n is not None and n <= 0:
            errors.append(f"pruner.num_layers={n} removes no layers: it must be >= 1 "
                          "(or null to remove `ratio` of all parameters)")
        elif n is None and not 0.0 < float(self.ratio) < 1.0:
            what = "removes no layers" if float(self.ratio) <= 0 else "would remove every parameter"
            errors.append(f"ratio={self.ratio} with pruner.num_layers=null {what}: ratio is the share of all "
                          "parameters to remove, in (0, 1); or set pruner.num_layers=n")
        errors += stream_option_errors(self.batch_size, self.offload, self.device, self.states)
        errors += range_order_errors(attention=self.attention_layers, mlp=self.mlp_layers)
        count = "sublayers" if self.granularity == "sublayer" else "layers"
        if n is None:
            refused = {u: "it counts removed units: set pruner.num_layers=n (then `ratio` is unused)"
                       for u in ("layers", "sublayers")}
        else:
            refused = {"params": f"pruner.num_layers={n} fixes how many units go, so `ratio` is unused; "
                                 "pruner.num_layers=null removes `ratio` of all parameters",
                       ("sublayers" if count == "layers" else "layers"):
                           f"granularity={self.granularity} counts {count} (ratio_target={count})"}
        errors += resolve_ratio_target(self, refused)
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def needs_calibration(self) -> bool:
        return True

    def candidates(self, depth: int) -> list[Unit]:
        """The units that may be removed, checked against ``depth`` (PruneError when none)."""
        att = resolve_range(*self.attention_layers, depth, "attention", 0.0)
        mlp = resolve_range(*self.mlp_layers, depth, "mlp", 0.0)
        if self.granularity == "layer":
            units = [(i, "layer") for i in range(max(att[0], mlp[0]), min(att[1], mlp[1]))]
            where = f"inside both layers.attention {list(att)} and layers.mlp {list(mlp)}"
        else:
            units = [(i, "attention") for i in range(*att)] + [(i, "mlp") for i in range(*mlp)]
            where = f"in layers.attention {list(att)} or layers.mlp {list(mlp)}"
        if not units:
            raise PruneError(f"shortgpt: no {'layer' if self.granularity == 'layer' else 'sub-block'} is {where} "
                             f"of the model's {depth} layers: nothing can be removed")
        return units

    def check(self, depth: int) -> None:
        units = self.candidates(depth)
        n = self.num_layers
        if n is None:
            return  # how many units `ratio` needs depends on their parameter counts: checked in __call__
        every = depth if self.granularity == "layer" else 2 * depth
        what = "layers" if self.granularity == "layer" else "sub-blocks"
        if n >= every:
            raise PruneError(f"pruner.num_layers={n} would remove all {every} {what} of the model"
                             f" ({depth} layers): at most {every - 1}")
        if n > len(units):
            raise PruneError(f"pruner.num_layers={n} asks for more {what} than the layer ranges hold "
                             f"({len(units)} candidates); widen layers.attention / layers.mlp or lower it")

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str, *, seq_len: int = 128,
                  free: Optional[tuple[Optional[int], Optional[int]]] = None) -> Any:
        """Peak memory and work of this prune on a model of ``config.json`` ``cfg`` (torch-free; core/run/plan.py):
        the layer stream (pruning/memory.py: weights, the carried hidden states (one copy, where ``states`` puts them), one layer's forward on a
        micro-batch) and the float32 copies of one micro-batch the cosines are taken on. Every layer runs once."""
        from core.run.plan import layer_params, model_params
        from pruning.memory import micro_batch, stream

        depth = int(cfg["num_hidden_layers"])
        self.check(depth)
        units = self.candidates(depth)
        p = stream(cfg, tokens=tokens, seq_len=seq_len, batch_size=self.batch_size, dtype=dtype, model_device=device,
                   device=self.device, offload=self.offload, states=self.states, device_free=(free or (None,))[0],
                   host_free=(free or (None, None))[1])
        b = micro_batch(tokens, seq_len, self.batch_size)
        p.add(**{"float32 cosines of a micro-batch": 3 * b * int(seq_len) * int(cfg["hidden_size"]) * 4})
        what = "layers" if self.granularity == "layer" else "sub-blocks (attention / MLP)"
        if self.num_layers is not None:
            removes = [f"the {self.num_layers} {what} of least Block Influence among {len(units)} candidates"]
        else:
            sizes = sorted({layer_params(cfg, i) for i, _ in units})
            goal = float(self.ratio) * model_params(cfg)
            fewest, most = math.ceil(goal / sizes[-1]), math.ceil(goal / sizes[0])
            count = f"{fewest}" if fewest == most else f"{fewest} to {most}"
            removes = [f"the fewest {what} of least Block Influence whose parameters reach ratio={self.ratio} of all "
                       f"{model_params(cfg):,}: {count} whole layer(s) of this size" if self.granularity == "layer" else
                       f"the fewest {what} of least Block Influence whose parameters reach ratio={self.ratio} of all "
                       f"{model_params(cfg):,}"]
        return p.footprint(layer_forwards=depth, tokens=int(tokens), removes=removes)

    def __call__(self, model: nn.Module, calibration: Optional[torch.Tensor]) -> PruneResult:
        # local: imports torch, and config validation imports this module
        from pruning.streaming import check_llama_layout, check_stream_device

        check_llama_layout(model, "shortgpt")
        depth = len(decoder_layers(model))
        self.check(depth)
        check_stream_device(model, self.device, self.offload)
        t0 = time.perf_counter()
        scores = block_influence(model, calibration, sublayer=self.granularity == "sublayer",
                                 batch_size=self.batch_size, device=self.device, offload=self.offload,
                                 states=self.states)
        t_score = time.perf_counter() - t0
        units = self.candidates(depth)
        params_before = count_params(model)
        chosen, notes = select(units, scores, _unit_params(model), params_before, self.num_layers, float(self.ratio))
        if sum(len(k) == 2 for k in _by_layer(chosen).values()) == depth:
            raise PruneError(f"ratio={self.ratio} of all parameters would remove all {depth} layers: lower it")
        t1 = time.perf_counter()
        removed_layers = remove_units(model, chosen)
        t_cut = time.perf_counter() - t1
        params_after = count_params(model)
        for note in notes:
            log.info(note)
        return _result(self, scores, chosen, removed_layers, depth, params_before, params_after, notes,
                       {"block_influence_s": t_score, "surgery_s": t_cut})


# --------------------------------------------------------------------------- scores


def _cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over tokens of ``cos(a, b)`` (``a, b``: ``[batch, tokens, hidden]``), computed in float32."""
    # local: imports torch, and config validation imports this module
    import torch.nn.functional as F

    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).sum())


def block_influence(model: nn.Module, calibration: Optional[torch.Tensor], *, sublayer: bool = False,
                    batch_size: int = 0, device: Optional[str] = None, offload: bool = False,
                    states: str = "auto") -> dict[str, list[float]]:
    """BI of every decoder layer over ``calibration`` (``[samples, tokens]`` ids), one streamed dense pass.

    ``{"layer": [BI per layer]}``; with ``sublayer`` also ``"attention"`` and ``"mlp"``: ``1 - mean cos(h, h + f(h))``
    with ``h`` the residual stream entering the sub-block. The model is not changed.
    """
    # local: imports torch, and config validation imports this module
    from pruning.streaming import LayerStream, layer_pieces

    stream = LayerStream(model, calibration, batch_size=batch_size, device=device, offload=offload, states=states)
    tokens = stream.tokens
    out: dict[str, list[float]] = {"layer": []}
    if sublayer:
        out.update(attention=[], mlp=[])
    was_training = model.training
    model.eval()
    try:
        for _i, layer in stream:
            sums = dict.fromkeys(out, 0.0)  # Python floats: float64 sums of each micro-batch's cosines
            def step(x: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
                if sublayer:
                    h, m = layer_pieces(layer, x, kw)
                    y = h + m
                    sums["attention"] += _cosine_sum(x, h)
                    sums["mlp"] += _cosine_sum(h, y)
                else:
                    y = layer(x, **kw)
                    y = y[0] if isinstance(y, tuple) else y
                sums["layer"] += _cosine_sum(x, y)
                return y

            stream.update(step)  # each micro-batch's outputs replace its inputs: one copy of the states
            for k, s in sums.items():
                out[k].append(1.0 - s / tokens)
    finally:
        model.train(was_training)
        stream.close()
    return out


# --------------------------------------------------------------------------- selection


def _by_layer(chosen: list[Unit]) -> dict[int, set[str]]:
    """``{layer: sub-blocks removed}``; a whole layer counts as both."""
    out: dict[int, set[str]] = {}
    for layer, kind in chosen:
        out.setdefault(layer, set()).update(("attention", "mlp") if kind == "layer" else (kind,))
    return out


def _unit_params(model: nn.Module) -> dict[Unit, int]:
    """Parameters of every unit: a whole layer (with its norms), its attention, its MLP."""
    out: dict[Unit, int] = {}
    for i, layer in enumerate(decoder_layers(model)):
        out[(i, "layer")] = sum(p.numel() for p in layer.parameters())
        out[(i, "attention")] = sum(p.numel() for p in layer.self_attn.parameters())
        out[(i, "mlp")] = sum(p.numel() for p in layer.mlp.parameters())
    return out


def _removed_params(chosen: list[Unit], params: dict[Unit, int]) -> int:
    """Parameters that removing ``chosen`` takes away (a layer losing both sub-blocks loses its norms too)."""
    return sum(params[(layer, "layer")] if len(kinds) == 2 else sum(params[(layer, k)] for k in kinds)
               for layer, kinds in _by_layer(chosen).items())


def select(units: list[Unit], scores: dict[str, list[float]], params: dict[Unit, int], total_params: int,
           num_layers: Optional[int], ratio: float) -> tuple[list[Unit], list[str]]:
    """The units to remove, lowest BI first (ties: lower layer first): ``num_layers`` of them, or the fewest
    whose parameters reach ``ratio * total_params``. PruneError when the candidates cannot reach it."""
    order = sorted(units, key=lambda u: (scores[u[1]][u[0]], u[0], u[1]))
    if num_layers is not None:
        return order[:num_layers], []
    what = "layers" if order[0][1] == "layer" else "sub-blocks"
    goal = ratio * total_params
    for k in range(1, len(order) + 1):
        got = _removed_params(order[:k], params)
        if got >= goal:
            return order[:k], [f"ratio={ratio} of all {total_params:,} parameters: the {k} least influential {what} "
                               f"reach it ({got / total_params:.2%} removed; the count rounds up)"]
    most = _removed_params(order, params)
    per_unit = most / len(order)
    raise PruneError(f"ratio={ratio} of all parameters would need about n={math.ceil(goal / per_unit)} "
                     f"{what} of this size, but the layer ranges "
                     f"hold {len(order)} candidates ({most / total_params:.2%} of the parameters); widen "
                     "layers.attention / layers.mlp or lower ratio")


# --------------------------------------------------------------------------- surgery


def remove_units(model: nn.Module, chosen: list[Unit]) -> list[int]:
    """Remove ``chosen`` from ``model`` in place; returns the indices of the layers removed entirely.

    Sub-blocks become ``RemovedAttention`` / ``RemovedMLP``; a layer losing both is deleted. The remaining
    layers are renumbered for the KV cache (``self_attn.layer_idx``), and the config follows:
    ``num_hidden_layers``, ``layer_types`` (when a list), ``layer_configs``, and ``removed_layers`` (indices in
    the original model, counting layers an earlier removal recorded there).
    """
    # local: imports torch, and config validation imports this module
    from core.models.modeling_pruned import RemovedAttention, RemovedMLP
    from pruning.surgery import remove_layers

    layers = decoder_layers(model)
    subs = _by_layer(chosen)
    gone = sorted(i for i, kinds in subs.items() if len(kinds) == 2)
    hd = head_dim(model.config)
    for i, kinds in subs.items():
        if len(kinds) == 1 and "attention" in kinds:
            layers[i].self_attn = RemovedAttention(i, hd)
        elif len(kinds) == 1:
            layers[i].mlp = RemovedMLP()
    remove_layers(model, gone)
    return gone


def _result(spec: ShortGPT, scores: dict[str, list[float]], chosen: list[Unit], gone: list[int], depth: int,
            params_before: int, params_after: int, notes: list[str], timings: dict[str, float]) -> PruneResult:
    kinds = _by_layer(chosen)
    new_index = {i: j for j, i in enumerate(i for i in range(depth) if i not in set(gone))}
    per_layer = []
    for i in range(depth):
        row: dict[str, Any] = {"layer": i, "block_influence": scores["layer"][i], "new_index": new_index.get(i)}
        if spec.granularity == "sublayer":
            row.update(attention_bi=scores["attention"][i], mlp_bi=scores["mlp"][i],
                       attention_removed="attention" in kinds.get(i, ()), mlp_removed="mlp" in kinds.get(i, ()))
        row["removed"] = i in gone
        per_layer.append(row)
    removed_units = [{"layer": layer, "kind": kind, "block_influence": scores[kind][layer]} for layer, kind in chosen]
    notes = list(notes)
    if gone:
        notes.append(f"layers {gone} removed (indices before pruning); the remaining {depth - len(gone)} are "
                     f"renumbered 0..{depth - len(gone) - 1}")
    partial = [i for i, k in sorted(kinds.items()) if len(k) == 1]
    if partial:
        notes.append(f"layers {partial} keep one sub-block (the other adds nothing to the residual stream): the "
                     "checkpoint needs its modeling file (layer_configs with 0 heads / 0 MLP width)")
    return PruneResult(
        params_before=params_before, params_after=params_after,
        compression={"unit": spec.ratio_target,
                     "amount": float(spec.ratio) if spec.num_layers is None else len(chosen),
                     **({spec.granularity + "s": len(chosen)} if spec.num_layers is None else {}),
                     "params_removed": 1.0 - params_after / params_before},
        ranges={"attention": list(resolve_range(*spec.attention_layers, depth, "attention", 0.0)),
                "mlp": list(resolve_range(*spec.mlp_layers, depth, "mlp", 0.0))},
        layers=per_layer, notes=notes,
        details={"granularity": spec.granularity, "num_layers": spec.num_layers,
                 "ratio": None if spec.num_layers is not None else float(spec.ratio),
                 "removed_layers": gone, "removed": removed_units,
                 "removed_attention": sorted(i for i, k in kinds.items() if k == {"attention"}),
                 "removed_mlp": sorted(i for i, k in kinds.items() if k == {"mlp"}),
                 "block_influence": scores["layer"],
                 **({"attention_bi": scores["attention"], "mlp_bi": scores["mlp"]}
                    if spec.granularity == "sublayer" else {}),
                 "params_removed": params_before - params_after},
        timings=timings)
