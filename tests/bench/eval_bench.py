"""Evaluation cost and efficiency on SmolLM2 (CPU, offline); prints exactly one JSON line.

    python tests/bench/eval_bench.py [--threads 2] [--tokens 1024] [--limit 10]

- perplexity loop tokens/s vs a bare forward over the same windows (the loop's overhead);
- lm-eval requests/s (arc_easy + piqa, ``--limit`` items each) through prunelab's offline tasks;
- perplexity agreement with lm-eval's loglikelihood_rolling on the same tokens;
- efficiency of SmolLM2 dense vs a copy with 25% of every MLP's channels removed (structurally,
  by magnitude), measured with the same protocol in the same process.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import time
from pathlib import Path

from _common import record  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def _prune_mlp_channels(model, frac: float):
    """Copy of ``model`` with the lowest-norm ``frac`` of each MLP's intermediate channels removed."""
    m = copy.deepcopy(model)
    for layer in m.model.layers:
        mlp = layer.mlp
        width = mlp.gate_proj.out_features
        keep_n = width - int(round(frac * width))
        score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
        keep = torch.sort(torch.topk(score, keep_n).indices).values  # [keep_n]
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            old = getattr(mlp, name)
            w = old.weight.data.index_select(dim, keep).clone()
            new = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
            new.weight.data = w
            setattr(mlp, name, new)
        mlp.intermediate_size = keep_n
    m.config.intermediate_size = m.model.layers[0].mlp.gate_proj.out_features
    return m


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--limit", type=int, default=10)
    args = p.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)

    from analysis.efficiency import measure_efficiency
    from analysis.lm_eval_tasks import make_lm, rolling_nll, run_lm_eval
    from analysis.perplexity import perplexity
    from core.data.text import TextSpec, eval_tokens, load_documents
    from core.models.load import load_model
    from recipes._common import resolve_model

    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    model, tok = load_model(resolve_model("smollm2"), cache_dir=cache)
    tokens = eval_tokens(tok, load_documents(TextSpec("boolq"), cache_dir=cache), args.tokens)  # [1, n]
    L = args.seq_len
    windows = tokens[0, : tokens.shape[1] // L * L].view(-1, L)  # [w, L]

    with torch.no_grad():  # warm-up, then the bare forward over the same windows, batch 4
        model(input_ids=windows[:4])
        t0 = time.perf_counter()
        for i in range(0, len(windows), 4):
            model(input_ids=windows[i:i + 4], use_cache=False)
        bare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = perplexity(model, tokens, L, batch_size=4, progress=False, source="boolq")
    ppl_s = time.perf_counter() - t0

    lm = make_lm(model, tok, max_length=L, batch_size=4)
    nll, n = rolling_nll(lm, windows.tolist())
    rolling_ppl = math.exp(nll / n)

    res = run_lm_eval(model, tok, ["arc_easy", "piqa"], limit=args.limit, batch_size=8, max_length=2048, progress=False)

    kw = dict(prompt_len=128, batch_size=1, decode_tokens=16, warmup=1, repeats=3)
    dense = measure_efficiency(model, **kw)
    pruned_model = _prune_mlp_channels(model, 0.25)
    pruned = measure_efficiency(pruned_model, **kw)
    keys = ("params", "nonzero_params", "weight_bytes", "prefill_tokens_per_s", "decode_tokens_per_s",
            "decode_latency_ms", "kv_cache_bytes", "peak_memory_bytes")
    record({
        "bench": "eval", "model": "smollm2-135m", "threads": args.threads, "device": "cpu",
        "ppl_tokens": ppl["tokens"], "ppl_seq_len": L, "ppl": round(ppl["value"], 4),
        "ppl_tokens_per_s": round(windows.numel() / ppl_s, 1), "bare_forward_tokens_per_s": round(windows.numel() / bare_s, 1),
        "ppl_loop_overhead_pct": round(100 * (ppl_s / bare_s - 1), 1),
        "lm_eval_rolling_ppl": round(rolling_ppl, 4), "ppl_vs_rolling_rel_diff": abs(rolling_ppl / ppl["value"] - 1),
        "lm_eval_requests": res["lm_eval"]["requests"], "lm_eval_requests_per_s": round(res["lm_eval"]["requests_per_s"], 2),
        "lm_eval_limit": args.limit, "arc_easy_acc": res["tasks"]["arc_easy"]["acc"], "piqa_acc": res["tasks"]["piqa"]["acc"],
        "efficiency_protocol": kw,
        "dense": {k: (round(dense[k], 2) if isinstance(dense[k], float) else dense[k]) for k in keys},
        "mlp_pruned_25pct": {k: (round(pruned[k], 2) if isinstance(pruned[k], float) else pruned[k]) for k in keys},
    }, __file__)


if __name__ == "__main__":
    main()
