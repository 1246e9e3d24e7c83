"""Collect run dirs' ``metrics.json`` into one results table (CSV, Markdown, LaTeX).

Replaces the seed's ``generate_results_table.py``. One row per evaluated model: each prune
run gives its pruned model (and its base model, deduplicated across runs); each evaluate
run gives its model. ``ratio`` and ``unit`` come from the record's ``compression`` (what was compressed
in which unit: a group ratio never sorts together with a sparsity). The base model rows come first, then the compressed models sorted by
method, ratio and layer ranges. Missing keys are empty cells, never errors.

Only ``completed`` runs give results. Every other run (``core.run.record.run_status``: failed, killed, interrupted,
``dead`` for a ``running`` record whose process is gone, or still ``running``) gets exactly one row after all
results: what it was (model, method, ratio, layers), its honest status and the first line of its error, never a
number (its model was never saved). The Markdown lists them under their own heading, the CSV with ``status``
filled, the LaTeX table (meant for a paper) leaves them out and says so in a comment. :func:`remove_orphans`
deletes the unfinished checkpoint dirs (``.<name>.partial-*``, see ``core.run.io.atomic_dir``) of runs that ended.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

import pandas as pd

from analysis.lm_eval_tasks import HEADLINE_METRIC
from core.run.io import atomic_write_text
from core.run.record import run_status, saved_checkpoint
from core.run.wandb_view import get as _get

log = logging.getLogger(__name__)

TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
               "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
INCOMPLETE_HEADING = "## Runs that did not complete"
# statuses whose process has ended without finishing: nothing will ever complete their partial dirs
ENDED_STATUSES = ("dead", "killed", "interrupted", "failed")
ORPHAN_GRACE_S = 3600.0  # another host's run: partial dirs removed only once its heartbeat is this old
PARTIAL_GLOB = ".*.partial-*"  # core.run.io.atomic_dir's temp dirs, beside their target in the run dir


def walk_once(root: str | Path) -> Iterator[tuple[str, list[str]]]:
    """(dir, file names) of every directory under ``root``, each real directory once: symlinked run dirs are
    followed (which Path.rglob does not), and a symlink loop (``a -> .``, ``up -> ..``) ends there instead of
    walking the same tree again and again. Unreadable dirs are skipped."""
    seen: set[tuple[int, int]] = set()

    def first_visit(path: str) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return False
        seen.add(key)
        return True

    if not first_visit(str(root)):
        return
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [n for n in dirs if first_visit(os.path.join(d, n))]  # os.walk descends only into these
        yield d, files


def find_metrics(paths: Iterable[str | Path]) -> list[Path]:
    """Every ``metrics.json`` under the given run dirs / folders of runs / files, sorted, deduplicated."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            found.add(p.resolve())
        elif p.is_dir():
            found.update((Path(d) / "metrics.json").resolve() for d, files in walk_once(p) if "metrics.json" in files)
        else:
            log.warning("table: %s is neither a run dir nor a metrics.json; skipped", p)
    return sorted(found)


def _range(m: dict, cfg: dict, part: str) -> Optional[str]:
    if m.get("task") == "evaluate":  # the ranges of the evaluated checkpoint, not this run's defaults
        r = _get(m, "checkpoint_info", "layer_ranges", part)
        return f"{r[0]}-{r[1]}" if isinstance(r, list) and len(r) == 2 else None
    resolved = _get(m, "pruning", f"{part}_layers")  # [start, end) after negative ends are resolved
    if isinstance(resolved, list) and len(resolved) == 2:
        return f"{resolved[0]}-{resolved[1]}"
    start, end = _get(cfg, "layers", part, "start"), _get(cfg, "layers", part, "end")
    if start is None and end is None:
        return None
    return f"{start if start is not None else 0}-{end if end is not None else 'end'}"


def _eval_columns(ev: dict) -> dict[str, Any]:
    """Flatten one evaluate_model dict: PPL with its protocol, tasks, average, MMLU, throughput."""
    row: dict[str, Any] = {}
    ppl = _get(ev, "ppl") or {}
    if ppl:
        row["ppl"] = ppl.get("value")
        row["ppl_protocol"] = f"{ppl.get('source', '?')}, seq_len {ppl.get('seq_len')}, {ppl.get('tokens')} tok"
    for name, e in (_get(ev, "tasks") or {}).items():
        if not isinstance(e, dict) or name.startswith("mmlu_"):
            continue
        metric = HEADLINE_METRIC.get(name, "acc")
        label = TASK_LABELS.get(name, name)
        row[label] = 100 * e[metric] if e.get("status", "completed") == "completed" and e.get(metric) is not None else None
    if _get(ev, "task_average") is not None:
        row["avg"] = 100 * ev["task_average"]
    mmlu = _get(ev, "mmlu") or {}
    if mmlu:
        row["MMLU"] = 100 * mmlu["average"] if mmlu.get("average") is not None else None
        row["mmlu_shots"] = mmlu.get("num_fewshot")
    eff = _get(ev, "efficiency") or {}
    for key, col in (("prefill_tokens_per_s", "prefill_tok_s"), ("decode_tokens_per_s", "decode_tok_s"),
                     ("decode_latency_ms", "decode_ms_per_tok")):
        if eff.get(key) is not None:
            row[col] = eff[key]
    lim = _get(ev, "lm_eval", "limit")
    if lim is not None:
        row["limit"] = lim
    return row


def _model_name(m: dict, cfg: dict) -> Optional[str]:
    return (_get(cfg, "model", "name") or _get(m, "model", "name")
            or (m.get("model") if isinstance(m.get("model"), str) else None))


def _ratio(m: dict, cfg: dict) -> Any:
    if _get(m, "compression", "amount") is not None:
        return _get(m, "compression", "amount")
    return _get(cfg, "ratio") if m.get("task") == "prune" else m.get("ratio")


def bytes_on_disk(path: Any) -> Optional[int]:
    """Bytes of a model on disk, counted as the analysis counts them (``analysis.size``: the weight files the loader
    reads, tokenizer, config), or None where there is no such local path."""
    if not path or not isinstance(path, (str, Path)):
        return None
    p = Path(path).expanduser()
    if not p.exists():
        return None
    from analysis.size import size_report  # local: torch (the format check), only when a model is on disk

    try:
        return int(size_report(p)["total_bytes"])
    except (OSError, ValueError):
        return None


def _model_bytes(m: dict, source: str) -> Optional[int]:
    """The compressed / evaluated model's bytes on disk: the checkpoint the run saved (``checkpoint.path`` inside the
    run dir: ``model/``, or replace / convert's named folder), the model an evaluate run read, else what the run
    recorded when it saved (``checkpoint.bytes``)."""
    saved = saved_checkpoint(Path(source), m) if m.get("task") != "evaluate" else None
    if saved is not None:
        return bytes_on_disk(saved)
    found = bytes_on_disk(_get(m, "model", "path")) if m.get("task") == "evaluate" else None
    return found if found is not None else _get(m, "checkpoint", "bytes")


def _gib(n: Optional[int]) -> Optional[float]:
    return None if n is None else n / 1024 ** 3


def rows_from_metrics(m: dict, source: str) -> list[dict]:
    """Zero, one or two rows (base, compressed) from one run's metrics dict."""
    cfg = m.get("config") or {}
    ev = m.get("eval") or {}
    params = m.get("params") or {}
    model_name = _model_name(m, cfg)
    common = {"run": source, "status": m.get("status")}
    rows = []
    if "base" in ev:
        base_params = params.get("base") or _get(ev, "base", "efficiency", "params")
        base_bytes = bytes_on_disk(_get(cfg, "model", "path"))
        rows.append({**common, "model": model_name, "method": "base", "is_base": True,
                     "model_bytes": base_bytes, "model_GiB": _gib(base_bytes),
                     "params": base_params, "params_kept_pct": 100.0 if base_params else None,
                     "nonzero_params": params.get("nonzero_base"),
                     "sparsity_pct": 0.0 if params.get("nonzero_base") else None,
                     **_eval_columns(ev["base"])})
    side = "pruned" if "pruned" in ev else "model" if "model" in ev else None
    if side:
        kept = params.get("kept_pct")
        if kept is not None and kept <= 1.0:
            kept *= 100.0  # tolerate a fraction
        is_base = m.get("task") == "evaluate" and not m.get("method")
        if is_base and kept is None:
            kept = 100.0  # an uncompressed model evaluated on its own
        model_bytes = _model_bytes(m, source)
        rows.append({
            **common, "model": model_name, "method": m.get("method") or ("base" if is_base else None),
            "is_base": is_base and side == "model" and "base" not in ev,
            "ratio": _ratio(m, cfg),
            "unit": _get(m, "compression", "unit"),
            "attn_layers": _range(m, cfg, "attention"), "mlp_layers": _range(m, cfg, "mlp"),
            "params": params.get("pruned") or params.get("model") or _get(ev, side, "efficiency", "params"),
            "params_kept_pct": kept, "nonzero_params": params.get("nonzero"),
            "sparsity_pct": params.get("sparsity_pct", 0.0 if is_base and params.get("nonzero") else None),
            "flops_kept_pct": _get(m, "flops", "kept_pct"), "model_bytes": model_bytes,
            "model_GiB": _gib(model_bytes), **_eval_columns(ev[side]),
        })
        if "recovered" in ev:  # recovery=lora / task=finetune: the same model after recovery, a row of its own
            label = _get(cfg, "recovery", "name") or "recovered"
            rows.append({**rows[-1], **{k: None for k in _eval_columns(ev[side])}, **_eval_columns(ev["recovered"]),
                         "method": f"{rows[-1]['method'] or 'model'}+{label}", "is_base": False})
    return rows


def incomplete_row(m: dict, source: str, status: Optional[str] = None, note: Optional[str] = None) -> dict:
    """The one row of a run that did not complete: what it was and how it ended, and no result column
    (params, perplexity, accuracies): a failed or dead run's model was never saved, whatever its record holds."""
    cfg = m.get("config") or {}
    status = status or run_status(m)
    pruning = m.get("task") in ("prune", None)  # an evaluate run's config names the default pruner, not its model's
    message = _get(m, "error", "message")
    lines = str(message).strip().splitlines() if message else []
    notes = []
    if status == "dead" and m.get("heartbeat"):
        notes.append(f"last heartbeat {m['heartbeat']}")
    if status == "dry_run":
        notes.append("dry_run=true: a plan only, nothing was loaded (its plan is in metrics.json)")
    if note:
        notes.append(note)
    return {"run": source, "status": status, "task": m.get("task"), "model": _model_name(m, cfg),
            "method": m.get("method") or (_get(cfg, "pruner", "name") if pruning else None),
            "ratio": _ratio(m, cfg), "unit": _get(m, "compression", "unit"),
            "attn_layers": _range(m, cfg, "attention"), "mlp_layers": _range(m, cfg, "mlp"),
            "error": lines[0] if lines else None, "note": "; ".join(notes) or None}


def read_record(path: str | Path) -> Optional[dict]:
    """One ``metrics.json`` as a dict, or None (logged) when it cannot be read."""
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("table: cannot read %s (%s); skipped", path, e)
        return None
    if not isinstance(m, dict):
        log.warning("table: %s is not a run record; skipped", path)
        return None
    return m


def remove_orphans(run_dir: str | Path, status: Optional[str] = None) -> list[str]:
    """Remove the unfinished checkpoint dirs (``.<name>.partial-*``) of a run that has ended without finishing
    (``status`` dead, killed, interrupted or failed; read from ``run_dir/metrics.json`` when not given): a
    ``kill -9`` during a save leaves one behind and nothing will ever finish it. A live (``running``), completed
    or unreadable run is never touched. Returns the removed paths, each one logged as a warning."""
    run_dir = Path(run_dir)
    m = read_record(run_dir / "metrics.json")
    if status is None:
        status = run_status(m) if m is not None else None
    if status not in ENDED_STATUSES:
        return []
    if status == "dead" and m is not None and m.get("host") != socket.gethostname():
        # Judged dead by a stopped heartbeat alone (another host): a stalled but live run would lose its save,
        # so wait until the heartbeat is an hour old.
        beat = m.get("heartbeat_unix")
        if not isinstance(beat, (int, float)) or time.time() - beat < ORPHAN_GRACE_S:
            return []
    removed = []
    for p in sorted(run_dir.glob(PARTIAL_GLOB)):
        if p.is_symlink() or not p.is_dir():  # atomic_dir makes real dirs only
            continue
        shutil.rmtree(p, ignore_errors=True)
        if p.exists():
            log.warning("table: could not remove the orphaned partial dir %s (run %s)", p, status)
            continue
        log.warning("table: removed the orphaned partial dir %s: its run is %s and will never finish it", p, status)
        removed.append(str(p))
    return removed


def _sort(df: pd.DataFrame, *first: str) -> pd.DataFrame:
    keys = [k for k in (*first, "method", "unit", "ratio", "attn_layers", "mlp_layers", "run") if k in df.columns]
    return df.sort_values(keys, na_position="last", kind="stable")


def collect(paths: Iterable[str | Path], notes: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """One DataFrame over all runs: base model first (deduplicated), then sorted compressed rows, then one row
    per run whose status (``run_status``) is not ``completed``. ``notes``: run dir -> a note for its row."""
    rows: list[dict] = []
    incomplete: list[dict] = []
    for f in find_metrics(paths):
        m = read_record(f)
        if m is None or m.get("task") in ("table", "report"):  # the reports of records are not results
            continue
        status = run_status(m)
        if status == "completed":
            rows += rows_from_metrics(m, str(f.parent))
        else:
            incomplete.append(incomplete_row(m, str(f.parent), status, (notes or {}).get(str(f.parent))))
    parts = []
    if rows:
        df = pd.DataFrame(rows)
        base = _merge_base_rows(df[df["is_base"] == True])  # noqa: E712  (object column)
        rest = _sort(df[df["is_base"] != True])  # noqa: E712
        parts.append(pd.concat([base, rest], ignore_index=True).drop(columns=["is_base"]))
    if incomplete:
        inc = _sort(pd.DataFrame(incomplete), "status")
        parts.append(inc.dropna(axis=1, how="all"))  # no all-empty column (pandas warns on those)
    if not parts:
        return pd.DataFrame()
    out = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True)
    ordered = ["model", "method", "ratio", "unit", "attn_layers", "mlp_layers", "params", "params_kept_pct",
               "nonzero_params", "sparsity_pct", "flops_kept_pct", "model_bytes", "model_GiB", "ppl",
               "ppl_protocol", *TASK_LABELS.values(), "avg", "MMLU", "mmlu_shots", "prefill_tok_s",
               "decode_tok_s", "decode_ms_per_tok", "limit", "task", "status", "error", "note", "run"]
    cols = [c for c in ordered if c in out.columns] + [c for c in out.columns if c not in ordered]
    return out[cols]


def split_completed(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, runs that did not complete) of a :func:`collect` frame."""
    if "status" not in df.columns:
        return df, df.iloc[0:0]
    done = df["status"] == "completed"
    return df[done], df[~done]


_INT_COLUMNS = ("params", "nonzero_params", "model_bytes", "mmlu_shots", "limit")
_MERGE_FREE = ("run", "status", "limit")


def _merge_base_rows(base: pd.DataFrame) -> pd.DataFrame:
    """One row per base model: rows from different runs (perplexity in one, zero-shot in another, MMLU in a
    third) are merged when every cell both have agrees; a disagreement (another PPL protocol, another score)
    keeps them apart. ``limit`` lists the limits merged (``5/50``), ``run`` the runs (``; ``-separated)."""
    merged: list[tuple[dict, dict[str, list]]] = []
    for row in base.to_dict("records"):
        row = {k: v for k, v in row.items() if not _missing(v)}
        for m, multi in merged:
            if all(row[k] == m[k] for k in (set(row) & set(m)) - set(_MERGE_FREE)):
                for k, v in row.items():
                    if k in ("limit", "run"):
                        multi.setdefault(k, []).append(v)
                    elif k == "status":  # a failure anywhere shows
                        m[k] = v if m.get(k, "completed") == "completed" else m[k]
                    else:
                        m.setdefault(k, v)
                break
        else:
            merged.append((dict(row), {k: [row[k]] for k in ("limit", "run") if k in row}))
    if not merged:
        return base
    out = []
    for m, multi in merged:
        for k, vals in multi.items():
            uniq = sorted({_int_or(v) for v in vals}, key=lambda v: (isinstance(v, str), v))
            m[k] = uniq[0] if len(uniq) == 1 else ("; " if k == "run" else "/").join(map(str, uniq))
        out.append(m)
    return pd.DataFrame(out, columns=base.columns)


def _int_or(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _integral(col: pd.Series) -> bool:
    """A numeric column of whole numbers, none missing: what pandas would have kept as integers."""
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col) or col.isna().any():
        return False
    return bool((col == col.round()).all())


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)


_INCOMPLETE_ONLY = ("task", "error", "note")  # columns only the rows of runs that did not complete fill
_INCOMPLETE_SHOWN = ("model", "method", "ratio", "unit", "attn_layers", "mlp_layers", "task", "status", "error",
                     "note", "run")


def write_tables(df: pd.DataFrame, out_dir: str | Path, stem: str = "results") -> dict[str, str]:
    """``<stem>.csv``, ``.md`` and ``.tex`` in ``out_dir`` (atomic); returns their paths.

    The CSV holds every row (``status`` tells results from the rest); the Markdown shows the results, then the
    runs that did not complete under :data:`INCOMPLETE_HEADING`; the LaTeX holds the results only."""
    out_dir = Path(out_dir)
    done, incomplete = split_completed(df)
    if len(incomplete):  # their empty cells made integer columns (params) floats: the results keep their integers
        df = df.astype({c: "Int64" for c in _INT_COLUMNS if c in df.columns and _integral(done[c])})
        done, incomplete = split_completed(df)
    shown = done.drop(columns=[c for c in ("run", *_INCOMPLETE_ONLY) if c in df.columns])
    md = _markdown(shown) if len(done) or not len(incomplete) else ""
    tex = shown.to_latex(index=False, float_format="%.2f", na_rep="--") if len(done) or not len(incomplete) else ""
    if len(incomplete):
        cols = [c for c in _INCOMPLETE_SHOWN if c in incomplete.columns and not incomplete[c].isna().all()]
        what = ", ".join(f"{n} {status}" for status, n in incomplete["status"].value_counts().items())
        md += ("\n" if md else "") + (f"{INCOMPLETE_HEADING}\n\n{len(incomplete)} run(s) ({what}). No numbers are "
                                      "shown for them: none of them finished.\n\n") + _markdown(incomplete[cols])
        tex += f"% {len(incomplete)} run(s) that did not complete ({what}) are listed in {stem}.md and {stem}.csv\n"
    paths = {
        "csv": atomic_write_text(out_dir / f"{stem}.csv", df.to_csv(index=False)),
        "markdown": atomic_write_text(out_dir / f"{stem}.md", md),
        "latex": atomic_write_text(out_dir / f"{stem}.tex", tex),
    }
    return {k: str(v) for k, v in paths.items()}


def _markdown(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' ``to_markdown`` needs ``tabulate``, not a dependency)."""
    def cell(v: Any, column: str) -> str:
        if _missing(v):
            return ""
        if column in _INT_COLUMNS:
            v = _int_or(v)
        return f"{v:.2f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v, c) for v, c in zip(row, df.columns)) + " |"
              for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"
