"""Recovery benchmark on SmolLM2-135M-Instruct: one JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/recovery_bench.py                  # benchmark budget, lora_cpu10
    .venv/bin/python tests/bench/recovery_bench.py --cut params25 --zeroshot-limit 200  # a true 25% cut (+ ~25 min)
    .venv/bin/python tests/bench/recovery_bench.py --set recovery.lr=5e-4 --set recovery.steps=60

Prunes SmolLM2 with LLM-Pruner's Taylor (``param_first``, 10 x 64 Austen tokens) either to the benchmark budget
(``--cut benchmark``: ratio 0.25 of the KV groups / MLP channels of layers [3, 27), i.e. <= 118,589,760 of
134,515,008 parameters, what LLM-Pruner's ``--pruning_ratio 0.25`` keeps) or by a true 25% of all parameters
(``--cut params25``: ``ratio_target=params``), then runs the recovery preset (``--preset``, default
``conf/recovery/lora_cpu10.yaml``, as ``run.py`` would build it; ``--set`` overrides) exactly as ``recovery=...``
does: the training text's rows, its held-out 10%, LoRA through peft, merge.

Reported, all measured in this one run:
- ``train_tokens_per_s`` (LoRA training steps: forward, backward, clipping, optimizer; evaluations excluded) against
  ``fwd_bwd_tokens_per_s``, a plain forward+backward of the same pruned model over the same micro-batches with every
  weight requiring grad (what a full fine-tuning step costs before its optimizer), and their ratio. The plain pass is
  timed in a forked child, alternating with a LoRA forward+backward over the same micro-batch (``interleaved``), so
  both see the same load on a shared machine and the plain pass's gradients do not count towards the peak RSS;
- peak RSS after loading, after pruning, at the end, and the fp32 weight bytes;
- the curve: held-out perplexity of the training domain (the preset's text, its last 10% of paragraphs) at each
  evaluation against training minutes, with the share of the damage closed, ``(pruned - now) / (pruned - dense)``;
- before / after: that held-out perplexity, BoolQ perplexity (the default evaluation text, outside the training
  mix), and with ``--zeroshot-limit N`` the 7-task zero-shot average (conf/eval/zeroshot.yaml, first N examples).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from _common import record, zeroshot_average  # noqa: E402  (tests/bench/_common.py, next to this script)
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCHMARK_PARAMS = 118_589_760


def _peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def _spec(preset: str, sets: list[str]) -> Any:
    """The recovery option as ``run.py recovery=<preset> <sets>`` builds it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import run  # noqa: F401  (registers the schema and resolvers)
    from recipes._recovery import spec_of

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"recovery={preset}", "paths.output_dir=/tmp", *sets])
    GlobalHydra.instance().clear()
    return spec_of(cfg)


def _zeroshot(model: Any, tok: Any, limit: int, cache: str) -> Any:
    return zeroshot_average(model, tok, limit, cache, ROOT)


def _throughput(peft_model: Any, rows: Any, micro_batch: int, pad_id: int, conn: Any, rounds: int = 3) -> None:
    """In a forked child (its gradients never count towards the parent's peak RSS): ``rounds`` alternations of a
    plain forward+backward of the model with every weight requiring grad (adapters disabled) and a LoRA
    forward+backward (only the adapters require grad) over the same micro-batch; sends (plain, LoRA) tokens/s."""
    from recovery.data import collate
    from recovery.lora import trainable_parameters

    adapters = trainable_parameters(peft_model)
    base = [p for n, p in peft_model.named_parameters() if n not in adapters]
    peft_model.train()
    seconds, tokens = [0.0, 0.0], 0
    for r in range(rounds + 1):  # round 0 warms both paths up
        ids, labels, mask = collate(rows, r * micro_batch, micro_batch, pad_id)
        for i, plain in enumerate((True, False)):
            for p in base:
                p.requires_grad_(plain)
            for p in adapters.values():
                p.requires_grad_(not plain)
            peft_model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            if plain:
                with peft_model.disable_adapter():
                    peft_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
            else:
                peft_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
            if r:
                seconds[i] += time.perf_counter() - t0
        if r:
            tokens += int(ids.numel() if mask is None else mask.sum())
    conn.send((tokens / seconds[0], tokens / seconds[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cut", choices=("benchmark", "params25"), default="benchmark")
    ap.add_argument("--preset", default="lora_cpu10")
    ap.add_argument("--set", action="append", default=[], help="a run.py override, e.g. recovery.lr=5e-4")
    ap.add_argument("--zeroshot-limit", type=int, default=0)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
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
    from recipes._recovery import _pad_id, damage_closed, heldout_ppl, prepare
    from recovery.lora import attach, merge, resolve_targets, trainable_parameters
    from recovery.train import train

    t_start = time.perf_counter()
    set_mmap_threshold(1.0)
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    spec = _spec(args.preset, args.set)
    model, tok = load_model(resolve_model("smollm2"), cache_dir=cache)
    peak_load = _peak_gib()
    boolq = load_documents(TextSpec("boolq"), cache)
    boolq_tokens = eval_tokens(tok, boolq, args.ppl_tokens)
    prep = prepare(spec, model, tok, cache_dir=cache, evaluation=[boolq])
    params_dense = count_params(model)
    dense = {"heldout": heldout_ppl(model, prep, tok),
             "boolq": perplexity(model, boolq_tokens, 128, 4, progress=False)["value"],
             "zeroshot": _zeroshot(model, tok, args.zeroshot_limit, cache)}

    calib = calibration_batch(tok, load_documents(TextSpec("austen"), cache), 10, 64, 0)
    if args.cut == "benchmark":
        pruner = LLMPruner(ratio=0.25, taylor="param_first", attention_layers=(3, 27), mlp_layers=(3, 27),
                           progress=False)
    else:
        pruner = LLMPruner(ratio=0.25, ratio_target="params", taylor="param_first", attention_layers=(3, 27),
                           mlp_layers=(3, 27), progress=False)
    t0 = time.perf_counter()
    res = pruner(model, calib)
    prune_s = time.perf_counter() - t0
    peak_prune = _peak_gib()
    pruned = {"heldout": heldout_ppl(model, prep, tok),
              "boolq": perplexity(model, boolq_tokens, 128, 4, progress=False)["value"],
              "zeroshot": _zeroshot(model, tok, args.zeroshot_limit, cache)}
    peft_model = attach(model, spec, resolve_targets(model, spec))
    trainable = sum(p.numel() for p in trainable_parameters(peft_model).values())
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_throughput, args=(peft_model, prep.rows, spec.micro_batch,
                                                                       _pad_id(tok), child))
    proc.start()
    fwd_bwd, lora_fwd_bwd = parent.recv()
    proc.join()
    result = train(peft_model, prep.rows, prep.heldout, spec, total_steps=prep.total_steps, pad_id=_pad_id(tok),
                   progress=False)
    peak_train = _peak_gib()
    model = merge(peft_model)
    after = {"heldout": heldout_ppl(model, prep, tok),
             "boolq": perplexity(model, boolq_tokens, 128, 4, progress=False)["value"],
             "zeroshot": _zeroshot(model, tok, args.zeroshot_limit, cache)}
    h = result.history
    curve = [{"train_min": round(e["train_s"] / 60, 3), "step": e["step"], "tokens": e["tokens"],
              "heldout_ppl": round(e["ppl"], 3),
              "damage_closed": round(damage_closed(pruned["heldout"], e["ppl"], dense["heldout"]) or 0, 4)}
             for e in h.evals]
    train_tps = result.tokens_per_s
    rnd = lambda d: {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    record({
        "bench": "recovery", "model": "SmolLM2-135M-Instruct", "threads": args.threads, "cut": args.cut,
        "preset": args.preset, "overrides": args.set,
        "spec": {k: v for k, v in spec.to_dict().items() if k in ("rank", "alpha", "lr", "schedule", "steps",
                                                                   "micro_batch", "grad_accum", "seq_len",
                                                                   "eval_every", "eval_tokens")},
        "data": prep.record()["source"], "heldout_windows": len(prep.heldout.ids),
        "params": {"dense": params_dense, "pruned": res.params_after, "benchmark_budget": BENCHMARK_PARAMS,
                   "removed_pct": round(100 * res.removed_fraction, 2), "trainable_lora": trainable},
        "prune_s": round(prune_s, 2),
        "train_tokens_per_s": round(train_tps, 1), "fwd_bwd_tokens_per_s": round(fwd_bwd, 1),
        "train_over_fwd_bwd": round(train_tps / fwd_bwd, 3),
        "interleaved": {"plain_fwd_bwd_tokens_per_s": round(fwd_bwd, 1),
                        "lora_fwd_bwd_tokens_per_s": round(lora_fwd_bwd, 1),
                        "lora_over_plain": round(lora_fwd_bwd / fwd_bwd, 3)},
        "train_s": round(h.train_s, 1), "eval_s": round(h.eval_s, 1), "steps": h.step, "tokens": h.tokens,
        "recovery_wall_s": round(h.train_s + h.eval_s, 1),
        "peak_rss_gib": {"load": peak_load, "prune": peak_prune, "train": peak_train, "end": _peak_gib()},
        "weights_gib_fp32": round(params_dense * 4 / 1024**3, 3),
        "dense": rnd(dense), "pruned": rnd(pruned), "recovered": rnd(after),
        "damage_closed": {"heldout": round(damage_closed(pruned["heldout"], after["heldout"], dense["heldout"]), 4),
                          "boolq": round(damage_closed(pruned["boolq"], after["boolq"], dense["boolq"]), 4)},
        "curve": curve, "final_loss": round(result.final_loss, 4), "wall_s": round(time.perf_counter() - t_start, 1),
    }, __file__)


if __name__ == "__main__":
    main()
