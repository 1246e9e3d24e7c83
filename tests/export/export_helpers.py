"""Tiny heterogeneous Llamas for the export tests: per-layer heads / KV heads / FFN widths, removed sub-blocks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

# (query heads, KV heads, FFN width, o_proj bias, down_proj bias) per layer; 0 heads / width: removed sub-block
HETERO = [(8, 2, 96, False, False),   # GQA 4:1, a width that is no multiple of 32
          (4, 1, 40, True, False),    # fewer groups, narrow FFN, an o_proj bias (FLAP / OBS)
          (0, 0, 128, False, True),   # attention removed (Nemotron's attention-free layer), down_proj bias
          (6, 2, 0, False, False),    # FFN removed, attention kept: llama.cpp's quirk
          (0, 0, 0, False, False),    # the whole layer removed (identity)
          (8, 2, 128, True, True)]    # a full layer last


def hetero_model(layers: Optional[list[tuple]] = None, *, hidden: int = 64, head_dim: int = 16, vocab: int = 259,
                 seed: int = 0, std: float = 0.2, rope: Optional[dict] = None):
    """A random-weight pruned Llama (prunelab's PrunedLlamaForCausalLM) with the byte tokenizer, in eval mode.

    Weights are drawn with std ``std`` (not transformers' 0.02) so attention patterns and logits are far from
    uniform: an export that mixes up heads or channels shows up as a large logit error.
    """
    from core.models.load import byte_tokenizer
    from core.models.modeling_pruned import PrunedLlamaConfig, PrunedLlamaForCausalLM

    layers = layers or HETERO
    tok = byte_tokenizer()
    lcs = [{"num_attention_heads": h, "num_key_value_heads": k, "intermediate_size": f,
            **({"o_proj_bias": True} if ob else {}), **({"down_proj_bias": True} if db else {})}
           for h, k, f, ob, db in layers]
    cfg = PrunedLlamaConfig(layer_configs=lcs, vocab_size=vocab, hidden_size=hidden, intermediate_size=128,
                            num_hidden_layers=len(layers), num_attention_heads=8, num_key_value_heads=2,
                            head_dim=head_dim, max_position_embeddings=512,
                            rope_parameters=rope or {"rope_theta": 10000.0, "rope_type": "default"},
                            tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = PrunedLlamaForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, std if "embed" not in name else 1.0)
    model.eval()
    return model, tok


def tokens(n: int, vocab: int = 256, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def torch_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# vLLM (vllm/model_executor/models/nemotron_nas.py, _ffn_mult_to_intermediate_size): the FFN width of ffn_mult
def vllm_ffn_width(ffn_mult: float, hidden: int) -> int:
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
    return out


def vllm_expectations(path: Path) -> dict[str, tuple[int, ...]]:
    """The parameters vLLM's DeciLMForCausalLM allocates for this config (name -> shape, before qkv/gate_up
    packing), read the way nemotron_nas.py and its config convertor read it; asserts each field it relies on."""
    from transformers import AutoConfig

    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "nemotron-nas" and raw["architectures"] == ["DeciLMForCausalLM"]
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)  # vLLM reads hf_config through AutoConfig
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    hd = cfg.head_dim  # vLLM: config.head_dim, else hidden // heads (which a padded head count would get wrong)
    assert hd and raw["head_dim"] == hd
    attention_bias = getattr(cfg, "attention_bias", False) or getattr(cfg, "bias", False)
    bias_o = attention_bias
    qkv_bias = cfg.qkv_bias if hasattr(cfg, "qkv_bias") else attention_bias
    mlp_bias = getattr(cfg, "mlp_bias", False)
    assert len(cfg.block_configs) == cfg.num_hidden_layers == raw["num_hidden_layers"]
    # NemotronNasModelArchConfigConvertor.get_total_num_kv_heads: the first attention block's
    first = next(b for b in cfg.block_configs if not b.attention.no_op)
    assert heads // first.attention.n_heads_in_group >= 1
    want = {"model.embed_tokens.weight": (cfg.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = (cfg.vocab_size, hidden)
    for i, b in enumerate(cfg.block_configs):
        p = f"model.layers.{i}."
        if i == 0 and b.attention.no_op:
            # vLLM's first FFN would get residual=None from its fused add-norm: the export never writes this
            assert b.ffn.no_op, "layer 0 without attention but with an FFN breaks vLLM's residual handling"
        if not b.attention.no_op:
            g = b.attention.n_heads_in_group
            assert isinstance(g, int) and g >= 1 and heads % g == 0, (i, g)
            kv = heads // g
            want.update({p + "input_layernorm.weight": (hidden,), p + "self_attn.q_proj.weight": (heads * hd, hidden),
                         p + "self_attn.k_proj.weight": (kv * hd, hidden),
                         p + "self_attn.v_proj.weight": (kv * hd, hidden),
                         p + "self_attn.o_proj.weight": (hidden, heads * hd)})
            if qkv_bias:
                want.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                             p + "self_attn.v_proj.bias": (kv * hd,)})
            if bias_o:
                want[p + "self_attn.o_proj.bias"] = (hidden,)
        else:
            assert b.attention.n_heads_in_group is None
        if not b.ffn.no_op:
            assert hasattr(b.ffn, "ffn_mult") and not getattr(b.ffn, "replace_with_linear", False)
            width = vllm_ffn_width(b.ffn.ffn_mult, hidden)
            assert width % 256 == 0
            want.update({p + "post_attention_layernorm.weight": (hidden,), p + "mlp.gate_proj.weight": (width, hidden),
                         p + "mlp.up_proj.weight": (width, hidden), p + "mlp.down_proj.weight": (hidden, width)})
            if mlp_bias:
                want.update({p + "mlp.gate_proj.bias": (width,), p + "mlp.up_proj.bias": (width,),
                             p + "mlp.down_proj.bias": (hidden,)})
    return want
