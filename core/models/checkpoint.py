"""The prunelab checkpoint: a directory plain transformers loads, written atomically.

    model/
      model.safetensors            (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
      config.json                  the format's config (model_type, per-layer widths, auto_map)
      modeling_prunelab*.py        the format's modeling file (torch + transformers only), when it has one
      generation_config.json, tokenizer files
      checkpoint_info.json         method, ratio, ranges, base model, scores, time, git commit, config
      README.md                    the model card (core/models/card.py), Hub metadata + what the record says

The model is written in the first of :data:`FORMATS` that claims it (each a :class:`CheckpointFormat`, its
config keys and modeling file its own):

- a hybrid with any Llamba (mamba2) layer: ``core.models.llamba.HYBRID`` (model_type prunelab_hybrid);
- a SliceGPT-sliced model (``config.slicing``): ``core.models.slicegpt.SLICED`` (model_type prunelab_sliced_llama);
- decoder layers all with the config's own widths and no added bias (unstructured / N:M sparsity, ShortGPT's
  whole-layer removal, a dense model): :data:`STOCK_LLAMA`, model_type llama, no auto_map and no modeling file,
  so it loads without ``trust_remote_code``;
- anything else: :data:`PRUNED_LLAMA`, model_type prunelab_llama with per-layer ``layer_configs`` and an auto_map
  to modeling_prunelab.py (a copy of core/models/modeling_pruned.py: PrunedLlamaConfig / PrunedLlamaForCausalLM).

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
from typing import Any, Optional, Protocol

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from core.models import llamba, slicegpt
from core.models.llama import head_dim, is_uniform, layer_configs
from core.models.modeling_pruned import PrunedLlamaConfig
from core.run.errors import RunDirError
from core.models.card import write_model_card
from core.run.io import atomic_dir, atomic_write_json

DEFAULT_SHARD_BYTES = 5 * 1024**3
# keys of a model's config that describe where it came from, not what it is: no format writes them
PROVENANCE_KEYS = ("architectures", "auto_map", "model_type", "transformers_version", "_name_or_path",
                   "quantization_config")


class CheckpointFormat(Protocol):
    """One layout of the checkpoint. ``save_checkpoint`` drops every format's ``config_keys`` from the model's
    config (the shared base: sizes, vocabulary, rope, ...), then the first format that ``claims`` the model
    builds the config to write from the model and that base."""

    config_keys: tuple[str, ...]  # the config keys this format writes itself (none leaks into another format)
    modeling_file: Optional[Path]  # copied into the checkpoint as ``modeling_name``; None: stock transformers
    modeling_name: str

    def claims(self, model: torch.nn.Module) -> bool: ...

    def config(self, model: torch.nn.Module, base_cfg: dict) -> Any: ...  # a transformers PretrainedConfig


class StockLlamaFormat:
    """Every decoder layer with the config's own widths: a plain LlamaConfig, no modeling file."""

    config_keys = ("layer_types",)  # transformers' own per-layer attention kinds, kept from the model's config
    modeling_file: Optional[Path] = None
    modeling_name = ""

    @staticmethod
    def claims(model: torch.nn.Module) -> bool:
        return is_uniform(model)

    @staticmethod
    def config(model: torch.nn.Module, base_cfg: dict) -> Any:
        if getattr(model.config, "layer_types", None) is not None:
            base_cfg = {**base_cfg, "layer_types": model.config.layer_types}
        cfg = LlamaConfig(**base_cfg)
        cfg.architectures = ["LlamaForCausalLM"]
        return cfg


class PrunedLlamaFormat:
    """Per-layer heads, KV heads, MLP widths, removed sub-blocks, added biases: ``layer_configs``."""

    config_keys = ("layer_configs", "layer_types")
    modeling_file = Path(__file__).parent / "modeling_pruned.py"
    modeling_name = "modeling_prunelab.py"

    @staticmethod
    def claims(model: torch.nn.Module) -> bool:
        return True  # the last resort: any Llama-layout model

    @staticmethod
    def config(model: torch.nn.Module, base_cfg: dict) -> Any:
        if getattr(model.config, "layer_types", None) is not None:  # transformers' own per-layer attention kinds
            base_cfg = {**base_cfg, "layer_types": model.config.layer_types}
        cfg = PrunedLlamaConfig(layer_configs=layer_configs(model), **base_cfg)
        cfg.architectures = ["PrunedLlamaForCausalLM"]
        cfg.auto_map = {"AutoConfig": "modeling_prunelab.PrunedLlamaConfig",
                        "AutoModelForCausalLM": "modeling_prunelab.PrunedLlamaForCausalLM"}
        return cfg


STOCK_LLAMA, PRUNED_LLAMA = StockLlamaFormat(), PrunedLlamaFormat()
FORMATS: tuple[CheckpointFormat, ...] = (llamba.HYBRID, slicegpt.SLICED, STOCK_LLAMA, PRUNED_LLAMA)  # in this order


def check_free_space(out_dir: str | Path, nbytes: int) -> None:
    """RunDirError unless the filesystem of ``out_dir`` has room for a checkpoint of ``nbytes`` (+5%)."""
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
    out_dir = Path(out_dir)
    owned = {key for fmt in FORMATS for key in fmt.config_keys}
    base_cfg = {k: v for k, v in model.config.to_dict().items() if k not in PROVENANCE_KEYS and k not in owned}
    base_cfg["head_dim"] = head_dim(model.config)
    base_cfg["num_hidden_layers"] = len(model.model.layers)
    dtype = save_dtype or next(model.parameters()).dtype
    base_cfg["dtype"] = str(dtype).removeprefix("torch.")
    fmt = next(f for f in FORMATS if f.claims(model))
    cfg = fmt.config(model, base_cfg)
    with atomic_dir(out_dir) as tmp:
        _write_weights(_state_dict(model, save_dtype), tmp, shard_bytes)
        cfg.to_json_file(tmp / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if fmt.modeling_file is not None:
            shutil.copyfile(fmt.modeling_file, tmp / fmt.modeling_name)
        full_info = {"format": "prunelab-checkpoint/1", "creation_time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                     "git_commit": git_commit(), **info}
        atomic_write_json(tmp / "checkpoint_info.json", full_info)
        write_model_card(tmp, warn=True)  # README.md from the info; a recipe refreshes it with its run's record
    return out_dir

