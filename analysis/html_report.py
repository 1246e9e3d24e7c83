"""One self-contained, offline HTML page of a sweep (or any folder of run dirs): :func:`write_report`.

    python run.py task=report runs='[outputs/multirun/2026-11-22/11-00-00]'    # -> that dir's report.html

Clusters have no internet, so nothing on the page points outside it: CSS and a little vanilla JS (click a header
to sort, type to filter rows) are inline, every plot is a base64 ``data:`` URI, and a Content-Security-Policy
forbids any other load. The rows are :func:`analysis.results_table.collect`'s: the results of completed runs, then
every run that did not complete with its honest status and the first line of its error, as ``results.md`` lists
them. Plots: the PNGs at the top level of each folder in ``runs`` (pareto, heatmaps, convergence), then each
model's analysis plots (``<job>/analysis/``, ``<sweep>/analysis/<job>/``) folded in ``<details>``. Every table row
of a run carries ``data-run`` (its job name), and ``#n-runs`` holds the number of runs, so a page can be checked.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import numbers
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from analysis.results_table import collect, find_metrics, read_record, split_completed
from core.run.errors import DataError
from core.run.io import atomic_write_text
from core.run.record import run_status

log = logging.getLogger(__name__)

MAX_EMBED_BYTES = 32 * 2**20  # PNG bytes embedded per page (base64 adds a third); the rest are listed by path
NOT_RUNS = ("table", "report")  # records of tasks that summarise other runs: never rows of a report
PLOT_CAPTIONS = {  # the sweep's own plots (recipes/_callbacks.py: sweep_summary), in this order
    "pareto_ppl.png": "Perplexity vs parameters kept, one line per method",
    "pareto_avg.png": "Zero-shot average vs parameters kept, one line per method",
    "heatmap_ppl_attn_layers.png": "Perplexity over the attention layer range (start x end)",
    "heatmap_ppl_mlp_layers.png": "Perplexity over the MLP layer range (start x end)",
    "convergence.png": "Optimisation convergence",
}
INT_COLUMNS = ("params", "nonzero_params", "mmlu_shots", "limit")
HIDDEN_IN_RESULTS = ("task", "status", "error", "note")  # empty or constant for completed rows
INCOMPLETE_COLUMNS = ("status", "task", "model", "method", "ratio", "unit", "attn_layers", "mlp_layers", "error",
                      "note", "run")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--accent:#0969da}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg)}
main{max-width:1280px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:32px 0 8px;padding-bottom:4px;border-bottom:1px solid var(--line)}
.meta{color:var(--muted);margin:0 0 16px}code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid var(--line);border-radius:8px;padding:8px 16px;min-width:120px}
.card b{display:block;font-size:22px}.card span{color:var(--muted)}.card.bad b{color:#cf222e}.card.ok b{color:#1a7f37}
.tools{display:flex;gap:12px;align-items:center;margin:8px 0;color:var(--muted)}
input[type=search]{font:inherit;padding:5px 10px;border:1px solid var(--line);border-radius:6px;width:280px}
.scroll{overflow-x:auto;border:1px solid var(--line);border-radius:8px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.err{white-space:normal;min-width:280px}
thead th{background:var(--bg);position:sticky;top:0;cursor:pointer;user-select:none}
thead th:hover{color:var(--accent)}th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:nth-child(even){background:#fafbfc}tbody tr:hover{background:#eef4ff}
.st{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;background:#eaeef2}
.st-completed{background:#dafbe1;color:#1a7f37}.st-failed{background:#ffebe9;color:#cf222e}
.st-killed,.st-dead,.st-interrupted{background:#fff1e5;color:#bc4c00}.st-running{background:#ddf4ff;color:#0969da}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(440px,1fr));gap:16px}
figure{margin:0;border:1px solid var(--line);border-radius:8px;padding:8px;background:#fff}
figure img{width:100%;height:auto;display:block}figcaption{color:var(--muted);font-size:12px;margin-top:4px}
details{border:1px solid var(--line);border-radius:8px;padding:6px 12px;margin:8px 0}
summary{cursor:pointer;font-weight:600}details .grid{margin:8px 0}.note{color:var(--muted)}
"""

# Sort on a header click (numbers by data-v, empty cells last), filter rows on typing; ~40 lines, no library.
JS = """
(function () {
  function key(row, i) { var c = row.cells[i]; return c ? (c.dataset.v !== undefined ? c.dataset.v : c.textContent.trim()) : ""; }
  function num(s) { return s === "" || isNaN(Number(s)) ? null : Number(s); }
  document.querySelectorAll("table.sortable").forEach(function (t) {
    var heads = t.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, i) {
      th.tabIndex = 0;
      function sort() {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = t.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a, i), y = key(b, i);
          if (x === "" || y === "") return (x === "") - (y === "");
          var nx = num(x), ny = num(y);
          var c = nx !== null && ny !== null ? nx - ny : x.localeCompare(y, undefined, {numeric: true});
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
    });
  });
  var box = document.getElementById("filter"), shown = document.getElementById("n-shown");
  function filter() {
    var q = box.value.trim().toLowerCase(), n = 0;
    document.querySelectorAll("tr[data-run]").forEach(function (r) {
      var hit = !q || r.textContent.toLowerCase().indexOf(q) >= 0;
      r.hidden = !hit; n += hit ? 1 : 0;
    });
    shown.textContent = n;
  }
  if (box) { box.addEventListener("input", filter); filter(); }
})();
"""


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v) or v is pd.NA or v is pd.NaT


def _job_name(run_dir: str, roots: list[Path]) -> str:
    """A run dir as the user knows it: its path inside the first folder of ``runs`` holding it, else the path."""
    p = Path(run_dir)
    for root in roots:
        try:
            rel = p.relative_to(root)
        except ValueError:
            continue
        return str(rel) if str(rel) != "." else p.name
    return str(p)


def _cell(v: Any, column: str, roots: list[Path]) -> str:
    """One ``<td>``: numbers right-aligned with their raw value in ``data-v`` (what the sort compares)."""
    if _missing(v):
        return "<td></td>"
    if column == "run":  # merged base rows list several runs, "; "-separated
        names = "; ".join(_job_name(r, roots) for r in str(v).split("; "))
        return f'<td title="{_esc(v)}">{_esc(names)}</td>'
    if column == "status":
        return f'<td><span class="st st-{_esc(v)}">{_esc(v)}</span></td>'
    if column in ("error", "note"):
        return f'<td class="err">{_esc(v)}</td>'
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        if column in INT_COLUMNS and float(v).is_integer():
            text = f"{int(v):,}"
        elif column == "ratio":
            text = f"{v:g}"
        else:
            text = str(v) if float(v).is_integer() and not isinstance(v, float) else f"{float(v):.2f}"
        return f'<td class="num" data-v="{float(v)!r}">{_esc(text)}</td>'
    return f"<td>{_esc(v)}</td>"


def _table(df: pd.DataFrame, columns: list[str], roots: list[Path], table_id: str) -> str:
    """A sortable table; each row carries ``data-run`` (its job names) and ``data-status``."""
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    rows = []
    for rec in df.to_dict("records"):
        runs = "; ".join(_job_name(r, roots) for r in str(rec.get("run", "")).split("; "))
        status = rec.get("status") or ""
        cells = "".join(_cell(rec.get(c), c, roots) for c in columns)
        rows.append(f'<tr data-run="{_esc(runs)}" data-status="{_esc(status)}">{cells}</tr>')
    return (f'<div class="scroll"><table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>\n" + "\n".join(rows) + "\n</tbody></table></div>")


class _Embedder:
    """PNG files as ``<figure>``s with data URIs, within :data:`MAX_EMBED_BYTES`; remembers what it left out."""

    def __init__(self, budget: int):
        self.budget = budget
        self.left_out: list[str] = []
        self.seen: set[Path] = set()

    def figure(self, path: Path, caption: str) -> str:
        real = path.resolve()
        if real in self.seen:
            return ""
        self.seen.add(real)
        try:
            data = path.read_bytes()
        except OSError as e:
            self.left_out.append(f"{path} (unreadable: {e.strerror or e})")
            return ""
        if not data.startswith(PNG_MAGIC):
            self.left_out.append(f"{path} (not a PNG)")
            return ""
        if len(data) > self.budget:
            self.left_out.append(f"{path} (page size limit)")
            return ""
        self.budget -= len(data)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        return (f'<figure><img alt="{_esc(path.name)}" src="{uri}">'
                f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _top_plots(roots: list[Path], emb: _Embedder) -> list[str]:
    figs = []
    for root in roots:
        pngs = sorted(root.glob("*.png"), key=lambda p: (list(PLOT_CAPTIONS).index(p.name)
                                                         if p.name in PLOT_CAPTIONS else 99, p.name))
        for p in pngs:
            label = PLOT_CAPTIONS.get(p.name, p.stem.replace("_", " "))
            figs.append(emb.figure(p, f"{label} ({p.name})" if len(roots) == 1 else f"{label} ({p})"))
    return [f for f in figs if f]


def _model_plots(run_dirs: list[Path], roots: list[Path], emb: _Embedder) -> list[str]:
    """One ``<details>`` per model: its run's own analysis plots and the sweep's batch analysis of it."""
    groups: dict[str, list[Path]] = {}
    for d in run_dirs:
        for sub in ("analysis", "model/analysis"):
            groups.setdefault(_job_name(str(d), roots), []).extend(sorted((d / sub).glob("*.png")))
    for root in roots:  # a sweep's batch analysis (analysis/<job>/), a batch_analyze run's (<output_name>/analysis/)
        for d in sorted(p for p in [*(root / "analysis").glob("*"), *root.glob("*/analysis/*")] if p.is_dir()):
            groups.setdefault(d.name, []).extend(sorted(d.glob("*.png")))
    out = []
    for name, files in sorted(groups.items()):
        figs = [f for f in (emb.figure(p, str(_job_name(str(p), roots))) for p in files) if f]
        if figs:
            out.append(f"<details><summary>{_esc(name)} ({len(figs)} plot{'s' * (len(figs) != 1)})</summary>"
                       f'<div class="grid">{"".join(figs)}</div></details>')
    return out


def _batch_table(roots: list[Path]) -> str:
    """The sweep's batch analysis (``batch_analysis_results.json``): one line per model, its status and size."""
    rows = []
    for root in roots:
        # the batch's results folder (output_name, e.g. baselines_analysis/) or, from older runs, the run dir itself
        found = [root / "batch_analysis_results.json", *sorted(root.glob("*/batch_analysis_results.json"))]
        try:
            batch = json.loads(next(p for p in found if p.is_file()).read_text())
        except (OSError, ValueError, StopIteration):
            continue
        models = batch.get("models") if isinstance(batch, dict) else None
        for m in models if isinstance(models, list) else []:
            if not isinstance(m, dict):
                continue
            s = m.get("summary") or {}
            red = s.get("reduction_ratio")
            rows.append("<tr>" + "".join([
                f"<td>{_esc(m.get('name', ''))}</td>", f"<td>{_esc(m.get('format') or '')}</td>",
                _cell(m.get("status"), "status", roots), _cell(s.get("total_params"), "params", roots),
                _cell(None if red is None else 100 * red, "reduction_pct", roots),
                _cell(m.get("error") or m.get("reason"), "error", roots)]) + "</tr>")
    if not rows:
        return ""
    head = "".join(f"<th>{c}</th>" for c in ("model", "format", "status", "params", "reduction %", "reason"))
    return (f'<div class="scroll"><table class="sortable" id="batch"><thead><tr>{head}</tr></thead><tbody>'
            + "".join(rows) + "</tbody></table></div>")


def _records(runs: Iterable[str | Path], exclude: set[Path]) -> list[tuple[Path, dict]]:
    """(metrics.json, record) of every run under ``runs``: readable, not excluded, not a table/report run."""
    out = []
    for f in find_metrics(runs):
        if f.parent in exclude:
            continue
        m = read_record(f)
        if m is not None and m.get("task") not in NOT_RUNS:
            out.append((f, m))
    return out


def write_report(runs: list[str | Path], out: Path, *, title: Optional[str] = None,
                 exclude: Iterable[str | Path] = (), max_embed_bytes: int = MAX_EMBED_BYTES) -> Path:
    """Write the HTML report of every run under ``runs`` (sweep dirs, folders of runs, run dirs) to ``out``
    (atomically) and return its path. ``exclude``: run dirs to leave out (the report run's own). Raises
    :class:`core.run.errors.DataError` when there is no run record at all."""
    sources = [Path(r).expanduser() for r in runs]
    roots = [(p if p.is_dir() else p.parent).resolve() for p in sources]
    records = _records(sources, {Path(e).resolve() for e in exclude})
    if not records:
        raise DataError(f"report: no run record (metrics.json) under {', '.join(map(str, sources))}")
    statuses = [run_status(m) for _, m in records]
    n_done = statuses.count("completed")
    counts: dict[str, int] = {}
    for s in statuses:
        if s != "completed":
            counts[s] = counts.get(s, 0) + 1

    df = collect([f for f, _ in records])
    done, incomplete = split_completed(df) if not df.empty else (df, df)
    shown_runs = {r for v in df.get("run", pd.Series(dtype=str)).dropna() for r in str(v).split("; ")}
    no_rows = [_job_name(str(f.parent), roots) for f, m in records if str(f.parent) not in shown_runs]

    title = title or f"Sweep report: {roots[0].name}"
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    emb = _Embedder(max_embed_bytes)
    parts = [f"<h1>{_esc(title)}</h1>",
             f'<p class="meta">Generated {_esc(now)} &middot; '
             + ", ".join(f"<code>{_esc(r)}</code>" for r in roots) + "</p>",
             '<div class="cards">'
             f'<div class="card"><b id="n-runs">{len(records)}</b><span>runs</span></div>'
             f'<div class="card ok"><b id="n-completed">{n_done}</b><span>completed</span></div>'
             f'<div class="card{" bad" if counts else ""}"><b id="n-incomplete">{sum(counts.values())}</b>'
             f"<span>did not complete{' (' + _esc(', '.join(f'{n} {s}' for s, n in counts.items())) + ')' if counts else ''}"
             "</span></div></div>"]
    n_rows = len(df)
    parts.append(f'<h2>Results</h2><div class="tools"><input type="search" id="filter" '
                 f'placeholder="Filter rows: method, status, run…" aria-label="filter rows">'
                 f'<span>showing <span id="n-shown">{n_rows}</span> of {n_rows} rows; click a header to sort'
                 "</span></div>")
    if len(done):
        cols = [c for c in done.columns if c not in HIDDEN_IN_RESULTS and not done[c].isna().all()]
        cols = [c for c in cols if c != "run"] + ["run"]
        parts.append(_table(done, cols, roots, "results"))
    else:
        parts.append('<p class="note">No completed run has results.</p>')
    if no_rows:
        parts.append(f'<p class="note">{len(no_rows)} run(s) gave no row (no evaluation in the record): '
                     f"{_esc(', '.join(no_rows))}</p>")

    parts.append('<h2 id="failed">Runs that did not complete</h2>')
    if len(incomplete):
        what = ", ".join(f"{n} {s}" for s, n in incomplete["status"].value_counts().items())
        parts.append(f'<p class="note">{len(incomplete)} run(s) ({_esc(what)}). No numbers are shown for them: '
                     "none of them finished.</p>")
        cols = [c for c in INCOMPLETE_COLUMNS if c in incomplete.columns and not incomplete[c].isna().all()]
        parts.append(_table(incomplete, cols, roots, "incomplete"))
    else:
        parts.append('<p class="note">None: every run completed.</p>')

    plots = _top_plots(roots, emb)
    if plots:
        parts.append(f'<h2>Plots</h2><div class="grid">{"".join(plots)}</div>')
    models = _model_plots(sorted({f.parent for f, _ in records}), roots, emb)
    batch = _batch_table(roots)
    if models or batch:
        parts.append('<h2>Models</h2><p class="note">The sweep\'s batch analysis of the saved models against their '
                     "base, and each model's analysis plots (click a name to open them).</p>" + batch + "".join(models))
    if emb.left_out:
        parts.append('<p class="note">Not embedded: ' + "; ".join(map(_esc, emb.left_out)) + "</p>")

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(parts) + f"\n</main><script>{JS}</script></body></html>\n")
    path = atomic_write_text(out, page)
    log.info("report: %d runs (%d completed), %d plots embedded -> %s", len(records), n_done,
             len(emb.seen) - len(emb.left_out), path)
    return path
