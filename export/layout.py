"""What an export target can express: per-layer shapes read off the modules, refusals, and zero padding.

Every exporter starts here. :func:`layer_shapes` reads each decoder layer's query heads, KV heads, FFN width and
biases from its modules (the truth after pruning), :func:`check_expressible` refuses in one line a model the
target would silently compute differently (SliceGPT's rotations, Llamba's Mamba-2 mixers, other activations or
RoPE variants), and :func:`head_padding` / :func:`pad_layer` give the zero-padded weights of the layouts that
need one global head count (vLLM's DeciLM, a stock Llama): extra query heads whose ``o_proj`` columns are zero,
extra KV groups whose q/k/v/o are zero, extra FFN channels whose gate/up rows and down columns are zero. None of
these changes any output: a padded channel computes ``silu(0) * x = 0``; a padded head's output is multiplied by
zero columns of ``o_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from core.models.llama import Geometry, decoder_layers, head_dim, layer_types_of
from core.run.errors import UserError

FORMAT_NAMES = {"gguf": "GGUF (llama.cpp)", "decilm": "the DeciLM layout (vLLM)", "hf": "a stock transformers Llama"}


class ExportError(UserError):
    """A model or a request the export target cannot honour; the message names the feature."""


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer as an exporter sees it (0 heads: attention removed; ffn 0: MLP removed)."""

    heads: int
    kv_heads: int
    ffn: int
    qkv_bias: bool = False  # q/k/v projections carry a bias (config.attention_bias)
    o_bias: bool = False  # o_proj carries a bias (config.attention_bias, or FLAP / OBS compensation)
    gate_up_bias: bool = False  # gate/up projections carry a bias (config.mlp_bias)
    down_bias: bool = False  # down_proj carries a bias (config.mlp_bias, or FLAP / OBS compensation)

    @property
    def has_attention(self) -> bool:
        return self.heads > 0

    @property
    def has_ffn(self) -> bool:
        return self.ffn > 0


def _bias(module: Optional[nn.Module], name: str) -> bool:
    lin = getattr(module, name, None) if module is not None else None
    return lin is not None and getattr(lin, "bias", None) is not None


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    """Per decoder layer, the widths and biases of its modules (call :func:`check_expressible` first)."""
    g = Geometry.of(model)
    out = []
    for layer, h, k, f in zip(decoder_layers(model), g.heads, g.kv_heads, g.widths):
        attn = layer.self_attn if h else None
        mlp = layer.mlp if f else None
        out.append(LayerShape(heads=h, kv_heads=k, ffn=f, qkv_bias=_bias(attn, "q_proj"), o_bias=_bias(attn, "o_proj"),
                              gate_up_bias=_bias(mlp, "gate_proj"), down_bias=_bias(mlp, "down_proj")))
    return out


def rope_settings(config: Any) -> dict:
    """``{"theta", "type", **params}`` of a Llama config, transformers 5 (``rope_parameters``) or 4 (``rope_theta``,
    ``rope_scaling``) style."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params and isinstance(params["full_attention"], dict):
        params = dict(params["full_attention"])
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return {**scaling, **params, "theta": float(theta if theta is not None else 10000.0), "type": str(kind)}


GGUF_ROPE_TYPES = ("default", "linear", "llama3")


def _sliced(where: str) -> ExportError:
    return ExportError(
        f"SliceGPT's shortcut rotations (attn_shortcut_Q / mlp_shortcut_Q per layer) are not expressible in {where}: "
        "its Llama blocks add every output to one unrotated residual stream of a single width, while a sliced "
        "model changes the stream's basis and width at each block (export the dense model, or a model pruned "
        "with heads / channels)")


def _mamba(idx: list[int], where: str) -> ExportError:
    return ExportError(
        f"Llamba's Mamba-2 (DiscreteMamba2) mixer layers {idx[:8]}{'...' if len(idx) > 8 else ''} are not "
        f"expressible in {where}: it has attention / linear / no-op sub-blocks only, no state-space mixer "
        "(export a hybrid whose replaced layers are all attention, or keep the prunelab checkpoint)")


def check_expressible_config(cfg: dict, fmt: str) -> None:
    """:func:`check_expressible`'s refusals that ``config.json`` settles, before any weight loads: a sliced model,
    Mamba-2 layers, an activation other than SiLU (the rest is checked on the loaded model)."""
    where = FORMAT_NAMES[fmt]
    if cfg.get("slicing") or cfg.get("model_type") == "prunelab_sliced_llama":
        raise _sliced(where)
    types = cfg.get("layer_types") or []
    if "mamba2" in types:
        raise _mamba([i for i, t in enumerate(types) if t == "mamba2"], where)
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ExportError(f"hidden_act={act!r} is not expressible in {where}: its MLP is SiLU-gated")


def check_expressible(model: nn.Module, fmt: str) -> None:
    """An :class:`ExportError` naming the first feature of ``model`` that ``fmt`` cannot express.

    Every target here runs a pre-norm Llama block (RMSNorm, SiLU-gated MLP, RoPE attention) on one residual
    stream of one width; anything else would load and compute something else, so it is refused instead.
    """
    where = FORMAT_NAMES[fmt]
    cfg = model.config
    if getattr(cfg, "slicing", None) or any(hasattr(l, "attn_shortcut_Q") for l in decoder_layers(model)):
        raise _sliced(where)
    types = layer_types_of(model)
    if "mamba2" in types:
        raise _mamba([i for i, t in enumerate(types) if t == "mamba2"], where)
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ExportError(f"hidden_act={act!r} is not expressible in {where}: its MLP is SiLU-gated")
    kinds = [t for t in (getattr(cfg, "layer_types", None) or []) if t not in ("full_attention", "attention")]
    if kinds or getattr(cfg, "use_sliding_window", False):
        raise ExportError(f"sliding-window attention ({sorted(set(kinds)) or 'use_sliding_window'}) is not "
                          f"expressible in {where}: every exported layer attends to the whole context")
    if fmt == "gguf":
        rope = rope_settings(cfg)
        if rope["type"] not in GGUF_ROPE_TYPES:
            raise ExportError(f"RoPE type {rope['type']!r} is not written by this GGUF exporter "
                              f"(supported: {', '.join(GGUF_ROPE_TYPES)})")
        for lyr, s in zip(decoder_layers(model), layer_shapes(model)):
            if s.has_attention and (lyr.self_attn.q_proj.out_features % head_dim(cfg) or head_dim(cfg) % 2):
                raise ExportError("attention projections that are not whole heads of an even head_dim are not "
                                  "expressible in GGUF (RoPE pairs)")
    shapes = layer_shapes(model)
    for i, s in enumerate(shapes):
        if s.has_attention and (s.kv_heads <= 0 or s.heads % s.kv_heads):
            raise ExportError(f"layer {i}: {s.heads} query heads over {s.kv_heads} KV heads is not a grouped-query "
                              f"layout ({where} shares each KV head among a whole number of query heads)")


# --------------------------------------------------------------------------- padding to a global head count


@dataclass(frozen=True)
class HeadPadding:
    """A global query-head count and, per layer, the KV heads it is padded to (0 where attention is removed)."""

    heads: int
    kv_heads: tuple[int, ...]

    def group(self, layer: int) -> int:
        """Query heads per KV head in ``layer`` after padding (vLLM's ``n_heads_in_group``)."""
        return self.heads // self.kv_heads[layer]


def _fits(total: int, kv: int, s: LayerShape) -> bool:
    """Can ``s``'s KV groups sit in ``kv`` padded groups of ``total // kv`` query heads each?"""
    return total % kv == 0 and kv >= s.kv_heads and total // kv >= s.heads // s.kv_heads


def head_padding(shapes: list[LayerShape], *, uniform_kv: bool, max_heads: int = 4096) -> HeadPadding:
    """The cheapest global head count H (and per-layer KV heads) that every attention layer fits into.

    Layer i's ``k_i`` real KV groups of ``g_i`` query heads go to the first ``k_i`` of ``kv'_i`` padded groups of
    ``H / kv'_i`` heads; ``uniform_kv`` (a stock Llama) asks one ``kv'`` for all layers. Cost: the q/k/v/o rows
    padded to, summed over the layers, so H is usually the largest head count the model kept.
    """
    attn = [s for s in shapes if s.has_attention]
    if not attn:
        return HeadPadding(1, tuple(0 for _ in shapes))
    lo = max(s.heads for s in attn)
    best: Optional[tuple[int, int, tuple[int, ...]]] = None
    for total in range(lo, max(lo, min(max_heads, 8 * lo)) + 1):
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        if uniform_kv:
            common = next((d for d in divisors if all(_fits(total, d, s) for s in attn)), None)
            kvs = [common if s.has_attention else 0 for s in shapes] if common else None
        else:
            kvs = []
            for s in shapes:
                kv = next((d for d in divisors if _fits(total, d, s)), None) if s.has_attention else 0
                if kv is None:
                    kvs = None
                    break
                kvs.append(kv)
        if kvs is None:
            continue
        cost = sum(2 * total + 2 * kv for kv in kvs if kv)
        if best is None or cost < best[0]:
            best = (cost, total, tuple(kvs))
    if best is None:
        raise ExportError("no global query-head count up to "
                          f"{max_heads} fits every layer's grouped-query layout (heads/KV heads per layer: "
                          f"{[(s.heads, s.kv_heads) for s in shapes]})")
    return HeadPadding(best[1], best[2])


def _rows(w: torch.Tensor, n: int) -> torch.Tensor:
    """``w`` with zero rows appended up to ``n`` rows (a vector: zero entries)."""
    if w.shape[0] == n:
        return w
    pad = w.new_zeros((n - w.shape[0], *w.shape[1:]))
    return torch.cat([w, pad], dim=0)


def _place_heads(w: torch.Tensor, real_groups: int, group: int, padded_groups: int, padded_group: int,
                 hd: int) -> torch.Tensor:
    """Rows of ``w`` (``real_groups`` x ``group`` heads of ``hd`` rows) placed at the start of each of the first
    ``real_groups`` padded groups of ``padded_group`` heads; every other row zero. Works on a weight or a bias."""
    rest = w.shape[1:]
    src = w.reshape(real_groups, group, hd, *rest)
    out = w.new_zeros((padded_groups, padded_group, hd, *rest))
    out[:real_groups, :group] = src
    return out.reshape(padded_groups * padded_group * hd, *rest)


def pad_layer(layer: nn.Module, s: LayerShape, hd: int, hidden: int, heads: int, kv: int, ffn: int, *,
              qkv_bias: bool, o_bias: bool, gate_up_bias: bool, down_bias: bool,
              dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """One decoder layer's weights zero-padded to ``heads`` query / ``kv`` KV heads and ``ffn`` channels.

    Names are transformers' (``self_attn.q_proj.weight``, ``mlp.down_proj.bias``, ...). ``heads == 0`` / ``ffn == 0``
    leave that sub-block (and its norm) out. A bias the layout asks for but the layer lacks is written as zeros.
    A removed sub-block asked for (a stock Llama keeps every block) is all zeros: it adds nothing.
    """
    out: dict[str, torch.Tensor] = {}
    like = next(layer.parameters())
    dt = dtype or like.dtype
    z = lambda *shape: torch.zeros(shape, dtype=dt)  # noqa: E731
    cast = lambda t: t.detach().to("cpu", dt)  # noqa: E731
    if heads:
        out["input_layernorm.weight"] = cast(layer.input_layernorm.weight)
        if s.has_attention:
            a = layer.self_attn
            g, pg = s.heads // s.kv_heads, heads // kv
            place_q = lambda t: _place_heads(cast(t), s.kv_heads, g, kv, pg, hd)  # noqa: E731
            place_kv = lambda t: _place_heads(cast(t), s.kv_heads, 1, kv, 1, hd)  # noqa: E731
            out["self_attn.q_proj.weight"] = place_q(a.q_proj.weight)
            out["self_attn.k_proj.weight"] = place_kv(a.k_proj.weight)
            out["self_attn.v_proj.weight"] = place_kv(a.v_proj.weight)
            out["self_attn.o_proj.weight"] = place_q(a.o_proj.weight.t()).t().contiguous()
            if qkv_bias:
                out["self_attn.q_proj.bias"] = place_q(a.q_proj.bias) if s.qkv_bias else z(heads * hd)
                out["self_attn.k_proj.bias"] = place_kv(a.k_proj.bias) if s.qkv_bias else z(kv * hd)
                out["self_attn.v_proj.bias"] = place_kv(a.v_proj.bias) if s.qkv_bias else z(kv * hd)
            if o_bias:
                out["self_attn.o_proj.bias"] = cast(a.o_proj.bias) if s.o_bias else z(hidden)
        else:
            out.update({"self_attn.q_proj.weight": z(heads * hd, hidden),
                        "self_attn.k_proj.weight": z(kv * hd, hidden), "self_attn.v_proj.weight": z(kv * hd, hidden),
                        "self_attn.o_proj.weight": z(hidden, heads * hd)})
            if qkv_bias:
                out.update({"self_attn.q_proj.bias": z(heads * hd), "self_attn.k_proj.bias": z(kv * hd),
                            "self_attn.v_proj.bias": z(kv * hd)})
            if o_bias:
                out["self_attn.o_proj.bias"] = z(hidden)
    if ffn:
        out["post_attention_layernorm.weight"] = cast(layer.post_attention_layernorm.weight)
        if s.has_ffn:
            m = layer.mlp
            out["mlp.gate_proj.weight"] = _rows(cast(m.gate_proj.weight), ffn)
            out["mlp.up_proj.weight"] = _rows(cast(m.up_proj.weight), ffn)
            out["mlp.down_proj.weight"] = _rows(cast(m.down_proj.weight).t(), ffn).t().contiguous()
            if gate_up_bias:
                out["mlp.gate_proj.bias"] = _rows(cast(m.gate_proj.bias), ffn) if s.gate_up_bias else z(ffn)
                out["mlp.up_proj.bias"] = _rows(cast(m.up_proj.bias), ffn) if s.gate_up_bias else z(ffn)
            if down_bias:
                out["mlp.down_proj.bias"] = cast(m.down_proj.bias) if s.down_bias else z(hidden)
        else:
            out.update({"mlp.gate_proj.weight": z(ffn, hidden), "mlp.up_proj.weight": z(ffn, hidden),
                        "mlp.down_proj.weight": z(hidden, ffn)})
            if gate_up_bias:
                out.update({"mlp.gate_proj.bias": z(ffn), "mlp.up_proj.bias": z(ffn)})
            if down_bias:
                out["mlp.down_proj.bias"] = z(hidden)
    return out


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if n else 0
