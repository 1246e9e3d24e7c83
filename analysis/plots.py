"""Plots: per-layer sparsity bars with the target line, per-module sparsity heatmap, search convergence."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _effective(d: dict) -> float:
    """Structural sparsity, or the non-zero based one when weights were zeroed in place."""
    sp = d.get("sparsity") or 0.0
    nz = d.get("nonzero_sparsity")
    return max(sp, nz) if nz is not None else sp


def sparsity_bars(comparison: dict, path: str | Path, target: Optional[float] = None) -> Path:
    """One bar per layer (sparsity of its params), attention and MLP side by side; dashed target line."""
    layers = comparison["layers"]
    idx = np.array([e["layer_idx"] for e in layers])
    total = np.array([_effective(e["total"]) for e in layers])
    attn = np.array([_effective(e["attention"]["total"]) if "attention" in e else 0.0 for e in layers])
    mlp = np.array([_effective(e["mlp"]["total"]) if "mlp" in e else 0.0 for e in layers])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) + 2), 4))
    w = 0.28
    ax.bar(idx - w, total, w, label="layer", color="#4c72b0")
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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
