# Modeling file shipped inside prunelab hybrid checkpoints (as modeling_prunelab_hybrid.py, referenced by
# `auto_map` in config.json).
#
# It depends on torch and transformers only, so
#     AutoModelForCausalLM.from_pretrained(ckpt_dir, trust_remote_code=True)
# loads a hybrid on a machine without prunelab.
#
# A hybrid is a Llama whose decoder layers are each either a stock LlamaDecoderLayer ("attention") or a
# LlambaDecoderLayer ("mamba2"): the layer of Cartesia's Llamba, a Mamba-2-style distillation of Llama-3 in
# which attention is replaced by a DiscreteMamba2 mixer (Bick et al. 2025, "Llamba"; the mixer comes from
# goombalab's Phi-Mamba / MOHAWK). Parameter names and shapes are Cartesia's, so a Llamba state dict maps
# onto this model by renaming its prefixes only (backbone.embedding -> model.embed_tokens,
# backbone.layers -> model.layers, backbone.final_layernorm -> model.norm).
#
# The mixer, per head h (H value heads of width P, G query/key groups of state width N, head h reads group
# h // (H/G)), with a_t = exp(-softplus(A_log_t)) in (0, 1):
#     state_t = a_t * state_{t-1} + x_t B_t^T            (P x N)
#     y_t     = state_t C_t + D_h x_t                     (P)
# where x, B, C come out of a causal depthwise convolution of one input projection. Full sequences run
# through a chunked ("SSD") form of that recurrence in pure PyTorch (any device); incremental decoding
# runs the recurrence one token at a time from the state kept in the KV cache.
#
# Cache. Mamba layers keep their conv and SSM states in a `MambaCacheLayer` at their index of the
# transformers Cache. It holds no keys or values, but counts the tokens it has seen: transformers reads the
# number of past tokens from the cache's first layer (positions, RoPE and the causal mask of the attention
# layers), and with a mamba2 layer first that count must still be right.
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers import cache_utils
from transformers.cache_utils import CacheLayerMixin, DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

LAYER_TYPES = ("attention", "mamba2")

# DiscreteMamba2's settings and Cartesia's defaults (LlambaConfig.ssm_cfg / DiscreteMamba2.__init__).
# `layer_norm_eps` is ours: the eps of a mamba2 layer's two RMSNorms (Cartesia's Block fixes it at 1e-5).
SSM_DEFAULTS = {"d_state": 64, "n_qk_heads": 32, "n_v_heads": 32, "d_conv": 4, "expand": 1,
                "activation": "identity", "bias": False, "conv_bias": True, "chunk_size": 128}


# --------------------------------------------------------------------------- config


class HybridConfig(LlamaConfig):
    """A LlamaConfig plus, per layer, whether it is attention or a Llamba mixer.

    - ``layer_types[i]``: "attention" | "mamba2".
    - ``layer_configs[i]`` (optional): ``{num_attention_heads, num_key_value_heads, intermediate_size}`` as in
      prunelab's pruned Llama; heads are 0 for a mamba2 layer.
    - ``ssm_cfg``: the DiscreteMamba2 settings shared by every mamba2 layer (see ``SSM_DEFAULTS``).
    - ``layer_sources`` (optional, informational): where each layer came from.
    The attention fields (heads, head_dim, rope, max_position_embeddings) are the donor Llama's.
    """

    model_type = "prunelab_hybrid"

    def __init__(self, layer_types: Optional[list[str]] = None, layer_configs: Optional[list[dict]] = None,
                 ssm_cfg: Optional[dict] = None, layer_sources: Optional[list[str]] = None, **kwargs):
        super().__init__(**kwargs)
        # Set after LlamaConfig.__init__: transformers would rename "attention" to its own "full_attention"
        # and refuse "mamba2"; our names are ours (the cache maps them, see MambaCacheLayer below).
        n = self.num_hidden_layers
        self.layer_types = list(layer_types) if layer_types is not None else ["attention"] * n
        self.layer_configs = layer_configs
        self.ssm_cfg = {**SSM_DEFAULTS, **ssm_cfg} if ssm_cfg else None
        self.layer_sources = layer_sources
        self.validate_layer_type()

    def validate_layer_type(self):
        layers = getattr(self, "layer_types", None)
        if layers is None:  # during LlamaConfig.__init__
            return
        bad = sorted({t for t in layers if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"layer_types entries must be in {LAYER_TYPES}, got {bad}")
        if len(layers) != self.num_hidden_layers:
            raise ValueError(f"{len(layers)} layer_types for num_hidden_layers={self.num_hidden_layers}")
        if "mamba2" in layers and not getattr(self, "ssm_cfg", None):
            raise ValueError("mamba2 layers need ssm_cfg")
        if getattr(self, "layer_configs", None) and len(self.layer_configs) != len(layers):
            raise ValueError(f"{len(self.layer_configs)} layer_configs for {len(layers)} layers")

    def validate(self):
        # LlamaConfig's strict validators check layer_types against transformers' names; run the others and ours.
        for validator in getattr(LlamaConfig, "__class_validators__", ()):
            if validator.__name__ != "validate_layer_type":
                validator(self)
        self.validate_layer_type()


# --------------------------------------------------------------------------- cache


class MambaCacheLayer(CacheLayerMixin):
    """One mamba2 layer's inference state inside a transformers Cache.

    conv_state: [batch, conv_dim, d_conv], the last d_conv inputs of the convolution (zeros before the start);
    ssm_state:  [batch, n_v_heads, headdim, d_state], float32.
    No keys or values: ``get_seq_length`` / ``get_mask_sizes`` answer from the number of tokens seen, so
    that a cache whose first layer is a mamba2 layer still gives the right positions and causal mask.
    """

    _layer_type = "mamba2"  # transformers registers it: DynamicCache(config=HybridConfig) builds these
    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.conv_state: Optional[torch.Tensor] = None
        self.ssm_state: Optional[torch.Tensor] = None
        self.seen = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("a mamba2 layer's cache holds no keys/values (is an attention layer at a mamba2 index?)")

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0  # as a full-attention layer with `seen` cached tokens

    def get_max_length(self) -> int:
        return -1

    def _map(self, fn) -> None:
        if self.conv_state is not None:
            self.conv_state = fn(self.conv_state)
            self.ssm_state = fn(self.ssm_state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.conv_state = self.ssm_state = None
        self.seen = 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise RuntimeError("a mamba2 layer's state cannot be rolled back (assisted decoding is not supported)")

    def offload(self):
        pass

    def prefetch(self):
        pass


class AttentionCacheLayer(DynamicLayer):
    """A plain DynamicLayer, registered under our layer type name "attention"."""

    _layer_type = "attention"


# Older transformers 5.x releases have the mapping but no `_layer_type` auto-registration.
for _name, _cls in (("mamba2", MambaCacheLayer), ("attention", AttentionCacheLayer)):
    getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {}).setdefault(_name, _cls)


def mamba_state(cache: Any, layer_idx: int) -> MambaCacheLayer:
    """The MambaCacheLayer at ``layer_idx`` of ``cache``, installed there if the slot is still empty.

    A cache built from a HybridConfig already has one. A LlambaDecoderLayer swapped into a plain Llama gets
    a DynamicCache of DynamicLayers (or a lazily growing one); their unused slot at this index is replaced.
    """
    layers = cache.layers
    if layer_idx < len(layers) and type(layers[layer_idx]).__name__ == MambaCacheLayer.__name__:
        return layers[layer_idx]  # by name: prunelab's copy of this file and a checkpoint's may both be loaded
    if layer_idx >= len(layers):
        grow = getattr(cache, "layer_class_to_replicate", None)
        if grow is None:
            raise RuntimeError(f"the cache has {len(layers)} layers, no slot for mamba2 layer {layer_idx}")
        while len(layers) < layer_idx:
            layers.append(grow())
        layers.append(MambaCacheLayer())
        return layers[layer_idx]
    slot = layers[layer_idx]
    if getattr(slot, "is_initialized", False) and slot.get_seq_length() > 0:
        raise RuntimeError(f"cache layer {layer_idx} already holds attention keys/values, not a mamba2 state")
    layers[layer_idx] = MambaCacheLayer()
    return layers[layer_idx]


# --------------------------------------------------------------------------- the mixer


def ssd_scan(x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
             initial_state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence ``s_t = a_t s_{t-1} + x_t B_t^T, y_t = s_t C_t`` over a whole sequence, chunk by chunk.

    x: [b, l, h, p]; log_a: [b, l, h] (log a_t <= 0); B, C: [b, l, h, n] (already one per head);
    initial_state: [b, h, p, n] or None (zeros). Returns y [b, l, h, p] and the final state [b, h, p, n].
    Inside a chunk of Q steps the outputs are one masked matrix product (the "attention form"); across
    chunks only the Q-step states are carried, so memory is O(l Q) rather than O(l^2).
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    Q = min(chunk_size, l)  # a short sequence is one chunk of its own length
    pad = (-l) % Q  # padded steps have x = 0, B = C = 0 and a = 1: they change neither outputs nor the state
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
        log_a = F.pad(log_a, (0, 0, 0, pad))
    nc = (l + pad) // Q
    x = x.reshape(b, nc, Q, h, p)
    B = B.reshape(b, nc, Q, h, n)
    C = C.reshape(b, nc, Q, h, n)
    cs = log_a.reshape(b, nc, Q, h).permute(0, 1, 3, 2).cumsum(-1)  # [b, c, h, Q]: log a_1 ... a_t within chunk

    # 1. Within each chunk: y_t = sum_{s<=t} (a_{s+1} ... a_t) (C_t . B_s) x_s.
    seg = cs[..., :, None] - cs[..., None, :]  # [b, c, h, t, s] = log(a_{s+1} ... a_t)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bcthn,bcshn->bchts", C, B) * decay
    y = torch.einsum("bchts,bcshp->bcthp", scores, x)

    # 2. The state each chunk adds by its end: sum_s (a_{s+1} ... a_Q) x_s B_s^T.
    to_end = torch.exp(cs[..., -1:] - cs)  # [b, c, h, s]
    chunk_states = torch.einsum("bcshn,bchs,bcshp->bchpn", B, to_end, x)

    # 3. Carry the state across chunks (a short loop over l / Q chunks), and read it out inside each chunk.
    state = initial_state if initial_state is not None else x.new_zeros(b, h, p, n)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = torch.exp(cs[:, c, :, -1])[..., None, None] * state + chunk_states[:, c]
    starts = torch.stack(starts, dim=1)  # [b, c, h, p, n]: the state before each chunk
    y = y + torch.einsum("bcthn,bchpn,bcht->bcthp", C, starts, torch.exp(cs))
    return y.reshape(b, nc * Q, h, p)[:, :l], state


class DiscreteMamba2(nn.Module):
    """Cartesia's / Phi-Mamba's DiscreteMamba2 mixer: same constructor arguments and parameters.

    in_proj:  d_model -> [x (d_inner) | B (G*N) | C (G*N) | z (d_inner) | A_log (H)]
    conv1d:   depthwise causal conv (kernel d_conv) over [x | B | C], then `activation`
    D:        [H] skip weight; z_bias: [d_inner] gate bias (only when bias=False, as in the original)
    out_proj: d_inner -> d_model, applied to y * silu(z + z_bias)
    """

    def __init__(self, d_model: int, d_state: int = 64, n_qk_heads: int = 32, n_v_heads: int = 32, d_conv: int = 4,
                 expand: int = 1, activation: str = "identity", bias: bool = False, conv_bias: bool = True,
                 chunk_size: int = 128, layer_idx: Optional[int] = None, device=None, dtype=None, **kwargs):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.n_qk_heads, self.n_v_heads = n_qk_heads, n_v_heads
        self.headdim = self.d_inner // n_v_heads
        if self.headdim * n_v_heads != self.d_inner or n_v_heads % n_qk_heads:
            raise ValueError(f"d_inner {self.d_inner} / n_v_heads {n_v_heads} / n_qk_heads {n_qk_heads} do not divide")
        if activation not in ("identity", "silu", "swish"):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation, self.chunk_size, self.layer_idx = activation, chunk_size, layer_idx
        self.ssm_cfg = {"d_state": d_state, "n_qk_heads": n_qk_heads, "n_v_heads": n_v_heads, "d_conv": d_conv,
                        "expand": expand, "activation": activation, "bias": bias, "conv_bias": conv_bias,
                        "chunk_size": chunk_size}
        self.conv_dim = self.d_inner + 2 * n_qk_heads * d_state
        self.in_proj = nn.Linear(d_model, self.conv_dim + self.d_inner + n_v_heads, bias=bias, **factory)
        if not bias:
            self.z_bias = nn.Parameter(torch.zeros(self.d_inner, **factory))
        else:
            self.z_bias = None  # the original adds 0
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.D = nn.Parameter(torch.ones(n_v_heads, **factory))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    # -- pieces shared by the full forward and the step

    def _split(self, proj: torch.Tensor):
        return torch.split(proj, [self.conv_dim, self.d_inner, self.n_v_heads], dim=-1)  # xBC, z, A_log

    def _act(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.activation == "identity" else F.silu(t)

    def _heads(self, xBC: torch.Tensor):
        """[..., conv_dim] -> x [..., H, P], B and C [..., H, N] (each group repeated for its H/G heads)."""
        x, B, C = torch.split(xBC, [self.d_inner, self.n_qk_heads * self.d_state, self.n_qk_heads * self.d_state], -1)
        rep = self.n_v_heads // self.n_qk_heads
        x = x.unflatten(-1, (self.n_v_heads, self.headdim))
        B = B.unflatten(-1, (self.n_qk_heads, self.d_state)).repeat_interleave(rep, dim=-2)
        C = C.unflatten(-1, (self.n_qk_heads, self.d_state)).repeat_interleave(rep, dim=-2)
        return x, B, C

    def _gate_out(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        zb = z if self.z_bias is None else z + self.z_bias
        return self.out_proj(y * F.silu(zb))

    # -- forward

    def forward(self, u: torch.Tensor, state: Optional[MambaCacheLayer] = None) -> torch.Tensor:
        """u: [b, l, d_model] -> [b, l, d_model]. With ``state``, continue from it and leave it after the last token."""
        if state is not None and state.ssm_state is not None and u.shape[1] == 1:
            return self.step(u, state)
        b, l, _ = u.shape
        xBC, z, A_log = self._split(self.in_proj(u))
        K = self.d_conv
        # Causal depthwise conv: each output sees its input and the K-1 before it (zeros before the start,
        # or the inputs kept in the state when continuing).
        inp = xBC.transpose(1, 2)  # [b, conv_dim, l]
        if state is not None and state.conv_state is not None:
            prev = state.conv_state[..., 1:].to(inp.dtype)
        else:
            prev = inp.new_zeros(b, self.conv_dim, K - 1)
        window = torch.cat([prev, inp], dim=-1)  # [b, conv_dim, K-1+l]
        conv = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)  # [b, conv_dim, l]
        x, B, C = self._heads(self._act(conv.transpose(1, 2)))  # [b, l, H, P], [b, l, H, N] x2
        # The scan runs in float32: it exponentiates sums of log-decays.
        log_a = -F.softplus(A_log.float())  # [b, l, H]
        init = state.ssm_state if state is not None else None
        y, final = ssd_scan(x.float(), log_a, B.float(), C.float(), self.chunk_size, init)
        y = y + self.D.float()[:, None] * x.float()
        if state is not None:
            state.conv_state = window[..., -K:].detach()
            state.ssm_state = final.detach()
            state.seen += l
        return self._gate_out(y.to(u.dtype).flatten(-2), z)

    def step(self, u: torch.Tensor, state: MambaCacheLayer) -> torch.Tensor:
        """One token: u [b, 1, d_model] -> [b, 1, d_model], updating ``state`` (the plain recurrence)."""
        xBC, z, A_log = self._split(self.in_proj(u[:, 0]))  # [b, conv_dim], [b, d_inner], [b, H]
        conv_state = torch.cat([state.conv_state[..., 1:], xBC[..., None].to(state.conv_state.dtype)], dim=-1)
        conv = (conv_state * self.conv1d.weight[:, 0]).sum(-1)  # [b, conv_dim]
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        x, B, C = self._heads(self._act(conv))  # [b, H, P], [b, H, N] x2
        a = torch.exp(-F.softplus(A_log.float()))  # [b, H]
        x32 = x.float()
        ssm = a[..., None, None] * state.ssm_state + x32[..., :, None] * B.float()[..., None, :]  # [b, H, P, N]
        y = torch.einsum("bhpn,bhn->bhp", ssm, C.float()) + self.D.float()[:, None] * x32
        state.conv_state, state.ssm_state = conv_state.detach(), ssm.detach()
        state.seen += 1
        return self._gate_out(y.to(u.dtype).flatten(-2), z)[:, None]


# --------------------------------------------------------------------------- layers and model


class LlambaDecoderLayer(GradientCheckpointingLayer):
    """Llamba's Block: x + mixer(norm(x)), then h + mlp(norm(h)); module names as Cartesia's."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        ssm = dict(config.ssm_cfg)
        eps = ssm.pop("layer_norm_eps", None) or config.rms_norm_eps
        self.hidden_size = config.hidden_size
        self.mixer = DiscreteMamba2(d_model=config.hidden_size, layer_idx=layer_idx, **ssm)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=eps)
        self.mlp = LlamaMLP(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values: Any = None,
                use_cache: Optional[bool] = False, cache_position: Optional[torch.LongTensor] = None,
                position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None, cache: Any = None,
                **kwargs) -> torch.Tensor:
        past_key_values = cache if cache is not None else past_key_values  # `cache` from transformers 5.24
        # The mixer is causal by construction and position-free: attention_mask, positions and RoPE are not used
        # (a padded batch is not masked here, as in the original).
        state = mamba_state(past_key_values, self.mixer.layer_idx) if past_key_values is not None else None
        residual = hidden_states
        mixed = self.mixer(self.input_layernorm(hidden_states), state=state)
        hidden_states = residual + mixed.to(residual.dtype)
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


def _linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def _resize(layer: nn.Module, lc: dict, config: HybridConfig, attention: bool) -> None:
    """Per-layer widths (as prunelab's pruned Llama): heads and KV heads of attention, MLP width of both kinds."""
    hidden = config.hidden_size
    if attention:
        attn = layer.self_attn
        hd = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        heads, kv = int(lc["num_attention_heads"]), int(lc["num_key_value_heads"])
        if heads <= 0 or kv <= 0 or heads % kv:
            raise ValueError(f"invalid head layout {heads} heads / {kv} KV heads")
        if attn.q_proj.out_features != heads * hd or attn.k_proj.out_features != kv * hd:
            ab = config.attention_bias
            attn.q_proj = _linear(hidden, heads * hd, ab, attn.q_proj)
            attn.k_proj = _linear(hidden, kv * hd, ab, attn.k_proj)
            attn.v_proj = _linear(hidden, kv * hd, ab, attn.v_proj)
            attn.o_proj = _linear(heads * hd, hidden, ab, attn.o_proj)
        attn.num_key_value_groups = heads // kv
    width, mlp = int(lc["intermediate_size"]), layer.mlp
    if width <= 0:
        raise ValueError("intermediate_size must be positive")
    if mlp.gate_proj.out_features != width:
        mb = config.mlp_bias
        mlp.gate_proj = _linear(hidden, width, mb, mlp.gate_proj)
        mlp.up_proj = _linear(hidden, width, mb, mlp.up_proj)
        mlp.down_proj = _linear(width, hidden, mb, mlp.down_proj)
    mlp.intermediate_size = width


def build_layer(config: HybridConfig, layer_idx: int) -> nn.Module:
    """Decoder layer ``layer_idx`` of a hybrid: its kind from ``layer_types``, its widths from ``layer_configs``."""
    kind = config.layer_types[layer_idx]
    layer = LlamaDecoderLayer(config, layer_idx) if kind == "attention" else LlambaDecoderLayer(config, layer_idx)
    if config.layer_configs:
        _resize(layer, config.layer_configs[layer_idx], config, kind == "attention")
    return layer


def _init_weights(self, module):
    LlamaPreTrainedModel._init_weights(self, module)
    if isinstance(module, DiscreteMamba2):  # the parameters transformers' generic init does not know
        from transformers import initialization as init

        init.ones_(module.D)
        if module.z_bias is not None:
            init.zeros_(module.z_bias)


class HybridModel(LlamaModel):
    """LlamaModel with per-layer kinds; the forward (masks, RoPE, cache) is LlamaModel's."""

    config_class = HybridConfig
    _no_split_modules = ["LlamaDecoderLayer", "LlambaDecoderLayer"]
    _can_record_outputs = {"hidden_states": [LlamaDecoderLayer, LlambaDecoderLayer], "attentions": LlamaAttention}

    def __init__(self, config: HybridConfig):
        LlamaPreTrainedModel.__init__(self, config)  # as LlamaModel.__init__, with our layers
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([build_layer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    _init_weights = _init_weights


class HybridForCausalLM(LlamaForCausalLM):
    config_class = HybridConfig
    _no_split_modules = ["LlamaDecoderLayer", "LlambaDecoderLayer"]

    def __init__(self, config: HybridConfig):
        LlamaPreTrainedModel.__init__(self, config)  # as LlamaForCausalLM.__init__, with HybridModel
        self.model = HybridModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    _init_weights = _init_weights
