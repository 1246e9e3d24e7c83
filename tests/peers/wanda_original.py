"""Run the ORIGINAL Wanda (locuslab/wanda, ``lib/prune.py: prune_wanda``) on given tokens; write its perplexities
and masks.

Runs inside the original's own environment (``tests/peers/wanda_env.sh`` builds it: transformers 4.41.0 and the
repository's ``lib/`` exported into ``VENV/src``), never inside prunelab's:

    .venv-peers/wanda/bin/python tests/peers/wanda_original.py --src .venv-peers/wanda/src --model HF_DIR \\
        --calib calib.pt --eval eval.pt --sparsity 0.5 --out result.json [--masks masks.pt]

``prune_wanda`` and everything it calls (``prepare_calibration_input``, ``WrappedGPT``, the per-row sort) run
unchanged. What differs from ``main.py``, input and device only:

- data: ``lib.prune.get_loaders`` (its C4 loader) is replaced by one returning the rows of ``--calib``
  (``[n, seq_len]``, a ``torch.save``d LongTensor) as its ``(input, target)`` pairs; ``args.nsamples`` = n and
  ``model.seqlen`` = seq_len (main.py sets ``max_position_embeddings``, which sizes the calibration buffer);
- model: a local Llama-layout HF directory loaded in float32 with ``device_map="cpu"`` (main.py: float16,
  ``device_map="auto"`` on CUDA) and ``device=cpu`` passed to ``prune_wanda``. A config written by a newer
  transformers (``rope_parameters``) is given the ``rope_theta`` that transformers 4.41 reads, in a temporary copy.

Perplexity: prunelab's protocol (``analysis/perplexity.py``, transcribed: non-overlapping windows of
``--eval-seq-len`` of the ``[1, n]`` ids in ``--eval``, each scored on its last ``seq_len - 1`` tokens) on the dense
and on the pruned model. ``--masks`` saves ``{"<layer>.<linear>": bool [out, in]}`` (True = zero after pruning).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from _common import local_model_dir, perplexity  # tests/peers/_common.py, next to this script


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="the exported repository (holds lib/)")
    p.add_argument("--model", required=True, type=Path, help="HF directory of a Llama-layout model")
    p.add_argument("--calib", required=True, type=Path, help="torch.save'd LongTensor [n, seq_len]")
    p.add_argument("--eval", required=True, type=Path, help="torch.save'd LongTensor [1, n]")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--masks", type=Path)
    args = p.parse_args(argv)

    sys.path.insert(0, str(args.src.resolve()))
    import transformers
    from transformers import AutoModelForCausalLM

    import lib.prune as original  # the repository's module, unchanged

    calib = torch.load(args.calib)
    ev = torch.load(args.eval)
    # the data loader, replaced: our calibration rows as its (input, target) pairs
    original.get_loaders = lambda name, nsamples, seed, seqlen, tokenizer: (
        [(calib[i:i + 1], None) for i in range(calib.shape[0])], None)

    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(local_model_dir(args.model, Path(tmp)), torch_dtype=torch.float32,
                                                     low_cpu_mem_usage=True, device_map="cpu")
    model.eval()
    model.seqlen = calib.shape[1]
    dense = perplexity(model, ev, args.eval_seq_len)
    ns = SimpleNamespace(nsamples=calib.shape[0], seed=0, sparsity_ratio=args.sparsity, use_variant=False)
    t0 = time.perf_counter()
    original.prune_wanda(ns, model, None, device=torch.device("cpu"), prune_n=0, prune_m=0)
    seconds = time.perf_counter() - t0
    pruned = perplexity(model, ev, args.eval_seq_len)
    result = {"peer": "locuslab/wanda", "transformers": transformers.__version__, "torch": torch.__version__,
              "sparsity": args.sparsity, "calibration": list(calib.shape), "eval_seq_len": args.eval_seq_len,
              "dense_ppl": dense, "ppl": pruned, "prune_s": seconds,
              "sparsity_check": original.check_sparsity(model)}
    if args.masks:
        masks = {f"{i}.{name}": (lin.weight.data == 0) for i, layer in enumerate(model.model.layers)
                 for name, lin in original.find_layers(layer).items()}
        torch.save(masks, args.masks)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
