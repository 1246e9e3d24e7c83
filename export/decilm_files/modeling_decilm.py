# Modeling file shipped inside prunelab's DeciLM-layout exports (referenced by `auto_map` in config.json).
#
# Depends on torch and transformers only, so
#     AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
# runs the export in transformers exactly as vLLM's DeciLMForCausalLM lays it out: every attention layer has
# `num_attention_heads` query heads and `num_attention_heads // n_heads_in_group` KV heads; every FFN the width
# its `ffn_mult` rounds to; a no_op sub-block adds nothing to the residual stream. Biases follow vLLM's reading:
# `attention_bias` puts a bias on o_proj (and on q/k/v unless `qkv_bias` is false), `mlp_bias` on all three MLP
# projections.
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_decilm import DeciLMConfig, ffn_mult_to_intermediate_size


class NoOpAttention(nn.Module):
    """attention.no_op: adds nothing; still records the step in the KV cache (zero heads), so the cache length that
    generation reads from layer 0 stays right when layer 0 is the one without attention."""

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        past_key_values = cache if cache is not None else past_key_values  # `cache` from transformers 5.24
        if past_key_values is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class NoOpMLP(nn.Module):
    """ffn.no_op: adds nothing."""

    def forward(self, x):
        return torch.zeros_like(x)


def _linear(n_in: int, n_out: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def apply_block_configs(model: LlamaForCausalLM) -> None:
    """Shape each decoder layer as its block config says (the checkpoint's weights are loaded into these)."""
    cfg = model.config
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or hidden // heads
    o_bias = bool(getattr(cfg, "attention_bias", False))
    qkv_bias = bool(getattr(cfg, "qkv_bias", o_bias))
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    if len(cfg.block_configs) != len(model.model.layers):
        raise ValueError(f"{len(cfg.block_configs)} block_configs for {len(model.model.layers)} layers")
    for i, (layer, bc) in enumerate(zip(model.model.layers, cfg.block_configs)):
        if bc.attention.no_op:
            layer.self_attn = NoOpAttention(i, hd)
            layer.input_layernorm = nn.Identity()
        else:
            if bc.attention.replace_with_linear:
                raise ValueError(f"block {i}: replace_with_linear attention is not supported")
            kv = heads // bc.attention.n_heads_in_group
            a = layer.self_attn
            a.q_proj = _linear(hidden, heads * hd, qkv_bias, a.q_proj)
            a.k_proj = _linear(hidden, kv * hd, qkv_bias, a.k_proj)
            a.v_proj = _linear(hidden, kv * hd, qkv_bias, a.v_proj)
            a.o_proj = _linear(heads * hd, hidden, o_bias, a.o_proj)
            a.num_key_value_groups = bc.attention.n_heads_in_group
        if bc.ffn.no_op:
            layer.mlp = NoOpMLP()
            layer.post_attention_layernorm = nn.Identity()
        else:
            if bc.ffn.replace_with_linear:
                raise ValueError(f"block {i}: replace_with_linear FFN is not supported")
            width = ffn_mult_to_intermediate_size(bc.ffn.ffn_mult, hidden)
            m = layer.mlp
            m.gate_proj = _linear(hidden, width, mlp_bias, m.gate_proj)
            m.up_proj = _linear(hidden, width, mlp_bias, m.up_proj)
            m.down_proj = _linear(width, hidden, mlp_bias, m.down_proj)
            m.intermediate_size = width


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        apply_block_configs(self)
