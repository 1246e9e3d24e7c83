# Modeling file shipped inside every prunelab checkpoint (referenced by `auto_map` in config.json).
#
# It depends on torch and transformers only, so
#     AutoModelForCausalLM.from_pretrained(ckpt_dir, trust_remote_code=True)
# loads a pruned model on a machine without prunelab. A pruned Llama differs from
# the stock one only in per-layer widths: `config.layer_configs[i]` gives layer i's
# query heads, KV heads and MLP width (head_dim is unchanged). The stock modules
# reshape with -1 heads and keep `num_key_value_groups = heads // kv_heads`, which
# GQA-consistent pruning preserves, so resizing the Linear layers is all it takes.
#
# Optional per-layer keys: `o_proj_bias` / `down_proj_bias` true where a method added an
# output bias (FLAP's compensation); 0 heads (attention) or intermediate_size 0 (MLP)
# where a whole sub-block was removed (ShortGPT's block variant): the sub-block then
# adds nothing to the residual stream.
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


class PrunedLlamaConfig(LlamaConfig):
    model_type = "prunelab_llama"

    def __init__(self, layer_configs: list[dict] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.layer_configs = layer_configs


def _linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


class RemovedAttention(nn.Module):
    """A removed attention sub-block: adds nothing to the residual stream.

    It still records the step in the KV cache (zero heads), so the cache's sequence length, which generation
    reads from layer 0, stays right when layer 0's attention is the one removed.
    """

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


class RemovedMLP(nn.Module):
    """A removed MLP sub-block: adds nothing to the residual stream."""

    def forward(self, x):
        return torch.zeros_like(x)


def apply_layer_configs(model: LlamaForCausalLM, layer_configs: list[dict] | None) -> None:
    """Resize each decoder layer's projections to the widths in ``layer_configs``."""
    if not layer_configs:
        return
    cfg = model.config
    layers = model.model.layers
    if len(layer_configs) != len(layers):
        raise ValueError(f"layer_configs has {len(layer_configs)} entries for {len(layers)} layers")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hidden = cfg.hidden_size
    for layer, lc in zip(layers, layer_configs):
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv = int(lc["num_attention_heads"]), int(lc["num_key_value_heads"])
        if heads == 0 and kv == 0:
            if not isinstance(attn, RemovedAttention):
                layer.self_attn = RemovedAttention(attn.layer_idx, head_dim)
        elif heads < 0 or kv <= 0 or heads % kv:
            raise ValueError(f"invalid head layout {heads} heads / {kv} KV heads")
        else:
            ab = cfg.attention_bias
            if attn.q_proj.out_features != heads * head_dim or attn.k_proj.out_features != kv * head_dim:
                attn.q_proj = _linear(hidden, heads * head_dim, ab, attn.q_proj)
                attn.k_proj = _linear(hidden, kv * head_dim, ab, attn.k_proj)
                attn.v_proj = _linear(hidden, kv * head_dim, ab, attn.v_proj)
                attn.o_proj = _linear(heads * head_dim, hidden, ab, attn.o_proj)
            if lc.get("o_proj_bias") and attn.o_proj.bias is None:
                attn.o_proj = _linear(heads * head_dim, hidden, True, attn.o_proj)
            attn.num_key_value_groups = heads // kv
        width = int(lc["intermediate_size"])
        if width < 0:
            raise ValueError("intermediate_size must not be negative")
        if width == 0:
            if not isinstance(mlp, RemovedMLP):
                layer.mlp = RemovedMLP()
            continue
        mb = cfg.mlp_bias
        if mlp.gate_proj.out_features != width:
            mlp.gate_proj = _linear(hidden, width, mb, mlp.gate_proj)
            mlp.up_proj = _linear(hidden, width, mb, mlp.up_proj)
            mlp.down_proj = _linear(width, hidden, mb, mlp.down_proj)
        if lc.get("down_proj_bias") and mlp.down_proj.bias is None:
            mlp.down_proj = _linear(width, hidden, True, mlp.down_proj)
        mlp.intermediate_size = width


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        apply_layer_configs(self, config.layer_configs)
