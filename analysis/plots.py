"""Plots: per-layer sparsity bars with the target line, per-module sparsity heatmap, search convergence."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _save(fig, path: str | Path) -> Path:
    """Lay out, write (PNG, 120 dpi) and close ``fig``."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _effective(d: dict) -> float:
    """Structural sparsity, or the non-zero based one when weights were zeroed in place."""
    sp = d.get("sparsity") or 0.0
    nz = d.get("nonzero_sparsity")
    return max(sp, nz) if nz is not None else sp


def _without_norms(e: dict) -> dict:
    """A comparison layer entry's totals over its matrices (attention, MLP, extras), its norm vectors left out:
    they are never pruned, so counting them would pull a layer pruned at 0.25 below 0.25."""
    groups = [e[g]["total"] for g in ("attention", "mlp", "extra") if isinstance(e.get(g), dict)]
    if not groups:
        return e["total"]
    orig, kept = sum(t["original"] for t in groups), sum(t["pruned"] for t in groups)
    out: dict = {"sparsity": 1 - kept / orig if orig else 0.0}
    if all(t.get("pruned_nonzero") is not None for t in groups):
        nz = sum(t["pruned_nonzero"] for t in groups)
        ref = (sum(t["original_nonzero"] for t in groups)
               if all(t.get("original_nonzero") is not None for t in groups) else orig)
        out["nonzero_sparsity"] = max(0.0, 1 - nz / ref) if ref else None
    return out


def layer_sparsity(comparison: dict) -> dict[str, np.ndarray]:
    """The bars of :func:`sparsity_bars`: per layer, the sparsity of its matrices (norms left out), of its attention
    and of its MLP (structural, or the non-zero one where weights were zeroed in place)."""
    layers = comparison["layers"]
    return {"layer_idx": np.array([e["layer_idx"] for e in layers]),
            "layer": np.array([_effective(_without_norms(e)) for e in layers]),
            "attention": np.array([_effective(e["attention"]["total"]) if "attention" in e else 0.0 for e in layers]),
            "mlp": np.array([_effective(e["mlp"]["total"]) if "mlp" in e else 0.0 for e in layers])}


def sparsity_bars(comparison: dict, path: str | Path, target: Optional[float] = None) -> Path:
    """One bar per layer (sparsity of its matrices, norms left out), attention and MLP side by side; dashed target
    line."""
    layers = comparison["layers"]
    bars = layer_sparsity(comparison)
    idx, total = bars["layer_idx"], bars["layer"]
    attn, mlp = bars["attention"], bars["mlp"]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 4))
    w = 0.28
    ax.bar(idx - w, total, w, label="layer (without norms)", color="#4c72b0")
    ax.bar(idx, attn, w, label="attention", color="#dd8452")
    ax.bar(idx + w, mlp, w, label="MLP", color="#55a868")
    if target is not None:
        ax.axhline(target, color="red", linestyle="--", label=f"target {target:.1%}")
    gs = comparison["total_params"].get("sparsity")
    if gs is not None:
        ax.axhline(gs, color="gray", linestyle=":", label=f"whole model {gs:.1%}")
    ax.set_xlabel("layer")
    ax.set_ylabel("sparsity (1 - retention)")
    ax.set_title(f"{comparison['pruned_name']} vs {comparison['original_name']}")
    ax.set_xticks(idx)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylim(0, max(1e-3, float(max(total.max(initial=0), attn.max(initial=0), mlp.max(initial=0),
                                            target or 0))) * 1.15)
    ax.legend(fontsize=7, ncol=5, loc="upper right")
    return _save(fig, path)


def module_heatmap(comparison: dict, path: str | Path) -> Path:
    """Rows = modules (q/k/v/o, gate/up/down, extras), columns = layers, colour = sparsity."""
    layers = comparison["layers"]
    names: list[str] = []
    for e in layers:
        for group in ("attention", "mlp"):
            for m, d in e.get(group, {}).items():
                if isinstance(d, dict) and "original_shape" in d and m not in names:
                    names.append(m)
    names.sort(key=lambda m: (_MODULE_ORDER.index(m) if m in _MODULE_ORDER else 99, m))
    grid = np.full((len(names), len(layers)), np.nan)
    for j, e in enumerate(layers):
        for group in ("attention", "mlp"):
            for m, d in e.get(group, {}).items():
                if m in names and isinstance(d, dict) and "original_shape" in d:
                    grid[names.index(m), j] = 1.0 if e.get("removed") else _effective(d)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(layers) + 2), 0.45 * max(len(names), 1) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-3, float(np.nanmax(grid, initial=0))))
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(len(layers)), [str(e["layer_idx"]) for e in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title("per-module sparsity")
    fig.colorbar(im, ax=ax, label="sparsity")
    return _save(fig, path)


def convergence(curves: dict[str, list[tuple[float, float]]], path: str | Path, *, title: str = "",
                ylabel: str = "best fitness (lower is better)", xlabel: str = "fitness evaluations") -> Path:
    """Best-so-far against cost, one line per label (``{label: [(cost, best), ...]}``), as a step plot."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, points in sorted(curves.items()):
        if points:
            xs, ys = zip(*points)
            ax.step(xs, ys, where="post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    return _save(fig, path)


def study_convergence(trials: list[tuple[int, Optional[float]]], path: str | Path, *, metric: str = "objective",
                      direction: str = "minimize") -> Optional[Path]:
    """An optimisation study's progress: each trial's value (``(trial number, value)``; None = failed, drawn as
    a red x on the axis floor) and the best so far as a step line. None when no trial has a value."""
    done = [(i, v) for i, v in trials if v is not None and np.isfinite(v)]
    if not done:
        return None
    better = min if direction == "minimize" else max
    xs, best, running = [], [], None
    for i, v in sorted(done):
        running = v if running is None else better(running, v)
        xs.append(i)
        best.append(running)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter([i for i, _ in done], [v for _, v in done], s=18, alpha=0.6, label="trial")
    ax.step(xs, best, where="post", color="black", label=f"best so far ({direction})")
    failed = [i for i, v in trials if v is None or not np.isfinite(v)]
    if failed:
        floor = min(v for _, v in done) if direction == "minimize" else max(v for _, v in done)
        ax.scatter(failed, [floor] * len(failed), marker="x", color="red", label=f"failed ({len(failed)})")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pareto(df, path: str | Path, y: str = "ppl", x: str = "params_kept_pct", *, log_y: bool = True) -> Optional[Path]:
    """``y`` against ``x`` for the completed rows of a results table, one line per method (sorted by ``x``), the
    base model as a star: the trade-off view of a sweep. ``x`` falls back to ``nonzero_kept`` (non-zero
    parameters kept) for masks, whose parameter count does not move. None when there is nothing to draw."""
    if y not in df.columns or x not in df.columns:
        return None
    rows = df[df[y].notna()].copy()
    if "status" in rows.columns:
        rows = rows[rows["status"] == "completed"]
    if x == "params_kept_pct" and {"unit", "nonzero_params", "params"} <= set(rows.columns):
        base = rows.loc[rows["method"] == "base", "params"].dropna()
        masks = rows["unit"] == "sparsity"
        if len(base) and masks.any():  # masks keep every parameter: place them by the non-zero ones they keep
            rows.loc[masks, x] = 100.0 * rows.loc[masks, "nonzero_params"].astype(float) / float(base.iloc[0])
    rows = rows[rows[x].notna()]
    if rows.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, part in sorted(rows.groupby("method"), key=lambda kv: str(kv[0])):
        part = part.sort_values(x)
        if method == "base":
            ax.scatter(part[x], part[y], marker="*", s=160, color="black", zorder=3, label="base")
        else:
            ax.plot(part[x], part[y], marker="o", label=str(method))
    ax.set_xlabel("parameters kept, % of base (masks: non-zero)" if x == "params_kept_pct" else x)
    ax.set_ylabel(y)
    if log_y and (rows[y] > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def range_heatmap(df, path: str | Path, value: str = "ppl", part: str = "attn_layers") -> Optional[Path]:
    """``value`` over the start x end of a layer range (``"3-27"`` cells of the results table) for sweeps that
    vary it; other settings are averaged. None when the range does not vary or nothing was measured."""
    if value not in df.columns or part not in df.columns:
        return None
    rows = df[df[value].notna() & df[part].notna()]
    if "status" in rows.columns:
        rows = rows[rows["status"] == "completed"]
    rows = rows[rows[part].astype(str).str.fullmatch(r"\d+-\d+")]
    if rows[part].nunique() < 2:
        return None
    se = rows[part].astype(str).str.split("-", expand=True).astype(int)
    grid = rows.assign(start=se[0], end=se[1]).pivot_table(index="start", columns="end", values=value, aggfunc="mean")
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * grid.shape[1], 1.2 + 0.6 * grid.shape[0]))
    im = ax.imshow(grid.values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in grid.index])
    ax.set_xlabel(f"{part} end (exclusive)")
    ax.set_ylabel(f"{part} start")
    lo, hi = np.nanmin(grid.values), np.nanmax(grid.values)
    for (i, j), v in np.ndenumerate(grid.values):
        if not np.isnan(v):  # dark text on the light (low) end of viridis_r
            light = hi == lo or (v - lo) / (hi - lo) < 0.5
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8, color="black" if light else "white")
    fig.colorbar(im, ax=ax, label=value)
    return _save(fig, path)
