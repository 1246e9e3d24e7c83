"""task=finetune: LoRA recovery fine-tuning of a compressed model, merged back into a plain checkpoint.

    python run.py task=finetune model=outputs/2026-11-22/10-48-13/model recovery=lora
    python run.py task=finetune model=outputs/.../model recovery=lora_cpu10 eval=zeroshot eval.limit=200
    python run.py task=finetune model=outputs/.../model recovery=lora recovery.resume=true    # after a kill

Top to bottom: check the model and the options, read and split the training text (never an evaluation text),
evaluate the model before recovery (and its dense base, when the checkpoint names one), train the adapters
(recovery/), save them unmerged, merge, evaluate after recovery, save the merged checkpoint (same architecture,
same loader, plain transformers) with the recovery in ``checkpoint_info.json``. The recovery stage itself
(:func:`prepare` + :func:`recover`) is also ``task=prune``'s optional last step (``recovery=lora``).
"""

from __future__ import annotations

import gc
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from recipes._common import build, checkpoint_info, headline_metrics, model_ref, plain, text_spec

log = logging.getLogger(__name__)

METRICS = {"ppl": "minimize", "ppl_before_recovery": "minimize", "avg_acc": "maximize", "mmlu": "maximize",
           "damage_closed": "maximize"}
STATE = Path("recovery") / "state"  # in the run dir


def enabled(cfg: DictConfig) -> bool:
    """Whether the config asks for a recovery stage (``recovery=none`` does not)."""
    node = cfg.get("recovery")
    return node is not None and str(node.get("name", "none")) != "none"


def spec_of(cfg: DictConfig) -> Any:
    """The bound :class:`recovery.lora.LoRASpec` of ``cfg.recovery`` (ConfigError for a bad key or value)."""
    return build(cfg.recovery, "recovery")


def recovery_errors(cfg: DictConfig) -> list[str]:
    """The recovery options bound to their class: a typo or a bad value fails before any weight loads."""
    from core.errors import UserError

    try:
        spec_of(cfg)
    except UserError as e:
        return [str(e)]
    return []


def validate(cfg: DictConfig) -> list[str]:
    from analysis.lm_eval_tasks import task_errors

    errors = task_errors(list(cfg.eval.tasks), cfg.eval.limit)
    if not enabled(cfg):
        return errors + ["task=finetune needs a recovery option: recovery=lora (or recovery=lora_cpu10)"]
    return errors + recovery_errors(cfg)


# --------------------------------------------------------------------------- the stage (shared with task=prune)


@dataclass
class Prepared:
    """The training text of a recovery stage, read and split before the model changes."""

    spec: Any  # recovery.lora.LoRASpec
    corpus: Any  # recovery.data.Corpus
    rows: Any  # recovery.data.Rows (training, in reading order)
    heldout: Any  # recovery.data.Rows (validation windows)
    total_steps: int
    resume_source: Optional[Path] = None  # the state dir to continue from (recovery.resume), checked against spec

    def record(self) -> dict:
        from recovery.data import describe_rows

        return {"source": self.corpus.name, "description": self.corpus.description, "kind": self.corpus.kind,
                "spec": self.spec.data.to_dict(), "seq_len": self.spec.seq_len, "packing": self.spec.packing,
                "train": describe_rows(self.rows), "heldout": {"windows": len(self.heldout.ids),
                                                               "tokens": self.heldout.tokens}}


def prepare(spec: Any, model: Any, tok: Any, *, cache_dir: str, evaluation: list, run_dir: Optional[Path] = None,
            outputs_root: str = "outputs") -> Prepared:
    """Check the targets against ``model``, read and split the training text, refuse overlap with the
    ``evaluation`` texts (TextSources), build the rows, find the state to resume (``recovery.resume``) and check it
    against the options: every bad input fails here, before any evaluation runs."""
    from core.errors import ConfigError
    from recovery.data import check_disjoint, heldout_rows, load_corpus, rows_per_epoch, steps_for, training_rows
    from recovery.lora import resolve_targets

    resolve_targets(model, spec)  # (task=prune checks again after pruning: widths may have shrunk below the rank)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and spec.seq_len > context:
        raise ConfigError(f"recovery.seq_len={spec.seq_len} is longer than the model's context of {context} tokens")
    corpus = load_corpus(spec.data, cache_dir)
    check_disjoint(corpus, [e for e in evaluation if e is not None])
    per_epoch = rows_per_epoch(tok, corpus, spec.seq_len, spec.packing) if spec.epochs is not None else None
    total = steps_for(spec.tokens, spec.epochs, spec.steps, rows_per_step=spec.rows_per_step, seq_len=spec.seq_len,
                      rows_in_epoch=per_epoch)
    rows = training_rows(tok, corpus, total * spec.rows_per_step, spec.seq_len, packing=spec.packing, seed=spec.seed,
                         batch_tokens=spec.micro_batch * spec.seq_len, train_on_inputs=spec.train_on_inputs)
    held = heldout_rows(tok, corpus, spec.seq_len, spec.eval_tokens)
    log.info("recovery data: %s, %d steps x %d rows of %d tokens (%.3f epochs); held-out %d windows",
             corpus.name, total, spec.rows_per_step, spec.seq_len, rows.epochs, len(held.ids))
    source = _resume_source(spec.resume, outputs_root, run_dir) if run_dir is not None else None
    if source is not None:
        from recovery.train import check_state

        source = check_state(source, spec, total)
    return Prepared(spec, corpus, rows, held, total, source)


def check_targets(model: Any, prep: Prepared) -> None:
    """The recovery targets and rank against ``model`` as it is now (after pruning, widths may be below the rank)."""
    from recovery.lora import resolve_targets

    resolve_targets(model, prep.spec)


def heldout_ppl(model: Any, prep: Prepared, tok: Any) -> float:
    """The held-out perplexity of any model on the stage's validation windows (the dense base, for the damage)."""
    from recovery.train import heldout_ppl as ppl

    return ppl(model, prep.heldout, prep.spec.micro_batch, _pad_id(tok))


def _pad_id(tok: Any) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def _resume_source(resume: Any, outputs_root: str, run_dir: Path) -> Optional[Path]:
    """The state dir to continue from: ``true`` = the newest unfinished run under ``outputs_root`` with a recovery
    state; a path = that run dir (its recovery/state) or that state dir."""
    import json

    from core.errors import ConfigError
    from core.record import run_status
    from recovery.train import latest_state

    if resume is False or resume is None or str(resume).lower() in ("false", "no", ""):
        return None
    if resume is True or str(resume).lower() in ("true", "latest"):
        found = []
        for f in Path(outputs_root).rglob("metrics.json"):
            state = f.parent / STATE
            if f.parent.resolve() == run_dir.resolve() or latest_state(state) is None:
                continue
            try:
                m = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if run_status(m) != "completed":
                found.append((m.get("started") or "", state))
        if not found:
            raise ConfigError(f"recovery.resume=true: no unfinished run with a recovery state under {outputs_root} "
                              "(give the run dir: recovery.resume=<run dir>)")
        return max(found)[1]
    path = Path(str(resume)).expanduser()
    for cand in (path / STATE, path):
        if cand.is_dir() and (latest_state(cand) is not None or (cand / "meta.json").is_file()):
            return cand
    raise ConfigError(f"recovery.resume={resume}: no recovery state there (expected <run dir>/{STATE}/latest.json)")


def _copy_state(step_dir: Path, state_dir: Path) -> Path:
    """Copy a saved state (``step-<n>/``) into this run's state dir (the earlier run is never modified)."""
    from core.io import atomic_write_json

    state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(step_dir, state_dir / step_dir.name)
    atomic_write_json(state_dir / "latest.json", {"step": int(step_dir.name.split("-")[-1]), "dir": step_dir.name})
    return state_dir


def _plots(run_dir: Path, result: Any, refs: dict[str, Optional[float]]) -> list[Path]:
    """``recovery/loss.png`` (training loss per step) and ``recovery/heldout_ppl.png`` (held-out perplexity against
    training minutes, with the dense and pre-recovery levels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result.history
    out = []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(range(1, len(h.losses) + 1), h.losses, lw=1, label="step loss")
    if len(h.losses) >= 10:
        k = max(5, len(h.losses) // 20)
        smooth = [sum(h.losses[max(0, i - k + 1):i + 1]) / len(h.losses[max(0, i - k + 1):i + 1])
                  for i in range(len(h.losses))]
        ax.plot(range(1, len(h.losses) + 1), smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (next-token cross-entropy)")
    out.append(_save_plot(fig, ax, run_dir / "recovery" / "loss.png"))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs = [e["train_s"] / 60 for e in h.evals if e.get("ppl") is not None]
    ax.plot(xs, [e["ppl"] for e in h.evals if e.get("ppl") is not None], marker="o", label="held-out perplexity")
    for label, value, style in (("before recovery", refs.get("before"), ":"), ("dense base", refs.get("dense"), "--")):
        if value is not None:
            ax.axhline(value, linestyle=style, color="gray", label=f"{label} {value:.2f}")
    ax.set_xlabel("training minutes (evaluations excluded)")
    ax.set_ylabel("perplexity")
    ax.set_title("held-out text of the training domain")
    out.append(_save_plot(fig, ax, run_dir / "recovery" / "heldout_ppl.png"))
    return out


def _save_plot(fig: Any, ax: Any, path: Path) -> Path:
    """The recovery plots' common finish: grid, legend, tight layout, PNG at 120 dpi, figure closed."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def damage_closed(before: Optional[float], after: Optional[float], dense: Optional[float]) -> Optional[float]:
    """(before - after) / (before - dense): the share of the compression's perplexity damage recovery removed."""
    if None in (before, after, dense) or before - dense <= 0:
        return None
    return (before - after) / (before - dense)


def recover(model: Any, tok: Any, prep: Prepared, ctx: Any, *, run_dir: Path, identity: dict,
            dense_heldout: Optional[float] = None, base_description: str = "") -> tuple[Any, dict]:
    """Attach adapters, train (resuming when asked), save them unmerged, merge. Returns the merged model and the
    summary recorded in the run record and in ``checkpoint_info.json``."""
    from core.llama import count_params
    from recovery.lora import attach, merge, resolve_targets, save_adapter, trainable_parameters
    from recovery.train import train

    spec = prep.spec
    t0 = time.perf_counter()
    targets = resolve_targets(model, spec)  # a name matching nothing or a rank too large: one line, model untouched
    state_dir = run_dir / STATE
    source = prep.resume_source
    resume_from = _copy_state(source, state_dir) if source is not None else None
    if source is not None:
        log.info("recovery: resuming from %s", source)
    params_before = count_params(model)
    peft_model = attach(model, spec, targets)
    trainable = sum(p.numel() for p in trainable_parameters(peft_model).values())
    ctx.log("recovery", {"method": spec.name, "config": spec.to_dict(), "data": prep.record(),
                         "targets": {"modules": len(targets), "names": sorted({t.rsplit(".", 1)[-1] for t in targets}),
                                     "trainable_params": trainable,
                                     "trainable_pct": 100.0 * trainable / max(1, params_before)},
                         "total_steps": prep.total_steps, "resume_source": str(source) if source else None})

    def on_step(h: Any) -> None:
        ctx.log_series("recovery/train", {"step": h.step, "loss": h.losses[-1], "tokens": h.tokens,
                                          "train_s": h.train_s})

    def on_eval(e: dict) -> None:
        ctx.log_series("recovery/heldout", {"step": e["step"], "ppl": e["ppl"], "train_s": e["train_s"]})
        ctx.log("recovery", {"progress": e})

    fingerprint = {**identity, "data_rows": prep.record()["train"], "vocab": len(tok)}
    result = train(peft_model, prep.rows, prep.heldout, spec, total_steps=prep.total_steps, pad_id=_pad_id(tok),
                   state_dir=state_dir, resume_from=resume_from, fingerprint=fingerprint, on_step=on_step,
                   on_eval=on_eval)
    (run_dir / "recovery").mkdir(parents=True, exist_ok=True)
    adapter_dir = None
    if spec.save_adapter:
        adapter_dir = save_adapter(peft_model, run_dir / "adapter", readme=(
            f"LoRA adapters (peft) of prunelab's recovery stage: rank {spec.rank}, alpha {spec.alpha}, "
            f"{len(targets)} modules, {result.steps} steps on {prep.corpus.name}.\n"
            f"They apply to {base_description or 'the model before recovery'}; ../model holds the merged model.\n\n"
            "    from peft import PeftModel\n    model = PeftModel.from_pretrained(<the model before recovery>, "
            "'<this dir>')\n"))
    merged = merge(peft_model)
    del peft_model
    gc.collect()
    train_info = result.to_dict()
    summary = {"method": spec.name, "rank": spec.rank, "alpha": spec.alpha, "target_modules": len(targets),
               "trainable_params": trainable, "data": {k: v for k, v in prep.record().items() if k != "spec"},
               **train_info, "heldout_ppl_dense": dense_heldout,
               "heldout_damage_closed": damage_closed(train_info["heldout_ppl_before"],
                                                      train_info["heldout_ppl_after"], dense_heldout),
               "adapter": str(adapter_dir) if adapter_dir else None, "seconds": time.perf_counter() - t0}
    refs = {"before": train_info["heldout_ppl_before"], "dense": dense_heldout}
    for p in _plots(run_dir, result, refs):
        ctx.log_image(f"recovery/{p.stem}", p)
    curve = [{**e, "damage_closed": damage_closed(train_info["heldout_ppl_before"], e["ppl"], dense_heldout)}
             for e in result.history.evals]
    ctx.log("recovery", {**summary, "series": {"loss": result.history.losses, "heldout": curve},
                         "plots": ["recovery/loss.png", "recovery/heldout_ppl.png"]})
    log.info("recovery: %d steps, %d tokens in %.0f s (%.0f tokens/s); held-out perplexity %.3f -> %.3f%s",
             result.steps, result.history.tokens, result.history.train_s, result.tokens_per_s or 0,
             train_info["heldout_ppl_before"] or float("nan"), train_info["heldout_ppl_after"] or float("nan"),
             f" (dense {dense_heldout:.3f}: {100 * summary['heldout_damage_closed']:.0f}% of the damage closed)"
             if summary["heldout_damage_closed"] is not None else "")
    return merged, summary


def checkpoint_entry(summary: dict, eval_before: dict, eval_after: dict, eval_base: Optional[dict]) -> dict:
    """What ``checkpoint_info.json``'s ``recovery`` says: data, tokens, steps, final loss, before/after figures."""
    ppl = lambda r: ((r or {}).get("ppl") or {}).get("value")  # noqa: E731
    keep = ("method", "rank", "alpha", "target_modules", "trainable_params", "data", "steps", "tokens", "final_loss",
            "heldout_ppl_before", "heldout_ppl_after", "heldout_ppl_dense", "heldout_damage_closed", "train_s",
            "stopped_early", "best_step")
    return {**{k: summary.get(k) for k in keep},
            "eval_ppl": {"before": ppl(eval_before), "after": ppl(eval_after), "base": ppl(eval_base),
                         "damage_closed": damage_closed(ppl(eval_before), ppl(eval_after), ppl(eval_base))},
            "zeroshot_avg": {"before": eval_before.get("task_average"), "after": eval_after.get("task_average")}}


# --------------------------------------------------------------------------- task=finetune


def _check_base(ref: Any, cache_dir: str) -> Optional[dict]:
    """config.json of the model to fine-tune; a ConfigError unless it is a prunelab checkpoint or a HF model dir."""
    from core.errors import ConfigError
    from core.models import model_config

    if ref.kind == "hf":
        path = Path(ref.path or "")
        if not path.exists():
            from core.errors import LoadError

            raise LoadError(f"model.path {path} does not exist")
        if not (path.is_dir() and (path / "config.json").is_file()):
            raise ConfigError(f"model={path}: recovery fine-tunes a prunelab checkpoint or a HF model dir (config.json "
                              "+ safetensors), not a legacy or foreign file: convert it first (task=convert, or "
                              "task=prune ... to write a checkpoint)")
    return model_config(ref, cache_dir)


def _eval_source(info: dict, cfg: DictConfig, cache_dir: str) -> Any:
    """The perplexity text, split off the checkpoint's calibration text when both are the same (as task=evaluate)."""
    from core.data import TextSpec, calibration_and_eval_sources, load_documents

    ppl = cfg.eval.ppl
    spec = TextSpec(ppl.source, ppl.path, ppl.text_field)
    calib = (info.get("config") or {}).get("data")
    if calib:
        return calibration_and_eval_sources(text_spec(calib), spec, cache_dir, calibration=False)[1]
    return load_documents(spec, cache_dir)


def evaluation_texts(cfg: DictConfig, eval_src: Any, cache_dir: str) -> list:
    """The texts training must not contain: the perplexity text and BoolQ's passages when BoolQ is a task."""
    from core.data import TextSpec, load_documents

    texts = [eval_src]
    if any(str(t).split(":")[0] == "boolq" for t in cfg.eval.tasks):
        texts.append(load_documents(TextSpec("boolq"), cache_dir))
    return texts


def run(cfg: DictConfig, ctx: Any) -> dict:
    from analysis.evaluate import evaluate_model
    from core.checkpoint import check_free_space, save_checkpoint
    from core.data import eval_tokens
    from core.llama import count_nonzero, count_params, flops_per_token, params_from_config
    from core.models import ModelRef, load_model, torch_dtype

    t_start = time.perf_counter()
    spec = spec_of(cfg)
    ref = model_ref(cfg.model)
    cache_dir, run_dir = cfg.paths.cache_dir, Path(cfg.paths.output_dir)
    eval_cfg = plain(cfg.eval)

    # 1. Without weights: the model is a checkpoint, disk space, the evaluation text.
    config = _check_base(ref, cache_dir)
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
