"""task=replace: the base model with the donor's decoder layers at ``replacement.layers``; evaluated and saved.

    python run.py task=replace replacement.base=outputs/.../model replacement.donor=smollm2 \\
        replacement.layers=[11,13,17,21] replacement.description="GA's 4-layer set"
    python run.py -m task=replace replacement.base=... replacement.layers='[17],[13,17],[13,16,17]'

The checkpoint, ``<run dir>/<output_name>/`` (default ``<base>_replaced_<layers>``: ``llamba_replaced_11_13_17_21``,
the seed's folder name; recorded in metrics.json as ``output`` and ``checkpoint.path``), loads in plain
transformers with trust_remote_code; ``checkpoint_info.json`` has the seed's fields (replaced_layers, score with its
metric, description, creation_time, base, donor) and ``README.txt`` says how to load and test it (the seed's
note, kept); ``README.md`` is the model card.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from core.data.text import TextSpec, eval_tokens, load_documents
from core.models.ref import model_config
from core.run.config import derived_output_name
from core.run.errors import UserError
from core.run.io import atomic_write_text
from core.run.wandb_view import WandbView
from replacement.spec import hybrid_readme
from recipes._common import (build, donor_dir, headline_metrics, plain, replacement_models, results_folder,
                             tokenizer_or_donors, write_card)
from recipes._plan import plan_replace

log = logging.getLogger(__name__)

METRICS = {"ppl": "minimize", "avg_acc": "maximize", "mmlu": "maximize"}
OUTPUT_NAME = True  # writes its results into <run dir>/<output_name>/ (run.check refuses the key elsewhere)
WANDB_VIEW = WandbView(method="replace")  # W&B method of every hybrid; layer_range: the replaced layers
plan = plan_replace  # dry_run=true prints it; a run checks it before loading (recipes/_plan.py)
GENERIC_NAMES = {"model", "models", "pruned", "checkpoint", "checkpoints", "hf", "base", "output", "outputs"}


def validate(cfg: DictConfig) -> list[str]:
    try:
        spec = build(cfg.replacement, "replacement")
    except UserError as e:
        return [str(e)]
    return [] if spec.layers else ["task=replace needs replacement.layers=[...] (the donor's layers to take)"]


def short_name(name: str, config: dict) -> str:
    """The base's short name in a hybrid's folder name: the first word of its name (``llamba_8b``, ``Llamba-8B`` ->
    ``llamba``; ``SmolLM2-135M-Instruct`` -> ``smollm2``); a generic folder name (a prunelab run's ``model/``) gives
    way to its config's model_type (``prunelab_llama`` -> ``llama``)."""
    words = re.findall(r"[A-Za-z0-9]+", name)
    if words and words[0].lower() not in GENERIC_NAMES and not words[0].isdigit():
        return words[0].lower()
    kind = re.findall(r"[A-Za-z0-9]+", str(config.get("model_type") or "").removeprefix("prunelab_"))
    return kind[0].lower() if kind else "model"


def output_name(cfg: DictConfig, base_name: str, base_cfg: dict, layers: list[int]) -> str:
    """``output_name``, or the seed's ``<base>_replaced_<layers joined by _>`` (``llamba_replaced_11_13_17_21``)."""
    if cfg.output_name is not None:
        return str(cfg.output_name)
    return derived_output_name(f"{short_name(base_name, base_cfg)}_replaced_{'_'.join(map(str, layers))}", "hybrid")


def run(cfg: DictConfig, ctx: Any) -> dict:
    # local: torch + transformers; validation imports this module
    from analysis.evaluate import evaluate_model
    from core.models.checkpoint import save_checkpoint
    from core.models.load import load_model, torch_dtype
    from replacement.hybrid import DonorLayers, assemble, check_compatible, check_layers

    spec = build(cfg.replacement, "replacement")
    base_ref, donor_ref = replacement_models(spec)
    cache_dir, run_dir = cfg.paths.cache_dir, Path(cfg.paths.output_dir)

    # 1. Without weights: both configs, the layer list, the donor's files.
    base_cfg = model_config(base_ref, cache_dir) or {}
    donor_path = donor_dir(donor_ref, cache_dir)
    donor = DonorLayers.open(donor_path, device=spec.donor_device or base_ref.device)
    check_compatible(base_cfg, donor.config, spec.base, spec.donor)
    layers = check_layers(list(spec.layers), donor.depth)
    name = output_name(cfg, base_ref.name or spec.base, base_cfg, layers)
    out_dir = results_folder(ctx, run_dir, name, cfg.output_name is None, writes=bool(cfg.save_model))

    # 2. Base model, donor layers swapped in (only those layers are read from the donor's files).
    t0 = time.perf_counter()
    model, tok = load_model(base_ref, cache_dir=cache_dir, allow_pickle=cfg.allow_pickle)
    tok = tokenizer_or_donors(tok, donor.path)
    if len(model.model.layers) != donor.depth:
        check_compatible({"num_hidden_layers": len(model.model.layers)}, donor.config, spec.base, spec.donor)
    donor.dtype = next(model.parameters()).dtype  # the donor's layers join the base in the base's dtype
    base_ref = dataclasses.replace(base_ref, dtype=str(donor.dtype).removeprefix("torch."))  # as used, for the record
    assemble(model, donor, layers)
    t_build = time.perf_counter() - t0
    log.info("hybrid: %s with layers %s from %s (%.1f s)", spec.base, layers, spec.donor, t_build)
    ctx.log("method", "replace")
    ctx.log("replacement", {"base": spec.base, "donor": spec.donor, "replaced_layers": layers,
                            "description": spec.description, "seconds": t_build})
    ctx.log("compression", {"unit": "replaced_layers", "amount": len(layers), "layers": layers})

    # 3. Evaluate (same protocol as any other run).
    eval_cfg = plain(cfg.eval)
    ppl_tokens, source = None, ""
    if cfg.eval.ppl.enabled:
        src = load_documents(TextSpec(cfg.eval.ppl.source, cfg.eval.ppl.path, cfg.eval.ppl.text_field), cache_dir)
        ppl_tokens, source = eval_tokens(tok, src, cfg.eval.ppl.max_tokens), src.name
    result = evaluate_model(model, tok, eval_cfg, cache_dir=cache_dir, ppl_tokens=ppl_tokens, ppl_source=source)
    ctx.log("eval", {"model": result})
    metrics = headline_metrics(result)

    # 4. Checkpoint + README.txt.
    if cfg.save_model:
        score = ({"metric": spec.score_metric, "value": spec.score, "source": "given"} if spec.score is not None
                 else next(({"metric": k, "value": v, "source": "this run"} for k, v in metrics.items()), None))
        info = {"method": "replace", "replaced_layers": layers, "score": score, "scores": metrics,
                "description": spec.description, "base_model": base_ref.to_dict(), "donor_model": donor_ref.to_dict(),
                "base": spec.base, "donor": spec.donor, "config": plain(cfg)}
        if spec.score_metric == "mmlu" and spec.score is not None:
            info["mmlu_score"] = spec.score  # the seed's field name
        out = save_checkpoint(model, tok, out_dir, info,
                              save_dtype=torch_dtype(cfg.save_dtype) if cfg.save_dtype else None)
        atomic_write_text(out / "README.txt",
                          hybrid_readme(spec.base, spec.donor, layers, out.resolve(), spec.description))
        write_card(out, ctx, settings=("replacement",))  # README.md: the model card (README.txt: the seed's note)
        ctx.log("checkpoint", {"path": str(out), "bytes": sum(f.stat().st_size for f in out.iterdir())})
        ctx.log("output", {"written": True})
        log.info("checkpoint: %s", out)
    return metrics
