"""Original code against prunelab, same model and data: Wanda, FLAP, ShortGPT on SmolLM2-135M-Instruct.

    .venv/bin/python tests/bench/peers_bench.py --method wanda --source PATH/TO/wanda.git
    .venv/bin/python tests/bench/peers_bench.py --method flap --source PATH/TO/FLAP.git
    .venv/bin/python tests/bench/peers_bench.py --method shortgpt --source PATH/TO/ShortGPT.git

``--source``: a git directory (clone or bare mirror) of the original: github.com/locuslab/wanda,
github.com/CASIA-IVA-Lab/FLAP, github.com/icip-cas/ShortGPT (the authors' code). ``tests/peers/<method>_env.sh``
builds the original's own environment (``.venv-peers/<method>``, its HEAD exported with ``git archive``) and
``tests/peers/<method>_original.py`` runs it there, in a child process, on the calibration and evaluation token ids
this script writes; prunelab's pruner runs here, from its option file, on the same ids and the same model
(the packaged SmolLM2 GGUF's HF directory, ``core.models.load.cached_gguf_dir``). Calibration: Austen,
``--samples`` x ``--seq-len`` (32 x 512); perplexity: prunelab's protocol on the first ``--eval-tokens`` tokens of
the BoolQ passages in windows of ``--eval-seq-len`` (4096, 128), the same held-out text as baselines_bench.py.

One JSON line per run (``tests/bench/results/peers.jsonl``): dense perplexity (measured in both environments: a
mismatch means the two do not run the same model), the original's perplexity and seconds, prunelab's, each one's
damage ``ppl / dense``, the damage ratio ours / original, and the overlap of what was removed:

- wanda (50% unstructured, per output row): of the weights the original zeroes, the share ours zeroes too
  (``overlap``) and the share of all weights on which the two masks agree; ours twice, ``sequential=false`` (the
  default: later layers see the dense model's inputs) and ``sequential=true`` (the original's order);
- flap (20%, WIFV, AL-AM, bias compensation): the original only runs multi-head with 128-wide heads, so it runs on
  SmolLM2 with its KV heads repeated per query head (the same function; tests/peers/flap_original.py), and ours runs
  on that same multi-head model (``ours_mha``: heads and channels overlap) and on SmolLM2 itself (``ours``:
  whole KV groups, the way pruner=flap is used);
- shortgpt (7 layers): the layers each removes, and their Jaccard overlap.
"""

from __future__ import annotations

import argparse
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

OURS: dict[str, list[str]] = {  # Hydra overrides of the prune config (layers=all is added)
    "wanda": ["pruner=wanda", "ratio=0.5"],
    "flap": ["pruner=flap", "ratio=0.2"],
    "shortgpt": ["pruner=shortgpt", "pruner.num_layers=7"],
}
SETTINGS = {"wanda": ["--sparsity", "0.5"], "flap": ["--ratio", "0.2"], "shortgpt": ["--layers", "7"]}


def peer_python(method: str, source: Path) -> str:
    out = subprocess.run(["bash", str(ROOT / "tests" / "peers" / f"{method}_env.sh"), str(source)], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def prunelab(method: str, extra: list[str], ref, cache: str, calib, ev, eval_seq_len: int, *, mha: bool = False):
    """(result, seconds, perplexity, model) of prunelab's pruner on a fresh copy of the model."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from analysis.perplexity import perplexity
    from core.models.load import load_model
    from recipes._common import build

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*OURS[method], *extra, "layers=all", "paths.output_dir=/tmp"])
    pruner = build(cfg.pruner, "pruner")
    model, _ = load_model(ref, cache_dir=cache)
    model.eval()
    if mha:
        multi_head(model)
    dense = {}
    for layer_i, layer in enumerate(model.model.layers):  # dense widths, to find which rows survive
        dense[layer_i] = layer.mlp.gate_proj.weight.detach().clone()
    t0 = time.perf_counter()
    with torch.no_grad():
        res = pruner(model, calib)
    seconds = time.perf_counter() - t0
    ppl = perplexity(model, ev, eval_seq_len, 4, progress=False)["value"]
    return res, seconds, ppl, model, dense


def multi_head(model) -> None:
    """Repeat each KV head's k/v rows for every query head it serves (the same function, one KV head per head)."""
    import torch
    from torch import nn

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    with torch.no_grad():
        for layer in model.model.layers:
            att = layer.self_attn
            for name in ("k_proj", "v_proj"):
                w = getattr(att, name).weight.view(kv, hd, -1).repeat_interleave(heads // kv, dim=0).reshape(heads * hd, -1)
                new = nn.Linear(w.shape[1], w.shape[0], bias=False)
                new.weight.copy_(w)
                setattr(att, name, new)
            att.num_key_value_groups = 1
    cfg.num_key_value_heads = heads


def kept_rows(dense, pruned) -> list[bool]:
    """Which rows of ``dense`` [n, d] survive in ``pruned`` [m, d] (rows are matched exactly, in order)."""
    keep, j = [], 0
    for i in range(dense.shape[0]):
        if j < pruned.shape[0] and bool((dense[i] == pruned[j]).all()):
            keep.append(True)
            j += 1
        else:
            keep.append(False)
    assert j == pruned.shape[0], "pruned rows are not an ordered subset of the dense ones"
    return keep


def removed_overlap(orig: list[list[bool]], ours: list[list[bool]]) -> dict:
    """Over all layers: units each removed, and the share of the original's removed units ours removes too."""
    a = {(l, i) for l, row in enumerate(orig) for i, k in enumerate(row) if not k}
    b = {(l, i) for l, row in enumerate(ours) for i, k in enumerate(row) if not k}
    return {"original_removed": len(a), "ours_removed": len(b),
            "overlap": round(len(a & b) / len(a), 4) if a else None,
            "jaccard": round(len(a & b) / len(a | b), 4) if a | b else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True, choices=sorted(OURS))
    ap.add_argument("--source", required=True, type=Path, help="git directory of the original repository")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import run  # noqa: F401  (registers the schema and resolvers)
    from analysis.perplexity import perplexity
    from core.data.text import TextSpec, calibration_batch, eval_tokens, load_documents
    from core.models.load import cached_gguf_dir, load_model
    from recipes._common import resolve_model
    from transformers import AutoTokenizer

    m = args.method
    py = peer_python(m, args.source)
    commit = subprocess.run(["git", f"--git-dir={args.source / '.git'}" if (args.source / ".git").is_dir()
                             else f"--git-dir={args.source}", "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    ref = resolve_model("smollm2")
    hf_dir = cached_gguf_dir(ref, cache)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    calib = calibration_batch(tok, load_documents(TextSpec("austen"), cache_dir=cache), args.samples, args.seq_len, 0)
    ev = eval_tokens(tok, load_documents(TextSpec("boolq")), args.eval_tokens)

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        torch.save(calib, t / "calib.pt")
        torch.save(ev, t / "eval.pt")
        cmd = [py, str(ROOT / "tests" / "peers" / f"{m}_original.py"), "--src", str(Path(py).parents[1] / "src"),
               "--model", str(hf_dir), "--calib", str(t / "calib.pt"), "--eval", str(t / "eval.pt"),
               "--eval-seq-len", str(args.eval_seq_len), "--out", str(t / "out.json"), *SETTINGS[m]]
        if m == "wanda":
            cmd += ["--masks", str(t / "masks.pt")]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"the original failed:\n{proc.stderr[-3000:]}")
        orig = json.loads((t / "out.json").read_text())
        masks = torch.load(t / "masks.pt") if m == "wanda" else None

    model, _ = load_model(ref, cache_dir=cache)
    dense_ours = perplexity(model, ev, args.eval_seq_len, 4, progress=False)["value"]
    del model
    row = {"bench": "peers", "method": m, "model": "SmolLM2-135M-Instruct", "threads": args.threads,
           "calibration": {"text": "austen", "samples": args.samples, "seq_len": args.seq_len},
           "ppl_protocol": {"text": "boolq validation passages", "seq_len": args.eval_seq_len,
                            "tokens": args.eval_tokens},
           "original": {"repo": orig["peer"], "commit": commit, "transformers": orig["transformers"],
                        "torch": orig["torch"], "dense_ppl": round(orig["dense_ppl"], 3), "ppl": round(orig["ppl"], 3),
                        "prune_s": round(orig["prune_s"], 2), "process_wall_s": round(wall, 2)},
           "dense_ppl": round(dense_ours, 3)}

    def side(ppl: float, seconds: float) -> dict:
        return {"ppl": round(ppl, 3), "prune_s": round(seconds, 2), "damage": round(ppl / dense_ours, 4),
                "damage_ratio_vs_original": round((ppl / dense_ours) / (orig["ppl"] / orig["dense_ppl"]), 4)}

    row["original"]["damage"] = round(orig["ppl"] / orig["dense_ppl"], 4)
    if m == "wanda":
        for key, extra in (("ours", []), ("ours_sequential", ["pruner.sequential=true"])):
            _, s, ppl, model, _ = prunelab(m, extra, ref, cache, calib, ev, args.eval_seq_len)
            a = b = agree = total = 0
            for i, layer in enumerate(model.model.layers):
                for name, mask in masks.items():
                    li, lname = name.split(".", 1)
                    if int(li) != i:
                        continue
                    ours = layer.get_submodule(lname).weight.detach() == 0
                    a += int(mask.sum())
                    b += int((mask & ours).sum())
                    agree += int((mask == ours).sum())
                    total += mask.numel()
            row[key] = {**side(ppl, s), "overlap": round(b / a, 6), "same_mask": round(agree / total, 6)}
            del model
    elif m == "flap":
        res, s, ppl, _, _ = prunelab(m, [], ref, cache, calib, ev, args.eval_seq_len)
        row["ours"] = {**side(ppl, s), "kv_groups_removed": res.details["kv_groups_removed"],
                       "channels_removed": res.details["channels_removed"],
                       "removed_prunable_fraction": round(res.details["in_range_fraction"], 4)}
        res, s, ppl, model, dense = prunelab(m, [], ref, cache, calib, ev, args.eval_seq_len, mha=True)
        heads = [[g not in set(d["removed_kv_groups"]) for g in range(d["kv_heads"][0])] for d in res.layers]
        channels = [kept_rows(dense[i], layer.mlp.gate_proj.weight.detach()) for i, layer in
                    enumerate(model.model.layers)]
        row["original"].update({"dense_mha_ppl": round(orig["dense_mha_ppl"], 3),
                                "heads_removed": sum(r.count(False) for r in orig["kept_heads"]),
                                "channels_removed": sum(r.count(False) for r in orig["kept_channels"])})
        row["ours_mha"] = {**side(ppl, s), "heads": removed_overlap(orig["kept_heads"], heads),
                           "channels": removed_overlap(orig["kept_channels"], channels)}
    else:
        res, s, ppl, model, _ = prunelab(m, [], ref, cache, calib, ev, args.eval_seq_len)
        ours = sorted(model.config.removed_layers)
        a, b = set(orig["removed_layers"]), set(ours)
        row["original"]["removed_layers"] = sorted(a)
        row["ours"] = {**side(ppl, s), "removed_layers": ours, "jaccard": round(len(a & b) / len(a | b), 4)}
    record(row, __file__, threads=args.threads)


if __name__ == "__main__":
    main()
