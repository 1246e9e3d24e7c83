"""task=search: for each k in ``search.k``, which k of the base's layers to take from the donor.

    python run.py task=search replacement.base=outputs/.../model replacement.donor=smollm2 \\
        search.k=[1,2,3,4] search.strategies=[evolve,random] search.budget=64
    python run.py task=search ... search.resume=latest      # continue a killed search to the same answer

The fitness (``search.fitness``; lower is better) is measured on calibration tokens from ``data`` (disjoint from
the evaluation text): ``kl`` = KL(donor || hybrid) per token (default: the donor's log-probabilities are
computed once), ``ppl``, or ``lm_eval`` = 1 - accuracy on ``search.task``. The engine (core/search.py)
caches every (candidate, fidelity) and saves its state in ``search/state/`` after every generation.
Outputs: ``search/results.json``, ``search/convergence_k<k>.png``, ``search/best_k<k>/`` with ``save_best``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from analysis.lm_eval_tasks import run_lm_eval
from core.data.text import calibration_and_eval_sources, calibration_batch, eval_tokens, mix_record
from core.models.ref import model_config
from core.run.errors import ConfigError, UserError
from core.run.io import atomic_write_json, atomic_write_text
from core.run.record import run_status
from core.run.wandb_view import WandbView
from core.search import Subsets, search
from replacement.spec import hybrid_readme
from recipes._common import (build, donor_dir, plain, replacement_models, text_spec, tokenizer_or_donors,
                             write_card)
from recipes._plan import plan_search

log = logging.getLogger(__name__)

METRICS = {"fitness": "minimize"}  # the best fitness found at the largest k
WANDB_VIEW = WandbView(method="search")  # W&B method of every search run
plan = plan_search  # dry_run=true prints it; a run checks it before loading (recipes/_plan.py)


def validate(cfg: DictConfig) -> list[str]:
    errors = []
    for group in ("replacement", "search"):
        try:
            build(getattr(cfg, group), group)
        except UserError as e:
            errors.append(str(e))
    return errors


def _resume_dir(resume: str, outputs_root: str, here: Path) -> Path:
    """The killed search to continue: ``latest`` = the newest unfinished search run under outputs_root."""
    if resume != "latest":
        path = Path(resume).expanduser()
        if not (path / "search" / "state").is_dir():
            raise ConfigError(f"search.resume={resume}: no search state there (search/state/ is missing)")
        return path
    found = []
    for f in Path(outputs_root).rglob("metrics.json"):
        if f.parent.resolve() == here.resolve() or not (f.parent / "search" / "state").is_dir():
            continue
        try:
            m = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if m.get("task") == "search" and run_status(m) != "completed":
            found.append((m.get("started") or "", f.parent))
    if not found:
        raise ConfigError(f"search.resume=latest: no unfinished search run under {outputs_root}")
    return max(found)[1]


def _check_states(source: Path, expected: dict) -> None:
    """The states of ``source`` against the settings known before any weight loads (the search checks every key
    again when it reads a state): another configuration is one ConfigError line, and nothing is copied."""
    for f in sorted((source / "search" / "state").glob("*.json")):
        try:
            saved = json.loads(f.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"search.resume: {f} is not a readable search state ({type(e).__name__}: {e})") from None
        now = json.loads(json.dumps(expected, default=str))
        differ = [k for k in now if isinstance(saved, dict) and saved.get(k, "<absent>") != now[k]]
        if differ:
            raise ConfigError(f"search.resume: {f} is the state of another search configuration ("
                              + "; ".join(f"{k}: {saved.get(k, '<absent>')!r} in the state, {now[k]!r} now"
                                          for k in differ[:4])
                              + "): resume with the same settings, or start afresh without search.resume")


def run(cfg: DictConfig, ctx: Any) -> dict:
    # local: torch + transformers; validation imports this module (analysis.plots: matplotlib)
    from analysis.perplexity import perplexity
    from analysis.plots import convergence
    from core.models.checkpoint import save_checkpoint
    from core.models.load import load_model
    from replacement.fitness import HybridFitness, donor_logprobs
    from replacement.hybrid import DonorLayers, adopt_attention, check_compatible, swapped

    rspec, sspec = build(cfg.replacement, "replacement"), build(cfg.search, "search")
    base_ref, donor_ref = replacement_models(rspec)
    cache_dir, run_dir = cfg.paths.cache_dir, Path(cfg.paths.output_dir)
    out_dir = run_dir / "search"

    # 1. Without weights: both configs, k against the depth, the state to resume.
    donor = DonorLayers.open(donor_dir(donor_ref, cache_dir), device=rspec.donor_device or base_ref.device)
    check_compatible(model_config(base_ref, cache_dir) or {}, donor.config, rspec.base, rspec.donor)
    n = donor.depth
    too_big = [k for k in sspec.k if k > n]
    if too_big:
        raise ConfigError(f"search.k={list(sspec.k)}: {too_big} larger than the model's {n} layers")
    outside = [c for c in sspec.initial if max(c) >= n]
    unused = [c for c in sspec.initial if len(c) not in sspec.k]
    if outside or unused:
        raise ConfigError(f"search.initial: {outside or unused} " + (f"name layers past the model's {n}" if outside
                          else f"match no k in search.k={list(sspec.k)}"))
    (out_dir / "state").mkdir(parents=True, exist_ok=True)
    fingerprint = {"base": rspec.base, "donor": rspec.donor, "fitness": sspec.fitness, "tokens": sspec.tokens,
                   "task": sspec.task, "limit": sspec.limit, "data": plain(cfg.data)}
    if sspec.resume:
        source = _resume_dir(sspec.resume, cfg.paths.outputs_root, run_dir)
        _check_states(source, {**fingerprint, "seed": sspec.seed, "budget": sspec.budget})  # before any weight
        for f in sorted((source / "search" / "state").glob("*.json")):
            shutil.copy2(f, out_dir / "state" / f.name)  # the earlier run is never modified
        log.info("resuming the search of %s", source)
        ctx.log("search", {"resumed_from": str(source)})

    # 2. Base model, calibration tokens, the donor's targets.
    model, tok = load_model(base_ref, cache_dir=cache_dir, allow_pickle=cfg.allow_pickle)
    tok = tokenizer_or_donors(tok, donor.path)
    adopt_attention(model, donor)  # a Llamba base takes the donor Llama's heads and RoPE
    donor.dtype = next(model.parameters()).dtype  # the donor's layers join the base in the base's dtype
    base_ref = dataclasses.replace(base_ref, dtype=str(donor.dtype).removeprefix("torch."))  # as used, for the record
    calib_src, _ = calibration_and_eval_sources(text_spec(cfg.data), text_spec(cfg.eval.ppl), cache_dir,
                                                evaluation=False)
    rows = math.ceil(sspec.tokens / cfg.data.seq_len)
    tokens = calibration_batch(tok, calib_src, rows, cfg.data.seq_len, cfg.data.seed)
    ctx.log("data", {"calibration": {"source": calib_src.name, "description": calib_src.description,
                                     "rows": rows, "seq_len": cfg.data.seq_len, "seed": cfg.data.seed,
                                     **mix_record(calib_src, rows, cfg.data.seed)}})
    targets = None
    t0 = time.perf_counter()
    if sspec.fitness == "kl":
        donor_model, _ = load_model(donor_ref, cache_dir=cache_dir)
        targets = donor_logprobs(donor_model, tokens)
        del donor_model
    if sspec.fitness == "lm_eval":
        fitness = _lm_eval_fitness(model, tok, donor, sspec)
    else:
        fitness = HybridFitness(model, donor, tokens, metric=sspec.fitness, targets=targets,
                                prefix_cache=sspec.prefix_cache)
    t_setup = time.perf_counter() - t0
    full = sspec.tokens
    reference = {"base": fitness((), full), "donor": fitness(tuple(range(n)), full)}
    log.info("fitness (%s) of the base %.4f, of the donor %.4f", sspec.fitness, reference["base"], reference["donor"])

    # 3. The search, per k and strategy (each resumable from its own state file).
    results: dict[str, Any] = {"fitness": sspec.fitness, "direction": "minimize", "reference": reference,
                               "setup_s": t_setup, "layers": n, "k": {}}
    best_overall: dict[int, tuple[float, tuple[int, ...]]] = {}
    for k in sspec.k:
        curves = {}
        for strategy in sspec.strategies:
            levels = sspec.levels() if strategy == "evolve" else [full]
            res = search(Subsets(n, k), fitness, strategy=strategy, budget=sspec.budget, seed=sspec.seed,
                         population=sspec.population, offspring=sspec.offspring, tournament=sspec.tournament,
                         mutation=sspec.mutation, initial=sspec.initial_for(k) if strategy in ("ga", "evolve") else (),
                         fidelities=levels, state_path=out_dir / "state" / f"k{k}_{strategy}.json",
                         fingerprint=fingerprint,
                         on_eval=lambda e, tag=f"search/k{k}/{strategy}": ctx.log_series(
                             tag, {"cost": e.cost, "fitness": e.fitness, "best": e.best}))
            entry = res.to_json()
            damage = reference["base"] - reference["donor"]
            entry["recovered"] = (reference["base"] - res.best_fitness) / damage if damage else None
            results["k"].setdefault(str(k), {})[strategy] = entry
            curves[strategy] = [(h["cost"], h["best"]) for h in entry["history"] if h.get("best") is not None]
            log.info("k=%d %-10s best %s fitness %.4f (%.0f%% of the damage recovered), %s evaluations, %s cache hits",
                     k, strategy, list(res.best), res.best_fitness, 100 * (entry["recovered"] or 0),
                     entry["evaluations"], entry["cache_hits"])
            if k not in best_overall or res.best_fitness < best_overall[k][0]:
                best_overall[k] = (res.best_fitness, tuple(res.best))
        plot = convergence(curves, out_dir / f"convergence_k{k}.png", title=f"k = {k} of {n} layers ({sspec.fitness})",
                           xlabel="fitness evaluations (full-fidelity equivalents)")
        ctx.log_image(f"search/convergence_k{k}", plot)
    results["best"] = {str(k): {"layers": list(c), "fitness": f, **_score(sspec, f)}
                       for k, (f, c) in best_overall.items()}
    if sspec.fitness == "lm_eval":  # the reference's accuracies as the user reads them, beside the minimised fitness
        results["reference_accuracy"] = {name: 1.0 - v for name, v in reference.items()}

    # 4. Held-out perplexity of the base, each k's best hybrid and the donor: how much damage each k recovers.
    if cfg.eval.ppl.enabled:
        _, src = calibration_and_eval_sources(text_spec(cfg.data), text_spec(cfg.eval.ppl), cache_dir,
                                              calibration=False)  # never overlaps the calibration text
        held_out = eval_tokens(tok, src, cfg.eval.ppl.max_tokens)
        sets = {"base": (), **{f"k{k}": c for k, (_, c) in best_overall.items()}, "donor": tuple(range(n))}
        ppl = {}
        for label, layers in sets.items():
            with swapped(model, {i: donor[i] for i in layers}):
                ppl[label] = perplexity(model, held_out, cfg.eval.ppl.seq_len, cfg.eval.ppl.batch_size,
                                        progress=False, source=src.name)["value"]
        damage = ppl["base"] - ppl["donor"]
        results["eval_ppl"] = {"source": src.name, "seq_len": cfg.eval.ppl.seq_len, "tokens": int(held_out.shape[1]),
                               "ppl": ppl, "recovered": {k: (ppl["base"] - v) / damage if damage else None
                                                         for k, v in ppl.items() if k.startswith("k")}}
        log.info("held-out perplexity (%s): %s", src.name, ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
        ctx.log("eval", {"ppl": results["eval_ppl"]})
    atomic_write_json(out_dir / "results.json", results)
    ctx.log("search", {"best": results["best"], "reference": reference, "results": str(out_dir / "results.json")})

    # 5. Each k's best hybrid as a checkpoint.
    if sspec.save_best:
        for k, (f, layers) in best_overall.items():
            sources = ["donor" if i in layers else "base" for i in range(n)]
            with swapped(model, {i: donor[i] for i in layers}):
                model.config.layer_sources = sources
                description = f"best {k}-layer set of task=search ({', '.join(sspec.strategies)})"
                scored = _score(sspec, f)
                info = {"method": "replace", "replaced_layers": list(layers),
                        "score": {"metric": scored.get("task", sspec.fitness), "value": scored.get("accuracy", f),
                                  "source": "this run"},
                        "fitness": {"metric": sspec.fitness, "value": f, "direction": "minimize"},
                        "description": description, "base": rspec.base, "donor": rspec.donor,
                        "base_model": base_ref.to_dict(), "donor_model": donor_ref.to_dict(), "config": plain(cfg)}
                if scored.get("task", "").startswith("mmlu"):
                    info["mmlu_score"] = scored["accuracy"]  # the seed's field name
                out = save_checkpoint(model, tok, out_dir / f"best_k{k}", info)
            model.config.layer_sources = None
            atomic_write_text(out / "README.txt", hybrid_readme(rspec.base, rspec.donor, list(layers), out.resolve(),
                                                                description, task="task=search"))
            write_card(out, ctx, settings=("replacement", "search"), label=f"k{k}")
            log.info("k=%d best hybrid saved: %s", k, out)
    return {"fitness": best_overall[max(best_overall)][0]}


def _score(sspec: Any, fitness: float) -> dict:
    """A fitness as the user reads it: under ``fitness=lm_eval`` the accuracy on the task (fitness = 1 - accuracy)
    and the task's name (``mmlu`` for ``mmlu:5``); nothing for kl / ppl, whose fitness is the score itself."""
    if sspec.fitness != "lm_eval":
        return {}
    return {"accuracy": 1.0 - fitness, "task": str(sspec.task).partition(":")[0]}


def _lm_eval_fitness(model: Any, tok: Any, donor: Any, sspec: Any):
    """1 - accuracy of the hybrid on ``search.task`` (one fidelity: the task with ``search.limit`` examples)."""
    from replacement.hybrid import swapped  # local: torch; validation imports this module

    def fitness(candidate: tuple[int, ...], fidelity: Optional[int] = None) -> float:
        with swapped(model, {i: donor[i] for i in candidate}):
            out = run_lm_eval(model, tok, [sspec.task], limit=sspec.limit, progress=False)
        acc = out.get("task_average")
        if acc is None:
            acc = (out.get("mmlu") or {}).get("average")
        if acc is None:
            task = (out.get("tasks") or {}).get(str(sspec.task).partition(":")[0]) or {}  # "<task>:<shots>"
            acc = task.get("acc")
        return 1.0 - float(acc)
    return fitness
