"""SliceGPT side by side with the ORIGINAL (microsoft/TransformerCompression) on SmolLM2: one JSON line.

    .venv/bin/python tests/bench/slicegpt_peer_bench.py --source GIT_DIR [--samples 32 --seq-len 512]

``--source`` is a git directory of TransformerCompression (a clone, or the bare mirror the search tool's fetch
leaves; default ``$SLICEGPT_SOURCE``). ``tests/peers/slicegpt_env.sh`` builds the original's own environment from
it (``.venv-peers/slicegpt``: transformers 4.41.0, its package exported with git archive), and
``tests/peers/slicegpt_original.py`` runs its ``rotate_and_slice`` there. Both sides get the SAME tokens, made here
once: the calibration windows of ``core.data.text.calibration_batch`` (the default mix, ``--samples`` x
``--seq-len``, seed 42) and the held-out BoolQ passages of the default perplexity protocol (``conf/eval/quick.yaml``:
4096 tokens, windows of 128). The original's sliced model is saved by it as ``run_slicegpt.py --save-dir`` does,
read back by ``core.models.slicegpt.load_slicegpt`` and scored by ``analysis.perplexity`` like prunelab's own, so
one protocol scores every model (the original's in-process score on the same windows is kept as a cross-check).

prunelab runs twice on a copy of the same dense model: ``before`` is the behaviour the issue measured (no embedding
mean subtraction, weights rotated in float32: ``center_embeddings=false rotation_dtype=float32``), ``after`` is
the default now (SliceGPT's). Damage = PPL - dense PPL; ``damage_ratio`` = ours / original's (target ~1.0).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import record  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"

VARIANTS = {"before": {"center_embeddings": False, "rotation_dtype": "float32"}, "after": {}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=os.environ.get("SLICEGPT_SOURCE"),
                   help="git dir of microsoft/TransformerCompression (default $SLICEGPT_SOURCE)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--round-interval", type=int, default=8)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=str(ROOT / ".cache"))
    args = p.parse_args()
    if not args.source:
        sys.exit("give --source (a git dir of microsoft/TransformerCompression) or set SLICEGPT_SOURCE")

    import torch

    torch.set_num_threads(args.threads)
    from analysis.perplexity import perplexity
    from core.data.text import TextSpec, calibration_and_eval_sources, calibration_batch, eval_tokens
    from core.models.llama import count_params
    from core.models.load import cached_gguf_dir, load_model
    from core.models.slicegpt import load_slicegpt
    from pruning.slicegpt import SliceGPT
    from recipes._common import resolve_model

    peer_py = subprocess.run(["bash", str(ROOT / "tests/peers/slicegpt_env.sh"), args.source], check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    commit = subprocess.run(["git", f"--git-dir={args.source}" if not Path(args.source, ".git").is_dir()
                             else f"--git-dir={Path(args.source, '.git')}", "rev-parse", "HEAD"],
                            check=True, capture_output=True, text=True).stdout.strip()

    ref = resolve_model("smollm2")
    model, tok = load_model(ref, cache_dir=args.cache)
    model.eval()
    hf_dir = cached_gguf_dir(ref, args.cache)
    calib_src, eval_src = calibration_and_eval_sources(TextSpec("mix"), TextSpec("boolq"), args.cache)
    calib = calibration_batch(tok, calib_src, args.samples, args.seq_len, 42)
    ev = eval_tokens(tok, eval_src, args.eval_tokens)

    def ppl(m) -> float:
        return round(perplexity(m, ev, args.eval_seq_len, 4, progress=False)["value"], 4)

    dense = ppl(model)
    params_dense = count_params(model)
    ours = {}
    for name, kw in VARIANTS.items():
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        SliceGPT(sparsity=args.sparsity, round_interval=args.round_interval, progress=False, **kw)(m, calib)
        seconds = time.perf_counter() - t0
        ours[name] = {"options": kw, "ppl": ppl(m), "params": count_params(m), "seconds": round(seconds, 1)}
        del m

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(calib, tmp / "calib.pt")
        torch.save(ev, tmp / "eval.pt")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": ""}
        t0 = time.perf_counter()
        proc = subprocess.run([peer_py, str(ROOT / "tests/peers/slicegpt_original.py"), "--model", str(hf_dir),
                               "--calib", str(tmp / "calib.pt"), "--eval", str(tmp / "eval.pt"),
                               "--eval-seq-len", str(args.eval_seq_len), "--sparsity", str(args.sparsity),
                               "--round-interval", str(args.round_interval), "--out", str(tmp / "orig.json"),
                               "--save-dir", str(tmp / "orig")], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"the original failed:\n{proc.stderr[-3000:]}")
        own = json.loads((tmp / "orig.json").read_text())
        sliced, _, _ = load_slicegpt(own["saved"])
        original = {"ppl": ppl(sliced), "ppl_own_process": round(own["ppl_sliced"], 4),
                    "ppl_dense_own_process": round(own["ppl_dense"], 4),
                    "ppl_fused_own_process": round(own["ppl_fused"], 4), "params": count_params(sliced),
                    "seconds": own["rotate_and_slice_s"], "wall_s": round(wall, 1),
                    "transformers": own["transformers"], "torch": own["torch"], "commit": commit}

    damage = original["ppl"] - dense
    record({
        "model": "smollm2", "sparsity": args.sparsity, "round_interval": args.round_interval,
        "calibration": {"text": "mix (default weights)", "samples": args.samples, "seq_len": args.seq_len,
                        "seed": 42},
        "ppl_protocol": {"text": "boolq validation passages", "seq_len": args.eval_seq_len,
                         "tokens": args.eval_tokens},
        "ppl_dense": dense, "params_dense": params_dense, "original": original,
        "ours_before": ours["before"], "ours_after": ours["after"],
        "damage_ratio_before": round((ours["before"]["ppl"] - dense) / damage, 3),
        "damage_ratio_after": round((ours["after"]["ppl"] - dense) / damage, 3),
        "threads": args.threads,
    }, __file__)


if __name__ == "__main__":
    main()
