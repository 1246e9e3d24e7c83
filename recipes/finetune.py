"""task=finetune: LoRA recovery fine-tuning of a compressed model, merged back into a plain checkpoint.

    python run.py task=finetune model=outputs/2026-11-22/10-48-13/model recovery=lora
    python run.py task=finetune model=outputs/.../model recovery=lora_cpu10 eval=zeroshot eval.limit=200
    python run.py task=finetune model=outputs/.../model recovery=lora recovery.resume=true    # after a kill

Top to bottom: check the model and the options, read and split the training text (never an evaluation text),
evaluate the model before recovery (and its dense base, when the checkpoint names one), train the adapters
(recovery/), save them unmerged, merge, evaluate after recovery, save the merged checkpoint (same architecture,
same loader, plain transformers) with the recovery in ``checkpoint_info.json``. The recovery stage itself
(recipes/_recovery.py: ``prepare`` + ``recover``) is also ``task=prune``'s optional last step (``recovery=lora``).
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from analysis.lm_eval_tasks import task_errors
from core.data.text import TextSpec, calibration_and_eval_sources, eval_tokens, load_documents
from core.models.llama import count_nonzero, count_params, flops_per_token, params_from_config
from core.models.ref import ModelRef, model_config
from core.run.errors import ConfigError, LoadError
from recipes._common import checkpoint_info, headline_metrics, model_ref, plain, text_spec, write_card
from recipes._plan import plan_finetune
from recipes._recovery import (checkpoint_entry, enabled, evaluation_texts, heldout_ppl, prepare, recover,
                               recovery_errors, spec_of)

log = logging.getLogger(__name__)

METRICS = {"ppl": "minimize", "ppl_before_recovery": "minimize", "avg_acc": "maximize", "mmlu": "maximize",
           "damage_closed": "maximize"}
plan = plan_finetune  # dry_run=true prints it; a run checks it before loading (recipes/_plan.py)


def validate(cfg: DictConfig) -> list[str]:
    errors = task_errors(list(cfg.eval.tasks), cfg.eval.limit)
    if not enabled(cfg):
        return errors + ["task=finetune needs a recovery option: recovery=lora (or recovery=lora_cpu10)"]
    return errors + recovery_errors(cfg)


# --------------------------------------------------------------------------- the stage (shared with task=prune)


def _check_base(ref: Any, cache_dir: str) -> Optional[dict]:
    """config.json of the model to fine-tune; a ConfigError unless it is a prunelab checkpoint or a HF model dir."""
    if ref.kind == "hf":
        path = Path(ref.path or "")
        if not path.exists():
            raise LoadError(f"model.path {path} does not exist")
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ConfigError(f"model={path}: recovery fine-tunes a prunelab checkpoint or a HF model dir (config.json "
                              "+ safetensors), not a legacy or foreign file: convert it first (task=convert, or "
                              "task=prune ... to write a checkpoint)")
    return model_config(ref, cache_dir)


def check_early(spec: Any, config: Optional[dict], cfg: DictConfig, run_dir: Path) -> None:
    """What config.json and the saved state settle before any weight is read: the targets and the rank against the
    layers' widths, ``recovery.seq_len`` against the context, and a ``recovery.resume`` state saved by other options
    (or not a plain state). The same checks run again once the model is loaded (``recipes._recovery.prepare``)."""
    from recovery.lora import check_targets_config  # local: validation imports this module
    from recovery.train import check_state

    from recipes._recovery import _resume_source

    check_targets_config(config, spec)
    context = (config or {}).get("max_position_embeddings")
    if isinstance(context, int) and spec.seq_len > context:
        raise ConfigError(f"recovery.seq_len={spec.seq_len} is longer than the model's context of {context} tokens")
    source = _resume_source(spec.resume, cfg.paths.outputs_root, run_dir)
    if source is not None:
        check_state(source, spec)


def _eval_source(info: dict, cfg: DictConfig, cache_dir: str) -> Any:
    """The perplexity text, split off the checkpoint's calibration text when both are the same (as task=evaluate)."""
    ppl = cfg.eval.ppl
    spec = TextSpec(ppl.source, ppl.path, ppl.text_field)
    calib = (info.get("config") or {}).get("data")
    if calib:
        return calibration_and_eval_sources(text_spec(calib), spec, cache_dir, calibration=False)[1]
    return load_documents(spec, cache_dir)


def run(cfg: DictConfig, ctx: Any) -> dict:
    # local: torch + transformers; validation imports this module
    from analysis.evaluate import evaluate_model
    from core.models.checkpoint import check_free_space, save_checkpoint
    from core.models.load import load_model, torch_dtype

    t_start = time.perf_counter()
    spec = spec_of(cfg)
    ref = model_ref(cfg.model)
    cache_dir, run_dir = cfg.paths.cache_dir, Path(cfg.paths.output_dir)
    eval_cfg = plain(cfg.eval)

    # 1. Without weights: the model is a checkpoint, the LoRA targets, rank and rows against its config, the state to
    # resume against these options, disk space, the evaluation text.
    config = _check_base(ref, cache_dir)
    check_early(spec, config, cfg, run_dir)
    info = checkpoint_info(ref)
    if config is not None and cfg.save_model:
        check_free_space(run_dir, params_from_config(config) * (2 if (cfg.save_dtype or ref.dtype) in
                                                                ("float16", "bfloat16") else 4))
    eval_src = _eval_source(info, cfg, cache_dir) if cfg.eval.ppl.enabled else None
    ctx.log("model", {"name": ref.name, "path": ref.path, "kind": ref.kind})
    if info:
        ctx.log("checkpoint_info", {k: info.get(k) for k in ("method", "ratio", "layer_ranges", "params",
                                                             "base_model")})
        if info.get("compression"):
            ctx.log("compression", info["compression"])
        ranges = info.get("layer_ranges") or {}
        if ranges.get("attention") or ranges.get("mlp"):  # the input's pruning, as the table and W&B read a prune run
            ctx.log("pruning", {"attention_layers": ranges.get("attention"), "mlp_layers": ranges.get("mlp"),
                                "source": "checkpoint_info.json of the input model"})
    ctx.log("method", info.get("method") or "base")

    # 2. Model, training text (refused if it overlaps an evaluation text), evaluation tokens.
    t0 = time.perf_counter()
    model, tok = load_model(ref, cache_dir=cache_dir, allow_pickle=cfg.allow_pickle)
    t_load = time.perf_counter() - t0
    prep = prepare(spec, model, tok, cache_dir=cache_dir, evaluation=evaluation_texts(cfg, eval_src, cache_dir),
                   run_dir=run_dir, outputs_root=cfg.paths.outputs_root)
    ppl_tokens = eval_tokens(tok, eval_src, cfg.eval.ppl.max_tokens) if eval_src is not None else None
    ctx.log("data", {"recovery": prep.record(),
                     "evaluation": {"source": eval_src.name, "description": eval_src.description,
                                    "tokens": int(ppl_tokens.shape[1])} if eval_src else {"source": None}})
    ev = lambda m: evaluate_model(m, tok, eval_cfg, cache_dir=cache_dir, ppl_tokens=ppl_tokens,  # noqa: E731
                                  ppl_source=eval_src.name if eval_src else "")

    # 3. The dense base (when the checkpoint names one): the level recovery aims at.
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    dense_heldout = None
    params: dict[str, Any] = {"pruned": count_params(model), "nonzero": count_nonzero(model)}
    if cfg.eval.compare_base and info.get("base_model"):
        try:
            base, _ = load_model(ModelRef.of(info["base_model"]), cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - the comparison is optional: record why it was skipped
            log.warning("base model not evaluated: %s", e)
            ctx.log("eval", {"base_skipped": f"{type(e).__name__}: {e}"})
        else:
            results["base"] = ev(base)
            dense_heldout = heldout_ppl(base, prep, tok)
            params.update({"base": count_params(base), "nonzero_base": count_nonzero(base)})
            context = int(cfg.eval.ppl.seq_len)
            flops = {"context": context, "per_token_base": flops_per_token(base, context),
                     "per_token": flops_per_token(model, context)}
            ctx.log("flops", {**flops, "kept_pct": 100.0 * flops["per_token"] / flops["per_token_base"]})
            ctx.log("eval", {"base": results["base"]})
            del base
            gc.collect()

    # 4. Before recovery.
    results["pruned"] = ev(model)
    ctx.log("eval", {"pruned": results["pruned"]})
    t_eval = time.perf_counter() - t0

    # 5. Recovery: train, save the adapters, merge.
    identity = {"model": ref.path or ref.name, "kind": ref.kind, "params": params["pruned"]}
    model, summary = recover(model, tok, prep, ctx, run_dir=run_dir, identity=identity,
                             dense_heldout=dense_heldout, base_description=f"the model {ref.path or ref.name}")

    # 6. After recovery, then the merged checkpoint.
    t0 = time.perf_counter()
    results["recovered"] = ev(model)
    ctx.log("eval", {"recovered": results["recovered"]})
    t_eval += time.perf_counter() - t0
    if "base" in params:
        params["kept_pct"] = 100.0 * params["pruned"] / params["base"]
        params["sparsity_pct"] = 100.0 * (1 - params["nonzero"] / params["nonzero_base"])
    ctx.log("params", params)
    entry = checkpoint_entry(summary, results["pruned"], results["recovered"], results.get("base"))
    entry["config"] = plain(cfg)
    ctx.log("recovery", {"eval_ppl": entry["eval_ppl"], "zeroshot_avg": entry["zeroshot_avg"]})
    t0 = time.perf_counter()
    if cfg.save_model:
        out = save_checkpoint(model, tok, run_dir / "model", {**{k: v for k, v in info.items()
                                                                 if k not in ("format", "creation_time", "git_commit")},
                                                              "base_model": info.get("base_model") or ref.to_dict(),
                                                              "recovery": entry},
                              save_dtype=torch_dtype(cfg.save_dtype) if cfg.save_dtype else None)
        ctx.log("checkpoint", {"path": str(out), "bytes": sum(f.stat().st_size for f in out.iterdir()),
                               "dtype": cfg.save_dtype or str(next(model.parameters()).dtype).removeprefix("torch.")})
        log.info("checkpoint: %s", out)
        write_card(out, ctx, settings=("recovery",))
    ctx.log("timings", {"load_s": t_load, "eval_s": t_eval, "recovery_s": summary["seconds"],
                        "save_s": time.perf_counter() - t0, "recipe_s": time.perf_counter() - t_start})
    for side in ("base", "pruned", "recovered"):
        ppl = (results.get(side) or {}).get("ppl")
        if ppl and ppl.get("value") is not None:
            log.info("PPL %-9s %.3f (seq_len %d, %d tokens of %s)", side, ppl["value"], ppl["seq_len"], ppl["tokens"],
                     ppl["source"])
    metrics = headline_metrics(results["recovered"])
    before = (results["pruned"].get("ppl") or {}).get("value")
    if before is not None:
        metrics["ppl_before_recovery"] = before
    if entry["eval_ppl"]["damage_closed"] is not None:
        metrics["damage_closed"] = entry["eval_ppl"]["damage_closed"]
    return metrics
