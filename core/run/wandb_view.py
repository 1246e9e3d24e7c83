"""How a run record looks in W&B (``logger=wandb``): pure functions, tested without W&B; ``RunContext`` uses them.

The W&B run (``logger=wandb``; one per run dir, files in ``<run dir>/wandb``):

- ``group``: ``logger.group``, else in a multirun the sweep's (:func:`sweep_group`), else none;
  ``job_type``: the task; ``name``: ``run_name`` or the run dir's name.
- ``config``: the resolved config flattened with ``/`` (:func:`flatten_config`: ``pruner/name``, ``ratio``,
  ``layers/attention/start``) plus two derived keys, ``method`` and ``layer_range`` (``"attn 3-27 / mlp
  3-27"``, ends exclusive as in the results table), set again from the record when the run ends. ``/``, not
  ``.``: W&B advises against dots in config keys and its API filters fail on them (wandb/wandb#3087).
  Where a task's ``method`` and ``layer_range`` come from when the record does not say is declared by its
  recipe (``WANDB_VIEW``, a :class:`WandbView`): this module names no task.
- summary: every scalar of ``ctx.log`` under ``<section>/<key>``, and when the run ends the standard names
  below (:func:`standard_summary`), the same for every recipe, so one panel compares every method.
- tables: ``ctx.log_table`` (``analysis/layers``, ``analysis/layer_totals``, ``eval/results``, ...); a table
  with one row per ``layer_idx`` is also logged as per-layer series ``<table>/<column>`` against
  ``<table>/layer_idx`` (:func:`per_layer_key`), the x axis of a per-layer line plot. When the run ends an
  ``eval/results`` table is built from the record if the recipe logged none (prune with ``eval=zeroshot``).
- ``logger.log_model=true``: the saved checkpoint (``checkpoint.path`` of the record, else ``<run dir>/model``)
  as an artifact of type ``model`` named ``model-<run id>``: a ``file://`` reference (paths and checksums;
  the files stay in the run dir and are not uploaded), logged only when the run completed.

Standard summary names (absent when the run did not measure them):

    name                      value
    ppl/pruned                perplexity of the run's model: prune: after pruning; evaluate / replace: the
                              model evaluated; search: the best hybrid of the largest k
    ppl/base                  perplexity of the base model, same protocol
    ppl/ratio                 ppl/pruned / ppl/base
    ppl/recovered             recovery=lora / task=finetune: perplexity after recovery (ppl/pruned: before it);
                              zeroshot/recovered_avg, mmlu/recovered_avg likewise
    params/base               parameters of the base model
    params/pruned             parameters of the run's model
    params/kept_frac          params/pruned / params/base (an uncompressed model evaluated alone: 1.0)
    params/nonzero_frac       non-zero parameters kept / the base's non-zero parameters (zeros in dense shapes)
    flops/kept_frac           dense-kernel FLOPs per token kept
    zeroshot/avg              mean headline accuracy over the zero-shot tasks (lm-eval), fraction in [0, 1]
    zeroshot/base_avg         the same for the base model
    zeroshot/<task>           one task's headline accuracy (acc_norm for hellaswag, arc_challenge, openbookqa)
    mmlu/avg                  MMLU accuracy (lm-eval's group average);  mmlu/base_avg for the base model
    time/prune_s              seconds spent pruning;  time/eval_s, time/recipe_s likewise
    speed/prefill_tok_s       prefill throughput (eval.efficiency);  speed/decode_tok_s, speed/decode_ms_per_tok;
                              speed/base_<same> for the base model
    search/best_fitness       task=search: the best fitness of the largest k (lower is better);
                              search/best_fitness_k<k> for each k
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

CONFIG_SEP = "/"  # flattened W&B config keys: pruner/name, layers/attention/start
GROUP_MAX_CHARS = 128  # W&B's limit on a run group's name

# The standard W&B summary names (module docstring); patterns: zeroshot/<task>, search/best_fitness_k<k>.
SUMMARY_NAMES: tuple[str, ...] = (
    "ppl/pruned", "ppl/base", "ppl/ratio", "ppl/recovered", "zeroshot/recovered_avg", "mmlu/recovered_avg",
    "params/base", "params/pruned", "params/kept_frac", "params/nonzero_frac", "flops/kept_frac",
    "zeroshot/avg", "zeroshot/base_avg", "mmlu/avg", "mmlu/base_avg",
    "time/prune_s", "time/eval_s", "time/recipe_s",
    "speed/prefill_tok_s", "speed/decode_tok_s", "speed/decode_ms_per_tok",
    "speed/base_prefill_tok_s", "speed/base_decode_tok_s", "speed/base_decode_ms_per_tok",
    "search/best_fitness",
)
EVAL_TABLE = "eval/results"  # the per-task eval table (recipes/evaluate.py logs it; finish() builds it otherwise)
EVAL_COLUMNS = ["model", "task", "acc", "acc_norm", "headline", "n", "num_fewshot", "split", "status"]
_SPEED = {"prefill_tokens_per_s": "prefill_tok_s", "decode_tokens_per_s": "decode_tok_s",
          "decode_latency_ms": "decode_ms_per_tok"}


# --- W&B: names, config, group (pure functions, tested without W&B) -------------------------------------------

def get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, or None where a level is missing or not a mapping (records are nested JSON)."""
    for k in keys:
        if not isinstance(d, Mapping):
            return None
        d = d.get(k)
    return d


def finite_number(v: Any) -> Optional[float]:
    """A finite real number (bools and NaN/inf are not), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return v if math.isfinite(v) else None


def flatten_config(config: Mapping[str, Any], sep: str = CONFIG_SEP) -> dict[str, Any]:
    """``{"pruner": {"name": "taylor"}}`` -> ``{"pruner/name": "taylor"}``; lists and scalars are kept as values,
    an empty dict stays an empty dict (its key is still there to filter on)."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping) and v:
                walk(v, key + sep)
            else:
                out[key] = dict(v) if isinstance(v, Mapping) else v
    walk(config, "")
    return out


def _span(r: Any) -> Optional[str]:
    if isinstance(r, (list, tuple)) and len(r) == 2:
        return f"{r[0]}-{r[1]}"
    if isinstance(r, Mapping) and ("start" in r or "end" in r):  # a config range: ends may still be negative
        start, end = r.get("start"), r.get("end")
        return f"{0 if start is None else start}-{'end' if end is None else end}"
    return None


def layer_range_label(attention: Any, mlp: Any) -> Optional[str]:
    """``"attn 3-27 / mlp 3-27"`` from two ranges, each ``[start, end)`` or a config ``{start, end}``."""
    parts = [f"{name} {s}" for name, s in (("attn", _span(attention)), ("mlp", _span(mlp))) if s]
    return " / ".join(parts) or None


@dataclass(frozen=True)
class WandbView:
    """Where one task's W&B ``method`` and ``layer_range`` come from when its record does not say (the record
    wins: a pruner's own name, ranges resolved against the model depth, a checkpoint's ``checkpoint_info``).
    Each recipe declares its own as ``WANDB_VIEW``; a task that declares none gets the record's values only.

    method_key       dotted config key naming the method (``"pruner.name"``)
    method           the method's name when no key gives one (``"replace"``)
    uncompressed     the method of a completed run that names none and compared no base model: the model was
                     evaluated as it is (``"base"``); the standard summary then counts it as its own base
    layers_key       dotted config key of the ``{attention, mlp}`` layer ranges (``"layers"``)
    """

    method_key: Optional[str] = None
    method: Optional[str] = None
    uncompressed: Optional[str] = None
    layers_key: Optional[str] = None


NO_VIEW = WandbView()


def derived_config(config: Mapping[str, Any], record: Optional[Mapping[str, Any]] = None,
                   view: WandbView = NO_VIEW) -> dict[str, Any]:
    """``method`` and ``layer_range`` for grouping runs: from the record when it knows them (the pruner's own
    name, ranges resolved against the model depth, a checkpoint's ``checkpoint_info``), else where the task's
    ``view`` says."""
    record = record or {}
    method = record.get("method")
    if method is None and view.method_key:
        method = get(config, *view.method_key.split("."))
    if method is None and view.method:
        method = view.method
    if method is None and view.uncompressed and record.get("status") == "completed":
        method = view.uncompressed  # an evaluated model without checkpoint_info: an uncompressed model
    rng = None
    if isinstance(get(record, "pruning", "attention_layers"), list):
        rng = layer_range_label(get(record, "pruning", "attention_layers"), get(record, "pruning", "mlp_layers"))
    elif isinstance(get(record, "checkpoint_info", "layer_ranges"), Mapping):
        ranges = record["checkpoint_info"]["layer_ranges"]
        rng = layer_range_label(ranges.get("attention"), ranges.get("mlp"))
    elif get(record, "compression", "unit") == "replaced_layers":
        rng = "replaced " + ",".join(map(str, get(record, "compression", "layers") or []))
    elif view.layers_key:
        layers = get(config, *view.layers_key.split("."))
        rng = layer_range_label(get(layers, "attention"), get(layers, "mlp"))
    return {"method": method, "layer_range": rng}


def wandb_config(config: Optional[Mapping[str, Any]], view: WandbView = NO_VIEW) -> dict[str, Any]:
    """The ``config`` given to ``wandb.init``: flattened, plus ``method`` and ``layer_range``."""
    config = config or {}
    return {**flatten_config(config), **derived_config(config, view=view)}


def sweep_group(sweep_dir: str | Path, outputs_root: Optional[str | Path] = None) -> str:
    """The W&B group of every job of a sweep, from its dir relative to ``paths.outputs_root``:
    ``multirun/2026-11-24/10-00-00`` -> ``sweep-2026-11-24_10-00-00``, ``baselines/2026-11-24_10-00-00`` ->
    ``baselines-2026-11-24_10-00-00``, any other ``<first>/<rest...>`` -> ``<first>-<rest joined by _>``; a dir
    outside the outputs root -> ``sweep-<its name>``. Stable: the same sweep dir always gives the same group."""
    path = Path(sweep_dir).expanduser().resolve()
    parts: tuple[str, ...] = ()
    if outputs_root is not None:
        try:
            parts = path.relative_to(Path(outputs_root).expanduser().resolve()).parts
        except ValueError:
            parts = ()
    if not parts:
        parts = ("multirun", path.name)
    head, rest = parts[0], parts[1:]
    prefix = "sweep" if head == "multirun" else head
    return (f"{prefix}-{'_'.join(rest)}" if rest else prefix)[:GROUP_MAX_CHARS]


def per_layer_key(table: str, column: str) -> str:
    """The per-layer series of a table with one row per layer (``log_table``): ``<table>/<column>``."""
    return f"{table}/{column}"


def _eval_sides(record: Mapping[str, Any]) -> tuple[Optional[dict], Optional[dict]]:
    """(the run's model's eval result, the base model's) from the record's ``eval`` section."""
    ev = record.get("eval") or {}
    model = ev.get("pruned") if isinstance(ev.get("pruned"), dict) else ev.get("model")
    base = ev.get("base") if isinstance(ev.get("base"), dict) else None
    return (model if isinstance(model, dict) else None), base


def _zeroshot(result: Mapping[str, Any]) -> dict[str, float]:
    """Per-task headline accuracies (the metric ``task_average_over`` names, else ``acc``) of completed tasks."""
    heads = result.get("task_average_over") or {}
    out = {}
    for name, e in (result.get("tasks") or {}).items():
        if not isinstance(e, Mapping) or name.startswith("mmlu") or e.get("status", "completed") != "completed":
            continue
        value = finite_number(e.get(heads.get(name, "acc")))
        if value is not None:
            out[f"zeroshot/{name}"] = value
    return out


def standard_summary(record: Mapping[str, Any], view: WandbView = NO_VIEW) -> dict[str, float]:
    """The standard summary names (module docstring) from a run record (``metrics.json``) of a task with this
    ``view``; only what was measured, only finite numbers. Pure: the same record always gives the same names
    and values."""
    out: dict[str, Any] = {}
    model, base = _eval_sides(record)
    params = record.get("params") or {}
    info_params = get(record, "checkpoint_info", "params") or {}
    search_ppl = get(record, "eval", "ppl", "ppl")  # task=search: {"base", "k<k>", "donor"}
    best = get(record, "search", "best") or {}

    if model is not None:
        out["ppl/pruned"] = get(model, "ppl", "value")
        out["zeroshot/avg"] = model.get("task_average")
        out["mmlu/avg"] = get(model, "mmlu", "average")
        out.update(_zeroshot(model))
        for key, name in _SPEED.items():
            out[f"speed/{name}"] = get(model, "efficiency", key)
    recovered = (record.get("eval") or {}).get("recovered")
    if isinstance(recovered, Mapping):
        out["ppl/recovered"] = get(recovered, "ppl", "value")
        out["zeroshot/recovered_avg"] = recovered.get("task_average")
        out["mmlu/recovered_avg"] = get(recovered, "mmlu", "average")
    if base is not None:
        out["ppl/base"] = get(base, "ppl", "value")
        out["zeroshot/base_avg"] = base.get("task_average")
        out["mmlu/base_avg"] = get(base, "mmlu", "average")
        for key, name in _SPEED.items():
            out[f"speed/base_{name}"] = get(base, "efficiency", key)
    if isinstance(search_ppl, Mapping):
        ks = sorted((k for k in search_ppl if k.startswith("k") and k[1:].isdigit()), key=lambda k: int(k[1:]))
        out["ppl/base"] = search_ppl.get("base")
        if ks:
            out["ppl/pruned"] = search_ppl[ks[-1]]
    if isinstance(best, Mapping) and best:
        ks = sorted((k for k in best if str(k).isdigit()), key=int)
        for k in ks:
            out[f"search/best_fitness_k{k}"] = get(best, k, "fitness")
        if ks:
            out["search/best_fitness"] = get(best, ks[-1], "fitness")

    n_base = finite_number(params.get("base")) or finite_number(info_params.get("base"))
    n_model = finite_number(params.get("pruned")) or finite_number(params.get("model")) or finite_number(info_params.get("pruned"))
    uncompressed = bool(view.uncompressed) and not record.get("method") and base is None
    if uncompressed and n_model:
        n_base = n_base or n_model  # an uncompressed model evaluated alone is its own base
    out["params/base"], out["params/pruned"] = n_base, n_model
    if n_base and n_model:
        out["params/kept_frac"] = n_model / n_base
    nz, nz_base = finite_number(params.get("nonzero")), finite_number(params.get("nonzero_base"))
    if uncompressed and nz:
        nz_base = nz_base or nz
    if nz is not None and nz_base:
        out["params/nonzero_frac"] = nz / nz_base
    flops = finite_number(get(record, "flops", "kept_pct"))
    if flops is not None:
        out["flops/kept_frac"] = flops / 100.0
    ppl, ppl_base = finite_number(out.get("ppl/pruned")), finite_number(out.get("ppl/base"))
    if ppl is not None and ppl_base:
        out["ppl/ratio"] = ppl / ppl_base
    for key in ("prune_s", "eval_s", "recipe_s"):
        out[f"time/{key}"] = get(record, "timings", key)
    return {k: v for k, v in out.items() if finite_number(v) is not None}


def eval_table_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``eval/results`` rows of a record (columns ``EVAL_COLUMNS``, as recipes/evaluate.py's table): one per
    lm-eval task, MMLU and the zero-shot average, for each evaluated model (``pruned``/``model`` and ``base``)."""
    rows: list[dict[str, Any]] = []
    for label, result in (record.get("eval") or {}).items():
        if not isinstance(result, Mapping) or label == "ppl":
            continue
        heads = result.get("task_average_over") or {}
        for name, e in (result.get("tasks") or {}).items():
            if isinstance(e, Mapping):
                rows.append({"model": label, "task": name, "acc": e.get("acc"), "acc_norm": e.get("acc_norm"),
                             "headline": heads.get(name, "acc"), "n": e.get("n"),
                             "num_fewshot": e.get("num_fewshot"), "split": e.get("split"), "status": e.get("status")})
        mmlu = result.get("mmlu")
        if isinstance(mmlu, Mapping):
            rows.append({"model": label, "task": "mmlu", "acc": mmlu.get("average"), "headline": "acc",
                         "n": mmlu.get("n"), "num_fewshot": mmlu.get("num_fewshot"), "split": "test",
                         "status": mmlu.get("status")})
        if result.get("task_average") is not None:
            rows.append({"model": label, "task": "average", "acc": result["task_average"], "headline": "mixed",
                         "status": "completed"})
    return [{c: r.get(c) for c in EVAL_COLUMNS} for r in rows]


def per_layer_rows(records: Iterable[Mapping[str, Any]]) -> Optional[list[dict[str, float]]]:
    """Numeric columns of a table with one row per ``layer_idx`` (else None: not a per-layer table)."""
    rows = [dict(r) for r in records]
    idx = [r.get("layer_idx") for r in rows]
    if not rows or any(finite_number(i) is None for i in idx) or len(set(idx)) != len(idx):
        return None
    return [{k: v for k, v in r.items() if finite_number(v) is not None} for r in rows]
