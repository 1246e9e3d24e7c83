"""Write a model's analysis: JSON, CSV, text summary and plots into ``<out_dir>``, and mirror to W&B.

Files (seed names): ``model_structure.json``, ``model_comparison.json`` (with a base),
``structure_summary.txt``, ``layers.csv`` (one row per layer x module; ``kind`` tells the projection matrices from
the norm vectors, which width pruning never touches), ``sparsity.png`` and ``module_heatmap.png`` (with a base).
``write_analysis`` returns the summary for metrics.json.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from analysis.compare import ArchitectureMismatch, compare
from analysis.plots import module_heatmap, sparsity_bars
from analysis.size import compare_sizes, size_report
from analysis.structure import ModelStructure
from core.run.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

CSV_COLUMNS = ["layer_idx", "group", "module", "kind", "original_shape", "pruned_shape", "original_params",
               "pruned_params", "retention", "sparsity", "pruned_nonzero", "nonzero_sparsity", "layer_status"]
# layers.csv's ``kind``: "matrix" = the attention / MLP projections (what pruning shrinks or zeroes), "norm" = the
# per-layer norm vectors (never pruned: sparsity 0, so a per-layer mean or "sparsity == 0" over all rows would count
# them), "other" = any other per-layer tensor (SliceGPT's shortcut rotations, a Mamba mixer's)
KINDS = {"attention": "matrix", "mlp": "matrix", "norm": "norm"}
GIB = 1024 ** 3
MIB = 1024 ** 2


def row_kind(group: str) -> str:
    return KINDS.get(group, "other")


def fmt_size(n: Optional[int]) -> str:
    """Bytes as MiB and GiB (the seeds' "GB" are GiB: Llama-3-8B's 16,060,522,496 parameter bytes are 14.96)."""
    return "n/a" if n is None else f"{n / MIB:,.2f} MiB ({n / GIB:.2f} GiB)"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f} ({x:.2%})"


def structure_rows(s: ModelStructure) -> list[dict]:
    """layers.csv rows for a structure alone (no base): original columns left empty."""
    rows = []
    for layer in s.layers:
        for key, m in layer.modules.items():
            rows.append({"layer_idx": layer.idx, "group": m.group, "module": m.name, "kind": row_kind(m.group),
                         "original_shape": None,
                         "pruned_shape": " x ".join(map(str, m.shape or [])), "original_params": None,
                         "pruned_params": m.params, "retention": None, "sparsity": None,
                         "pruned_nonzero": m.nonzero,
                         "nonzero_sparsity": (1 - m.nonzero / m.params) if m.nonzero is not None and m.params else None,
                         "layer_status": "removed" if layer.removed else ("zeroed" if layer.is_zero else "present")})
    return rows


_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _num(v: Any) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and v != v) else float(v)


def module_dimensions(rows: list[dict]) -> list[str]:
    """The per-module dimension table (the seed's "detailed module analysis"): for each projection, its original
    and compressed shape per layer, with retention and sparsity; consecutive layers that agree share one line."""
    by_module: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("kind", row_kind(r["group"])) != "norm":
            by_module.setdefault((r["group"], r["module"]), []).append(r)
    order = lambda k: ({"attention": 0, "mlp": 1}.get(k[0], 2),  # noqa: E731
                       _MODULE_ORDER.index(k[1]) if k[1] in _MODULE_ORDER else 99, k[1])
    compared = any(r.get("original_shape") not in (None, "") for r in rows)
    lines = []
    for key in sorted(by_module, key=order):
        lines.append(f"{key[0]}.{key[1]}")
        lines.append(f"  {'layers':<9} " + (f"{'original':>13} -> " if compared else "")
                     + f"{'compressed' if compared else 'shape':<13} {'retention':>9} {'sparsity':>9} "
                       f"{'non-zero sparsity':>18}")
        runs: list[list] = []
        for r in sorted(by_module[key], key=lambda r: r["layer_idx"]):
            ret, sp, nz = _num(r.get("retention")), _num(r.get("sparsity")), _num(r.get("nonzero_sparsity"))
            sig = (r.get("original_shape"), r.get("pruned_shape"), None if ret is None else round(ret, 4),
                   None if nz is None else round(nz, 4),
                   r.get("layer_status") if r.get("layer_status") in ("removed", "zeroed") else None)
            if runs and runs[-1][2] == sig and runs[-1][1] == r["layer_idx"] - 1:
                runs[-1][1] = r["layer_idx"]
            else:
                runs.append([r["layer_idx"], r["layer_idx"], sig, sp])
        for a, b, (orig, new, ret, nz, status), sp in runs:
            f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
            lines.append(f"  {f'{a}-{b}' if b != a else str(a):<9} " + (f"{orig or '-':>13} -> " if compared else "")
                         + f"{new or '-':<13} {f(ret):>9} {f(sp):>9} {f(nz):>18}"
                         + (f"  {status}" if status in ("removed", "zeroed") else ""))
    return lines


def summary_text(s: ModelStructure, comparison: Optional[dict], size: Optional[dict],
                 size_cmp: Optional[dict], compare_error: Optional[str] = None,
                 rows: Optional[list[dict]] = None) -> str:
    out = io.StringIO()
    w = lambda line="": out.write(line + "\n")  # noqa: E731
    bar = "=" * 100
    w(bar)
    w(f"Model structure: {s.name}  ({s.format}, {s.source})")
    w(bar)
    w(f"total params       : {s.total_params:,}")
    w(f"embedding params   : {s.embedding_params:,}")
    w(f"lm_head params     : {s.lm_head_params:,}" + ("  (tied to the embedding: counted once, under embedding)"
                                                      if s.tied_embeddings else ""))
    w(f"layers             : {s.num_layers} present, {s.layer_params:,} params"
      + (f"; removed {[l.idx for l in s.layers if l.removed]}" if any(l.removed for l in s.layers) else ""))
    if s.nonzero_params is not None:
        w(f"non-zero params    : {s.nonzero_params:,} ({s.nonzero_params / max(s.total_params, 1):.2%})")
    w(f"dtypes             : " + ", ".join(f"{k} {v:,}" for k, v in s.dtypes.items()))
    for note in s.notes:
        w(f"note: {note}")
    w()
    w(f"{'layer':>5} {'params':>14} {'heads':>6} {'kv':>4} {'mlp':>7} {'extra':>22} {'zero':>5}")
    for layer in s.layers:
        extra = ",".join(layer.group("extra")) or "-"
        w(f"{layer.idx:>5} {layer.params():>14,} {str(layer.num_heads):>6} {str(layer.num_kv_heads):>4} "
          f"{str(layer.intermediate_size):>7} {extra[:22]:>22} {str(layer.is_zero):>5}")
    if compare_error:
        w()
        w(f"comparison with the base skipped: {compare_error}")
    if comparison:
        c = comparison
        w()
        w(bar)
        w(f"Comparison with {c['original_name']}")
        w(bar)
        t = c["total_params"]
        w(f"original params    : {t['original']:,}")
        w(f"pruned params      : {t['pruned']:,}")
        w(f"reduced            : {t['reduced']:,}")
        w(f"overall retention  : {_pct(t['retention'])}")
        w(f"overall sparsity   : {_pct(t['sparsity'])}")
        if t.get("nonzero_sparsity") is not None:
            base_nz = f"{t['original_nonzero']:,}" if t.get("original_nonzero") is not None else "not counted"
            w(f"non-zero params    : {t['pruned_nonzero']:,} (base {base_nz})")
            w(f"non-zero sparsity  : {_pct(t['nonzero_sparsity'])}  (share of the base's non-zero weights gone)")
        for note in c.get("alignment_notes", []):
            w(f"note: {note}")
        w()
        w(f"{'layer':>5} {'original':>14} {'pruned':>14} {'retention':>9} {'sparsity':>9} "
          f"{'heads':>7} {'kv':>5} {'mlp':>11} {'status':>10}")
        for e in c["layers"]:
            a, m = e.get("attention", {}), e.get("mlp", {})
            h, kv, im = a.get("num_heads", {}), a.get("num_kv_heads", {}), m.get("intermediate_size", {})
            ret = e["total"]["retention"]
            sp = e["total"]["sparsity"] if e["status"] != "sparsified" else e["total"].get("nonzero_sparsity")
            w(f"{e['layer_idx']:>5} {e['total']['original']:>14,} {e['total']['pruned']:>14,} "
              f"{ret if ret is not None else float('nan'):>9.4f} {sp if sp is not None else float('nan'):>9.4f} "
              f"{h.get('original')}->{h.get('pruned')!s:>3} {kv.get('original')}->{kv.get('pruned')!s:>2} "
              f"{im.get('original')}->{im.get('pruned')!s:>5} {e['status']:>10}")
        w()
        w("Per module (layers whose shape changed)")
        for key, v in c["consistency"]["modules"].items():
            if v["consistent"]:
                w(f"  OK   {key}: same retention {v['retention']} in layers "
                  f"{_ranges(next(iter(v['retention_by_layers'].values())))}")
            else:
                w(f"  DIFF {key}: " + "; ".join(f"{r} in {_ranges(ls)}" for r, ls in v["retention_by_layers"].items()))
        cons = c["consistency"]
        w()
        w(f"untouched layers   : {_ranges(cons['untouched_layers'])}")
        w(f"pruned (attention) : {_ranges(cons['pruned_layers']['attention'])}")
        w(f"pruned (mlp)       : {_ranges(cons['pruned_layers']['mlp'])}")
        if cons["removed_layers"]:
            w(f"removed layers     : {cons['removed_layers']}")
        w(f"mean sparsity of pruned layers: {_pct(cons['pruned_layers_mean_sparsity'])}"
          + (f"  (target {_pct(cons['target_sparsity'])})" if "target_sparsity" in cons else ""))
        for group, r in cons.get("ranges", {}).items():
            w(f"range check {group:<9}: expected [{r['expected'][0]}, {r['expected'][1]}) -> "
              + ("OK" if r["ok"] else f"outside {r['pruned_outside_range']}, untouched inside "
                                      f"{r['untouched_inside_range']}"))
        for v in cons["verdicts"]:
            w(f"! {v}")
    if rows:
        w()
        w(bar)
        w("Per-module dimensions" + (" (original -> compressed)" if comparison else ""))
        w(bar)
        for line in module_dimensions(rows):
            w(line)
    if size:
        w()
        w(bar)
        w(f"Size on disk: {fmt_size(size['total_bytes'])} ({size['path']})")
        w(bar)
        for f in size["files"]:
            w(f"  {f['bytes']:>14,}  {f['category']:<9} {f['file']}")
        pb = size.get("param_bytes")
        if pb:
            w(f"parameter bytes    : stored {fmt_size(pb['stored'])}; fp32 {fmt_size(pb['fp32'])}, "
              f"fp16/bf16 {fmt_size(pb['fp16'])}")
        if size.get("unread_weight_bytes"):
            w(f"not counted        : {fmt_size(size['unread_weight_bytes'])} of weight files the loader does not "
              "read (marked unread)")
        if size_cmp:
            o, p = size_cmp["original_total_bytes"], size_cmp["pruned_total_bytes"]
            red = size_cmp.get("total_bytes_reduction")
            w(f"original total     : {fmt_size(o)}")
            w(f"compressed total   : {fmt_size(p)}")
            w(f"reduced on disk    : {fmt_size(o - p)}" + (f" ({red:.2%})" if red is not None else ""))
        for line in size.get("explanation", []):
            w(f"- {line}")
        for line in (size_cmp or {}).get("explanation", []):
            w(f"- {line}")
    return out.getvalue()


def _ranges(idx: list[int]) -> str:
    """[0,1,2,5] -> '0-2, 5'"""
    if not idx:
        return "none"
    idx = sorted(idx)
    parts, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def write_analysis(out_dir: str | Path, pruned: ModelStructure, base: Optional[ModelStructure] = None, *,
                   expected_ranges: Optional[dict] = None, target_sparsity: Optional[float] = None,
                   model_dir: Optional[str | Path] = None, ctx: Any = None,
                   base_model_dir: Optional[str | Path] = None,
                   wait_for_model: Optional[Callable[[], Any]] = None) -> dict:
    """Write every analysis file into ``out_dir``; return the summary for metrics.json.

    A base with another architecture does not raise: the structure is still written and the
    summary carries ``comparison_error``. ``wait_for_model``: called before ``model_dir``'s files are measured
    (a checkpoint still being written beside the comparison and the plots finishes first).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comparison: Optional[dict] = None
    compare_error: Optional[str] = None
    if base is not None:
        try:
            comparison = compare(base, pruned, expected_ranges=expected_ranges, target_sparsity=target_sparsity)
        except ArchitectureMismatch as e:
            compare_error = str(e)
            log.error("comparison skipped: %s", e)
    rows = comparison.pop("_rows") if comparison is not None else structure_rows(pruned)
    for r in rows:
        r["kind"] = row_kind(r["group"])
    frame = pd.DataFrame(rows, columns=CSV_COLUMNS)
    images: dict[str, Path] = {}
    if comparison is not None:
        images["sparsity"] = sparsity_bars(comparison, out / "sparsity.png", target_sparsity)
        images["module_heatmap"] = module_heatmap(comparison, out / "module_heatmap.png")

    if wait_for_model is not None:
        wait_for_model()
    model_dir = model_dir or pruned.model_dir
    base_model_dir = base_model_dir or (base.model_dir if base is not None else None)
    size = size_report(model_dir, pruned) if model_dir and Path(model_dir).exists() else None
    base_size = size_report(base_model_dir, base) if base is not None and base_model_dir and \
        Path(base_model_dir).exists() else None
    size_cmp = compare_sizes(base_size, size) if size and base_size else None
    structure = pruned.to_json()
    structure["size"] = size
    atomic_write_json(out / "model_structure.json", structure)
    files = ["model_structure.json"]
    if comparison is not None:
        comparison["size"] = size_cmp
        atomic_write_json(out / "model_comparison.json", comparison)
        files.append("model_comparison.json")
    atomic_write_text(out / "layers.csv", frame.to_csv(index=False))
    files.append("layers.csv")
    text = summary_text(pruned, comparison, size, size_cmp, compare_error, rows)
    atomic_write_text(out / "structure_summary.txt", text)
    files.append("structure_summary.txt")
    files += [Path(p).name for p in images.values()]

    summary: dict[str, Any] = {
        "dir": str(out), "files": files, "model_name": pruned.name, "format": pruned.format,
        "total_params": pruned.total_params, "layer_params": pruned.layer_params,
        "num_layers": pruned.num_layers, "embedding_params": pruned.embedding_params,
        "lm_head_params": pruned.lm_head_params, "tied_embeddings": pruned.tied_embeddings,
        "nonzero_params": pruned.nonzero_params,
    }
    if size:
        summary["size_bytes"] = size["total_bytes"]
    if compare_error:
        summary["comparison_error"] = compare_error
    if comparison is not None:
        cons = comparison["consistency"]
        summary.update({
            "original_params": comparison["total_params"]["original"],
            "reduction_ratio": comparison["total_params"]["reduction_ratio"],
            # masks keep every parameter: the share of the base's non-zero weights gone (None when not counted)
            "nonzero_reduction_ratio": comparison["total_params"].get("nonzero_sparsity"),
            "retention": comparison["total_params"]["retention"],
            "sparsity": comparison["total_params"]["sparsity"],
            "layer_sparsity": comparison["layer_params"]["sparsity"],
            "pruned_layers_mean_sparsity": cons["pruned_layers_mean_sparsity"],
            "untouched_layers": cons["untouched_layers"], "removed_layers": cons["removed_layers"],
            "modules_consistent": cons["all_modules_consistent"], "consistency_ok": cons["ok"],
            "verdicts": cons["verdicts"],
        })
        if size_cmp:
            summary["size_reduction"] = size_cmp["total_bytes_reduction"]
    if ctx is not None:
        ctx.log("analysis", summary)
        ctx.log_table("analysis/layers", frame)
        if comparison is not None:
            ctx.log_table("analysis/layer_totals", pd.DataFrame(
                [{"layer_idx": e["layer_idx"], "status": e["status"], "original": e["total"]["original"],
                  "pruned": e["total"]["pruned"], "retention": e["total"]["retention"],
                  "sparsity": e["total"]["sparsity"]} for e in comparison["layers"]]))
        for name, p in images.items():
            ctx.log_image(f"analysis/{name}", p)
        ctx.log_text("analysis/structure_summary", text)
    return summary
