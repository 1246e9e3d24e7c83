"""Pruning benchmark on SmolLM2-135M-Instruct: one JSON line.

    .venv/bin/python tests/bench/prune_bench.py [--threads 1] [--taylor param_first] [--samples 10 --seq-len 64]

Configuration of the foundation issue: ratio 0.25, attention and MLP layers [3, 27), 10 x 64 calibration
tokens, Taylor param_first. Reports the pruning wall time next to the floor it is compared with, one plain
forward+backward over the same calibration tokens (all parameters requiring grad, as a training step would),
measured in the same process tree (in a forked child, so its gradients do not count towards our peak RSS),
peak RSS of this process, parameters and perplexity before/after (BoolQ passages, 4096 tokens, seq_len 128).

The README's quality table is rows of this script with ``--holdout`` (calibration from the first 90% of Austen,
perplexity also on the last 10%), e.g. the default: ``--holdout --taylor param_second --samples 16 --seq-len 128``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from typing import Optional
from pathlib import Path

from _common import record  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"


def _reference(model, batch, conn) -> None:
    import torch

    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model(input_ids=batch[:1, :8])  # warm-up
    t0 = time.perf_counter()
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    conn.send(time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--taylor", default="param_first")
    ap.add_argument("--importance", default="taylor")
    ap.add_argument("--global-ranking", action="store_true")
    ap.add_argument("--group-reduction", default="sum")
    ap.add_argument("--iterative-steps", type=int, default=1)
    ap.add_argument("--holdout", action="store_true",
                    help="calibrate on the first 90%% of Austen's paragraphs and also report perplexity on the "
                         "last 10%% (the README's quality table)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--mmap-threshold-mb", type=float, default=1.0,
                    help="as runtime.mmap_threshold_mb in run.py; 0 = glibc default")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from analysis.perplexity import perplexity
    from core.data.text import TextSpec, calibration_batch, eval_tokens, load_documents
    from core.models.llama import count_params
    from core.models.load import load_model
    from recipes._launch import set_mmap_threshold
    from pruning.llm_pruner import LLMPruner
    from recipes._common import resolve_model

    mmap_applied = set_mmap_threshold(args.mmap_threshold_mb)
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    model, tok = load_model(resolve_model("smollm2"), cache_dir=cache)
    austen = load_documents(TextSpec("austen"), cache_dir=cache)
    calib_src = austen.split("calibration") if args.holdout else austen
    batch = calibration_batch(tok, calib_src, args.samples, args.seq_len, 0)
    ppl_tokens = eval_tokens(tok, load_documents(TextSpec("boolq")), args.ppl_tokens)
    holdout = eval_tokens(tok, austen.split("evaluation"), args.ppl_tokens) if args.holdout else None

    def ppls() -> tuple[float, Optional[float]]:
        b = perplexity(model, ppl_tokens, 128, 4, progress=False)["value"]
        return b, perplexity(model, holdout, 128, 4, progress=False)["value"] if holdout is not None else None

    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_reference, args=(model, batch, child))
    proc.start()
    fwd_bwd = parent.recv()
    proc.join()

    ppl_before, holdout_before = ppls()
    params_before = count_params(model)
    pruner = LLMPruner(ratio=0.25, importance=args.importance, taylor=args.taylor,
                       global_ranking=args.global_ranking, group_reduction=args.group_reduction,
                       iterative_steps=args.iterative_steps, attention_layers=(3, 27), mlp_layers=(3, 27),
                       progress=False)
    t0 = time.perf_counter()
    res = pruner(model, batch)
    prune_s = time.perf_counter() - t0
    peak_prune = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    ppl_after, holdout_after = ppls()
    record({
        "bench": "prune", "model": "SmolLM2-135M-Instruct", "threads": args.threads,
        "config": {"importance": args.importance, "taylor": args.taylor, "global_ranking": args.global_ranking,
                   "group_reduction": args.group_reduction, "iterative_steps": args.iterative_steps,
                   "calibration": "austen, first 90%" if args.holdout else "austen",
                   "ratio": 0.25, "layers": [3, 27], "samples": args.samples, "seq_len": args.seq_len,
                   "mmap_threshold_mb": args.mmap_threshold_mb if mmap_applied else None},
        "prune_s": round(prune_s, 3), "fwd_bwd_reference_s": round(fwd_bwd, 3),
        "prune_over_fwd_bwd": round(prune_s / fwd_bwd, 3),
        "importance_s": round(res.timings["importance_s"], 3), "surgery_s": round(res.timings["surgery_s"], 3),
        "peak_rss_gib_after_prune": round(peak_prune, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "weights_gib_fp32": round(params_before * 4 / 1024**3, 3),
        "params_before": params_before, "params_after": res.params_after,
        "ppl_before": round(ppl_before, 3), "ppl_after": round(ppl_after, 3),
        "ppl_ratio": round(ppl_after / ppl_before, 4),
        "holdout_ppl_before": holdout_before and round(holdout_before, 3),
        "holdout_ppl_after": holdout_after and round(holdout_after, 3),
        "ppl_protocol": {"text": "boolq validation passages", "seq_len": 128, "tokens": int(ppl_tokens.shape[1])},
        "llm_pruner_reference": {"params_after": 118_589_760, "ppl_ratio": round(13.69 / 11.01, 4),
                                 "prune_s": 9.0, "peak_rss_gib": 2.35},
    }, __file__)


if __name__ == "__main__":
    main()
