"""Compare a compressed model's structure with its base: per layer and module, retention and sparsity.

retention = kept / original params, sparsity = 1 - retention (structural: from shapes).
When non-zero counts exist, ``nonzero_sparsity`` = 1 - non-zero kept / original params measures
unstructured sparsity too (a Wanda / magnitude model keeps its shapes but not its values); the
reference is the base's own non-zero count when it was counted.
The consistency report does the checks seed 001 describes in prose: same retention for a module
across pruned layers, untouched layers, pruned layers inside the configured ranges, output dims
shrinking while the hidden dim stays.
"""

from __future__ import annotations

from typing import Any, Optional

from analysis.structure import LayerStructure, ModelStructure, ModuleInfo

GROUPS = ("attention", "mlp", "norm", "extra")
# which dim of a module's weight is the hidden size (must not change under width pruning)
_HIDDEN_DIM = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 0, "gate_proj": 1, "up_proj": 1, "down_proj": 0}


class ArchitectureMismatch(ValueError):
    """The base model is not the model the compressed one came from."""


def ratio(original: int, pruned: int, orig_nz: Optional[int] = None, pruned_nz: Optional[int] = None) -> dict:
    """The seed's {original, pruned, reduced, reduction_ratio} plus retention / sparsity."""
    out: dict[str, Any] = {"original": original, "pruned": pruned, "reduced": original - pruned,
                           "reduction_ratio": (original - pruned) / original if original else None}
    out["retention"] = pruned / original if original else None
    out["sparsity"] = 1 - out["retention"] if original else None
    if pruned_nz is not None:
        # share of the base's non-zero weights that are gone (exact zeros the base already had, e.g.
        # from quantisation, do not count); against the dense count when the base was not counted
        ref = orig_nz if orig_nz is not None else original
        out["pruned_nonzero"] = pruned_nz
        out["nonzero_sparsity"] = max(0.0, 1 - pruned_nz / ref) if ref else None
    if orig_nz is not None:
        out["original_nonzero"] = orig_nz
    return out


def check_compatible(base: ModelStructure, pruned: ModelStructure) -> None:
    """Raise ArchitectureMismatch with a readable reason when the pair cannot be compared."""
    be = base.tensors[base.embedding[0]].shape if base.embedding else None
    pe = pruned.tensors[pruned.embedding[0]].shape if pruned.embedding else None
    if be and pe and be[0] != pe[0]:
        raise ArchitectureMismatch(f"vocabularies differ: base {base.name} has {be[0]} tokens, "
                                   f"{pruned.name} has {pe[0]}: is base= the model it was compressed from?")
    bkeys = {k for layer in base.layers for k in layer.modules}
    pkeys = {k for layer in pruned.layers for k in layer.modules}
    if pkeys and bkeys and not (bkeys & pkeys):
        raise ArchitectureMismatch(f"no module in common between {base.name} ({sorted(bkeys)[:4]}) and "
                                   f"{pruned.name} ({sorted(pkeys)[:4]}): different architectures")
    if len(pruned.layers) > len(base.layers):
        raise ArchitectureMismatch(f"{pruned.name} has {len(pruned.layers)} layers, more than base "
                                   f"{base.name} ({len(base.layers)}): not compressed from it")


def align_layers(base: ModelStructure, pruned: ModelStructure) -> tuple[list[Optional[LayerStructure]], list[str]]:
    """For each base layer, the pruned layer it became (None = removed), plus notes on how."""
    nb = len(base.layers)
    if len(pruned.layers) == nb:
        return list(pruned.layers), []
    removed = pruned.config.get("removed_layers") or pruned.meta.get("removed_layers")
    if removed is not None and len(pruned.layers) + len(removed) == nb:
        kept = [i for i in range(nb) if i not in set(int(r) for r in removed)]
        out: list[Optional[LayerStructure]] = [None] * nb
        for j, i in enumerate(kept):
            out[i] = pruned.layers[j]
        return out, [f"layers {sorted(removed)} removed (from removed_layers); remaining layers renumbered"]
    kept, why = match_layers_by_content(base, pruned)
    if kept is not None:
        out = [None] * nb
        for j, i in enumerate(kept):
            out[i] = pruned.layers[j]
        gone = [i for i in range(nb) if out[i] is None]
        return out, [f"layers {gone} removed (not recorded: found by matching each remaining layer's weights with "
                     f"the base's, layer {len(kept) - 1} is base layer {kept[-1]}); remaining layers renumbered"]
    out = list(pruned.layers) + [None] * (nb - len(pruned.layers))
    return out, [f"{nb - len(pruned.layers)} of {nb} layers removed and renumbered, but which ones is not "
                 f"recorded and the weights do not tell ({why}): compared assuming the last ones were removed "
                 "(record removed_layers to fix)"]


# a layer copied unchanged differs from its base layer by at most a dtype rounding (bfloat16: 2^-8 relative)
CONTENT_TOLERANCE = 1e-2


def _layer_samples(s: ModelStructure, layer: LayerStructure) -> Optional[dict[str, tuple[tuple, Any]]]:
    """Per tensor of the layer, by its name inside the layer: (shape, sampled values); None when unknown."""
    if s.samples is None or not layer.modules:
        return None
    out: dict[str, tuple[tuple, Any]] = {}
    for mod in layer.modules.values():
        for tname in mod.tensors:
            values = s.samples.get(tname)
            if values is None:
                return None
            rest = tname.split(f".{layer.idx}.", 1)[-1]
            out[rest] = (tuple(s.tensors[tname].shape), values)
    return out


def _same_content(a: dict[str, tuple[tuple, Any]], b: dict[str, tuple[tuple, Any]]) -> bool:
    """Same tensors, same shapes, sampled values equal within :data:`CONTENT_TOLERANCE` of the base's scale."""
    if a.keys() != b.keys():
        return False
    for k, (shape, va) in a.items():
        shape_b, vb = b[k]
        if shape != shape_b or va.shape != vb.shape:
            return False
        if va.numel() == 0:
            continue
        scale = float(vb.abs().max())
        if float((va - vb).abs().max()) > CONTENT_TOLERANCE * max(scale, 1e-12):
            return False
    return True


def match_layers_by_content(base: ModelStructure, pruned: ModelStructure) -> tuple[Optional[list[int]], str]:
    """For a model with fewer layers and no record of which went (ShortGPT's output saved with a shortened
    config.json): the base layer each remaining layer is a copy of, found by comparing a few sampled values of
    every tensor (``ModelStructure.samples``). Accepted only when each remaining layer matches exactly one base
    layer and the matches keep the layers' order; else (None, why)."""
    if pruned.samples is None or base.samples is None:
        return None, "the weights' values were not read"
    theirs = [(bl.idx, _layer_samples(base, bl)) for bl in base.layers]
    kept: list[int] = []
    for layer in pruned.layers:
        mine = _layer_samples(pruned, layer)
        if mine is None:
            return None, f"no values for layer {layer.idx}"
        hits = [i for i, t in theirs if t is not None and _same_content(mine, t)]
        if len(hits) != 1:
            return None, (f"layer {layer.idx} matches no base layer" if not hits else
                          f"layer {layer.idx} matches base layers {hits}")
        if kept and hits[0] <= kept[-1]:
            return None, f"layer {layer.idx} matches base layer {hits[0]}, out of order"
        kept.append(hits[0])
    return kept, ""


def _module_entry(bm: Optional[ModuleInfo], pm: Optional[ModuleInfo]) -> dict:
    e = ratio(bm.params if bm else 0, pm.params if pm else 0, bm.nonzero if bm else None,
              pm.nonzero if pm else None)
    e["original_shape"] = bm.shape if bm else None
    e["pruned_shape"] = pm.shape if pm else None
    return e


def _layer_status(bl: LayerStructure, pl: Optional[LayerStructure], mods: dict[str, dict]) -> str:
    if pl is None or pl.removed:
        return "removed"
    if pl.is_zero:
        return "zeroed"
    if any(m["original_shape"] != m["pruned_shape"] for m in mods.values()):
        return "pruned"
    if any(_zeroed_in_place(m) for m in mods.values()):
        return "sparsified"
    return "untouched"


def compare(base: ModelStructure, pruned: ModelStructure, *, expected_ranges: Optional[dict] = None,
            target_sparsity: Optional[float] = None) -> dict:
    """model_comparison.json: totals, per-layer per-module ratios, the consistency report."""
    check_compatible(base, pruned)
    aligned, notes = align_layers(base, pruned)
    layers: list[dict] = []
    rows: list[dict] = []
    for bl, pl in zip(base.layers, aligned):
        entry: dict[str, Any] = {"layer_idx": bl.idx, "pruned_layer_idx": pl.idx if pl is not None else None}
        entry["total"] = ratio(bl.params(), pl.params() if pl else 0, bl.nonzero(), pl.nonzero() if pl else 0)
        mods: dict[str, dict] = {}
        for group in GROUPS:
            bmods, pmods = bl.group(group), (pl.group(group) if pl else {})
            if not bmods and not pmods:
                continue
            g: dict[str, Any] = {"total": ratio(bl.params(group), pl.params(group) if pl else 0,
                                                bl.nonzero(group), pl.nonzero(group) if pl else 0)}
            for mname in list(bmods) + [m for m in pmods if m not in bmods]:
                g[mname] = mods[f"{group}.{mname}"] = _module_entry(bmods.get(mname), pmods.get(mname))
            if group == "attention":
                g["num_heads"] = {"original": bl.num_heads, "pruned": pl.num_heads if pl else 0}
                g["num_kv_heads"] = {"original": bl.num_kv_heads, "pruned": pl.num_kv_heads if pl else 0}
            if group == "mlp":
                g["intermediate_size"] = {"original": bl.intermediate_size,
                                          "pruned": pl.intermediate_size if pl else 0}
            entry[group] = g
        entry["status"] = _layer_status(bl, pl, mods)
        entry["removed"] = entry["status"] == "removed"
        entry["is_zero_layer"] = entry["status"] in ("removed", "zeroed")
        layers.append(entry)
        for key, m in mods.items():
            group, mname = key.split(".", 1)
            rows.append({"layer_idx": bl.idx, "group": group, "module": mname,
                         "original_shape": _fmt_shape(m["original_shape"]), "pruned_shape": _fmt_shape(m["pruned_shape"]),
                         "original_params": m["original"], "pruned_params": m["pruned"],
                         "retention": m["retention"], "sparsity": m["sparsity"],
                         "pruned_nonzero": m.get("pruned_nonzero"), "nonzero_sparsity": m.get("nonzero_sparsity"),
                         "layer_status": entry["status"]})
    out: dict[str, Any] = {
        "original_name": base.name,
        "pruned_name": pruned.name,
        "total_params": ratio(base.total_params, pruned.total_params, base.nonzero_params, pruned.nonzero_params),
        "layer_params": ratio(base.layer_params, pruned.layer_params),
        "embedding_params": ratio(base.embedding_params, pruned.embedding_params),
        "lm_head_params": ratio(base.lm_head_params, pruned.lm_head_params),
        "tied_embeddings": {"original": base.tied_embeddings, "pruned": pruned.tied_embeddings},
        "num_layers": {"original": base.num_layers, "pruned": pruned.num_layers},
        "layers": layers,
        "alignment_notes": notes,
    }
    out["consistency"] = consistency_report(layers, expected_ranges=expected_ranges, target_sparsity=target_sparsity,
                                            global_sparsity=out["total_params"]["sparsity"])
    out["_rows"] = rows  # layers.csv rows; popped before writing the JSON
    return out


def _fmt_shape(shape: Optional[list[int]]) -> str:
    return " x ".join(str(d) for d in shape) if shape else "-"


def _zeroed_in_place(m: dict) -> bool:
    """Same shape, fewer non-zeros than the base. Without base counts, compare with the dense count,
    tolerating the 0.1% of exact zeros a trained / randomly initialised matrix can hold (padding rows)."""
    nz = m.get("pruned_nonzero")
    if nz is None or m["original_shape"] != m["pruned_shape"]:
        return False
    if m.get("original_nonzero") is not None:
        return nz < m["original_nonzero"]
    return nz < m["original"] * 0.999


def _changed(m: dict) -> bool:
    return m["original_shape"] != m["pruned_shape"] or _zeroed_in_place(m)


def consistency_report(layers: list[dict], *, expected_ranges: Optional[dict] = None,
                       target_sparsity: Optional[float] = None, global_sparsity: Optional[float] = None) -> dict:
    """Which modules share a retention across pruned layers, untouched layers, range and shape checks."""
    report: dict[str, Any] = {}
    per_module: dict[str, dict[str, list[int]]] = {}
    changed_layers: dict[str, set[int]] = {"attention": set(), "mlp": set()}
    shape_problems: list[str] = []
    for e in layers:
        for group in ("attention", "mlp"):
            if e["status"] == "removed":
                changed_layers[group].add(e["layer_idx"])
                continue
            for mname, m in e.get(group, {}).items():
                if not isinstance(m, dict) or "original_shape" not in m:
                    continue
                if _changed(m):
                    changed_layers[group].add(e["layer_idx"])
                    sp = m.get("nonzero_sparsity") if m["original_shape"] == m["pruned_shape"] else m["sparsity"]
                    per_module.setdefault(f"{group}.{mname}", {}).setdefault(
                        f"{1 - sp:.4f}" if sp is not None else "n/a", []).append(e["layer_idx"])
                hd = _HIDDEN_DIM.get(mname)
                os_, ps = m["original_shape"], m["pruned_shape"]
                if hd is not None and os_ and ps and len(os_) == len(ps) == 2 and os_[hd] != ps[hd]:
                    shape_problems.append(f"layer {e['layer_idx']} {mname}: hidden dim {os_[hd]} -> {ps[hd]}")
    report["modules"] = {
        k: {"consistent": len(v) == 1, "retention": float(next(iter(v))) if len(v) == 1 and "n/a" not in v else None,
            "retention_by_layers": v}
        for k, v in sorted(per_module.items())}
    report["all_modules_consistent"] = all(v["consistent"] for v in report["modules"].values())
    status = {e["layer_idx"]: e["status"] for e in layers}
    report["untouched_layers"] = [i for i, s in status.items() if s == "untouched"]
    report["pruned_layers"] = {g: sorted(v) for g, v in changed_layers.items()}
    report["removed_layers"] = [i for i, s in status.items() if s == "removed"]
    report["zeroed_layers"] = [i for i, s in status.items() if s == "zeroed"]
    report["hidden_dim_changes"] = shape_problems  # width pruning keeps the hidden size; SliceGPT does not
    verdicts: list[str] = []
    if expected_ranges:
        report["ranges"] = {}
        for group, rng in expected_ranges.items():
            if rng is None or group not in changed_layers:
                continue
            start, end = int(rng[0]), int(rng[1])
            expected = set(range(start, end))
            actual = changed_layers[group]
            outside, untouched_inside = sorted(actual - expected), sorted(expected - actual)
            ok = not outside and not untouched_inside
            report["ranges"][group] = {"expected": [start, end], "pruned_outside_range": outside,
                                       "untouched_inside_range": untouched_inside, "ok": ok}
            if outside:
                verdicts.append(f"{group}: layers {outside} changed outside the configured range [{start}, {end})")
            if untouched_inside:
                verdicts.append(f"{group}: layers {untouched_inside} inside [{start}, {end}) were left untouched")
    pruned_sp = [e["total"]["sparsity"] for e in layers if e["status"] in ("pruned", "removed", "zeroed")]
    pruned_nz = [e["total"].get("nonzero_sparsity") for e in layers if e["status"] == "sparsified"]
    vals = [v for v in pruned_sp + pruned_nz if v is not None]
    report["pruned_layers_mean_sparsity"] = sum(vals) / len(vals) if vals else 0.0
    report["global_sparsity"] = global_sparsity
    if target_sparsity is not None:
        report["target_sparsity"] = target_sparsity
        report["target_gap"] = report["pruned_layers_mean_sparsity"] - target_sparsity
    inconsistent = [k for k, v in report["modules"].items() if not v["consistent"]]
    if inconsistent:
        verdicts.append(f"modules with differing retention across pruned layers: {inconsistent}")
    if shape_problems:
        verdicts.append(f"{len(shape_problems)} module(s) changed the hidden dim (expected only for SliceGPT)")
    report["verdicts"] = verdicts
    report["ok"] = not any("outside" in v for v in verdicts)
    return report
