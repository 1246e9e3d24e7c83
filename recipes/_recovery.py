"""The recovery stage shared by task=finetune and task=prune recovery=lora: read and split the training text
before the model changes (:func:`prepare`), train LoRA adapters on the compressed model, save them, merge them and
write the curves (:func:`recover`), and the ``recovery`` entry of ``checkpoint_info.json``
(:func:`checkpoint_entry`). The code that trains lives in recovery/; this module reads the config for it.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from core.data.text import TextSpec, load_documents
from core.models.llama import count_params
from core.run.errors import ConfigError, UserError
from core.run.io import atomic_write_json
from core.run.record import run_status
from recipes._common import build
from recovery.data import (check_disjoint, describe_rows, heldout_rows, load_corpus, rows_per_epoch, steps_for,
                           training_rows)
from recovery.lora import attach, merge, resolve_targets, save_adapter, trainable_parameters

log = logging.getLogger(__name__)

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
    try:
        spec_of(cfg)
    except UserError as e:
        return [str(e)]
    return []


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
        return {"source": self.corpus.name, "description": self.corpus.description, "kind": self.corpus.kind,
                "spec": self.spec.data.to_dict(), "seq_len": self.spec.seq_len, "packing": self.spec.packing,
                "train": describe_rows(self.rows), "heldout": {"windows": len(self.heldout.ids),
                                                               "tokens": self.heldout.tokens}}


def prepare(spec: Any, model: Any, tok: Any, *, cache_dir: str, evaluation: list, run_dir: Optional[Path] = None,
            outputs_root: str = "outputs") -> Prepared:
    """Check the targets against ``model``, read and split the training text, refuse overlap with the
    ``evaluation`` texts (TextSources), build the rows, find the state to resume (``recovery.resume``) and check it
    against the options: every bad input fails here, before any evaluation runs."""
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
        from recovery.train import check_state  # local: torch; validation imports this module

        source = check_state(source, spec, total)
    return Prepared(spec, corpus, rows, held, total, source)


def check_targets(model: Any, prep: Prepared) -> None:
    """The recovery targets and rank against ``model`` as it is now (after pruning, widths may be below the rank)."""
    resolve_targets(model, prep.spec)


def heldout_ppl(model: Any, prep: Prepared, tok: Any) -> float:
    """The held-out perplexity of any model on the stage's validation windows (the dense base, for the damage)."""
    from recovery.train import heldout_ppl as ppl  # local: torch; validation imports this module

    return ppl(model, prep.heldout, prep.spec.micro_batch, _pad_id(tok))


def _pad_id(tok: Any) -> int:
    for t in (tok.pad_token_id, tok.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def _resume_source(resume: Any, outputs_root: str, run_dir: Path) -> Optional[Path]:
    """The state dir to continue from: ``true`` = the newest unfinished run under ``outputs_root`` with a recovery
    state; a path = that run dir (its recovery/state) or that state dir."""
    from recovery.train import latest_state  # local: torch; validation imports this module

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
    state_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(step_dir, state_dir / step_dir.name)
    atomic_write_json(state_dir / "latest.json", {"step": int(step_dir.name.split("-")[-1]), "dir": step_dir.name})
    return state_dir


def _plots(run_dir: Path, result: Any, refs: dict[str, Optional[float]]) -> list[Path]:
    """``recovery/loss.png`` (training loss per step) and ``recovery/heldout_ppl.png`` (held-out perplexity against
    training minutes, with the dense and pre-recovery levels)."""
    import matplotlib  # local: heavy, needed only once training is done; validation imports this module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

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
    import matplotlib.pyplot as plt  # local: as in _plots

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
    # local: torch, and validation imports this module; looked up here, so tests can monkeypatch recovery.train.train
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


def evaluation_texts(cfg: DictConfig, eval_src: Any, cache_dir: str) -> list:
    """The texts training must not contain: the perplexity text and BoolQ's passages when BoolQ is a task."""
    texts = [eval_src]
    if any(str(t).split(":")[0] == "boolq" for t in cfg.eval.tasks):
        texts.append(load_documents(TextSpec("boolq"), cache_dir))
    return texts
