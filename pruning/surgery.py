"""Structural edits of a Llama decoder: remove KV groups (GQA-consistent), MLP channels, whole layers.

Each edit shrinks the ``nn.Linear`` modules in place; the stock modules reshape with -1 heads and keep
``num_key_value_groups = heads // kv_heads``, so a shrunk layer runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def keep_index(n: int, drop: torch.Tensor) -> torch.Tensor:
    """Indices ``0..n-1`` without ``drop``, sorted."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[drop] = False
    return mask.nonzero().squeeze(1)


def shrink_linear(lin: nn.Linear, keep: torch.Tensor, dim: int) -> None:
    """Keep rows (``dim=0``: outputs, with the bias) or columns (``dim=1``: inputs) ``keep`` of ``lin``."""
    keep = keep.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(dim, keep).contiguous(), requires_grad=False)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, keep).contiguous(), requires_grad=False)
        lin.out_features = keep.numel()
    else:
        lin.in_features = keep.numel()


def remove_kv_groups(layer: nn.Module, groups: torch.Tensor, head_dim: int) -> None:
    """Remove KV groups (each: 1 KV head + the ``n_rep`` query heads sharing it) from a Llama attention block."""
    attn = layer.self_attn
    kv = attn.k_proj.out_features // head_dim
    n_rep = attn.q_proj.out_features // head_dim // kv
    keep_groups = keep_index(kv, groups)
    kv_rows = (keep_groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    q_rows = (keep_groups[:, None] * (n_rep * head_dim) + torch.arange(n_rep * head_dim)).reshape(-1)
    shrink_linear(attn.q_proj, q_rows, 0)
    shrink_linear(attn.k_proj, kv_rows, 0)
    shrink_linear(attn.v_proj, kv_rows, 0)
    shrink_linear(attn.o_proj, q_rows, 1)
    attn.num_key_value_groups = n_rep  # unchanged by construction


def remove_channels(layer: nn.Module, channels: torch.Tensor) -> None:
    """Remove MLP channels: rows of gate_proj and up_proj, columns of down_proj."""
    mlp = layer.mlp
    keep = keep_index(mlp.gate_proj.out_features, channels)
    shrink_linear(mlp.gate_proj, keep, 0)
    shrink_linear(mlp.up_proj, keep, 0)
    shrink_linear(mlp.down_proj, keep, 1)
    mlp.intermediate_size = keep.numel()


def remove_layers(model: nn.Module, gone: list[int]) -> None:
    """Delete decoder layers ``gone`` (current indices) from ``model`` in place. The rest are renumbered for the KV
    cache (``self_attn.layer_idx``) and the config follows: ``num_hidden_layers``, ``layer_types`` (when a list),
    ``layer_configs``, and ``removed_layers`` (indices in the original model, counting layers an earlier removal
    recorded there; set only when some layer is or was removed)."""
    from core.models.llama import decoder_layers, layer_configs

    layers = decoder_layers(model)
    depth = len(layers)
    kept = [i for i in range(depth) if i not in set(gone)]
    model.model.layers = nn.ModuleList([layers[i] for i in kept])
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j
    cfg = model.config
    before = list(getattr(cfg, "removed_layers", None) or [])
    original = [i for i in range(depth + len(before)) if i not in set(before)]  # current index -> original
    if before or gone:
        cfg.removed_layers = sorted(before + [original[i] for i in gone])
    cfg.num_hidden_layers = len(kept)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == depth:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    cfg.layer_configs = layer_configs(model)
