"""Llama anatomy in one place: head size, per-layer widths, parameter counts.

Every package that reads or changes a Llama-style decoder (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
``.mlp.{gate,up,down}_proj``) asks here instead of re-deriving shapes. Widths are read off the modules, so
they are the truth after pruning whatever ``config.json`` says; :meth:`Geometry.from_config` gives the same
answer from a config dict before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # annotations only: reading a config's geometry needs no torch
    import torch
    from torch import nn


def head_dim(config: Any) -> int:
    """``config.head_dim`` if set, else ``hidden_size // num_attention_heads`` (an object or a dict)."""
    get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
    hd = get("head_dim", None)
    return int(hd) if hd else int(get("hidden_size")) // int(get("num_attention_heads"))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


@dataclass(frozen=True)
class Geometry:
    """Per-layer attention and MLP widths of a Llama-style model."""

    hidden: int
    head_dim: int
    heads: tuple[int, ...]  # query heads, per layer
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
        return Geometry(
            hidden=model.config.hidden_size, head_dim=hd,
            heads=tuple(l.self_attn.q_proj.out_features // hd for l in layers),
            kv_heads=tuple(l.self_attn.k_proj.out_features // hd for l in layers),
            widths=tuple(l.mlp.gate_proj.out_features for l in layers),
            attn_bias=layers[0].self_attn.q_proj.bias is not None,
            mlp_bias=layers[0].mlp.gate_proj.bias is not None,
        )

    @staticmethod
    def from_config(cfg: Mapping[str, Any]) -> "Geometry":
        """The same geometry from a ``config.json`` dict (``layer_configs`` of a prunelab checkpoint honoured)."""
        n = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        width = int(cfg["intermediate_size"])
        lcs = cfg.get("layer_configs") or [{}] * n
        return Geometry(
            hidden=int(cfg["hidden_size"]), head_dim=head_dim(cfg),
            heads=tuple(int(lc.get("num_attention_heads", heads)) for lc in lcs),
            kv_heads=tuple(int(lc.get("num_key_value_heads", kv)) for lc in lcs),
            widths=tuple(int(lc.get("intermediate_size", width)) for lc in lcs),
            attn_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        )

    def group_params(self, layer: int) -> int:
        """Parameters in one KV group of ``layer`` (q, k, v rows + o columns, + biases)."""
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
    for heads, kv, width in zip(g.heads, g.kv_heads, g.widths):
        q, k = heads * g.head_dim, kv * g.head_dim
        total += 2 * h * q + 2 * h * k + 3 * h * width + 2 * h  # q, o, k, v, gate/up/down, two norms
        total += (q + 2 * k + h) if g.attn_bias else 0
        total += (2 * width + h) if g.mlp_bias else 0
    return total


def layer_configs(model: nn.Module) -> list[dict]:
    """Per-layer widths as stored in a prunelab checkpoint's ``config.json``."""
    g = Geometry.of(model)
    return [{"num_attention_heads": h, "num_key_value_heads": kv, "intermediate_size": w}
            for h, kv, w in zip(g.heads, g.kv_heads, g.widths)]


def count_params(model: nn.Module) -> int:
    """Parameters counted once (a tied embedding / LM head counts once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
