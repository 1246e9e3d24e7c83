"""Run the ORIGINAL LLM-Pruner script (horseee/LLM-Pruner, ``llama3.py``: its own ``main(args)`` from its own argparse)
on SmolLM2 with given calibration ids: the whole process, from python start to exit, as the user runs it.

Runs inside the original's own environment (``tests/peers/llm_pruner_env.sh`` builds it: transformers 4.41.0 and the
repository's ``LLMPruner/`` and ``llama3.py`` exported into ``VENV/src``), never inside prunelab's:

    .venv-peers/llm_pruner/bin/python tests/peers/llm_pruner_original.py --src .venv-peers/llm_pruner/src \\
        --model HF_DIR --calib calib.pt [--threads 1] [-- EXTRA llama3.py ARGS]
    .venv-peers/llm_pruner/bin/python tests/peers/llm_pruner_original.py --src ... --model HF_DIR --prepare DIR
        (then --model DIR --prepared: the model dir translated once, outside the timed run; patch 5)

It runs in the current directory (llama3.py writes ``prune_log/llama_prune/``: its log, and with ``--save_model`` the
pruned model as ``pytorch_model.bin``). The command line given to llama3.py is the seed's (the user's) on SmolLM2's
depth with prunelab's acceptance settings (tests/bench/process_bench.py, ACCEPTANCE)::

    llama3.py --base_model HF_DIR --pruning_ratio 0.25 --block_wise --pruner_type taylor --taylor param_first
        --block_attention_layer_start 3 --block_attention_layer_end 27
        --block_mlp_layer_start 3 --block_mlp_layer_end 27
        --num_examples 10 --max_seq_len 64 --save_model --device cpu --eval_device cpu

Everything else runs unchanged: the model load (``LlamaForCausalLM.from_pretrained(device_map="auto")``), the
dependency graph and pruning of its ``torch_pruning`` fork (``MetaPruner``, ``hf_llama_pruner.TaylorImportance``,
one backward of the 10 x 64 batch), the heads attributes it rewrites, and ``model.half(); torch.save({'model',
'tokenizer'})`` of the pruned model. The patches, all of them (also in PATCHES, which process_bench records):

1. calibration: ``LLMPruner.datasets.example_samples.get_examples`` (its Hub download of bookcorpus) returns the rows
   of ``--calib`` instead (``[n, seq_len]``, a ``torch.save``d LongTensor: the ids prunelab's run draws); the shape
   it asks for (``num_examples`` x 64) is checked against them;
2. no evaluation: ``LLMPruner.evaluator.ppl.PPLMetric`` (wikitext2 and ptb from the Hub, after pruning, which
   llama3.py runs unconditionally) returns ``{}`` without computing; prunelab's run has ``eval=none``. The generation
   tests stay off (their flags are not given);
3. device: ``--device cpu --eval_device cpu`` (the script's defaults are cuda); ``device_map="auto"`` is kept and
   places the model on the CPU;
4. dtype: llama3.py loads in float16 (``torch_dtype=torch.float16``) and skips ``model.half()`` only when
   ``--device cpu``, so on the CPU it would run its forward and backward in float16; ``from_pretrained`` is given
   ``torch_dtype=torch.float32`` instead (prunelab's run is float32 too). The ``model.half()`` before its
   ``torch.save`` is kept;
5. model directory: the HF dir prunelab caches was written by transformers 5 and tokenizers 0.22+
   (``rope_parameters``, ``dtype``, ``tokenizer_class: TokenizersBackend``, BPE merges as pairs); the same weights
   are linked into a temporary directory whose config.json has the ``rope_theta`` / ``torch_dtype`` keys
   transformers 4.41 reads, whose tokenizer_config.json names ``PreTrainedTokenizerFast`` and whose tokenizer.json
   writes each merge as ``"a b"`` (the form tokenizers 0.19 reads; the same merges). ``--prepare DIR`` writes that
   copy and exits, so that a timed run (``--model DIR --prepared``) reads it as llama3.py would read any model dir;
6. threads: ``torch.set_num_threads(--threads)`` before the script runs (the bench also sets OMP_NUM_THREADS);
7. GQA with fewer channels to cut than one head: the fork cannot prune SmolLM2's attention as it stands. Its root is
   ``k_proj`` (192 channels: 3 KV heads of 64) with ``consecutive_groups`` = head_dim; at ratio 0.25 it computes
   ``n_pruned`` = 48 channels, 48 // 64 = 0 whole heads, and ``MetaPruner.prune_local`` raises on ``torch.cat([])``
   (its ``n_pruned <= 0: continue`` guard counts channels, not heads). ``MetaPruner.estimate_importance`` is wrapped:
   it computes the importance as before and then, for a group whose root would lose no whole head, returns None,
   which prune_local's own ``if imp is None: continue`` skips, as it skips a group with nothing to prune. Every
   attention layer keeps its 9 / 3 heads, as in prunelab's run at this ratio (same widths); the MLP groups are
   untouched. (``hf_prune.py`` does not fail there but is not an alternative: its root is ``q_proj``, written for
   multi-head LLaMA; it would cut 2 of 9 query heads over 3 KV heads, which is no valid GQA model. llama3.py is
   the seed's own script.)

Prints one JSON line last: the versions, the patches and the parameter counts llama3.py logged.
"""

from __future__ import annotations

import argparse
import json
import re
import runpy
import sys
import tempfile
from pathlib import Path

from _common import local_model_dir  # tests/peers/_common.py, next to this script

PATCHES = [
    "get_examples('bookcorpus', ...) -> the given calibration ids (the same n x 64 rows as prunelab's run)",
    "PPLMetric (wikitext2/ptb after pruning) -> {} without computing (prunelab's run: eval=none)",
    "--device cpu --eval_device cpu (defaults: cuda); device_map='auto' kept",
    "from_pretrained torch_dtype float16 -> float32 (llama3.py would run the backward in float16 on the CPU); "
    "model.half() before torch.save kept",
    "model dir: transformers 5 / tokenizers 0.22 files for 4.41 / 0.19 in a temporary copy linking the same "
    "weights: rope_parameters -> rope_theta, dtype -> torch_dtype, tokenizer_class TokenizersBackend -> "
    "PreTrainedTokenizerFast, BPE merges [a, b] -> 'a b'",
    "torch.set_num_threads(--threads)",
    "MetaPruner.estimate_importance wrapped: a group whose consecutive-group root would lose 0 whole heads "
    "(SmolLM2 k_proj: 48 of 192 channels at 0.25, head_dim 64) returns None after computing its importance, "
    "which prune_local skips; unpatched it raises on torch.cat([]). Attention keeps 9/3 heads, as in ours",
]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="the exported repository (holds LLMPruner/, llama3.py)")
    p.add_argument("--model", required=True, type=Path, help="HF directory of a Llama-layout model")
    p.add_argument("--calib", type=Path, help="torch.save'd LongTensor [n, seq_len]")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prepare", type=Path, help="only write --model's copy for transformers 4.41 (patch 5) here")
    p.add_argument("--prepared", action="store_true", help="--model is such a copy (written by --prepare)")
    p.add_argument("extra", nargs="*", help="after --: more llama3.py arguments")
    args = p.parse_args(argv)
    if args.prepare is not None:  # before any timed run: the translation is the harness's work, not llama3.py's
        args.prepare.mkdir(parents=True, exist_ok=True)
        return {"prepared": str(local_model_dir(args.model.resolve(), args.prepare, tokenizer=True))}
    if args.calib is None:
        p.error("--calib is required")

    import torch

    torch.set_num_threads(args.threads)  # patch 6
    src = args.src.resolve()
    sys.path.insert(0, str(src))
    import transformers

    import LLMPruner.datasets.example_samples as examples
    import LLMPruner.evaluator.ppl as ppl

    calib = torch.load(args.calib)

    def get_examples(dataset, tokenizer, n_samples, seq_len=128):  # patch 1
        if tuple(calib.shape) != (n_samples, seq_len):
            raise SystemExit(f"llama3.py asks {n_samples} x {seq_len} examples; --calib holds {tuple(calib.shape)}")
        return calib.clone()

    examples.get_examples = get_examples
    ppl.PPLMetric = lambda *a, **kw: {}  # patch 2

    from LLMPruner.torch_pruning.pruner.algorithms.metapruner import MetaPruner

    estimate = MetaPruner.estimate_importance

    def estimate_importance(self, group, ch_groups=1, consecutive_groups=1):  # patch 7
        imp = estimate(self, group, ch_groups=ch_groups, consecutive_groups=consecutive_groups)
        if imp is None or consecutive_groups <= 1:
            return imp
        module = group[0][0].target.module  # as prune_local computes n_pruned
        n_pruned = self.DG.get_out_channels(module) - int(
            self.layer_init_out_ch[module] * (1 - self.get_target_sparsity(module)))
        if self.round_to:
            n_pruned -= n_pruned % self.round_to
        return None if 0 < n_pruned and n_pruned // consecutive_groups == 0 else imp

    MetaPruner.estimate_importance = estimate_importance

    llama = transformers.LlamaForCausalLM
    load = llama.from_pretrained.__func__
    llama.from_pretrained = classmethod(lambda cls, *a, **kw: load(cls, *a, **{**kw, "torch_dtype": torch.float32}))

    samples, seq_len = calib.shape
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model.resolve() if args.prepared else local_model_dir(args.model.resolve(), Path(tmp), tokenizer=True)
        sys.argv = [str(src / "llama3.py"), "--base_model", str(model_dir), "--pruning_ratio", "0.25", "--block_wise",
                    "--pruner_type", "taylor", "--taylor", "param_first",
                    "--block_attention_layer_start", "3", "--block_attention_layer_end", "27",
                    "--block_mlp_layer_start", "3", "--block_mlp_layer_end", "27",
                    "--num_examples", str(samples), "--max_seq_len", str(seq_len), "--save_model",
                    "--device", "cpu", "--eval_device", "cpu", *args.extra]  # patch 3: the two device flags
        runpy.run_path(str(src / "llama3.py"), run_name="__main__")  # its own argparse and main(args)

    params = None
    logs = sorted(Path("prune_log/llama_prune").glob("*/training.log"))
    if logs:
        m = re.search(r"#Param before: (\d+), #Param after: (\d+)", logs[-1].read_text())
        params = [int(m.group(1)), int(m.group(2))] if m else None
    result = {"peer": "horseee/LLM-Pruner llama3.py", "transformers": transformers.__version__,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "calibration": [samples, seq_len],
              "params": params, "saved": Path("prune_log/llama_prune/pytorch_model.bin").is_file(),
              "argv": sys.argv[1:], "patches": PATCHES}
    return result


if __name__ == "__main__":
    print(json.dumps(main()), flush=True)
