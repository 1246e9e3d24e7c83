"""CPU/GPU agreement: the same pruner at the same seed on SmolLM2, once on the CPU and once on CUDA, should choose
the same channels and give close logits.

    python tests/gpu/agreement.py [--out results.jsonl] [--methods taylor,obs] [--dry-run]

For each method: the model loaded in float32 twice (CPU, CUDA; TF32 off, no autocast), the same calibration
tokens, the pruner built from its conf/pruner/ options; then, per pruned layer, the kept MLP channels (gate_proj
rows, found by matching them against the dense rows) and attention rows (q_proj) compared, and the logits of both
pruned models on the same held-out ids. One JSON line per method. ``--dry-run`` (or PRUNELAB_GPU_DRYRUN=1): only
builds the pruners and the calibration (no CUDA needed), to check the script on a CPU machine.

Thresholds: channels identical in at least 99% of the kept sets (a near-tie may fall either way under a different
summation order), logits within 1e-2 relative (max abs difference over the max abs logit) where the channels agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

OVERRIDES = {
    "taylor": ["pruner=taylor", "ratio=0.25", "data.num_samples=8", "data.seq_len=64"],
    "obs": ["pruner=obs", "ratio=0.15", "pruner.autocast=null", "pruner.progress=false", "pruner.guard=false"],
}
CHANNELS_MIN = 0.99
LOGITS_RTOL = 1e-2


def kept_rows(dense, pruned) -> list[int]:
    """Which rows of ``dense`` [out, in] the rows of ``pruned`` are (pruning keeps rows unchanged, in order)."""
    import torch

    d, p = dense.float().cpu(), pruned.float().cpu()
    if d.shape == p.shape:
        return list(range(d.shape[0]))
    dist = torch.cdist(p[:, :64], d[:, :64])
    return dist.argmin(dim=1).tolist()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--methods", default="taylor,obs")
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("PRUNELAB_GPU_DRYRUN") == "1")
    ap.add_argument("--device", default="cuda", help="the second device (cpu: a self-check of this script)")
    a = ap.parse_args()

    import torch

    from conftest import CACHE_DIR, compose
    from core.models.load import load_model
    from core.models.ref import ModelRef
    from recipes._common import build

    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run and a.device != "cpu":
        print("agreement: no CUDA device (use --dry-run to check the script)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 8000, (32, 128), generator=g)
    probe = torch.randint(0, 8000, (2, 64), generator=g)
    failures = 0
    for method in a.methods.split(","):
        t0 = time.perf_counter()
        cfg = compose([*OVERRIDES[method], "model=smollm2", "model.dtype=float32"], Path("/tmp/prunelab-agreement"))
        rows = int(cfg.data.num_samples) if method == "taylor" else 32
        batch = calib[:rows, : int(cfg.data.seq_len)] if method == "taylor" else calib
        pruner = build(cfg.pruner, "pruner")
        line = {"method": method, "calibration": list(batch.shape), "dry_run": a.dry_run}
        if a.dry_run:
            line["pruner"] = type(pruner).__name__
            print(json.dumps(line), flush=True)
            continue
        ref = ModelRef(name="smollm2", kind="gguf", gguf_package=cfg.model.gguf_package, gguf_file=cfg.model.gguf_file,
                       dtype="float32", device="cpu")
        dense, _ = load_model(ref, cache_dir=str(CACHE_DIR))
        dense_gate = [l.mlp.gate_proj.weight.detach().clone() for l in dense.model.layers]
        dense_q = [l.self_attn.q_proj.weight.detach().clone() for l in dense.model.layers]
        models = {}
        for key, device in (("cpu", "cpu"), ("cuda", a.device)):
            model, _ = load_model(ref, cache_dir=str(CACHE_DIR)) if key == "cpu" else (dense.to(device), None)
            torch.manual_seed(int(cfg.seed))
            build(cfg.pruner, "pruner")(model, batch.to(device))
            models[key] = model
        same, total, diffs = 0, 0, []
        for i, (lc, lg) in enumerate(zip(models["cpu"].model.layers, models["cuda"].model.layers)):
            for name, dense_w, get in (("mlp", dense_gate[i], lambda l: l.mlp.gate_proj.weight),
                                       ("attention", dense_q[i], lambda l: l.self_attn.q_proj.weight)):
                kc, kg = kept_rows(dense_w, get(lc)), kept_rows(dense_w, get(lg))
                total += 1
                if kc == kg:
                    same += 1
                else:
                    diffs.append({"layer": i, "part": name, "cpu_kept": len(kc), "cuda_kept": len(kg),
                                  "overlap": len(set(kc) & set(kg)) / max(1, len(set(kc) | set(kg)))})
        with torch.no_grad():
            lc = models["cpu"](probe).logits.float()
            lg = models["cuda"](probe.to(a.device)).logits.float().cpu()
        rel = float((lc - lg).abs().max() / lc.abs().max()) if lc.shape == lg.shape else None
        share = same / total
        ok = share >= CHANNELS_MIN and (rel is not None and (rel <= LOGITS_RTOL or share < 1.0))
        line.update({"kept_sets_identical": round(share, 4), "kept_sets": total, "differences": diffs[:10],
                     "logits_max_rel_diff": rel, "ok": ok, "seconds": round(time.perf_counter() - t0, 1),
                     "device": a.device, "device_name": torch.cuda.get_device_name(0) if cuda else None})
        failures += not ok
        print(json.dumps(line), flush=True)
        if a.out:
            with open(a.out, "a", encoding="utf-8") as f:
                f.write(json.dumps({"label": f"agreement_{method}", **line}) + "\n")
        del models, dense
        if cuda:
            torch.cuda.empty_cache()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
