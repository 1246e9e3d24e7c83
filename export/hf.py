"""A pruned Llama as a stock transformers ``LlamaForCausalLM`` directory: no ``trust_remote_code`` anywhere.

    write_hf(model, tokenizer, Path("out"))

Serving stacks that refuse remote code (TGI, most hosted endpoints, vLLM without the flag) all read a stock
Llama. A model whose layers differ is zero-padded to one shape (:mod:`export.layout`): the largest FFN width any
layer kept, one global query-head count and one KV-head count that every layer's grouped-query layout fits,
removed sub-blocks as all-zero weights, and output biases (FLAP, OBS) as ``attention_bias`` / ``mlp_bias``
with zeros where a layer had none. Layers with neither attention nor MLP left are dropped (the identity). The
logits are the model's; the cost is the padded parameters, reported in ``export_info.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig

from core.models.llama import count_params, decoder_layers, head_dim
from core.run.io import atomic_dir, atomic_write_json
from export.layout import ExportError, check_expressible, head_padding, layer_shapes, pad_layer

SHARD_BYTES = 5 * 1024**3
DROP_CONFIG_KEYS = ("architectures", "auto_map", "model_type", "layer_configs", "transformers_version", "_name_or_path",
                    "name_or_path", "quantization_config", "layer_types", "ssm_cfg", "layer_sources", "slicing",
                    "block_configs", "torch_dtype", "dtype", "qkv_bias")


@dataclass
class DirReport:
    """What an HF-style export wrote, and what the padding cost."""

    path: str
    format: str
    dtype: str
    params_model: int
    params_written: int
    bytes: int
    heads: int = 0
    layers_dropped: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def base_config(model: nn.Module) -> dict:
    """The model's config.json keys that any Llama-family layout shares (per-layer prunelab keys removed)."""
    d = model.config.to_dict()
    for key in DROP_CONFIG_KEYS:
        d.pop(key, None)
    d["head_dim"] = head_dim(model.config)
    return d


def top_weights(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], bool]:
    """Embedding, final norm and (untied) LM head under transformers' names; and whether the head is tied."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    out = {"model.embed_tokens.weight": emb.detach().to("cpu", dtype).contiguous(),
           "model.norm.weight": model.model.norm.weight.detach().to("cpu", dtype).contiguous()}
    tied = head.data_ptr() == emb.data_ptr()
    if not tied:
        out["lm_head.weight"] = head.detach().to("cpu", dtype).contiguous()
    return out, tied


def write_model_dir(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], config: Any, tokenizer: Any,
                    generation_config: Any, extra_files: dict[str, Path], info: Callable[[], dict]) -> tuple[int, int]:
    """Write an HF model directory atomically, streaming ``tensors`` into safetensors shards of at most 5 GiB (so
    the padded copy never exists whole in memory); ``info()`` (called after the tensors) fills export_info.json.
    Returns (parameters written, bytes on disk)."""
    if out.exists():
        raise ExportError(f"{out} already exists; refusing to overwrite it")
    if tokenizer is None:
        raise ExportError("the model has no tokenizer: an exported directory needs one to serve text")
    with atomic_dir(out) as tmp:
        shard: dict[str, torch.Tensor] = {}
        files: list[tuple[Path, list[str]]] = []
        size = params = total = 0

        def flush() -> None:
            path = tmp / f".shard-{len(files)}"
            save_file(shard, path, metadata={"format": "pt"})
            files.append((path, list(shard)))
            shard.clear()

        for name, t in tensors:
            n = t.numel() * t.element_size()
            if shard and size + n > SHARD_BYTES:
                flush()
                size = 0
            shard[name] = t
            size, params, total = size + n, params + t.numel(), total + n
        flush()
        if len(files) == 1:
            files[0][0].rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (path, names) in enumerate(files, 1):
                fname = f"model-{i:05d}-of-{len(files):05d}.safetensors"
                path.rename(tmp / fname)
                weight_map.update({k: fname for k in names})
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.to_json_file(tmp / "config.json")
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, src in extra_files.items():
            (tmp / name).write_bytes(src.read_bytes())
        atomic_write_json(tmp / "export_info.json", {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info()})
    return params, sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def write_hf(model: nn.Module, tokenizer: Any, out: str | Path, *, dtype: Optional[torch.dtype] = None,
             info: Optional[dict] = None) -> DirReport:
    """Write ``model`` as a stock Llama directory at ``out`` (refused first if it cannot be one)."""
    check_expressible(model, "hf")
    out = Path(out)
    dtype = dtype or next(model.parameters()).dtype
    shapes = layer_shapes(model)
    keep = [i for i, s in enumerate(shapes) if s.has_attention or s.has_ffn]
    if not keep:
        raise ExportError("every decoder layer is removed: there is nothing to export")
    kept = [shapes[i] for i in keep]
    pad = head_padding(kept, uniform_kv=True)
    kv = max(1, *pad.kv_heads)  # every stock layer has an attention and an MLP: all-zero ones where none is left
    ffn = max(1, *(s.ffn for s in kept))
    qkv_bias = any(s.qkv_bias for s in kept)
    o_bias = qkv_bias or any(s.o_bias for s in kept)
    mlp_bias = any(s.gate_up_bias or s.down_bias for s in kept)
    hd, hidden = head_dim(model.config), int(model.config.hidden_size)
    top, tied = top_weights(model, dtype)
    layers = decoder_layers(model)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        yield from top.items()
        for j, i in enumerate(keep):
            w = pad_layer(layers[i], shapes[i], hd, hidden, pad.heads, kv, ffn, qkv_bias=o_bias, o_bias=o_bias,
                          gate_up_bias=mlp_bias, down_bias=mlp_bias, dtype=dtype)
            yield from ((f"model.layers.{j}.{k}", v) for k, v in w.items())

    cfg = base_config(model)
    cfg.update(num_hidden_layers=len(keep), num_attention_heads=pad.heads, num_key_value_heads=kv,
               intermediate_size=ffn, attention_bias=o_bias, mlp_bias=mlp_bias, tie_word_embeddings=tied,
               dtype=str(dtype).removeprefix("torch."))
    config = LlamaConfig(**cfg)
    config.architectures = ["LlamaForCausalLM"]
    notes = []
    if o_bias and not qkv_bias:
        notes.append("o_proj biases written with zero q/k/v biases (a stock Llama's attention_bias covers all four)")
    if mlp_bias and not any(s.gate_up_bias for s in kept):
        notes.append("down_proj biases written with zero gate/up biases (mlp_bias covers all three)")
    report = DirReport(path=str(out), format="hf", dtype=str(dtype).removeprefix("torch."),
                       params_model=count_params(model), params_written=0, bytes=0, heads=pad.heads,
                       layers_dropped=[i for i in range(len(shapes)) if i not in keep], notes=notes)
    padding = {"num_attention_heads": pad.heads, "num_key_value_heads": kv, "intermediate_size": ffn}
    report.params_written, report.bytes = write_model_dir(
        out, tensors(), config, tokenizer, getattr(model, "generation_config", None), {},
        lambda: {"format": "hf", "source_layers": keep, "padding": padding, "report": report.to_dict(), **(info or {})})
    return report
