"""Size report: bytes on disk per file vs parameter bytes, and why they differ.

Answers seed 000's question "why didn't the file shrink as much as the parameters?": the
directory also holds tokenizer and config files whose size does not change with pruning, the
weight file has a header / pickle overhead, and a dtype change (fp16 base saved as fp32) doubles
the bytes per parameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from analysis.structure import ModelStructure, loader_weight_files

_TOKENIZER = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "spiece", "sentencepiece")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
MB = 1024 * 1024


def _category(p: Path) -> str:
    n = p.name.lower()
    if n.endswith(_WEIGHTS):
        return "weights"
    if n.startswith(_TOKENIZER) or n.endswith(".model") or n.endswith(".tiktoken"):
        return "tokenizer"
    if n.endswith(".py"):
        return "code"
    if n.endswith(".json"):
        return "config"
    return "other"


def size_report(path: str | Path, structure: Optional[ModelStructure] = None) -> dict:
    """Per-file bytes of a model (dir or single file) and its parameter bytes at fp32/fp16/bf16."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        # the analysis/ output and eval results written beside a model are not part of it
        files = sorted(p for p in path.rglob("*") if p.is_file() and "analysis" not in p.relative_to(path).parts
                       and not p.name.startswith("."))
    entries = [{"file": str(p.relative_to(path)) if path.is_dir() else p.name, "bytes": p.stat().st_size,
                "category": _category(p)} for p in files]
    # only the weight files the loader reads are the model: an HF download's original/consolidated.00.pth (or a
    # pytorch_model.bin beside the safetensors) is listed as "unread" and not counted in the total
    used = loader_weight_files(path) if path.is_dir() else None
    if used is not None:
        used_set = {p.resolve() for p in used}
        for e, p in zip(entries, files):
            if e["category"] == "weights" and p.resolve() not in used_set:
                e["category"] = "unread"
    by_cat: dict[str, int] = {}
    for e in entries:
        by_cat[e["category"]] = by_cat.get(e["category"], 0) + e["bytes"]
    unread = by_cat.pop("unread", 0)
    total = sum(by_cat.values())
    out: dict[str, Any] = {"path": str(path), "files": entries, "bytes_by_category": by_cat, "total_bytes": total,
                           "unread_weight_bytes": unread}
    if structure is None:
        return out
    n = structure.total_params
    stored = structure.param_bytes
    weights = by_cat.get("weights", 0)
    out["params"] = n
    out["param_bytes"] = {"fp32": 4 * n, "fp16": 2 * n, "bf16": 2 * n, "stored": stored}
    out["stored_dtypes"] = structure.dtypes
    out["nonzero_params"] = structure.nonzero_params
    out["weight_file_overhead_bytes"] = weights - stored
    expl: list[str] = []
    dts = structure.dtypes
    main = max(dts, key=dts.get) if dts else "?"
    expl.append(f"{n:,} parameters stored mostly as {main}: {stored / MB:.2f} MiB of parameter bytes "
                f"(fp32 {4 * n / MB:.2f} MiB, fp16/bf16 {2 * n / MB:.2f} MiB)")
    if weights:
        oh = weights - stored
        kind = "safetensors header" if any(e["file"].endswith(".safetensors") for e in entries) else \
            "pickle overhead (and any tokenizer / objects pickled with the model)"
        expl.append(f"weight files {weights / MB:.2f} MiB = parameter bytes + {oh / MB:.3f} MiB {kind}"
                    f" ({oh / weights:.1%} of the weight files)" if oh >= 0 else
                    f"weight files {weights / MB:.2f} MiB are smaller than the parameter bytes: some tensors are "
                    "shared or stored elsewhere (e.g. tied weights saved once)")
    others = total - weights
    if others:
        expl.append(f"non-weight files {others / MB:.2f} MiB ({others / total:.1%} of the total): "
                    + ", ".join(f"{c} {b / MB:.2f} MiB" for c, b in sorted(by_cat.items()) if c != "weights")
                    + " — these do not shrink when the model is pruned")
    if unread:
        expl.append(f"not counted: {unread / MB:.2f} MiB of weight files the loader does not read ("
                    + ", ".join(e["file"] for e in entries if e["category"] == "unread") + ")")
    out["explanation"] = expl
    return out


def compare_sizes(base: dict, pruned: dict) -> dict:
    """Reductions of params, stored parameter bytes, weight files and the whole dir, and why they differ."""
    def red(a: Optional[int], b: Optional[int]) -> Optional[float]:
        return (a - b) / a if a and b is not None else None

    out: dict[str, Any] = {
        "params_reduction": red(base.get("params"), pruned.get("params")),
        "param_bytes_reduction": red(base.get("param_bytes", {}).get("stored"), pruned.get("param_bytes", {}).get("stored")),
        "weight_files_reduction": red(base["bytes_by_category"].get("weights"), pruned["bytes_by_category"].get("weights")),
        "total_bytes_reduction": red(base["total_bytes"], pruned["total_bytes"]),
        "original_total_bytes": base["total_bytes"], "pruned_total_bytes": pruned["total_bytes"],
    }
    expl: list[str] = []
    pr, tr = out["params_reduction"], out["total_bytes_reduction"]
    if pr is not None and tr is not None:
        expl.append(f"parameters fell by {pr:.2%}, bytes on disk by {tr:.2%}")
    bdt, pdt = base.get("stored_dtypes", {}), pruned.get("stored_dtypes", {})
    if bdt and pdt:
        bmain, pmain = max(bdt, key=bdt.get), max(pdt, key=pdt.get)
        if bmain != pmain:
            expl.append(f"dtype mismatch: base stored as {bmain}, compressed as {pmain}; bytes per parameter "
                        "differ, so file sizes are not comparable to parameter counts")
    if out["param_bytes_reduction"] is not None and out["weight_files_reduction"] is not None and \
            abs(out["param_bytes_reduction"] - out["weight_files_reduction"]) > 0.005:
        expl.append(f"weight files shrank by {out['weight_files_reduction']:.2%} vs parameter bytes "
                    f"{out['param_bytes_reduction']:.2%}: serialization overhead or tensors stored twice")
    fixed = pruned["total_bytes"] - pruned["bytes_by_category"].get("weights", 0)
    if fixed and pruned["total_bytes"]:
        expl.append(f"{fixed / MB:.2f} MiB of tokenizer/config/code files do not shrink with pruning "
                    f"({fixed / pruned['total_bytes']:.1%} of the compressed model's bytes)")
    nz, n = pruned.get("nonzero_params"), pruned.get("params") or 0
    bnz, bn = base.get("nonzero_params"), base.get("params") or 0
    zero_frac = 1 - nz / n if nz is not None and n else 0.0
    base_zero_frac = 1 - bnz / bn if bnz is not None and bn else 0.0
    if zero_frac > base_zero_frac + 0.001:  # exact zeros beyond those the base already had (quantisation)
        expl.append(f"{n - nz:,} zero weights ({zero_frac:.2%}, base {base_zero_frac:.2%}): unstructured "
                    "sparsity still takes its bytes in a dense file")
    out["explanation"] = expl
    return out
