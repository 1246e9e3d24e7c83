"""Evaluate one in-memory model with an eval config (a plain dict with the keys of ``EvalConfig``)."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from analysis.efficiency import measure_efficiency
from analysis.generation import generate_sample
from analysis.lm_eval_tasks import run_lm_eval
from analysis.perplexity import perplexity

log = logging.getLogger(__name__)


def evaluate_model(model: torch.nn.Module, tokenizer, eval_cfg: dict, *, cache_dir: str = ".cache",
                   ppl_tokens: Optional[torch.Tensor] = None, ppl_source: str = "", progress: bool = True) -> dict:
    """Perplexity (on ``ppl_tokens``, tokenised once by the caller for base and pruned alike) and generation."""
    out: dict = {}
    ppl = eval_cfg["ppl"]
    if ppl["enabled"] and ppl_tokens is not None:
        out["ppl"] = perplexity(model, ppl_tokens, ppl["seq_len"], ppl["batch_size"], progress, ppl_source)
        v = out["ppl"]["value"]
        log.info("perplexity %s (seq_len %d, %d tokens, %s)", f"{v:.3f}" if isinstance(v, float) else v, ppl["seq_len"],
                 out["ppl"]["tokens"], ppl_source)
    gen = eval_cfg["generation"]
    if gen["enabled"]:
        out["generation"] = generate_sample(model, tokenizer, gen["prompt"], gen["max_new_tokens"])
        log.info("generation: %r -> %r", gen["prompt"], out["generation"]["output"])
    if eval_cfg.get("tasks"):  # lm-eval tasks (analysis/lm_eval_tasks.py): tasks, mmlu, task_average, lm_eval
        out.update(run_lm_eval(model, tokenizer, list(eval_cfg["tasks"]), limit=eval_cfg.get("limit"),
                               num_fewshot=eval_cfg.get("num_fewshot"), batch_size=eval_cfg.get("batch_size", 8),
                               max_length=eval_cfg.get("max_length", 2048), progress=progress))
    eff = eval_cfg.get("efficiency") or {}
    if eff.get("enabled"):
        out["efficiency"] = measure_efficiency(model, **{k: v for k, v in eff.items() if k != "enabled"})
    return out
