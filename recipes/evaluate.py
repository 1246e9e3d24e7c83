"""task=evaluate: one model (and its base model, when it is a prunelab checkpoint) through ``eval=``.

    python run.py task=evaluate model=smollm2 eval=zeroshot eval.limit=50
    python run.py task=evaluate model=outputs/2026-11-22/10-48-13/model eval=full
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from analysis.lm_eval_tasks import results_frame, task_errors
from core.data.text import TextSpec, calibration_and_eval_sources, eval_tokens, load_documents
from core.models.llama import count_nonzero, count_params
from core.models.ref import ModelRef, model_config
from core.run.errors import ConfigError
from core.run.io import atomic_write_text
from core.run.wandb_view import WandbView
from recipes._common import checkpoint_info, headline_metrics, model_ref, plain, text_spec
from recipes._plan import plan_evaluate

log = logging.getLogger(__name__)

METRICS = {"ppl": "minimize", "avg_acc": "maximize", "mmlu": "maximize"}
WANDB_VIEW = WandbView(uncompressed="base")  # a model without checkpoint_info, evaluated alone: W&B method "base"
plan = plan_evaluate  # dry_run=true prints it; a run checks it before loading (recipes/_plan.py)


def validate(cfg: DictConfig) -> list[str]:
    """Unknown lm-eval task names or a bad limit fail here, before any model loads."""
    return task_errors(list(cfg.eval.tasks), cfg.eval.limit)


def _ppl_tokens(tokenizer, eval_cfg: dict, calib: Optional[TextSpec], cache_dir: str):
    """Evaluation tokens ``[1, n]`` and the sources used (never overlapping the calibration text)."""
    ppl = eval_cfg["ppl"]
    if not ppl["enabled"]:
        return None, {}
    spec = TextSpec(ppl["source"], ppl.get("path"), ppl.get("text_field", "text"))
    if calib:  # the checkpoint's calibration text is known: split if it is the same source
        calib_src, src = calibration_and_eval_sources(calib, spec, cache_dir)
        data = {"calibration": {"source": calib_src.name, "description": calib_src.description}}
    else:
        src = load_documents(spec, cache_dir)
        data = {"calibration": {"source": None, "description": "unknown (not a prunelab checkpoint)"}}
    tokens = eval_tokens(tokenizer, src, ppl["max_tokens"])
    data["evaluation"] = {"source": src.name, "description": src.description, "tokens": int(tokens.shape[1])}
    return (tokens, src.name), data


def _evaluate_one(ref: ModelRef, eval_cfg: dict, calib: Optional[TextSpec], cache_dir: str,
                  allow_pickle: bool) -> tuple[dict, dict, dict]:
    # local: torch + transformers; validation imports this module
    from analysis.efficiency import size_stats
    from analysis.evaluate import evaluate_model
    from core.models.load import load_model

    model, tok = load_model(ref, cache_dir=cache_dir, allow_pickle=allow_pickle)
    ppl, data = _ppl_tokens(tok, eval_cfg, calib, cache_dir)
    result = evaluate_model(model, tok, eval_cfg, cache_dir=cache_dir,
                            ppl_tokens=ppl[0] if ppl else None, ppl_source=ppl[1] if ppl else "")
    if "efficiency" in result and ref.path and Path(ref.path).is_dir():
        disk = size_stats(model, ref.path)
        result["efficiency"].update({k: disk[k] for k in ("disk_bytes", "disk_weight_bytes")})
    params = {"params": count_params(model), "nonzero": count_nonzero(model)}  # zeros in dense shapes: not counted
    del model, tok
    gc.collect()
    return result, data, params


def _log_results(label: str, result: dict) -> None:
    ppl = result.get("ppl")
    if ppl:
        log.info("[%s] PPL %s (seq_len %s, %s tokens of %s)", label,
                 f"{ppl['value']:.3f}" if ppl.get("value") is not None else "FAILED (non-finite)",
                 ppl.get("seq_len"), ppl.get("tokens"), ppl.get("source"))
    frame = results_frame(result, label)
    if len(frame):
        log.info("[%s] lm-eval results:\n%s", label, frame.drop(columns=["model"]).to_string(index=False))
    eff = result.get("efficiency")
    if eff:
        log.info("[%s] efficiency: %s params, prefill %.1f tok/s, decode %.1f tok/s (%.1f ms/token)", label,
                 f"{eff['params']:,}", eff["prefill_tokens_per_s"], eff.get("decode_tokens_per_s", float("nan")),
                 eff.get("decode_latency_ms", float("nan")))


def run(cfg: DictConfig, ctx: Any) -> dict:
    """Evaluate ``cfg.model`` (and its base model when ``eval.compare_base``) into ``ctx.run_dir``."""
    import pandas as pd  # local: pandas; validation imports this module

    eval_cfg, ref, cache_dir = plain(cfg.eval), model_ref(cfg.model), cfg.paths.cache_dir
    config = model_config(ref, cache_dir) or {}
    context = config.get("max_position_embeddings")
    if context and eval_cfg["ppl"]["enabled"] and eval_cfg["ppl"]["seq_len"] > context:
        raise ConfigError(f"eval.ppl.seq_len={eval_cfg['ppl']['seq_len']} is longer than the model's context of "
                          f"{context} tokens")
    info = checkpoint_info(ref)
    calib_cfg = (info.get("config") or {}).get("data")
    calib = text_spec(calib_cfg) if calib_cfg else None
    ctx.log("model", {"name": ref.name, "path": ref.path, "kind": ref.kind})
    if info:
        ctx.log("checkpoint_info", {k: info.get(k) for k in ("method", "ratio", "layer_ranges", "params", "base_model")})
        if info.get("method"):
            ctx.log("method", info["method"])
            ctx.log("ratio", info.get("ratio"))
        if info.get("compression"):
            ctx.log("compression", info["compression"])

    result, data, params = _evaluate_one(ref, eval_cfg, calib, cache_dir, bool(cfg.allow_pickle))
    ctx.log("data", data)
    ctx.log("eval", {"model": result})
    _log_results(ref.name or "model", result)
    frames = [results_frame(result, "model")]
    params_entry: dict[str, Any] = {"model": params["params"], "nonzero": params["nonzero"]}

    base_cfg = info.get("base_model")
    if eval_cfg.get("compare_base") and base_cfg:
        try:
            base_result, _, base_params = _evaluate_one(ModelRef.of(base_cfg), eval_cfg, calib, cache_dir, False)
        except Exception as e:  # noqa: BLE001 - the comparison is optional: record why it was skipped
            log.warning("base model not evaluated: %s", e)
            ctx.log("eval", {"base_skipped": f"{type(e).__name__}: {e}"})
        else:
            ctx.log("eval", {"base": base_result})
            _log_results(f"base {base_cfg.get('name')}", base_result)
            frames.append(results_frame(base_result, "base"))
            params_entry.update({"base": base_params["params"], "pruned": params["params"],
                                 "kept_pct": 100.0 * params["params"] / base_params["params"],
                                 "nonzero_base": base_params["nonzero"],
                                 "sparsity_pct": 100.0 * (1 - params["nonzero"] / base_params["nonzero"])})
    elif eval_cfg.get("compare_base") and not base_cfg:
        ctx.log("eval", {"base_skipped": "no base_model in checkpoint_info.json (not a prunelab checkpoint)"})
    ctx.log("params", params_entry)
    table = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else None
    if table is not None:
        atomic_write_text(Path(ctx.run_dir) / "eval_results.csv", table.to_csv(index=False))
        ctx.log_table("eval/results", table)
    return headline_metrics(result)
