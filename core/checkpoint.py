"""The prunelab checkpoint: a directory plain transformers loads, written atomically.

    model/
      model.safetensors            (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
      config.json                  model_type prunelab_llama, per-layer `layer_configs`, auto_map
      modeling_prunelab.py         PrunedLlamaConfig / PrunedLlamaForCausalLM (torch + transformers only)
      generation_config.json, tokenizer files
      checkpoint_info.json         method, ratio, ranges, base model, scores, time, git commit, config

A model whose decoder layers all have the config's own widths and no added bias (unstructured / N:M sparsity,
ShortGPT's whole-layer removal, a dense model) is written as a stock Llama instead: model_type llama, no
auto_map and no modeling file, so it loads without ``trust_remote_code``.

A model with any Llamba (mamba2) decoder layer is written as a hybrid instead: config.json has model_type
prunelab_hybrid, `layer_types` ("attention" | "mamba2" per layer), `layer_configs` (heads 0 for mamba2
layers), `ssm_cfg` and an auto_map to modeling_prunelab_hybrid.py (a copy of core/modeling/hybrid.py:
HybridConfig / HybridForCausalLM), which replaces modeling_prunelab.py; everything else is the same.

A SliceGPT-sliced model (``config.slicing``: per-layer hidden widths) is written with model_type
prunelab_sliced_llama, `slicing`, no norm weights (fused), SliceGPT's `model.layers.N.{attn,mlp}_shortcut_Q`
matrices and an auto_map to modeling_prunelab_sliced.py (a copy of core/modeling/sliced_llama.py).

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads it without prunelab.
The whole directory is written under a temporary name and renamed at the end, so a crash never
leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from core.io import atomic_dir, atomic_write_json
from core.llama import head_dim, is_uniform, layer_configs, layer_types_of

MODELING_FILE = Path(__file__).parent / "modeling" / "pruned_llama.py"  # copied in as modeling_prunelab.py
HYBRID_MODELING_FILE = Path(__file__).parent / "modeling" / "hybrid.py"  # copied in as modeling_prunelab_hybrid.py
SLICED_MODELING_FILE = Path(__file__).parent / "modeling" / "sliced_llama.py"  # as modeling_prunelab_sliced.py
DEFAULT_SHARD_BYTES = 5 * 1024**3


def check_free_space(out_dir: str | Path, nbytes: int) -> None:
    """RunDirError unless the filesystem of ``out_dir`` has room for a checkpoint of ``nbytes`` (+5%)."""
    from core.errors import RunDirError

    need = int(nbytes * 1.05) + 16 * 2**20  # + tokenizer, config, headers
    probe = Path(out_dir)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise RunDirError(f"not enough free space for the checkpoint in {out_dir}: about {need / 2**30:.2f} GiB "
                          f"needed, {free / 2**30:.2f} GiB free (free some space, use save_dtype=float16, "
                          "or save_model=false)")


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _state_dict(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: stored once, as the embedding
    return {k: v.detach().to("cpu", dtype=dtype if v.is_floating_point() else None).contiguous() for k, v in sd.items()}


def _write_weights(sd: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / fname, metadata=meta)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_checkpoint(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, info: dict,
                    shard_bytes: int = DEFAULT_SHARD_BYTES, save_dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``model`` + ``tokenizer`` + ``info`` as a prunelab checkpoint at ``out_dir`` (must not exist).

    ``save_dtype`` (e.g. ``torch.float16``) casts floating-point weights on the way out (half-size files);
    by default they are saved in the model's own dtype.
    """
    from core.modeling.pruned_llama import PrunedLlamaConfig

    out_dir = Path(out_dir)
    base_cfg = model.config.to_dict()
    for key in ("architectures", "auto_map", "model_type", "layer_configs", "transformers_version",
                "_name_or_path", "quantization_config", "layer_types", "ssm_cfg"):
        base_cfg.pop(key, None)
    slicing = base_cfg.pop("slicing", None)  # set by pruning.slicegpt / core.slicegpt
    base_cfg["head_dim"] = head_dim(model.config)
    base_cfg["num_hidden_layers"] = len(model.model.layers)
    dtype = save_dtype or next(model.parameters()).dtype
    base_cfg["dtype"] = str(dtype).removeprefix("torch.")
    types = layer_types_of(model)
    modeling_file: Optional[Path]
    if "mamba2" in types:
        cfg = _hybrid_config(model, types, base_cfg)
        modeling_file, modeling_name = HYBRID_MODELING_FILE, "modeling_prunelab_hybrid.py"
    elif slicing is not None:
        cfg = _sliced_config(model, slicing, base_cfg)
        modeling_file, modeling_name = SLICED_MODELING_FILE, "modeling_prunelab_sliced.py"
    elif is_uniform(model):
        from transformers import LlamaConfig

        if getattr(model.config, "layer_types", None) is not None:
            base_cfg["layer_types"] = model.config.layer_types
        cfg = LlamaConfig(**base_cfg)
        cfg.architectures = ["LlamaForCausalLM"]
        modeling_file, modeling_name = None, ""
    else:
        if getattr(model.config, "layer_types", None) is not None:  # transformers' own per-layer attention kinds
            base_cfg["layer_types"] = model.config.layer_types
        cfg = PrunedLlamaConfig(layer_configs=layer_configs(model), **base_cfg)
        cfg.architectures = ["PrunedLlamaForCausalLM"]
        cfg.auto_map = {"AutoConfig": "modeling_prunelab.PrunedLlamaConfig",
                        "AutoModelForCausalLM": "modeling_prunelab.PrunedLlamaForCausalLM"}
        modeling_file, modeling_name = MODELING_FILE, "modeling_prunelab.py"
    with atomic_dir(out_dir) as tmp:
        _write_weights(_state_dict(model, save_dtype), tmp, shard_bytes)
        cfg.to_json_file(tmp / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if modeling_file is not None:
            shutil.copyfile(modeling_file, tmp / modeling_name)
        full_info = {"format": "prunelab-checkpoint/1", "creation_time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "git_commit": git_commit(), **info}
        atomic_write_json(tmp / "checkpoint_info.json", full_info)
    return out_dir


def _hybrid_config(model: torch.nn.Module, types: list[str], base_cfg: dict):
    """The HybridConfig of a model with Llamba (mamba2) layers: kinds and widths read off its modules."""
    from core.modeling.hybrid import HybridConfig

    ssm_cfgs = []
    for layer, kind in zip(model.model.layers, types):
        if kind == "mamba2":
            ssm = dict(layer.mixer.ssm_cfg)
            ssm["layer_norm_eps"] = layer.input_layernorm.variance_epsilon
            if ssm not in ssm_cfgs:
                ssm_cfgs.append(ssm)
    if len(ssm_cfgs) != 1:
        raise ValueError(f"the mamba2 layers differ in their mixer settings ({ssm_cfgs}): one ssm_cfg per checkpoint")
    cfg = HybridConfig(layer_types=types, layer_configs=layer_configs(model), ssm_cfg=ssm_cfgs[0], **base_cfg)
    cfg.architectures = ["HybridForCausalLM"]
    cfg.auto_map = {"AutoConfig": "modeling_prunelab_hybrid.HybridConfig",
                    "AutoModelForCausalLM": "modeling_prunelab_hybrid.HybridForCausalLM"}
    return cfg


def _sliced_config(model: torch.nn.Module, slicing: dict, base_cfg: dict):
    """The SlicedLlamaConfig of a SliceGPT-sliced model (hidden widths per layer in ``slicing``)."""
    from core.modeling.sliced_llama import SlicedLlamaConfig

    if not is_uniform(model):
        raise ValueError("a sliced model with per-layer head or MLP widths has no checkpoint format (slice the dense "
                         "model, or prune heads / channels before slicing is not supported)")
    cfg = SlicedLlamaConfig(slicing=slicing, **base_cfg)
    cfg.architectures = ["SlicedLlamaForCausalLM"]
    cfg.auto_map = {"AutoConfig": "modeling_prunelab_sliced.SlicedLlamaConfig",
                    "AutoModelForCausalLM": "modeling_prunelab_sliced.SlicedLlamaForCausalLM"}
    return cfg
