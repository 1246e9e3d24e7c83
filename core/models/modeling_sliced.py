# Modeling file shipped inside sliced prunelab checkpoints (SliceGPT; as modeling_prunelab_sliced.py,
# referenced by `auto_map` in config.json).
#
# It depends on torch and transformers only, so
#     AutoModelForCausalLM.from_pretrained(ckpt_dir, trust_remote_code=True)
# loads a sliced model on a machine without prunelab (and without SliceGPT's package).
#
# SliceGPT (Ashkboos et al. 2024, microsoft/TransformerCompression) rotates the residual stream of a
# Llama with per-layer orthogonal matrices (PCA of calibration activations) and deletes the rotated
# coordinates with the least energy, so every hidden dimension shrinks; heads, head_dim and MLP width are
# unchanged. What makes that computation possible, and what this file implements:
#   - RMSNorm scales are fused into the linears that follow them, leaving weightless norms. A norm divides by
#     the ORIGINAL hidden size (`config.hidden_size`), whatever the sliced width: SliceGPT's RMSN, for which
#     the deleted coordinates count as zeros (a rotation keeps the norm, a slice drops the smallest part).
#   - Each layer carries two residual rotations, with SliceGPT's parameter names and shapes:
#         model.layers.N.attn_shortcut_Q  [attention_input, attention_output]
#         model.layers.N.mlp_shortcut_Q   [attention_output, mlp_output]
#     the residual entering a block is multiplied by its shortcut before the block's output is added.
#   - The embedding is [vocab, embedding_dimension]; the LM head [vocab, lm_head_dimension] carries the last
#     rotation and the final norm's scale (never tied to the embedding).
# Per-layer widths are in `config.slicing`:
#     {"embedding_dimension": d0, "lm_head_dimension": dh,
#      "layers": [{"attention_input": ..., "attention_output": ..., "mlp_output": ...}, ...]}
# (SliceGPT's SlicingConfig: embedding_dimensions[0], head_dimension, attention_input_dimensions[i],
# attention_output_dimensions[i] = mlp_input_dimensions[i], mlp_output_dimensions[i]); each layer's input
# width is the previous layer's output width. `config.rms_norm_eps` is the norms' epsilon (SliceGPT's RMSN
# fixes 1e-5; a model sliced by prunelab keeps its own).
from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

LAYER_KEYS = ("attention_input", "attention_output", "mlp_output")


class SlicedLlamaConfig(LlamaConfig):
    model_type = "prunelab_sliced_llama"

    def __init__(self, slicing: dict | None = None, **kwargs):
        kwargs["tie_word_embeddings"] = False  # the embedding and the LM head carry different rotations
        super().__init__(**kwargs)
        self.slicing = slicing


def check_slicing(slicing: dict, num_layers: int) -> None:
    """ValueError unless ``slicing`` gives positive widths for ``num_layers`` layers that chain up."""
    layers = slicing.get("layers") or []
    if len(layers) != num_layers:
        raise ValueError(f"slicing has {len(layers)} layer entries for {num_layers} layers")
    width = slicing["embedding_dimension"]
    for i, lc in enumerate(layers):
        if any(int(lc[k]) <= 0 for k in LAYER_KEYS):
            raise ValueError(f"slicing.layers[{i}]: widths must be positive, got {lc}")
        if lc["attention_input"] != width:
            raise ValueError(f"slicing.layers[{i}].attention_input={lc['attention_input']} but the stream entering "
                             f"layer {i} is {width} wide")
        width = lc["mlp_output"]
    if slicing["lm_head_dimension"] != width:
        raise ValueError(f"slicing.lm_head_dimension={slicing['lm_head_dimension']} but the last layer outputs "
                         f"{width} dims")


class SlicedRMSNorm(nn.Module):
    """RMSNorm without a scale (fused into the next linears), dividing by the original hidden size ``dim``."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).sum(-1, keepdim=True) / self.dim
        return (x * torch.rsqrt(variance + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}"


class SlicedLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose residual stream changes basis and width at each block (SliceGPT).

    Built around an existing layer's attention and MLP (already rotated and sliced, or resized to be loaded
    into); its norms become :class:`SlicedRMSNorm`. ``attention_block`` and ``mlp_block`` are the two halves
    of ``forward``, callable on their own (the slicer measures the stream between them).
    """

    def __init__(self, layer: nn.Module, attn_shortcut_Q: torch.Tensor, mlp_shortcut_Q: torch.Tensor,
                 norm_dim: int, eps: float):
        nn.Module.__init__(self)  # not LlamaDecoderLayer.__init__: the sub-modules are `layer`'s own
        self.hidden_size = norm_dim
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm = SlicedRMSNorm(norm_dim, eps)
        self.post_attention_layernorm = SlicedRMSNorm(norm_dim, eps)
        self.attn_shortcut_Q = nn.Parameter(attn_shortcut_Q, requires_grad=False)
        self.mlp_shortcut_Q = nn.Parameter(mlp_shortcut_Q, requires_grad=False)

    def attention_block(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """``[.., attention_input]`` -> ``[.., attention_output]``: rotated residual + attention."""
        attn, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        return torch.matmul(hidden_states, self.attn_shortcut_Q) + attn

    def mlp_block(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[.., attention_output]`` -> ``[.., mlp_output]``: rotated residual + MLP."""
        return torch.matmul(hidden_states, self.mlp_shortcut_Q) + self.mlp(self.post_attention_layernorm(hidden_states))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.mlp_block(self.attention_block(hidden_states, **kwargs))


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, device=like.weight.device,
                     dtype=like.weight.dtype)


def apply_slicing(model: LlamaForCausalLM, slicing: dict) -> None:
    """Resize a freshly built Llama to ``slicing``'s widths (empty weights, to be loaded) and wrap its layers."""
    cfg, inner = model.config, model.model
    check_slicing(slicing, len(inner.layers))
    emb = inner.embed_tokens
    inner.embed_tokens = nn.Embedding(cfg.vocab_size, slicing["embedding_dimension"], padding_idx=emb.padding_idx,
                                      device=emb.weight.device, dtype=emb.weight.dtype)
    for i, (layer, lc) in enumerate(zip(inner.layers, slicing["layers"])):
        d_in, d_attn, d_out = (int(lc[k]) for k in LAYER_KEYS)
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _linear(d_in, getattr(attn, name).out_features, getattr(attn, name)))
        attn.o_proj = _linear(attn.o_proj.in_features, d_attn, attn.o_proj)
        mlp.gate_proj = _linear(d_attn, mlp.gate_proj.out_features, mlp.gate_proj)
        mlp.up_proj = _linear(d_attn, mlp.up_proj.out_features, mlp.up_proj)
        mlp.down_proj = _linear(mlp.down_proj.in_features, d_out, mlp.down_proj)
        like = attn.o_proj.weight
        inner.layers[i] = SlicedLlamaDecoderLayer(
            layer, torch.empty(d_in, d_attn, device=like.device, dtype=like.dtype),
            torch.empty(d_attn, d_out, device=like.device, dtype=like.dtype), cfg.hidden_size, cfg.rms_norm_eps)
    inner.norm = SlicedRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    model.lm_head = _linear(slicing["lm_head_dimension"], cfg.vocab_size, model.lm_head)


class SlicedLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlicedLlamaConfig
    _no_split_modules = ["LlamaDecoderLayer", "SlicedLlamaDecoderLayer"]

    def __init__(self, config: SlicedLlamaConfig):
        super().__init__(config)
        apply_slicing(self, config.slicing)
