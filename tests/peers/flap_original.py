"""Run the ORIGINAL FLAP (CASIA-IVA-Lab/FLAP, ``lib/prune.py: prune_flap``, ``lib/layerwrapper.py: BiasGPT``) on
given tokens; write the heads and channels it removes and its perplexities.

Runs inside the original's own environment (``tests/peers/flap_env.sh`` builds it: transformers 4.41.0 and the
repository's ``lib/`` exported into ``VENV/src``), never inside prunelab's:

    .venv-peers/flap/bin/python tests/peers/flap_original.py --src .venv-peers/flap/src --model HF_DIR \\
        --calib calib.pt --eval eval.pt --ratio 0.2 --out result.json

The original cannot take SmolLM2 as it is: ``lib/prune.py`` hard-codes a head of 128 channels (``128`` in
``compress`` and the head reshapes; ``512.0 / 3`` = 4 x 128 / 3, a head's cost in MLP channels, in AL-AM) and
one KV head per query head (it cuts q, k and v rows with one head mask); its ``models/hf_llama/modeling_llama.py``
(transformers 4.28's Llama with biases on o_proj / down_proj) also fixes head_dim 128 and rope base 10000.
SmolLM2-135M has head_dim 64, 9 query heads on 3 KV heads and rope_theta 100000. So, and nothing else:

- model: transformers 4.41's Llama from the local HF directory in float32 on the CPU (main.py: its own modeling
  file, float16, CUDA), made multi-head exactly: every KV head's k/v rows are repeated for each query head it
  serves (``repeat_kv``'s order), which computes the same function (the dense perplexity printed shows it), and
  o_proj / down_proj get zero biases as main.py's ``get_llm`` gives them. After ``prune_flap`` each attention's
  ``num_key_value_heads`` is set to the ``num_heads`` that ``compress`` wrote (its modeling file has one count);
- ``lib/prune.py`` is loaded with four text substitutions, each checked to occur as often as expected:
  every head-size ``128`` (not wanda_sp's ``nsamples=128``) -> the model's head_dim, ``512.0 / 3`` -> ``4 * head_dim / 3`` (the same cost for this head size), the
  calibration buffer's ``2048`` rows -> n, and ``.type(torch.half)`` of the mean inputs removed (in float16 they
  cannot be multiplied with the float32 weights; main.py runs the whole model in float16);
- data: its wikitext2 loader is replaced by one returning the rows of ``--calib`` (``[n, seq_len]``); ``nsamples``
  = n and ``model.seqlen`` = seq_len (main.py: 128).

The metric (WIFV, ``BiasGPT``'s running variance), the per-layer standardisation, the AL-AM global threshold and
``compress`` with bias compensation run unchanged. ``compress`` is wrapped to record the masks it receives.
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
from types import SimpleNamespace

import torch
from torch import nn

from _common import local_model_dir, perplexity  # tests/peers/_common.py, next to this script


@torch.no_grad()
def multi_head(model: nn.Module) -> None:
    """Repeat each KV head's k/v rows for the query heads it serves, and give o_proj / down_proj zero biases."""
    cfg = model.config
    heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for layer in model.model.layers:
        att = layer.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(att, name)
            w = old.weight.view(kv, hd, -1).repeat_interleave(heads // kv, dim=0).reshape(heads * hd, -1)
            new = nn.Linear(w.shape[1], w.shape[0], bias=False)
            new.weight.copy_(w)
            setattr(att, name, new)
        att.num_key_value_heads, att.num_key_value_groups = heads, 1
        for mod, name in ((att, "o_proj"), (layer.mlp, "down_proj")):
            old = getattr(mod, name)
            new = nn.Linear(old.in_features, old.out_features, bias=True)
            new.weight.copy_(old.weight)
            new.bias.zero_()
            setattr(mod, name, new)
    cfg.num_key_value_heads = heads


def load_original(src: Path, head_dim: int, nsamples: int) -> types.ModuleType:
    """``lib/prune.py`` with the head size, the buffer size and the float16 cast substituted (module doc)."""
    sys.path.insert(0, str(src))
    import lib  # noqa: F401  (the package, for the relative imports of prune.py)

    text = (src / "lib" / "prune.py").read_text()
    subs = [("512.0 / 3", f"(4 * {head_dim} / 3)", 1), ("repeat_interleave(128)", f"repeat_interleave({head_dim})", 2),
            ("* 128", f"* {head_dim}", 3), (", 128)", f", {head_dim})", 5),
            ("inps = torch.zeros((2048,", f"inps = torch.zeros(({nsamples},", 1),
            (".type(torch.half)", "", 2)]
    for old, new, count in subs:
        if text.count(old) != count:
            raise SystemExit(f"lib/prune.py has {text.count(old)} of {old!r}, expected {count}: re-check the patch")
        text = text.replace(old, new)
    mod = types.ModuleType("lib.prune")
    mod.__file__, mod.__package__ = str(src / "lib" / "prune.py"), "lib"
    exec(compile(text, mod.__file__, "exec"), mod.__dict__)
    return mod


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="the exported repository (holds lib/)")
    p.add_argument("--model", required=True, type=Path, help="HF directory of a Llama-layout model")
    p.add_argument("--calib", required=True, type=Path, help="torch.save'd LongTensor [n, seq_len]")
    p.add_argument("--eval", required=True, type=Path, help="torch.save'd LongTensor [1, n]")
    p.add_argument("--eval-seq-len", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.2, help="pruning_ratio")
    p.add_argument("--metrics", default="WIFV")
    p.add_argument("--structure", default="AL-AM")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)

    import transformers
    from transformers import AutoModelForCausalLM

    calib = torch.load(args.calib)
    ev = torch.load(args.eval)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_pretrained(local_model_dir(args.model, Path(tmp)), torch_dtype=torch.float32,
                                                     low_cpu_mem_usage=True)
    model.eval()
    dense = perplexity(model, ev, args.eval_seq_len)
    multi_head(model)
    dense_mha = perplexity(model, ev, args.eval_seq_len)
    hd = model.config.hidden_size // model.config.num_attention_heads
    original = load_original(args.src.resolve(), hd, calib.shape[0])
    original.get_loaders = lambda name, nsamples, seed, seqlen, tokenizer: (
        [(calib[i:i + 1], None) for i in range(calib.shape[0])], None)
    masks: dict[str, list] = {"attention": [], "mlp": []}
    compress = original.compress

    def recording(layer, attn_mask, mlp_mask, *a, **kw):
        if attn_mask is not None:
            masks["attention"].append(attn_mask.bool().tolist())
        if mlp_mask is not None:
            masks["mlp"].append(mlp_mask.bool().tolist())
        return compress(layer, attn_mask, mlp_mask, *a, **kw)

    original.compress = recording
    model.seqlen = calib.shape[1]
    ns = SimpleNamespace(nsamples=calib.shape[0], seed=0, pruning_ratio=args.ratio, remove_heads=-1,
                         metrics=args.metrics, structure=args.structure, unstr=False)
    params0 = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    original.prune_flap(ns, model, None, device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    for layer in model.model.layers:  # compress() wrote num_heads; 4.41's attention also reads the KV count
        att = layer.self_attn
        att.num_heads = int(att.num_heads)
        att.num_key_value_heads, att.hidden_size = att.num_heads, int(att.hidden_size)
    pruned = perplexity(model, ev, args.eval_seq_len)
    result = {"peer": "CASIA-IVA-Lab/FLAP", "transformers": transformers.__version__, "torch": torch.__version__,
              "pruning_ratio": args.ratio, "metrics": args.metrics, "structure": args.structure,
              "calibration": list(calib.shape), "eval_seq_len": args.eval_seq_len,
              "dense_ppl": dense, "dense_mha_ppl": dense_mha, "ppl": pruned, "prune_s": seconds,
              "params_mha_before": params0, "params_mha_after": sum(p.numel() for p in model.parameters()),
              "kept_heads": masks["attention"], "kept_channels": masks["mlp"]}
    args.out.write_text(json.dumps(result))
    return {k: v for k, v in result.items() if k not in ("kept_heads", "kept_channels")}


if __name__ == "__main__":
    print(json.dumps(main()))
