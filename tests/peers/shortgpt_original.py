"""Run the ORIGINAL ShortGPT (icip-cas/ShortGPT, the authors' code: ``shortgpt/shortgpt.py`` and ``metrics.py``) on
given tokens; write the layers it removes and its perplexities.

Runs inside the original's own environment (``tests/peers/shortgpt_env.sh`` builds it: transformers 4.41.0 and the
repository's ``shortgpt/`` exported into ``VENV/src``), never inside prunelab's:

    .venv-peers/shortgpt/bin/python tests/peers/shortgpt_original.py --src .venv-peers/shortgpt/src \\
        --model HF_DIR --calib calib.pt --eval eval.pt --layers 7 --out result.json

``ShortGPT.eval_importance`` (one forward with ``output_hidden_states``, ``compute_bi`` summing ``block_influence``
over the tokens of every window) and ``ShortGPT.remove_layers`` (``np.argsort`` of the importances, the
``n_prune_layers`` lowest deleted) run unchanged, then the ``layer_idx`` renumbering of ``run_shortgpt.py``. What
differs from ``run_shortgpt.py``, input and device only:

- data: instead of pg19 text through its tokenizer, the rows of ``--calib`` (``[n, seq_len]``, a ``torch.save``d
  LongTensor) are the ``input_ids`` its tokenizer call returns (all-ones attention mask), and ``stride`` = seq_len,
  so each row is one window as each 256-token stride is there; ``--batch`` rows per ``eval_importance`` call
  (run_shortgpt.py: one pg19 book per call);
- model: ``ShortGPT.__init__`` loads ``AutoModelForCausalLM.from_pretrained(model_name, device_map="auto",
  torch_dtype=float16)``; here ``from_pretrained`` is given float32 and ``device_map="cpu"``, and the four
  ``.to("cuda")`` of ``eval_importance`` are read as ``.to(<the model's device>)`` (a text substitution in the loaded
  source, checked to occur exactly four times; two are in the generation branch, not taken). A config written by a newer transformers (``rope_parameters``) is given
  the ``rope_theta`` that transformers 4.41 reads, in a temporary copy.

Perplexity: prunelab's protocol (``analysis/perplexity.py``, transcribed) on the dense and the pruned model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

from _common import local_model_dir, perplexity  # tests/peers/_common.py, next to this script


def load_original(src: Path) -> types.ModuleType:
    """``shortgpt/shortgpt.py`` as a module, its four ``.to("cuda")`` read as the model's device."""
    sys.path.insert(0, str(src / "shortgpt"))  # it does `from metrics import *`
    text = (src / "shortgpt" / "shortgpt.py").read_text()
    if text.count('.to("cuda")') != 4:
        raise SystemExit('shortgpt.py no longer has exactly four .to("cuda"): re-check the device patch')
    text = text.replace('.to("cuda")', '.to(self.model.device)')
    mod = types.ModuleType("shortgpt")
    mod.__file__ = str(src / "shortgpt" / "shortgpt.py")
    exec(compile(text, mod.__file__, "exec"), mod.__dict__)
    return mod


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="the exported repository (holds shortgpt/)")
    p.add_argument("--model", required=True, type=Path, help="HF directory of a Llama-layout model")
    p.add_argument("--calib", required=True, type=Path, help="torch.save'd LongTensor [n, seq_len]")
    p.add_argument("--eval", required=True, type=Path, help="torch.save'd LongTensor [1, n]")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=7, help="n_prune_layers")
    p.add_argument("--batch", type=int, default=8, help="calibration rows per eval_importance call")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)

    import transformers

    original = load_original(args.src.resolve())
    calib = torch.load(args.calib)
    ev = torch.load(args.eval)

    class Rows:
        """Stands for the tokenizer: the prompts are row indices into ``calib``."""
        pad_token = None
        eos_token = None

        def __call__(self, prompts, **kw):
            ids = calib[list(prompts)]
            return types.SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    with tempfile.TemporaryDirectory() as tmp:
        path = local_model_dir(args.model, Path(tmp))
        original.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda name: Rows())
        load = original.AutoModelForCausalLM.from_pretrained
        original.AutoModelForCausalLM = types.SimpleNamespace(
            from_pretrained=lambda name, device_map, torch_dtype: load(name, device_map="cpu",
                                                                       torch_dtype=torch.float32))
        short = original.ShortGPT(model_name=str(path), layers_path="model.layers", n_prune_layers=args.layers)
    short.model.eval()
    dense = perplexity(short.model, ev, args.eval_seq_len)
    t0 = time.perf_counter()
    for start in range(0, calib.shape[0], args.batch):
        short.eval_importance(prompts=list(range(start, min(start + args.batch, calib.shape[0]))),
                              stride=calib.shape[1], max_gen_len=0)
    removed = short.remove_layers()
    for layer_idx, module in enumerate(short.layers):  # run_shortgpt.py's renumbering
        module.self_attn.layer_idx = layer_idx
    seconds = time.perf_counter() - t0
    short.model.config.num_hidden_layers = len(short.layers)
    pruned = perplexity(short.model, ev, args.eval_seq_len)
    result = {"peer": "icip-cas/ShortGPT", "transformers": transformers.__version__, "torch": torch.__version__,
              "n_prune_layers": args.layers, "calibration": list(calib.shape), "eval_seq_len": args.eval_seq_len,
              "dense_ppl": dense, "ppl": pruned, "prune_s": seconds, "removed_layers": sorted(removed),
              "importances": [float(x) for x in short.importances]}
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
