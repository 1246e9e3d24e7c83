"""Tiny random Llamba checkpoints in Cartesia's layout, and tiny random hybrids, for tests.

Shapes here are written from Cartesia's code (cartesia_pytorch/Llamba: LlambaLMHeadModel, DiscreteMamba2,
LlamaMLP), not read off prunelab's modules, so a mismatch between the two shows up as a load error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

# A Llamba as its config.json says it (LlambaConfig fields). vocab 259 = the byte tokenizer's, padded to 264.
TINY_SSM = {"d_state": 8, "n_v_heads": 4, "n_qk_heads": 2, "expand": 1, "chunk_size": 4, "activation": "identity",
            "bias": False, "conv_bias": True, "d_conv": 4}
TINY_LLAMBA = {"model_type": "llamba", "vocab_size": 259, "pad_vocab_size_multiple": 8, "tie_embeddings": False,
               "lm_head_bias": False, "d_model": 32, "n_layer": 3, "resid_dropout": 0.0, "norm_epsilon": 1e-5,
               "mlp_cfg": {"intermediate_size": 48, "bias": False, "act_fn": "silu"}, "ssm_cfg": TINY_SSM}


def cartesia_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LlambaLMHeadModel state dict and its shape, from the config alone."""
    d, n = cfg["d_model"], cfg["n_layer"]
    mult = cfg.get("pad_vocab_size_multiple", 8)
    vocab = cfg["vocab_size"] + (-cfg["vocab_size"]) % mult
    s, m = cfg["ssm_cfg"], cfg["mlp_cfg"]
    d_inner = s.get("expand", 1) * d
    qk = s["n_qk_heads"] * s["d_state"]
    conv_dim = d_inner + 2 * qk
    k = s.get("d_conv", 4)
    out = {"backbone.embedding.weight": (vocab, d), "backbone.final_layernorm.weight": (d,)}
    for i in range(n):
        p = f"backbone.layers.{i}."
        out[p + "mixer.in_proj.weight"] = (2 * d_inner + 2 * qk + s["n_v_heads"], d)
        if s.get("bias"):
            out[p + "mixer.in_proj.bias"] = (2 * d_inner + 2 * qk + s["n_v_heads"],)
            out[p + "mixer.out_proj.bias"] = (d,)
        else:
            out[p + "mixer.z_bias"] = (d_inner,)
        out[p + "mixer.conv1d.weight"] = (conv_dim, 1, k)
        if s.get("conv_bias", True):
            out[p + "mixer.conv1d.bias"] = (conv_dim,)
        out[p + "mixer.D"] = (s["n_v_heads"],)
        out[p + "mixer.out_proj.weight"] = (d, d_inner)
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for name in ("gate_proj", "up_proj"):
            out[p + f"mlp.{name}.weight"] = (m["intermediate_size"], d)
        out[p + "mlp.down_proj.weight"] = (d, m["intermediate_size"])
        if m.get("bias"):
            for name in ("gate_proj", "up_proj"):
                out[p + f"mlp.{name}.bias"] = (m["intermediate_size"],)
            out[p + "mlp.down_proj.bias"] = (d,)
    if not cfg.get("tie_embeddings"):
        out["lm_head.weight"] = (vocab, d)
    return out


def _random(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Weights on a scale where every part of the model matters (unlike a 0.02-std init)."""
    t = torch.randn(shape, generator=g)
    if "norm" in name:
        return 1 + 0.1 * t
    if len(shape) >= 2:
        return t / math.sqrt(math.prod(shape[1:]))
    return 0.5 * t  # biases, D, z_bias


def cartesia_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: _random(k, shape, g) for k, shape in cartesia_shapes(cfg).items()}


def write_llamba_dir(path: Path, cfg: Optional[dict] = None, seed: int = 0, drop: tuple[str, ...] = (),
                     reshape: Optional[dict[str, tuple[int, ...]]] = None, extra: Optional[dict] = None,
                     shards: int = 1) -> tuple[Path, dict[str, torch.Tensor]]:
    """A Llamba checkpoint dir as Cartesia publishes it: config.json + model.safetensors (or shards + index).

    ``drop`` leaves tensors out, ``reshape`` writes some with another shape, ``extra`` adds tensors.
    Returns the dir and the tensors written.
    """
    cfg = dict(cfg or TINY_LLAMBA)
    sd = cartesia_state_dict(cfg, seed)
    for k in drop:
        sd.pop(k)
    for k, shape in (reshape or {}).items():
        sd[k] = torch.randn(shape)
    sd.update(extra or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    names = sorted(sd)
    if shards == 1:
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in names[i::shards]}
            save_file(part, path / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path, sd


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_random(name, tuple(p.shape), g))
    return model


def tiny_hybrid(layer_types: list[str], seed: int = 0, ssm_cfg: Optional[dict] = None, **overrides):
    """A random HybridForCausalLM (hidden 32, 4 heads / 2 KV heads, Llamba mixers as TINY_SSM) + byte tokenizer."""
    from core.models.modeling_hybrid import HybridConfig, HybridForCausalLM
    from core.models.load import byte_tokenizer

    tok = byte_tokenizer()
    kw = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=len(layer_types),
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    kw.update(overrides)
    cfg = HybridConfig(layer_types=layer_types, ssm_cfg=ssm_cfg or TINY_SSM, **kw)
    model = randomize(HybridForCausalLM(cfg), seed).eval()
    return model, tok
