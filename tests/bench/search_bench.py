"""Layer-replacement search benchmark on the embedded model: one JSON line.

    .venv/bin/python tests/bench/search_bench.py [--seeds 5] [--tokens 256] [--threads 2]   (about 8 minutes)

The demo pair of the README: base = SmolLM2-135M-Instruct with 50% of every MLP's channels removed (Taylor,
param_second, heads kept), donor = SmolLM2. Fitness = KL(donor || hybrid) per token on Austen calibration
tokens (the default). Reports:
- k = 2 of 30 layers: the exhaustive optimum (all 435 sets) computed in this run, and for each strategy and seed
  the evaluations (full-fidelity equivalents) it needed to first reach that optimum (null: not within budget);
- k = 4: each strategy's best fitness at the same budget, mean over seeds;
- seconds per full-fidelity fitness evaluation against one bare forward over the same tokens.
Targets (replacement issue): evolve or ga reaches the k=2 optimum within 65 evaluations in >= 4 of 5 seeds; at
k = 4 it beats random on average; one evaluation costs at most 1.1x a bare forward.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

from _common import record  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--budget2", type=int, default=100, help="k=2 budget per strategy and seed (23%% of 435)")
    ap.add_argument("--budget4", type=int, default=40)
    ap.add_argument("--seeds4", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strategies", default="evolve,ga,score_topk,random")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from core.data.text import TextSpec, calibration_batch, load_documents
    from core.models.load import cached_gguf_dir, load_model
    from core.search import Subsets, search
    from pruning.llm_pruner import LLMPruner
    from recipes._common import resolve_model
    from replacement.fitness import HybridFitness, donor_logprobs
    from replacement.hybrid import DonorLayers

    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    ref = resolve_model("smollm2")
    model, tok = load_model(ref, cache_dir=cache)
    austen = load_documents(TextSpec("austen"), cache_dir=cache)
    tokens = calibration_batch(tok, austen, math.ceil(args.tokens / args.seq_len), args.seq_len, 0)
    targets = donor_logprobs(model, tokens)  # the donor is the unpruned model
    t0 = time.perf_counter()
    LLMPruner(ratio=0.5, attention_ratio=0.0, attention_layers=(0, 30), mlp_layers=(0, 30), progress=False)(
        model, calibration_batch(tok, austen.split("calibration"), 16, 128, 1))
    prune_s = time.perf_counter() - t0
    donor = DonorLayers.open(cached_gguf_dir(ref, cache))
    fitness = HybridFitness(model, donor, tokens, targets=targets)
    n, full = len(model.model.layers), tokens.numel()
    levels = sorted({max(args.seq_len, full // 4), max(args.seq_len, full // 2), full})

    memo: dict = {}  # the same (candidate, fidelity) is computed once across strategies and seeds

    def fit(c, f=None):
        key = (tuple(c), f or full)
        if key not in memo:
            memo[key] = fitness(c, f)
        return memo[key]

    # seconds per evaluation vs one bare forward over the same tokens (random candidates, no memo)
    with torch.no_grad():
        model(input_ids=tokens[:1, :8])
        t0 = time.perf_counter()
        for s in range(0, tokens.shape[0], 4):
            model(input_ids=tokens[s:s + 4], use_cache=False)
        forward_s = time.perf_counter() - t0
    rng = random.Random(0)
    t0 = time.perf_counter()
    samples = [tuple(sorted(rng.sample(range(n), 2))) for _ in range(8)]
    for c in samples:
        fitness(c)
    eval_s = (time.perf_counter() - t0) / len(samples)

    t0 = time.perf_counter()
    exhaustive = search(Subsets(n, 2), fit, strategy="exhaustive", budget=10**6, seed=0, fidelities=[full])
    exhaustive_s = time.perf_counter() - t0
    optimum, opt_value = tuple(exhaustive.best), exhaustive.best_fitness
    strategies = args.strategies.split(",")
    to_optimum: dict[str, list] = {}
    for strategy in strategies:
        for seed in range(args.seeds):
            res = search(Subsets(n, 2), fit, strategy=strategy, budget=args.budget2, seed=seed,
                         fidelities=levels if strategy == "evolve" else [full]).to_json()
            hit = next((h["cost"] for h in res["history"] if h.get("best") is not None
                        and h["best"] <= opt_value + 1e-12), None)
            to_optimum.setdefault(strategy, []).append(None if hit is None else round(hit, 2))
    k4: dict[str, list[float]] = {}
    for strategy in strategies:
        for seed in range(args.seeds4):
            res = search(Subsets(n, 4), fit, strategy=strategy, budget=args.budget4, seed=seed,
                         fidelities=levels if strategy == "evolve" else [full])
            k4.setdefault(strategy, []).append(res.best_fitness)
    base_fit, donor_fit = fit(()), fit(tuple(range(n)))
    found = {s: sum(v is not None and v <= 65 for v in hits) for s, hits in to_optimum.items()}
    record({
        "bench": "search", "model": "SmolLM2-135M-Instruct, MLP -50% (taylor) vs original", "fitness": "kl",
        "tokens": full, "fidelities": levels, "threads": args.threads, "prune_s": round(prune_s, 1),
        "fitness_base": round(base_fit, 5), "fitness_donor": round(donor_fit, 5),
        "k2": {"optimum": list(optimum), "fitness": round(opt_value, 5), "exhaustive_evaluations": exhaustive.evaluations,
               "exhaustive_s": round(exhaustive_s, 1), "evaluations_to_optimum": to_optimum,
               "seeds_within_65": found, "budget": args.budget2},
        "k4": {"budget": args.budget4, "seeds": args.seeds4,
               "mean_best_fitness": {s: round(statistics.mean(v), 5) for s, v in k4.items()},
               "best_fitness": {s: [round(x, 5) for x in v] for s, v in k4.items()}},
        "seconds_per_evaluation": round(eval_s, 3), "bare_forward_s": round(forward_s, 3),
        "evaluation_over_forward": round(eval_s / forward_s, 3),
        "targets": {"k2_within_65_in_4_of_5": max(found.get("evolve", 0), found.get("ga", 0)) >= 4,
                    "k4_beats_random": min(statistics.mean(k4.get("evolve", [1e9])), statistics.mean(k4.get("ga", [1e9])))
                    < statistics.mean(k4.get("random", [0])),
                    "evaluation_at_most_1.1x_forward": eval_s / forward_s <= 1.1},
    }, __file__)


if __name__ == "__main__":
    main()
