"""task=convert: SliceGPT's saved output -> a prunelab checkpoint that plain transformers loads.

    python run.py task=convert model=<SliceGPT .pt, or its folder> base=<base model name or path>
    (base may be left out when SliceGPT copied the base's config.json beside the .pt: a local --model-path)

Reads ``<model>_<sparsity>.pt`` with torch's tensors-only unpickler (no dill, no slicegpt package) and its
``<model>_<sparsity>.json`` slicing config, checks both against the base model's config (``core.models.slicegpt``), and
writes ``<run dir>/<output_name>/`` (default: the SliceGPT file's name, ``Llama-3-8B-Instruct_0.2``): a sliced
prunelab checkpoint (``core.models.modeling_sliced``, SliceGPT's tensors unchanged) with the same logits. The base
model gives the config and the tokenizer; its weights are not read. ``checkpoint_info.json`` and metrics.json
(``conversion``) also carry the seed's ``pruning_ratio``, ``actual_ratio`` and ``round_interval``
(``core.models.slicegpt.seed_fields``: each derived from the files, or null with the reason).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from core.models.llama import count_params, params_from_config
from core.models.ref import read_config_json, tiny_config
from core.run.config import derived_output_name
from recipes._common import model_ref, plain, resolve_model, results_folder, write_card
from recipes._plan import plan_convert

log = logging.getLogger(__name__)

METRICS = {"params_kept_pct": "minimize"}
OUTPUT_NAME = True  # writes its results into <run dir>/<output_name>/ (run.check refuses the key elsewhere)
plan = plan_convert  # dry_run=true prints it; a run checks it before loading (recipes/_plan.py)


def validate(cfg: DictConfig) -> list[str]:
    """A SliceGPT output path, and a base unless its config.json sits beside it; no weights read."""
    errors: list[str] = []
    path = Path(str(cfg.model.path)).expanduser() if cfg.model.path else None
    if cfg.model.kind != "hf" or path is None:
        errors.append("task=convert needs model=<SliceGPT's .pt file or the folder holding it>")
    elif not path.exists():
        errors.append(f"model.path={path} does not exist")
    elif not cfg.base and not ((path if path.is_dir() else path.parent) / "config.json").is_file():
        errors.append(f"task=convert: {path} has no config.json beside it (SliceGPT copies one only for a local "
                      "--model-path): give base=<the model SliceGPT sliced, name or path>")
    if not cfg.save_model:
        errors.append("task=convert writes a checkpoint: save_model=false leaves nothing to do")
    return errors


def _base(name: str, cache_dir: str) -> tuple[dict, Any, dict]:
    """(config.json dict, tokenizer, ModelRef dict) of the base model: a model name or a path."""
    # local: torch + transformers; validation imports this module
    from transformers import AutoTokenizer

    from core.models.load import byte_tokenizer, cached_gguf_dir

    ref = resolve_model(name)
    if ref.kind == "tiny":
        return {**tiny_config(**dataclasses.asdict(ref.tiny)), "model_type": "llama"}, byte_tokenizer(), ref.to_dict()
    path = cached_gguf_dir(ref, cache_dir) if ref.kind == "gguf" else Path(str(ref.path))
    return read_config_json(path), AutoTokenizer.from_pretrained(path), ref.to_dict()


def run(cfg: DictConfig, ctx: Any) -> dict:
    # local: torch + transformers; validation imports this module
    from core.models.checkpoint import check_free_space, save_checkpoint
    from core.models.load import torch_dtype
    from core.models.slicegpt import SliceGPTFiles, load_slicegpt, seed_fields

    ref = model_ref(cfg.model)
    run_dir = Path(cfg.paths.output_dir)
    files = SliceGPTFiles.of(str(ref.path))
    name = str(cfg.output_name) if cfg.output_name is not None else derived_output_name(files.weights.stem, "sliced")
    out_dir = results_folder(ctx, run_dir, name, cfg.output_name is None)
    tokenizer, base_ref = None, None  # without a base: the tokenizer beside the file, if any
    if cfg.base:
        base_config, tokenizer, base_ref = _base(str(cfg.base), cfg.paths.cache_dir)
        base_name = f"base={cfg.base}"
    else:  # validate() made sure SliceGPT copied the base's config.json beside the file
        base_config, base_name = read_config_json(files.weights.parent), str(files.weights.parent / "config.json")
    t0 = time.perf_counter()
    model, tokenizer, source = load_slicegpt(files.weights, base_config=base_config, base_name=base_name,
                                             tokenizer=tokenizer, dtype=torch_dtype(ref.dtype), device=ref.device)
    t_load = time.perf_counter() - t0
    params = count_params(model)
    base_params = params_from_config(base_config)
    hidden, slicing = source["hidden_size"], source["slicing"]
    sparsity = source["sparsity"] if source["sparsity"] is not None else 1.0 - slicing["embedding_dimension"] / hidden
    compression = {"unit": "slicing", "amount": sparsity,
                   "hidden_kept": slicing["embedding_dimension"] / hidden, "params_removed": 1.0 - params / base_params}
    seed = seed_fields(source)  # the seed's pruning_ratio, actual_ratio, round_interval (+ where each came from)
    log.info("SliceGPT %s: hidden %d -> %d, %s parameters (%s in the base model)", files.weights.name, hidden,
             slicing["embedding_dimension"], f"{params:,}", f"{base_params:,}")
    ctx.log("method", "slicegpt")
    ctx.log("compression", compression)
    ctx.log("params", {"base": base_params, "pruned": params, "kept_pct": 100.0 * params / base_params})
    ctx.log("conversion", {**source, **seed, "seconds": t_load})
    if tokenizer is None:
        log.warning("no tokenizer beside %s and no base given: the checkpoint has none", files.weights)
    dtype = torch_dtype(cfg.save_dtype) if cfg.save_dtype else None
    check_free_space(run_dir, params * (dtype.itemsize if dtype else next(model.parameters()).element_size()))
    t0 = time.perf_counter()
    info = {"method": "slicegpt", "ratio": sparsity, "compression": compression,
            "layer_ranges": {"attention": [0, len(slicing["layers"])], "mlp": [0, len(slicing["layers"])]},
            "base_model": base_ref, "params": {"base": base_params, "pruned": params},
            "source": {k: source[k] for k in ("weights", "slicing_config", "base_config", "identity_shortcuts_added")},
            **seed, "config": plain(cfg)}
    out = save_checkpoint(model, tokenizer, out_dir, info, save_dtype=dtype)
    ctx.log("checkpoint", {"path": str(out), "bytes": sum(f.stat().st_size for f in out.iterdir()),
                           "dtype": cfg.save_dtype or str(next(model.parameters()).dtype).removeprefix("torch.")})
    ctx.log("output", {"written": True})
    ctx.log("timings", {"load_s": t_load, "save_s": time.perf_counter() - t0})
    write_card(out, ctx)
    log.info("checkpoint: %s", out)
    return {"params_kept_pct": 100.0 * params / base_params}
