"""Tiny GQA Llamas pruned in known ways, for the analysis and legacy tests.

Base: 4 layers, hidden 64, 8 heads / 2 KV heads (head_dim 8), MLP 128, vocab 259, untied.
Pruned ("known"):
- layer 1: KV group 1 removed = its 4 query heads: q 64->32 rows, k/v 16->8 rows, o 64->32 cols;
- layers 1-2: MLP 128 -> 96 (gate/up rows, down cols).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.models.load import build_tiny

HIDDEN, INTER, HEADS, KV, HEAD_DIM, VOCAB = 64, 128, 8, 2, 8, 259


def tiny(num_layers: int = 4, seed: int = 0):
    return build_tiny(num_layers=num_layers, hidden_size=HIDDEN, intermediate_size=INTER, num_heads=HEADS,
                      num_kv_heads=KV, vocab_size=256, seed=seed)


def _rows(lin: nn.Linear, keep: int) -> None:
    lin.weight = nn.Parameter(lin.weight.data[:keep].clone())
    lin.out_features = keep


def _cols(lin: nn.Linear, keep: int) -> None:
    lin.weight = nn.Parameter(lin.weight.data[:, :keep].clone())
    lin.in_features = keep


def prune_known(model) -> None:
    """In place: the pruning described in the module docstring."""
    attn = model.model.layers[1].self_attn
    _rows(attn.q_proj, 4 * HEAD_DIM)
    _rows(attn.k_proj, 1 * HEAD_DIM)
    _rows(attn.v_proj, 1 * HEAD_DIM)
    _cols(attn.o_proj, 4 * HEAD_DIM)
    for i in (1, 2):
        mlp = model.model.layers[i].mlp
        _rows(mlp.gate_proj, 96)
        _rows(mlp.up_proj, 96)
        _cols(mlp.down_proj, 96)


def base_and_pruned():
    base, tok = tiny()
    pruned = copy.deepcopy(base)
    prune_known(pruned)
    return base, pruned, tok


# exact counts of the known pruning
EMB = VOCAB * HIDDEN  # 16,576 (lm_head the same, untied)
NORM = 2 * HIDDEN
ATTN_FULL = 64 * 64 + 16 * 64 + 16 * 64 + 64 * 64  # 10,240
MLP_FULL = 3 * INTER * HIDDEN  # 24,576
LAYER_FULL = ATTN_FULL + MLP_FULL + NORM  # 34,944
ATTN_L1 = 32 * 64 + 8 * 64 + 8 * 64 + 64 * 32  # 5,120
MLP_96 = 3 * 96 * HIDDEN  # 18,432
LAYER1 = ATTN_L1 + MLP_96 + NORM  # 23,680
LAYER2 = ATTN_FULL + MLP_96 + NORM  # 28,800
BASE_TOTAL = 2 * EMB + 4 * LAYER_FULL + HIDDEN
PRUNED_TOTAL = 2 * EMB + 2 * LAYER_FULL + LAYER1 + LAYER2 + HIDDEN


def state_dict_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Tok:  # a picklable stand-in for a tokenizer (module-level so it pickles)
    vocab = {"a": 0}
