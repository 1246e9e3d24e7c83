"""The prune recipe (task=prune), top to bottom: check, load, calibrate, evaluate, prune, evaluate, save, analyse.

The only function here that sees a DictConfig; everything it calls takes plain arguments.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from analysis.evaluate import evaluate_model
from analysis.report import write_analysis
from analysis.structure import structure_of
from core.checkpoint import save_checkpoint
from core.data import calibration_and_eval_sources, calibration_batch, eval_tokens
from core.models import cached_gguf_dir, count_params, load_model, model_depth
from core.runlog import RunContext
from pruning.llm_pruner import Geometry, PruneSpec, prune
from pruning.ranges import resolve_range, solve_params_ratio

log = logging.getLogger(__name__)


def _spec(cfg: DictConfig, depth: int) -> PruneSpec:
    p = cfg.pruner
    att_ratio = cfg.ratio if p.attention_ratio is None else p.attention_ratio
    mlp_ratio = cfg.ratio if p.mlp_ratio is None else p.mlp_ratio
    return PruneSpec(
        importance=p.importance, taylor=p.taylor, group_reduction=p.group_reduction,
        global_ranking=p.global_ranking, iterative_steps=p.iterative_steps,
        attention_ratio=float(att_ratio), mlp_ratio=float(mlp_ratio),
        attention_layers=resolve_range(cfg.layers.attention.start, cfg.layers.attention.end, depth, "attention",
                                       float(att_ratio)),
        mlp_layers=resolve_range(cfg.layers.mlp.start, cfg.layers.mlp.end, depth, "mlp", float(mlp_ratio)),
        round_to=p.round_to, rounding=p.rounding, batch_size=p.batch_size, seed=cfg.seed,
    )


def _structure(model, name: str):
    """Shapes-only structure (no weights copied) for the analysis report."""
    return structure_of(model, config=model.config.to_dict(), name=name)


def run_prune(cfg: DictConfig, ctx: RunContext) -> float | None:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    cache_dir = cfg.paths.cache_dir
    run_dir = Path(cfg.paths.output_dir)

    # 1. Everything that can be checked without weights: depth, ranges, data.
    depth = model_depth(model_cfg, cache_dir)
    if depth is not None:
        _spec(cfg, depth)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    ppl_cfg = OmegaConf.to_container(cfg.eval.ppl, resolve=True)
    calib_src, eval_src = calibration_and_eval_sources(data_cfg, ppl_cfg, cache_dir)

    # 2. Model, calibration batch, evaluation tokens (tokenised once for base and pruned).
    t0 = time.perf_counter()
    model, tok = load_model(model_cfg, cache_dir=cache_dir, allow_pickle=cfg.allow_pickle)
    t_load = time.perf_counter() - t0
    spec = _spec(cfg, len(model.model.layers))
    batch = calibration_batch(tok, calib_src, cfg.data.num_samples, cfg.data.seq_len, cfg.data.seed)
    ppl_tokens = eval_tokens(tok, eval_src, cfg.eval.ppl.max_tokens) if cfg.eval.ppl.enabled else None
    eval_cfg = OmegaConf.to_container(cfg.eval, resolve=True)
    ctx.log("data", {
        "calibration": {"source": calib_src.name, "description": calib_src.description,
                        "num_samples": cfg.data.num_samples, "seq_len": cfg.data.seq_len, "seed": cfg.data.seed},
        "evaluation": {"source": eval_src.name, "description": eval_src.description,
                       "tokens": int(ppl_tokens.shape[1]) if ppl_tokens is not None else 0},
    })
    params_base = count_params(model)

    # 3. Base model, same protocol as the pruned one.
    results: dict = {}
    if cfg.eval.compare_base:
        results["base"] = evaluate_model(model, tok, eval_cfg, cache_dir=cache_dir, ppl_tokens=ppl_tokens,
                                         ppl_source=eval_src.name)
        ctx.log("eval", {"base": results["base"]})
    base_structure = _structure(model, model_cfg["name"])

    # 4. Prune.
    ratio_target = getattr(cfg.ratio_target, "value", str(cfg.ratio_target))
    if ratio_target == "params":
        spec = solve_params_ratio(Geometry.of(model), spec, float(cfg.ratio), params_base,
                                  fixed_attention=cfg.pruner.attention_ratio is not None,
                                  fixed_mlp=cfg.pruner.mlp_ratio is not None)
        log.info("ratio_target=params: group ratios attention %.4f, mlp %.4f", spec.attention_ratio, spec.mlp_ratio)
    log.info("pruning %s (%s) attention layers [%d, %d) ratio %.3f, mlp layers [%d, %d) ratio %.3f",
             cfg.pruner.name, spec.taylor if spec.importance == "taylor" else spec.importance,
             *spec.attention_layers, spec.attention_ratio, *spec.mlp_layers, spec.mlp_ratio)
    t0 = time.perf_counter()
    result = prune(model, batch, spec)
    t_prune = time.perf_counter() - t0
    log.info("params %s -> %s (%.2f%% removed) in %.1f s", f"{result.params_before:,}", f"{result.params_after:,}",
             100 * result.removed_fraction, t_prune)
    ctx.log("method", cfg.pruner.name)
    ctx.log("params", {"base": params_base, "pruned": result.params_after,
                       "kept_pct": 100.0 * result.params_after / params_base,
                       "removed_pct": 100.0 * result.removed_fraction})
    ctx.log("pruning", {
        "importance": spec.importance, "taylor": spec.taylor, "group_reduction": spec.group_reduction,
        "global_ranking": spec.global_ranking, "iterative_steps": spec.iterative_steps,
        "attention_ratio": spec.attention_ratio, "mlp_ratio": spec.mlp_ratio,
        "attention_layers": list(spec.attention_layers), "mlp_layers": list(spec.mlp_layers),
        "round_to": spec.round_to, "rounding": spec.rounding, "notes": result.notes,
        "heads_pruned": any(l["kv_heads"][0] != l["kv_heads"][1] for l in result.layers),
        "layers": result.layers, "seconds": t_prune, **result.timings,
    })
    del batch
    gc.collect()

    # 5. Pruned model.
    results["pruned"] = evaluate_model(model, tok, eval_cfg, cache_dir=cache_dir, ppl_tokens=ppl_tokens,
                                       ppl_source=eval_src.name)
    ctx.log("eval", {"pruned": results["pruned"]})
    for side in ("base", "pruned"):
        ppl = results.get(side, {}).get("ppl")
        if ppl:
            log.info("PPL %-6s %s (seq_len %d, %d tokens of %s)", side,
                     f"{ppl['value']:.3f}" if ppl["value"] is not None else "FAILED (non-finite)",
                     ppl["seq_len"], ppl["tokens"], ppl["source"])

    # 6. Checkpoint (atomic) and analysis.
    info = {"method": cfg.pruner.name, "ratio": float(cfg.ratio), "ratio_target": ratio_target,
            "layer_ranges": {"attention": list(spec.attention_layers), "mlp": list(spec.mlp_layers)},
            "base_model": model_cfg, "params": {"base": params_base, "pruned": result.params_after},
            "scores": {k: (v.get("ppl") or {}).get("value") for k, v in results.items()},
            "config": OmegaConf.to_container(cfg, resolve=True)}
    if cfg.save_model:
        out = save_checkpoint(model, tok, run_dir / "model", info)
        ctx.log("checkpoint", {"path": str(out), "bytes": sum(f.stat().st_size for f in out.iterdir())})
        log.info("checkpoint: %s", out)
    base_dir = cached_gguf_dir(model_cfg, cache_dir) if model_cfg["kind"] == "gguf" else model_cfg.get("path")
    summary = write_analysis(
        run_dir / "analysis", _structure(model, f"{model_cfg['name']}-{cfg.pruner.name}"), base_structure,
        expected_ranges={"attention": list(spec.attention_layers), "mlp": list(spec.mlp_layers)},
        target_sparsity=float(cfg.ratio) if ratio_target == "params" else result.removed_fraction,
        model_dir=(run_dir / "model") if cfg.save_model else None, base_model_dir=base_dir, ctx=ctx)
    ctx.log("analysis", summary)
    ctx.log("timings", {"load_s": t_load, "prune_s": t_prune, "total_s": time.perf_counter() - t_start})
    ppl = results["pruned"].get("ppl")
    return ppl["value"] if ppl else None
