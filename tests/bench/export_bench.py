"""Export cost and fidelity on SmolLM2 pruned by taylor (0.5): GGUF f32 / q8_0 in llama.cpp, DeciLM in transformers.

    python tests/bench/export_bench.py [--model <pruned checkpoint>] [--tokens 256] [--threads 1]

Without --model it prunes the embedded SmolLM2 first (taylor, ratio 0.5, 8 x 64 calibration tokens). Prints one
JSON line: per format the export wall time as a ratio to one project forward pass over the same tokens, the file
size against the checkpoint's safetensors, the logit error (max |dlogit| / max |logit|) and greedy agreement on
held-out boolq text, and llama.cpp's tokens/s against the project's (transformers) tokens/s, for prompt processing
(one forward over all tokens) and for greedy decoding (32 tokens after a 16-token prompt, one at a time through
each runtime's KV cache). Timings are the best of 3 on ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import record  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
for _v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_v] = "1"


def _prune(work: Path, threads: int) -> Path:
    from conftest import run_task

    _, m = run_task(["pruner=taylor", "ratio=0.5", "logger=none", "eval.ppl.enabled=false",
                     "eval.generation.enabled=false", f"runtime.threads={threads}", "data.num_samples=8",
                     "data.seq_len=64"], work / "prune")
    assert m["status"] == "completed", m.get("error")
    return work / "prune" / "model"


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="export_bench_") as tmp:  # ~1 GB of files, removed at the end
        record(_bench(Path(tmp), args), __file__)


def _bench(work: Path, args: argparse.Namespace) -> dict:
    import torch

    from core.data.text import TextSpec, eval_tokens, load_documents
    from core.models.load import load_model
    from core.models.ref import ModelRef
    from export.decilm import write_decilm
    from export.to_gguf import write_gguf
    from export.tokenizer import from_gguf
    from recipes._common import checkpoint_info
    from recipes.export import _source_gguf, compare, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model

    ckpt = Path(args.model) if args.model else _prune(work, args.threads)
    ref = ModelRef.at(ckpt)
    model, tok = load_model(ref, cache_dir=ROOT / ".cache")
    ids = eval_tokens(tok, load_documents(TextSpec("boolq"), ROOT / ".cache"), args.tokens)[0].tolist()
    x = torch.tensor([ids])
    with torch.no_grad():
        model(x)  # warm-up
        t_fwd = _best(lambda: model(x))
        ref_logits = model(x).logits[0].numpy()
        prompt = x[:, :16]
        t_dec = _best(lambda: model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                             pad_token_id=tok.pad_token_id))
    safetensors = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    fields = from_gguf(_source_gguf(ref, checkpoint_info(ref)))
    out: dict = {"model": str(ckpt), "tokens": len(ids), "threads": args.threads,
                 "forward_s": t_fwd, "forward_tokens_per_s": len(ids) / t_fwd, "decode_tokens_per_s": 32 / t_dec,
                 "safetensors_mb": safetensors / 1e6}
    for out_type in ("f32", "q8_0"):
        path = work / f"m-{out_type}.gguf"
        t0 = time.perf_counter()
        report = write_gguf(model, fields, path, out_type, name="bench")
        t_export = time.perf_counter() - t0
        llm = llama_cpp_model(path, n_ctx=len(ids) + 16, f32_cache=out_type == "f32", threads=args.threads)
        llama_cpp_logits(llm, ids)  # warm-up
        t_llama = _best(lambda: llama_cpp_logits(llm, ids))
        got = llama_cpp_logits(llm, ids)
        t_llama_dec = _best(lambda: llama_cpp_greedy(llm, ids[:16], 32))
        llm.close()
        c = compare(ref_logits, got)
        out[f"gguf_{out_type}"] = {"export_s": t_export, "export_over_forward": t_export / t_fwd,
                                   "file_mb": report.bytes / 1e6, "size_vs_safetensors": report.bytes / safetensors,
                                   "logit_error": c["logit_error"], "max_abs_logit_diff": c["max_abs_logit_diff"],
                                   "greedy_agreement": c["greedy_agreement"],
                                   "llama_cpp_tokens_per_s": len(ids) / t_llama,
                                   "llama_cpp_over_forward_speed": t_fwd / t_llama,
                                   "llama_cpp_decode_tokens_per_s": 32 / t_llama_dec,
                                   "llama_cpp_over_project_decode_speed": t_dec / t_llama_dec}
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    report = write_decilm(model, tok, work / "decilm")
    t_export = time.perf_counter() - t0
    loaded = AutoModelForCausalLM.from_pretrained(work / "decilm", trust_remote_code=True).eval()
    with torch.no_grad():
        loaded(x)
        t_loaded = _best(lambda: loaded(x))
        c = compare(ref_logits, loaded(x).logits[0].numpy())
    out["decilm"] = {"export_s": t_export, "export_over_forward": t_export / t_fwd, "dir_mb": report.bytes / 1e6,
                     "size_vs_safetensors": report.bytes / safetensors,
                     "params_padded_pct": 100.0 * (report.params_written / report.params_model - 1),
                     "logit_error": c["logit_error"], "greedy_agreement": c["greedy_agreement"],
                     "transformers_tokens_per_s": len(ids) / t_loaded}
    return out


if __name__ == "__main__":
    main()
