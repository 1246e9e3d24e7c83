"""``task=evaluate`` and ``task=table``: the only functions here that take a DictConfig.

    python run.py task=evaluate model=smollm2 eval=zeroshot eval.limit=50
    python run.py task=evaluate model=outputs/2026-11-22/10-48-13/model eval=full
    python run.py task=table runs='[outputs/multirun/2026-11-22/11-00-00]'

Both convert the config to plain containers and call plain-argument library functions
(``analysis.evaluate.evaluate_model``, ``analysis.results_table``).
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def _load(model_cfg: dict, cache_dir: str, allow_pickle: bool):
    """``core.models.load_model`` with any failure turned into one clear LoadError line."""
    from core.models import LoadError, load_model

    try:
        return load_model(model_cfg, cache_dir=cache_dir, allow_pickle=allow_pickle)
    except LoadError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken checkpoint raises anything; report it in one line
        where = model_cfg.get("path") or model_cfg.get("name")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LoadError(f"could not load model {where!r}: {type(e).__name__}: {first}") from None


def _checkpoint_info(model_cfg: dict) -> dict:
    path = model_cfg.get("path")
    info = Path(path) / "checkpoint_info.json" if path else None
    if info is not None and info.is_file():
        try:
            return json.loads(info.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("cannot read %s: %s", info, e)
    return {}


def _ppl_tokens(tokenizer, eval_cfg: dict, calib_cfg: Optional[dict], cache_dir: str):
    """Evaluation tokens ``[1, n]`` and the sources used (never overlapping the calibration text)."""
    from core.data import calibration_and_eval_sources, eval_tokens, load_documents

    ppl = eval_cfg["ppl"]
    if not ppl["enabled"]:
        return None, {}
    if calib_cfg:  # the checkpoint's calibration text is known: split if it is the same source
        calib, src = calibration_and_eval_sources(calib_cfg, ppl, cache_dir)
        data = {"calibration": {"source": calib.name, "description": calib.description}}
    else:
        src = load_documents(ppl["source"], ppl.get("path"), ppl.get("text_field", "text"), cache_dir)
        data = {"calibration": {"source": None, "description": "unknown (not a prunelab checkpoint)"}}
    tokens = eval_tokens(tokenizer, src, ppl["max_tokens"])
    data["evaluation"] = {"source": src.name, "description": src.description, "tokens": int(tokens.shape[1])}
    return (tokens, src.name), data


def _evaluate_one(model_cfg: dict, eval_cfg: dict, calib_cfg: Optional[dict], cache_dir: str,
                  allow_pickle: bool) -> tuple[dict, dict, int]:
    from analysis.efficiency import size_stats
    from analysis.evaluate import evaluate_model
    from core.models import count_params

    model, tok = _load(model_cfg, cache_dir, allow_pickle)
    ppl, data = _ppl_tokens(tok, eval_cfg, calib_cfg, cache_dir)
    result = evaluate_model(model, tok, eval_cfg, cache_dir=cache_dir,
                            ppl_tokens=ppl[0] if ppl else None, ppl_source=ppl[1] if ppl else "")
    if "efficiency" in result and model_cfg.get("path") and Path(model_cfg["path"]).is_dir():
        disk = size_stats(model, model_cfg["path"])
        result["efficiency"].update({k: disk[k] for k in ("disk_bytes", "disk_weight_bytes")})
    params = count_params(model)
    del model, tok
    gc.collect()
    return result, data, params


def _log_results(label: str, result: dict) -> None:
    from analysis.lm_eval_tasks import results_frame

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


def _headline(result: dict) -> Optional[float]:
    """The number a sweeper optimises: task average, else MMLU, else perplexity."""
    if result.get("task_average") is not None:
        return float(result["task_average"])
    if (result.get("mmlu") or {}).get("average") is not None:
        return float(result["mmlu"]["average"])
    return (result.get("ppl") or {}).get("value")


def run_evaluate(cfg: DictConfig, ctx: Any) -> Optional[float]:
    """Evaluate ``cfg.model`` (and its base model when ``eval.compare_base``) into ``ctx.run_dir``."""
    import pandas as pd

    from analysis.lm_eval_tasks import _task_manager, parse_task_specs, results_frame, validate_eval_request

    c: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    eval_cfg, model_cfg, cache_dir = c["eval"], c["model"], c["paths"]["cache_dir"]
    # Bad input fails here, before any model loads.
    validate_eval_request(list(eval_cfg["tasks"]), eval_cfg["limit"])
    if eval_cfg["tasks"]:
        _task_manager([n for n, _ in parse_task_specs(list(eval_cfg["tasks"]), None)])
    info = _checkpoint_info(model_cfg)
    calib_cfg = ((info.get("config") or {}).get("data")) or None
    ctx.log("model", {"name": model_cfg.get("name"), "path": model_cfg.get("path"), "kind": model_cfg.get("kind")})
    if info:
        ctx.log("checkpoint_info", {k: info.get(k) for k in ("method", "ratio", "layer_ranges", "params", "base_model")})
        if info.get("method"):
            ctx.log("method", info["method"])
            ctx.log("ratio", info.get("ratio"))

    result, data, params = _evaluate_one(model_cfg, eval_cfg, calib_cfg, cache_dir, c.get("allow_pickle", False))
    ctx.log("data", data)
    ctx.log("eval", {"model": result})
    _log_results(model_cfg.get("name") or "model", result)
    frames = [results_frame(result, "model")]
    params_entry: dict[str, Any] = {"model": params}

    base_cfg = info.get("base_model")
    if eval_cfg.get("compare_base") and base_cfg:
        try:
            base_result, _, base_params = _evaluate_one(base_cfg, eval_cfg, calib_cfg, cache_dir, False)
        except Exception as e:  # noqa: BLE001 - the comparison is optional: record why it was skipped
            log.warning("base model not evaluated: %s", e)
            ctx.log("eval", {"base_skipped": f"{type(e).__name__}: {e}"})
        else:
            ctx.log("eval", {"base": base_result})
            _log_results(f"base {base_cfg.get('name')}", base_result)
            frames.append(results_frame(base_result, "base"))
            params_entry.update({"base": base_params, "pruned": params, "kept_pct": 100.0 * params / base_params})
    elif eval_cfg.get("compare_base") and not base_cfg:
        ctx.log("eval", {"base_skipped": "no base_model in checkpoint_info.json (not a prunelab checkpoint)"})
    ctx.log("params", params_entry)
    table = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else None
    if table is not None:
        from core.io import atomic_write_text

        atomic_write_text(Path(ctx.run_dir) / "eval_results.csv", table.to_csv(index=False))
        ctx.log_table("eval/results", table)
    return _headline(result)


def run_table(cfg: DictConfig, ctx: Any) -> None:
    """Collect ``metrics.json`` of ``cfg.runs`` (default ``paths.outputs_root``) into CSV/Markdown/LaTeX."""
    from analysis.results_table import collect, find_metrics, write_tables

    runs = list(cfg.runs) or [cfg.paths.outputs_root]
    sources = [str(Path(r).expanduser()) for r in runs]
    missing = [s for s in sources if not Path(s).exists()]
    if missing:
        raise FileNotFoundError(f"table: no such run dir(s): {', '.join(missing)}")
    found = [f for f in find_metrics(sources) if f.parent.resolve() != Path(ctx.run_dir).resolve()]
    df = collect(found)
    if df.empty:
        raise FileNotFoundError(f"table: no evaluated runs (metrics.json with an `eval` section) under {', '.join(sources)}")
    files = write_tables(df, ctx.run_dir)
    ctx.log("table", {"sources": sources, "runs": len(found), "rows": len(df), "files": files})
    ctx.log_table("results", df)
    log.info("results table (%d rows from %d runs):\n%s", len(df), len(found), Path(files["markdown"]).read_text())
    return None
