"""Baselines benchmark on SmolLM2-135M-Instruct: every method's cost and quality, one JSON line.

    .venv/bin/python tests/bench/baselines_bench.py [--methods wanda,flap] [--samples 32 --seq-len 128] [--threads 1]

Each method runs in a fresh process (peak memory is per process) built from its real option file
(``conf/pruner/<name>.yaml`` + overrides, all layers), on the same calibration tokens (Austen) and scored on the
same held-out text (BoolQ passages, 4096 tokens, seq_len 128). Per method:

- ``time_over_forward``: pruning wall time / one forward pass of the dense model over the same calibration tokens
  (micro-batches of 8, no grad), measured in the same process just before. Target for the activation-based methods
  (Wanda, FLAP, ShortGPT, SliceGPT): <= 1.5; SliceGPT's float64 PCA is also reported apart (``pca_s``).
- ``peak_over_model``: peak RSS during pruning above the process's RSS after imports (so it includes the model
  itself), over the fp32 model bytes. Target: <= 1.3. The baseline is taken after imports and the tokenised
  text; the dense reference forward and the perplexity before run in a forked child, and the peak is reset
  (``/proc/self/clear_refs``) right before pruning, so only loading's leftovers and the method count.
- parameters, non-zero parameters, perplexity before/after.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import record  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"

# name -> Hydra overrides of the prune config (layers=all is added)
METHODS: dict[str, list[str]] = {
    "magnitude": ["pruner=magnitude", "ratio=0.5"],
    "magnitude_2of4": ["pruner=magnitude", "pruner.pattern=2:4"],
    "wanda": ["pruner=wanda", "ratio=0.5"],
    "wanda_sequential": ["pruner=wanda", "ratio=0.5", "pruner.sequential=true"],
    "wanda_2of4": ["pruner=wanda", "pruner.pattern=2:4"],
    "wanda_sp": ["pruner=wanda", "pruner.pattern=structured", "ratio=0.2", "pruner.attention_ratio=0"],
    "flap": ["pruner=flap", "ratio=0.2"],
    "shortgpt": ["pruner=shortgpt", "pruner.num_layers=7"],
    "slicegpt": ["pruner=slicegpt", "pruner.sparsity=0.25"],
    "taylor": ["pruner=taylor", "ratio=0.2", "ratio_target=params", "pruner.taylor=param_first"],
}
ACTIVATION_BASED = {"wanda", "wanda_sequential", "wanda_2of4", "wanda_sp", "flap", "shortgpt", "slicegpt"}


def _status(key: str) -> int:
    """A /proc/self/status value in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _reference(model, batch, ppl_tokens, conn) -> None:
    import torch

    from analysis.perplexity import perplexity

    with torch.no_grad():
        model(input_ids=batch[:1, :8])  # warm-up
        t0 = time.perf_counter()
        for j in range(0, batch.shape[0], 8):
            model(input_ids=batch[j:j + 8], use_cache=False)
        forward_s = time.perf_counter() - t0
    conn.send((forward_s, perplexity(model, ppl_tokens, 128, 4, progress=False)["value"]))


def one(method: str, samples: int, seq_len: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import run  # noqa: F401  (registers the schema and resolvers)
    from analysis.perplexity import perplexity
    from core.data.text import TextSpec, calibration_batch, eval_tokens, load_documents
    from core.models.llama import count_nonzero, count_params
    from core.models.load import cached_gguf_dir, load_model
    from recipes._launch import set_mmap_threshold
    from recipes._common import build, resolve_model
    from transformers import AutoTokenizer

    set_mmap_threshold(1.0)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*METHODS[method], "layers=all", "paths.output_dir=/tmp"])
    pruner = build(cfg.pruner, "pruner")
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    ref = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(str(cached_gguf_dir(ref, cache)))
    batch = calibration_batch(tok, load_documents(TextSpec("austen"), cache_dir=cache), samples, seq_len, 0)
    ppl_tokens = eval_tokens(tok, load_documents(TextSpec("boolq")), 4096)
    gc.collect()
    baseline = _status("VmRSS")  # after imports and data: what the method adds, model included, is measured

    model, _ = load_model(ref, cache_dir=cache)
    params0, nonzero0 = count_params(model), count_nonzero(model)
    model_bytes = params0 * 4
    # The dense reference (one forward over the calibration tokens) and the perplexity before, in a forked
    # child: their logits never count towards this process's peak.
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_reference, args=(model, batch, ppl_tokens, child))
    proc.start()
    forward_s, ppl_before = parent.recv()
    proc.join()

    gc.collect()
    reset = _reset_peak()
    t0 = time.perf_counter()
    res = pruner(model, batch if pruner.needs_calibration else None)
    prune_s = time.perf_counter() - t0
    peak = _status("VmHWM") - baseline
    ppl_after = perplexity(model, ppl_tokens, 128, 4, progress=False)["value"]
    nonzero1 = count_nonzero(model)
    out = {
        "prune_s": round(prune_s, 3), "forward_s": round(forward_s, 3),
        "time_over_forward": round(prune_s / forward_s, 3),
        "peak_above_baseline_mib": round(peak / 2**20, 1), "model_mib_fp32": round(model_bytes / 2**20, 1),
        "peak_over_model": round(peak / model_bytes, 3) if reset else None,
        "params_before": params0, "params_after": count_params(model),
        "nonzero_kept_pct": round(100 * nonzero1 / nonzero0, 2),
        "compression": res.compression,
        "ppl_before": round(ppl_before, 3), "ppl_after": round(ppl_after, 3),
    }
    if "pca_s" in res.timings:
        out["pca_s"] = round(res.timings["pca_s"], 3)
        out["time_over_forward_without_pca"] = round((prune_s - res.timings["pca_s"]) / forward_s, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.samples, args.seq_len, args.threads)))
        return
    results, errors = {}, {}
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"unknown method {method}; known: {', '.join(METHODS)}")
        proc = subprocess.run([sys.executable, __file__, "--one", method, "--samples", str(args.samples),
                               "--seq-len", str(args.seq_len), "--threads", str(args.threads)],
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            errors[method] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            continue
        results[method] = json.loads(lines[-1])
    act = [r for m, r in results.items() if m in ACTIVATION_BASED]
    record({
        "bench": "baselines", "model": "SmolLM2-135M-Instruct", "threads": args.threads,
        "calibration": {"text": "austen", "samples": args.samples, "seq_len": args.seq_len},
        "ppl_protocol": {"text": "boolq validation passages", "seq_len": 128, "tokens": 4096},
        "targets": {"time_over_forward": 1.5, "peak_over_model": 1.3},
        "activation_based_max_time_over_forward": max((r.get("time_over_forward_without_pca", r["time_over_forward"])
                                                       for r in act), default=None),
        "activation_based_max_peak_over_model": max((r["peak_over_model"] or 0 for r in act), default=None),
        "methods": results, "errors": errors,
    }, __file__)


if __name__ == "__main__":
    main()
