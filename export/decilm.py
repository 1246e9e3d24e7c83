"""A pruned Llama in the DeciLM / Nemotron-NAS layout that vLLM's ``DeciLMForCausalLM`` serves.

    write_decilm(model, tokenizer, Path("out"))

vLLM builds each layer from ``block_configs[i]`` with two constraints a pruned model does not meet by itself:
one query-head count for every attention layer (``num_attention_heads``; the KV heads are
``num_attention_heads // n_heads_in_group``) and FFN widths that are ``int(2 * ffn_mult * hidden / 3)`` rounded
up to a multiple of 256. Both are met by zero padding (:mod:`export.layout`): dummy query heads whose o_proj
columns are zero, dummy KV groups that are zero throughout, FFN channels with zero gate/up rows and down
columns. A removed attention or MLP is ``no_op`` (no weights). Output biases (FLAP, OBS) are written the way
vLLM reads them: ``attention_bias`` gives o_proj a bias, ``qkv_bias: false`` keeps q/k/v without one; ``mlp_bias``
covers gate/up/down (zeros where a layer had none).

One corner of vLLM's layer, read in its code: a first layer whose attention is no_op passes ``residual=None``
to the fused add-norm of its FFN, which then returns one tensor where two are unpacked. Layer 0 therefore keeps
an all-zero attention (one KV head) when the model removed it.

The directory carries ``configuration_decilm.py`` / ``modeling_decilm.py`` (torch + transformers only), so
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` computes the same logits in transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from core.models.llama import count_params, decoder_layers, head_dim
from export.decilm_files.configuration_decilm import DeciLMConfig, ffn_mult_to_intermediate_size
from export.hf import DirReport, base_config, top_weights, write_model_dir
from export.layout import ExportError, LayerShape, check_expressible, head_padding, layer_shapes, pad_layer, round_up

FILES_DIR = Path(__file__).parent / "decilm_files"
FFN_MULTIPLE = 256  # vLLM's (and NVIDIA's) _find_multiple(…, 256)


def ffn_mult_for(width: int, hidden: int) -> float:
    """An ``ffn_mult`` that vLLM turns back into exactly ``width`` (a multiple of 256)."""
    mult = 1.5 * width / hidden
    if ffn_mult_to_intermediate_size(mult, hidden) != width:
        raise ExportError(f"no ffn_mult gives an FFN width of {width} at hidden size {hidden}")
    return mult


def write_decilm(model: nn.Module, tokenizer: Any, out: str | Path, *, dtype: Optional[torch.dtype] = None,
                 info: Optional[dict] = None) -> DirReport:
    """Write ``model`` in the DeciLM layout at ``out`` (refused first if the layout cannot express it)."""
    check_expressible(model, "decilm")
    out = Path(out)
    dtype = dtype or next(model.parameters()).dtype
    shapes = layer_shapes(model)
    notes = []
    zero_first = bool(shapes) and not shapes[0].has_attention and shapes[0].has_ffn
    if zero_first:  # a zero attention with one KV head: vLLM's first FFN needs a residual from an attention
        shapes[0] = LayerShape(heads=1, kv_heads=1, ffn=shapes[0].ffn, gate_up_bias=shapes[0].gate_up_bias,
                               down_bias=shapes[0].down_bias)
        notes.append("layer 0 had no attention: written as an all-zero attention (vLLM needs one before the first FFN)")
    pad = head_padding(shapes, uniform_kv=False)
    qkv_bias = any(s.qkv_bias for s in shapes)
    o_bias = qkv_bias or any(s.o_bias for s in shapes)
    mlp_bias = any(s.gate_up_bias or s.down_bias for s in shapes)
    hd, hidden = head_dim(model.config), int(model.config.hidden_size)
    top, tied = top_weights(model, dtype)
    layers = decoder_layers(model)
    widths = [round_up(s.ffn, FFN_MULTIPLE) for s in shapes]
    blocks = [{"attention": {"no_op": not kv, "replace_with_linear": False,
                             "n_heads_in_group": pad.group(i) if kv else None},
               "ffn": {"no_op": not width, "replace_with_linear": False,
                       "ffn_mult": ffn_mult_for(width, hidden) if width else None}}
              for i, (kv, width) in enumerate(zip(pad.kv_heads, widths))]
    if not any(pad.kv_heads):
        raise ExportError("no layer keeps attention: vLLM's DeciLM derives its KV-head count from an attention layer")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from top.items()
        for i, (layer, s) in enumerate(zip(layers, shapes)):
            kv = pad.kv_heads[i]
            src = LayerShape(0, 0, s.ffn, gate_up_bias=s.gate_up_bias, down_bias=s.down_bias) if (
                i == 0 and zero_first) else s
            w = pad_layer(layer, src, hd, hidden, pad.heads if kv else 0, kv, widths[i], qkv_bias=qkv_bias,
                          o_bias=o_bias, gate_up_bias=mlp_bias, down_bias=mlp_bias, dtype=dtype)
            if i == 0 and zero_first:
                w["input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
            yield from ((f"model.layers.{i}.{k}", v) for k, v in w.items())

    cfg = base_config(model)
    first_kv = next(k for k in pad.kv_heads if k)
    cfg.update(num_attention_heads=pad.heads, num_key_value_heads=first_kv, intermediate_size=max(widths),
               attention_bias=o_bias, mlp_bias=mlp_bias, tie_word_embeddings=tied,
               dtype=str(dtype).removeprefix("torch."))
    config = DeciLMConfig(block_configs=blocks, **cfg)
    if o_bias and not qkv_bias:
        config.qkv_bias = False  # vLLM: `if hasattr(config, "qkv_bias"): attention_bias = config.qkv_bias`
        notes.append("o_proj biases: attention_bias=true with qkv_bias=false (vLLM's reading)")
    if mlp_bias and not any(s.gate_up_bias for s in shapes):
        notes.append("down_proj biases written with zero gate/up biases (mlp_bias covers all three)")
    config.architectures = ["DeciLMForCausalLM"]
    config.auto_map = {"AutoConfig": "configuration_decilm.DeciLMConfig",
                       "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    report = DirReport(path=str(out), format="decilm", dtype=str(dtype).removeprefix("torch."),
                       params_model=count_params(model), params_written=0, bytes=0, heads=pad.heads, notes=notes)
    files = {name: FILES_DIR / name for name in ("configuration_decilm.py", "modeling_decilm.py")}
    model_widths = [s.ffn for s in layer_shapes(model)]
    report.params_written, report.bytes = write_model_dir(
        out, tensors(), config, tokenizer, getattr(model, "generation_config", None), files,
        lambda: {"format": "decilm", "num_attention_heads": pad.heads, "kv_heads": list(pad.kv_heads),
                 "ffn_widths": widths, "ffn_widths_model": model_widths, "report": report.to_dict(), **(info or {})})
    return report
