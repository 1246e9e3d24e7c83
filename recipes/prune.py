"""task=prune, top to bottom: check, load, calibrate, evaluate, prune, evaluate, [recover, evaluate,] save, analyse.

    python run.py pruner=taylor ratio=0.25 layers=seed model=llama3_8b_instruct
    python run.py pruner=taylor recovery=lora          # + LoRA recovery (recipes/_recovery.py), merged before saving

``pruner=X`` builds the class named by ``conf/pruner/X.yaml``'s ``_target_`` (a :class:`pruning.Pruner`);
everything below takes plain arguments.
"""

from __future__ import annotations

import gc
import importlib
import logging
import resource
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from analysis.lm_eval_tasks import task_errors
from core.data.text import calibration_and_eval_sources, calibration_batch, eval_tokens, mix_record
from core.models.llama import count_nonzero, count_params, flops_per_token, params_from_config
from core.models.ref import model_config, model_depth
from core.run.errors import ConfigError, UserError
from core.run.io import InBackground
from core.run.wandb_view import WandbView
from recipes import _recovery as recovery_stage
from recipes._common import build, headline_metrics, model_ref, plain, text_spec, write_card
from recipes._launch import imports_without_gc
from recipes._plan import plan_prune

log = logging.getLogger(__name__)

METRICS = {"ppl": "minimize", "ppl_base": "minimize", "avg_acc": "maximize", "mmlu": "maximize",
           "params_kept_pct": "minimize", "nonzero_kept_pct": "minimize",
           # recovery=lora: ppl / avg_acc / mmlu are the recovered model's; these are the pruned model's and the share
           # of the perplexity damage (pruned - base) recovery closed
           "ppl_before_recovery": "minimize", "damage_closed": "maximize"}
WANDB_VIEW = WandbView(method_key="pruner.name", layers_key="layers")  # W&B: the pruner and the configured ranges
plan = plan_prune  # dry_run=true prints it; a run checks it before loading (recipes/_plan.py)

DENSE_ZEROS_NOTE = ("unstructured / N:M sparsity keeps dense shapes: these dense kernels gain no speed or memory "
                    "from the zeros (2:4 needs semi-structured sparse kernels on an Ampere+ GPU, "
                    "torch.sparse.to_sparse_semi_structured)")


def validate(cfg: DictConfig) -> list[str]:
    """The pruner's options bound to its class, and the eval tasks: a typo or a bad value fails before any weight loads.

    The unit the pruner reads ``ratio`` in is written back into ``cfg`` (:func:`resolve_ratio_target`), so the
    record composed from it says what is used.
    """
    errors = task_errors(list(cfg.eval.tasks), cfg.eval.limit)
    try:
        resolve_ratio_target(cfg, build(cfg.pruner, "pruner"))
    except UserError as e:
        errors.append(str(e))
    if recovery_stage.enabled(cfg):
        errors += recovery_stage.recovery_errors(cfg)
    return errors


def resolve_ratio_target(cfg: DictConfig, pruner: Any) -> None:
    """``cfg.ratio_target`` (null: the pruner's default) becomes the unit ``pruner`` resolved it to, a plain
    string; ``pruner.ratio_target`` (``${ratio_target}``) follows. The config the run records, the W&B config and
    the checkpoint's then say what the pruner used, never the top-level default."""
    with read_write(cfg), open_dict(cfg):
        cfg.ratio_target = str(pruner.ratio_target)
        if OmegaConf.select(cfg, "pruner.ratio_target", default=None) != cfg.ratio_target:
            cfg.pruner.ratio_target = cfg.ratio_target


def check_model_config(config: dict, cfg: DictConfig) -> None:
    """Settings that must fit the model: calibration and evaluation windows within its context."""
    context = config.get("max_position_embeddings")
    if context and cfg.data.seq_len > context:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context of {context} tokens")
    if context and cfg.eval.ppl.enabled and cfg.eval.ppl.seq_len > context:
        raise ConfigError(f"eval.ppl.seq_len={cfg.eval.ppl.seq_len} is longer than the model's context of "
                          f"{context} tokens")


def _bytes_per_param(dtype: str, config: dict) -> int:
    name = dtype if dtype != "auto" else str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return 2 if name in ("float16", "bfloat16") else 4


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(cfg: DictConfig, ctx) -> dict:
    """The prune task. The objects that exist once torch and transformers are imported (~400k, alive until exit) are
    frozen out of the cyclic collector for the run: each collection (the one after pruning, Python's own) then
    walks only what the run made, not the imports again (what is freed does not change)."""
    with imports_without_gc():
        import core.models.checkpoint  # noqa: F401 - torch + transformers, imported before freezing
        import core.models.load  # noqa: F401

    gc.freeze()
    try:
        return _run(cfg, ctx)
    finally:
        gc.unfreeze()


def _run(cfg: DictConfig, ctx) -> dict:
    # local: torch + transformers; validation imports this module
    import torch

    from analysis.evaluate import evaluate_model
    from analysis.structure import structure_of
    from core.models.checkpoint import check_free_space, save_checkpoint
    from core.models.load import cached_gguf_dir, load_model, torch_dtype

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    pruner = build(cfg.pruner, "pruner")
    resolve_ratio_target(cfg, pruner)  # (validate did it; a record composed before validation gets it here)
    ctx.log("config", {"ratio_target": cfg.ratio_target, "pruner": plain(cfg.pruner)})
    ref = model_ref(cfg.model)
    cache_dir, run_dir = cfg.paths.cache_dir, Path(cfg.paths.output_dir)
    eval_cfg = plain(cfg.eval)

    # 1. Everything that can be checked without weights: depth and ranges, context length, disk space, text.
    config = model_config(ref, cache_dir)
    depth = int(config["num_hidden_layers"]) if config is not None else model_depth(ref, cache_dir)
    if depth is not None:  # (a GGUF not yet converted: its metadata)
        pruner.check(depth)
    if config is not None:
        check_model_config(config, cfg)
        if cfg.save_model:
            check_free_space(run_dir, params_from_config(config) * _bytes_per_param(cfg.save_dtype or ref.dtype, config))
    calib_src, eval_src = calibration_and_eval_sources(text_spec(cfg.data), text_spec(cfg.eval.ppl), cache_dir,
                                                       calibration=pruner.needs_calibration,
                                                       evaluation=cfg.eval.ppl.enabled)

    # 2. Model, calibration batch, evaluation tokens (tokenised once for base and pruned).
    t0 = time.perf_counter()
    model, tok = load_model(ref, cache_dir=cache_dir, allow_pickle=cfg.allow_pickle)
    t_load = time.perf_counter() - t0
    peak = {"load": _peak_mib()}
    pruner.check(len(model.model.layers))
    if cfg.save_model:  # known exactly now (a GGUF's first conversion, a legacy file): still before pruning
        check_free_space(run_dir, sum(p.numel() for p in model.parameters())
                         * (torch_dtype(cfg.save_dtype).itemsize if cfg.save_dtype else next(model.parameters()).element_size()))
    # a pruner that needs a given amount of text says so (pruner=obs: its token rule on the model's geometry, and
    # how the number was derived); others take `data`'s
    plan = pruner.calibration_plan(model.config.to_dict()) if hasattr(pruner, "calibration_plan") else None
    samples, seq_len = plan.shape if plan is not None else (cfg.data.num_samples, cfg.data.seq_len)
    batch = calibration_batch(tok, calib_src, samples, seq_len, cfg.data.seed) if pruner.needs_calibration else None
    ppl_tokens = eval_tokens(tok, eval_src, cfg.eval.ppl.max_tokens) if cfg.eval.ppl.enabled else None
    ctx.log("data", {
        "calibration": {"source": calib_src.name, "description": calib_src.description,
                        "num_samples": samples, "seq_len": seq_len, "tokens": samples * seq_len, "seed": cfg.data.seed,
                        **({"rule": plan.rule} if plan is not None else {}), **mix_record(calib_src, samples, cfg.data.seed)}
        if calib_src else {"source": None, "description": f"{pruner.name} uses no calibration text"},
        "evaluation": {"source": eval_src.name, "description": eval_src.description,
                       "tokens": int(ppl_tokens.shape[1])} if eval_src else {"source": None, "tokens": 0},
    })
    prep = None  # recovery=lora: its training text, read and checked before anything is pruned
    if recovery_stage.enabled(cfg):
        prep = recovery_stage.prepare(recovery_stage.spec_of(cfg), model, tok, cache_dir=cache_dir,
                                      evaluation=recovery_stage.evaluation_texts(cfg, eval_src, cache_dir),
                                      run_dir=run_dir, outputs_root=cfg.paths.outputs_root)
        ctx.log("data", {"recovery": prep.record()})
    params_base = count_params(model)
    # non-zeros are counted by torch kernels on another core while this thread tokenises, evaluates the base model
    # and builds its structure (all read-only); joined before the pruner writes a weight
    nonzero_base_count = InBackground(count_nonzero, model)
    context = int(cfg.eval.ppl.seq_len)
    flops_base = flops_per_token(model, context)

    # 3. Base model, same protocol as the pruned one.
    t0 = time.perf_counter()
    results: dict = {}
    if cfg.eval.compare_base:
        results["base"] = evaluate_model(model, tok, eval_cfg, cache_dir=cache_dir, ppl_tokens=ppl_tokens,
                                         ppl_source=eval_src.name if eval_src else "")
        ctx.log("eval", {"base": results["base"]})
    dense_heldout = recovery_stage.heldout_ppl(model, prep, tok) if prep else None  # the level recovery aims at
    base_structure = structure_of(model, config=model.config.to_dict(), name=ref.name)  # shapes only
    t_eval = time.perf_counter() - t0

    # 4. Prune. The analysis modules (pandas, matplotlib: ~0.5 s) are imported meanwhile, beside torch's kernels.
    analysis_imports = InBackground(importlib.import_module, "analysis.report")
    nonzero_base = nonzero_base_count.result()
    t0 = time.perf_counter()
    result = pruner(model, batch)
    t_prune = time.perf_counter() - t0
    peak["prune"] = _peak_mib()
    log.info("params %s -> %s (%.2f%% removed) in %.1f s", f"{result.params_before:,}", f"{result.params_after:,}",
             100 * result.removed_fraction, t_prune)
    ctx.log("method", pruner.name)
    ctx.log("compression", result.compression)
    # counted beside the pruned model's evaluation, the checkpoint write and the analysis (all read-only); joined
    # before recovery changes a weight
    nonzero_count = InBackground(count_nonzero, model)
    flops = flops_per_token(model, context)
    ctx.log("flops", {"context": context, "per_token_base": flops_base, "per_token": flops,
                      "kept_pct": 100.0 * flops / flops_base,
                      "note": "dense-kernel FLOPs: zeros in dense shapes are multiplied all the same"})
    ctx.log("pruning", {**result.details, "notes": result.notes, "layers": result.layers, "seconds": t_prune,
                        **result.timings})
    if prep is not None:  # the pruned widths against recovery.rank / targets, before the pruned model is evaluated
        recovery_stage.check_targets(model, prep)
    del batch
    gc.collect()

    # 5. Pruned model.
    t0 = time.perf_counter()
    results["pruned"] = evaluate_model(model, tok, eval_cfg, cache_dir=cache_dir, ppl_tokens=ppl_tokens,
                                       ppl_source=eval_src.name if eval_src else "")
    if result.compression.get("unit") == "sparsity" and "efficiency" in results["pruned"]:
        results["pruned"]["efficiency"]["note"] = DENSE_ZEROS_NOTE
    ctx.log("eval", {"pruned": results["pruned"]})
    t_eval += time.perf_counter() - t0
    for side in ("base", "pruned"):
        ppl = results.get(side, {}).get("ppl")
        if ppl:
            log.info("PPL %-6s %s (seq_len %d, %d tokens of %s)", side,
                     f"{ppl['value']:.3f}" if ppl["value"] is not None else "FAILED (non-finite)",
                     ppl["seq_len"], ppl["tokens"], ppl["source"])

    # 5b. recovery=lora: train adapters on the pruned model, merge them, evaluate again (recipes/_recovery.py).
    recovery_entry, t_recovery = None, 0.0
    if prep is not None:
        nonzero_count.result()  # counted before recovery changes a weight (result() gives it again below)
        t0 = time.perf_counter()
        identity = {"model": ref.path or ref.name, "pruner": plain(cfg.pruner), "ratio": float(cfg.ratio),
                    "ratio_target": pruner.ratio_target, "layers": plain(cfg.layers), "data": plain(cfg.data),
                    "seed": int(cfg.seed), "params": result.params_after}
        model, summary = recovery_stage.recover(model, tok, prep, ctx, run_dir=run_dir, identity=identity,
                                                dense_heldout=dense_heldout,
                                                base_description=f"the {pruner.name}-pruned model of this run "
                                                                 "(before recovery; not saved)")
        t_recovery = time.perf_counter() - t0
        peak["recovery"] = _peak_mib()
        t0 = time.perf_counter()
        results["recovered"] = evaluate_model(model, tok, eval_cfg, cache_dir=cache_dir, ppl_tokens=ppl_tokens,
                                              ppl_source=eval_src.name if eval_src else "")
        ctx.log("eval", {"recovered": results["recovered"]})
        t_eval += time.perf_counter() - t0
        recovery_entry = recovery_stage.checkpoint_entry(summary, results["pruned"], results["recovered"],
                                                   results.get("base"))
        ctx.log("recovery", {"eval_ppl": recovery_entry["eval_ppl"], "zeroshot_avg": recovery_entry["zeroshot_avg"]})

    # 6. Checkpoint (atomic) and analysis.
    t0 = time.perf_counter()
    # ratio, unit and compression as the pruner used them (slicegpt's ratio is pruner.sparsity)
    info = {"method": pruner.name, "ratio": float(pruner.ratio), "ratio_target": pruner.ratio_target,
            "compression": result.compression, "layer_ranges": result.ranges, "base_model": ref.to_dict(),
            "params": {"base": params_base, "pruned": result.params_after},
            "scores": {k: (v.get("ppl") or {}).get("value") for k, v in results.items()},
            "config": plain(cfg)}
    if recovery_entry is not None:
        info["recovery"] = recovery_entry
    # the checkpoint is written (safetensors, fsync: outside the interpreter lock) while the analysis compares and
    # plots; the analysis measures the checkpoint's files once it is complete
    saving = InBackground(save_checkpoint, model, tok, run_dir / "model", info,
                          save_dtype=torch_dtype(cfg.save_dtype) if cfg.save_dtype else None) if cfg.save_model else None

    def saved() -> None:
        if saving is None:
            return
        out = saving.result()
        ctx.log("checkpoint", {"path": str(out), "bytes": sum(f.stat().st_size for f in out.iterdir()),
                               "dtype": cfg.save_dtype or str(next(model.parameters()).dtype).removeprefix("torch.")})
        log.info("checkpoint: %s", out)

    analysis_imports.result()
    from analysis.report import write_analysis  # (imported during pruning)

    base_dir = cached_gguf_dir(ref, cache_dir) if ref.kind == "gguf" else ref.path
    try:
        summary = write_analysis(
            run_dir / "analysis", structure_of(model, config=model.config.to_dict(), name=f"{ref.name}-{pruner.name}"),
            base_structure, expected_ranges=result.ranges,
            target_sparsity=float(result.compression["amount"]) if result.compression.get("unit") in ("params", "sparsity")
            else result.removed_fraction,
            model_dir=(run_dir / "model") if cfg.save_model else None, base_model_dir=base_dir, ctx=ctx,
            wait_for_model=saved)
    finally:
        if saving is not None:  # never leave while the checkpoint is still being written
            saving.result()
    nonzero = nonzero_count.result()
    ctx.log("params", {"base": params_base, "pruned": result.params_after,
                       "kept_pct": 100.0 * result.params_after / params_base,
                       "removed_pct": 100.0 * result.removed_fraction,
                       # zeros kept in dense shapes (unstructured / N:M) count here, not above
                       "nonzero_base": nonzero_base, "nonzero": nonzero,
                       "sparsity_pct": 100.0 * (1.0 - nonzero / nonzero_base)})
    t_save = saving.seconds if saving is not None else 0.0
    peak["save"] = peak["analysis"] = _peak_mib()
    ctx.log("analysis", summary)
    ctx.log("memory", {f"peak_rss_mib_after_{k}": round(v, 1) for k, v in peak.items()})
    ctx.log("timings", {"load_s": t_load, "eval_s": t_eval, "prune_s": t_prune, "recovery_s": t_recovery,
                        "save_s": t_save,  # (beside the analysis: save_and_analysis_s is their wall time)
                        "save_and_analysis_s": time.perf_counter() - t0, "recipe_s": time.perf_counter() - t_start})
    metrics = headline_metrics(results.get("recovered") or results["pruned"])
    if recovery_entry is not None:
        metrics.update({k: v for k, v in (("ppl_before_recovery", (results["pruned"].get("ppl") or {}).get("value")),
                                          ("damage_closed", recovery_entry["eval_ppl"]["damage_closed"]))
                        if v is not None})
    if "base" in results and (results["base"].get("ppl") or {}).get("value") is not None:
        metrics["ppl_base"] = results["base"]["ppl"]["value"]
    metrics["params_kept_pct"] = 100.0 * result.params_after / params_base
    metrics["nonzero_kept_pct"] = 100.0 * nonzero / nonzero_base
    if cfg.save_model:  # the model card, now that the record holds every evaluation
        write_card(run_dir / "model", ctx, settings=("pruner", "recovery"))
    return metrics
