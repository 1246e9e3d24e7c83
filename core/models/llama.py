"""Llama anatomy in one place: head size, per-layer widths, parameter counts.

Every package that reads or changes a Llama-style decoder (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
``.mlp.{gate,up,down}_proj``) asks here instead of re-deriving shapes. Widths are read off the modules, so
they are the truth after pruning whatever ``config.json`` says; :meth:`Geometry.from_config` gives the same
answer from a config dict before any weight is loaded.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # annotations only: reading a config's geometry needs no torch
    from torch import nn


def head_dim(config: Any) -> int:
    """``config.head_dim`` if set, else ``hidden_size // num_attention_heads`` (an object or a dict)."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    hd = get("head_dim", None)
    return int(hd) if hd else int(get("hidden_size")) // int(get("num_attention_heads"))


@functools.cache
def cache_kwarg() -> str:
    """The keyword under which transformers hands models, layers and masks the KV cache: ``cache`` from 5.24
    (``past_key_values`` is deprecated there), ``past_key_values`` before. Read once per process."""
    from transformers.models.llama.modeling_llama import LlamaModel  # not at config validation, which reads this module

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a model output (``out.cache`` from transformers 5.24, ``out.past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        try:
            value = getattr(out, name)
        except (AttributeError, KeyError):
            continue
        if value is not None:
            return value
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def layer_type(layer: nn.Module) -> str:
    """"mamba2" for a Llamba decoder layer (``core.models.modeling_hybrid.LlambaDecoderLayer``, also as loaded from a
    checkpoint's own modeling file), "attention" for a Llama-style one (``self_attn``)."""
    if type(layer).__name__ == "LlambaDecoderLayer":
        return "mamba2"
    if hasattr(layer, "self_attn"):
        return "attention"
    raise TypeError(f"unknown decoder layer type {type(layer).__name__}")


def layer_types_of(model: nn.Module) -> list[str]:
    """Per decoder layer, "attention" or "mamba2" (by module type, whatever the config says)."""
    return [layer_type(layer) for layer in decoder_layers(model)]


@dataclass(frozen=True)
class Geometry:
    """Per-layer attention and MLP widths of a Llama-style model."""

    hidden: int
    head_dim: int
    heads: tuple[int, ...]  # query heads, per layer (0 for a mamba2 layer: no attention)
    kv_heads: tuple[int, ...]
    widths: tuple[int, ...]  # MLP intermediate size, per layer
    attn_bias: bool
    mlp_bias: bool

    @property
    def depth(self) -> int:
        return len(self.heads)

    @staticmethod
    def of(model: nn.Module) -> "Geometry":
        hd = head_dim(model.config)
        layers = decoder_layers(model)
        # (a removed sub-block, core.models.modeling_pruned.RemovedAttention / RemovedMLP, has no projections)
        attn = [l.self_attn if layer_type(l) == "attention" and hasattr(l.self_attn, "q_proj") else None
                for l in layers]
        first = next((a for a in attn if a is not None), None)
        mlps = [l.mlp if hasattr(l.mlp, "gate_proj") else None for l in layers]
        first_mlp = next((m for m in mlps if m is not None), None)
        return Geometry(
            hidden=model.config.hidden_size, head_dim=hd,
            heads=tuple(a.q_proj.out_features // hd if a is not None else 0 for a in attn),
            kv_heads=tuple(a.k_proj.out_features // hd if a is not None else 0 for a in attn),
            widths=tuple(m.gate_proj.out_features if m is not None else 0 for m in mlps),
            attn_bias=first.q_proj.bias is not None if first is not None else bool(
                getattr(model.config, "attention_bias", False)),
            mlp_bias=first_mlp.gate_proj.bias is not None if first_mlp is not None else bool(
                getattr(model.config, "mlp_bias", False)),
        )

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> "Geometry":
        """The same geometry from a ``config.json`` dict (``layer_configs`` of a prunelab checkpoint honoured)."""
        n = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        width = int(cfg["intermediate_size"])
        lcs = cfg.get("layer_configs") or [{}] * n
        mamba = [t == "mamba2" for t in (cfg.get("layer_types") or [None] * n)]  # a prunelab hybrid's mixer layers
        return Geometry(
            hidden=int(cfg["hidden_size"]), head_dim=head_dim(cfg),
            heads=tuple(0 if m else int(lc.get("num_attention_heads", heads)) for lc, m in zip(lcs, mamba)),
            kv_heads=tuple(0 if m else int(lc.get("num_key_value_heads", kv)) for lc, m in zip(lcs, mamba)),
            widths=tuple(int(lc.get("intermediate_size", width)) for lc in lcs),
            attn_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        )

    def group_params(self, layer: int) -> int:
        """Parameters in one KV group of ``layer`` (q, k, v rows + o columns, + biases); 0 for a mamba2 layer."""
        if not self.kv_heads[layer]:
            return 0
        n_rep = self.heads[layer] // self.kv_heads[layer]
        q = n_rep * self.head_dim * self.hidden
        kv = 2 * self.head_dim * self.hidden
        bias = (n_rep * self.head_dim + 2 * self.head_dim) if self.attn_bias else 0
        return 2 * q + kv + bias

    def channel_params(self) -> int:
        """Parameters in one MLP channel (a row of gate and up, a column of down, + biases)."""
        return 3 * self.hidden + (2 if self.mlp_bias else 0)


def params_from_config(cfg: Mapping[str, Any]) -> int:
    """Parameter count of a Llama-style model from its config dict (per-layer widths honoured), no weights."""
    g = Geometry.from_config(cfg)
    vocab, h = int(cfg["vocab_size"]), g.hidden
    total = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + h  # embeddings, LM head, final norm
    types = cfg.get("layer_types") or ["attention"] * g.depth
    lcs = cfg.get("layer_configs") or [{}] * g.depth
    for heads, kv, width, kind, lc in zip(g.heads, g.kv_heads, g.widths, types, lcs):
        q, k = heads * g.head_dim, kv * g.head_dim
        total += 3 * h * width + 2 * h  # gate/up/down, two norms
        total += (2 * width + h) if g.mlp_bias and width else 0
        total += h if lc.get("down_proj_bias") and not g.mlp_bias and width else 0
        if kind == "mamba2":
            total += mamba2_mixer_params(h, cfg.get("ssm_cfg") or {})
            continue
        total += 2 * h * q + 2 * h * k  # q, o, k, v
        total += (q + 2 * k + h) if g.attn_bias and heads else 0
        total += h if lc.get("o_proj_bias") and not g.attn_bias and heads else 0
    return total


def mamba2_mixer_params(hidden: int, ssm_cfg: Mapping[str, Any]) -> int:
    """Parameters of one DiscreteMamba2 mixer (``core.models.modeling_hybrid``) with Cartesia's defaults for missing keys."""
    get = lambda k, d: ssm_cfg.get(k, d)  # noqa: E731
    inner, heads = int(get("expand", 1)) * hidden, int(get("n_v_heads", 32))
    qk_state, bias = int(get("n_qk_heads", 32)) * int(get("d_state", 64)), bool(get("bias", False))
    conv_dim = inner + 2 * qk_state
    in_proj = hidden * (conv_dim + inner + heads) + ((conv_dim + inner + heads) if bias else 0)
    conv = conv_dim * int(get("d_conv", 4)) + (conv_dim if get("conv_bias", True) else 0)
    out_proj = inner * hidden + (hidden if bias else 0)
    return in_proj + (0 if bias else inner) + conv + heads + out_proj  # + z_bias, + D


def layer_configs(model: nn.Module) -> list[dict]:
    """Per-layer widths as stored in a prunelab checkpoint's ``config.json`` (heads 0 for a mamba2 layer or a
    removed attention sub-block, intermediate_size 0 for a removed MLP; ``o_proj_bias`` / ``down_proj_bias``
    where a method added an output bias the config's ``attention_bias`` / ``mlp_bias`` does not give)."""
    g = Geometry.of(model)
    out = []
    for layer, h, kv, w in zip(decoder_layers(model), g.heads, g.kv_heads, g.widths):
        lc = {"num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": w}
        o = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if o is not None and o.bias is not None and not g.attn_bias:
            lc["o_proj_bias"] = True
        d = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if d is not None and d.bias is not None and not g.mlp_bias:
            lc["down_proj_bias"] = True
        out.append(lc)
    return out


def is_uniform(model: nn.Module) -> bool:
    """True when every decoder layer has the config's own widths and no added bias: a stock Llama."""
    cfg = model.config
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    want = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": kv,
            "intermediate_size": cfg.intermediate_size}
    return "mamba2" not in layer_types_of(model) and all(lc == want for lc in layer_configs(model))


def flops_per_token(model: nn.Module, context: int) -> int:
    """Forward FLOPs (2 per multiply-add) for one token attending to ``context`` tokens, as dense kernels do it.

    Every ``nn.Linear`` (the LM head included, tied or not), every other 2-D weight outside an embedding
    (SliceGPT's shortcut matrices), and per attention layer the scores and the mixing, 2 x 2 x context x
    (query heads x head_dim). Zeros in dense shapes count: a dense kernel multiplies them all the same.
    Embedding lookups, norms and activations are left out (they are not matmuls).
    """
    from torch import nn  # not at config validation, which reads this module

    total = 0
    in_module: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += 2 * m.in_features * m.out_features
            in_module.add(id(m.weight))
        elif isinstance(m, nn.Embedding):
            in_module.add(id(m.weight))
    for p in model.parameters():
        if p.ndim == 2 and id(p) not in in_module:
            total += 2 * p.numel()
            in_module.add(id(p))
    for layer in decoder_layers(model):
        q = getattr(getattr(layer, "self_attn", None), "q_proj", None)
        if q is not None:
            total += 4 * int(context) * q.out_features
    return total


def unique_parameters(model: nn.Module) -> list:
    """Every parameter once (a tied embedding / LM head is one tensor)."""
    seen: set[int] = set()
    return [p for p in model.parameters() if id(p) not in seen and not seen.add(id(p))]


def count_nonzero(model: nn.Module) -> int:
    """Non-zero parameters counted once: what unstructured / N:M sparsity actually leaves."""
    import torch  # not at config validation, which reads this module

    return sum(int(torch.count_nonzero(p.detach())) for p in unique_parameters(model))


def count_params(model: nn.Module) -> int:
    """Parameters counted once (a tied embedding / LM head counts once)."""
    return sum(p.numel() for p in unique_parameters(model))
