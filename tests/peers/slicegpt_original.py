"""Run the ORIGINAL SliceGPT (microsoft/TransformerCompression) on given tokens; write its perplexities as JSON.

Runs inside the original's own environment (``tests/peers/slicegpt_env.sh`` builds it: transformers 4.41.0 and the
``slicegpt`` package exported from its repository), never inside prunelab's:

    .venv-peers/slicegpt/bin/python tests/peers/slicegpt_original.py --model HF_DIR --calib calib.pt \\
        --eval eval.pt --sparsity 0.25 --out result.json [--save-dir DIR]

It follows ``experiments/run_slicegpt.py`` step by step (``replace_layers``, ``fuse_modules``, the
``ConstSlicingScheduler`` width ``int((1 - sparsity) * hidden)`` rounded down to ``--round-interval``,
``rotate.rotate_and_slice`` with ``final_orientation``) with two changes of input only: the calibration batches are
the token ids of ``--calib`` (``[n, seq_len]``, a ``torch.save``d LongTensor, all-ones attention masks, batches of
``--cal-batch-size`` as ``--cal-batch-size`` does there) instead of its own dataset loader, and the model is a local
Llama-layout HF directory loaded with ``LlamaForCausalLM`` and wrapped in its ``LlamaModelAdapter`` (whose
``from_pretrained`` only accepts meta-llama names). A config written by a newer transformers (``rope_parameters``)
is given the ``rope_theta`` that transformers 4.41 reads, in a temporary copy.

Perplexity: prunelab's protocol (``analysis/perplexity.py``, transcribed here: non-overlapping windows of
``--eval-seq-len`` of the ``[1, n]`` ids in ``--eval``, each scored on its last ``seq_len - 1`` tokens, total NLL over
total count) on the dense model, on the fused model (SliceGPT's embedding mean subtraction changes a Llama) and on
the sliced one. ``--save-dir`` writes the sliced model as run_slicegpt.py's ``--save-dir`` does (``<name>_<sparsity>.pt``
+ ``.json``, and the base config), which prunelab reads with ``core.models.slicegpt.load_slicegpt``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import local_model_dir, perplexity  # tests/peers/_common.py, next to this script


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="HF directory of a Llama-layout model")
    p.add_argument("--calib", required=True, type=Path, help="torch.save'd LongTensor [n, seq_len]")
    p.add_argument("--eval", required=True, type=Path, help="torch.save'd LongTensor [1, n]")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--sparsity", type=float, default=0.25)
    p.add_argument("--round-interval", type=int, default=8)
    p.add_argument("--final-orientation", default="random", choices=["random", "pca"])
    p.add_argument("--cal-batch-size", type=int, default=16)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense and fused models")
    p.add_argument("--save-dir", type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)

    import transformers
    from slicegpt import layernorm_fusion, rotate
    from slicegpt.adapters.llama_adapter import LlamaModelAdapter
    from slicegpt.config import config
    from slicegpt.slicing_scheduler import ConstSlicingScheduler
    from transformers import LlamaForCausalLM

    config.device = torch.device("cpu")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # rotate.random_orthogonal_upper_left draws from numpy's global generator
    dtype = torch.float32 if args.dtype == "fp32" else torch.float16
    calib = torch.load(args.calib, weights_only=True).long()
    evals = torch.load(args.eval, weights_only=True).long()
    result: dict = {"transformers": transformers.__version__, "torch": torch.__version__,
                    "calibration": list(calib.shape), "eval_tokens": int(evals.shape[1]),
                    "eval_seq_len": args.eval_seq_len, "sparsity": args.sparsity,
                    "round_interval": args.round_interval, "final_orientation": args.final_orientation,
                    "dtype": args.dtype}

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = local_model_dir(args.model, Path(tmp))
        model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
        model.config.torch_dtype = dtype
        model.eval()
        adapter = LlamaModelAdapter(model)
        adapter.use_cache = False  # as hf_utils.get_model_and_tokenizer
        if not args.skip_dense:
            result["ppl_dense"] = perplexity(model, evals, args.eval_seq_len)

        t0 = time.perf_counter()
        layernorm_fusion.replace_layers(adapter)
        layernorm_fusion.fuse_modules(adapter)
        t_fuse = time.perf_counter() - t0
        if not args.skip_dense:
            result["ppl_fused"] = perplexity(model, evals, args.eval_seq_len)
        params_before = sum(int(q.nelement()) for q in model.parameters())

        hidden = adapter.hidden_size
        width = int((1 - args.sparsity) * hidden)
        width -= width % args.round_interval
        scheduler = ConstSlicingScheduler(width)
        batches = [{"input_ids": calib[i:i + args.cal_batch_size],
                    "attention_mask": torch.ones_like(calib[i:i + args.cal_batch_size])}
                   for i in range(0, calib.shape[0], args.cal_batch_size)]
        t0 = time.perf_counter()
        rotate.rotate_and_slice(adapter, batches, scheduler, final_orientation=args.final_orientation)
        t_slice = time.perf_counter() - t0
        params_after = sum(int(q.nelement()) for q in model.parameters())
        result.update({"width": width, "hidden_size": hidden, "params_fused": params_before,
                       "params_sliced": params_after, "fuse_s": round(t_fuse, 3),
                       "rotate_and_slice_s": round(t_slice, 3)})
        result["ppl_sliced"] = perplexity(model, evals, args.eval_seq_len)

        if args.save_dir:
            args.save_dir.mkdir(parents=True, exist_ok=True)
            name = f"{args.model.name}_{args.sparsity}"
            torch.save(model.state_dict(), args.save_dir / f"{name}.pt")
            (args.save_dir / f"{name}.json").write_text(adapter.slicing_conf.to_json_string())
            shutil.copy(model_dir / "config.json", args.save_dir / "config.json")
            result["saved"] = str(args.save_dir / f"{name}.pt")

    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
