"""task=export: a compressed model for the runtimes people deploy with, checked in those runtimes.

    python run.py task=export model=<pruned checkpoint>                         # GGUF f32 for llama.cpp
    python run.py task=export model=<pruned checkpoint> export.out_type=q8_0   # (or f16, bf16, q4_k_m, ...)
    python run.py task=export model=<pruned checkpoint> export=decilm          # DeciLM layout for vLLM
    python run.py task=export model=<pruned checkpoint> export=hf              # stock transformers Llama

Top to bottom: options checked (before any weight loads), the model loaded, refused in one line if the format
cannot express it (``export.layout.check_expressible``), written (``export.to_gguf`` / ``export.decilm`` /
``export.hf``), then verified on ``verify_tokens`` tokens of held-out text (``eval.ppl``'s source, split from the
checkpoint's calibration text): a GGUF in llama.cpp itself (llama-cpp-python, logits on every position, f32 KV
cache for f32 files, plus a greedy-decoding check through its KV cache), a directory in transformers. The record
gets the logit error relative to the logit scale and the greedy-token agreement.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig

from core.data.text import TextSpec, calibration_and_eval_sources, eval_tokens, load_documents
from core.models.ref import ModelRef, gguf_path
from core.run.errors import ConfigError, UserError
from recipes._common import CONF_DIR, build, checkpoint_info, model_ref, plain, text_spec
from recipes._plan import plan_export

log = logging.getLogger(__name__)

METRICS = {"logit_error": "minimize", "greedy_agreement": "maximize", "size_mb": "minimize"}
plan = plan_export  # dry_run=true prints it; a run checks it before loading (recipes/_plan.py)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def options(node: Any) -> Any:
    """The built export options. ``export.format=X`` on top of another format's option file switches to
    ``conf/export/X.yaml``, keeping the keys both options share (output, verify, ...) from the command line; a
    key changed on the command line that X does not have is an error, never silently dropped."""
    d = plain(node) or {}
    fmt = d.get("format")
    files = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((CONF_DIR / "export").glob("*.yaml"))}
    if fmt not in files:
        raise ConfigError(f"export.format={fmt!r} is not one of {', '.join(files)}")
    own = files[fmt]
    if own.get("_target_") != d.get("_target_"):
        composed = next((f for f in files.values() if f.get("_target_") == d.get("_target_")), {})
        stray = [k for k, v in d.items() if k not in own and (k not in composed or composed[k] != v)]
        if stray:
            raise ConfigError(f"{', '.join(f'export.{k}' for k in stray)}: not an option of export.format={fmt} "
                              f"(conf/export/{fmt}.yaml)")
        d = {**own, **{k: v for k, v in d.items() if k in own and k not in ("_target_", "format")}}
    return build(d, "export")


def validate(cfg: DictConfig) -> list[str]:
    try:
        opts = options(cfg.export)
    except UserError as e:
        return [str(e)]
    errors = []
    if opts.output and Path(opts.output).expanduser().exists():
        errors.append(f"export.output={opts.output} already exists; exports never overwrite (choose another path)")
    path = Path(str(cfg.model.path)).expanduser() if cfg.model.kind == "hf" and cfg.model.path else None
    if path is not None and path.is_dir() and (path / "config.json").is_file() and not any(
            (path / f).is_file() for f in TOKENIZER_FILES):
        errors.append(f"model {path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): every export format needs "
                      "one; copy the base model's tokenizer files into it")
    return errors


# --------------------------------------------------------------------------- runtimes


def llama_cpp_model(path: str | Path, n_ctx: int, *, f32_cache: bool = True, threads: Optional[int] = None):
    """A llama-cpp-python ``Llama`` with logits on every position (f32 KV cache unless ``f32_cache`` is false)."""
    import llama_cpp  # local: an optional dependency (pip install llama-cpp-python)

    kw = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_batch=n_ctx,
                           n_threads=threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or None, **kw)


def llama_cpp_logits(llm: Any, ids: list[int]):
    """Logits ``[len(ids), vocab]`` (float32 numpy) of llama.cpp on ``ids`` from an empty context."""
    llm.reset()
    llm.eval(ids)
    return llm.scores[: len(ids)].copy()


def llama_cpp_greedy(llm: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt``, one at a time through llama.cpp's KV cache."""
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(nxt)
        llm.eval([nxt])
    return out


def llama_cpp_quantize(src: str | Path, dst: str | Path, out_type: str, threads: Optional[int] = None) -> None:
    """llama.cpp's own quantiser (the code behind llama-quantize), ``src`` (f32 GGUF) -> ``dst``."""
    import llama_cpp  # local: an optional dependency (pip install llama-cpp-python)

    from export.layout import ExportError  # local: torch; validation imports this module

    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{out_type.upper()}")
    params.nthread = threads or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp's quantiser failed to write {out_type} ({dst}), return code {rc}")


def compare(ref, got) -> dict:
    """Logit error relative to the logit scale (max |reference logit|) and greedy-token agreement."""
    import numpy as np  # local: numpy; validation imports this module

    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    err = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max())
    return {"max_abs_logit_diff": err, "logit_scale": scale, "logit_error": err / scale if scale else err,
            "greedy_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean()), "tokens": int(ref.shape[0])}


# --------------------------------------------------------------------------- the recipe


def _held_out_tokens(tok: Any, cfg: DictConfig, info: dict, n: int) -> tuple[list[int], dict]:
    """``n`` tokens of ``eval.ppl``'s text, never the checkpoint's calibration text."""
    spec = TextSpec(cfg.eval.ppl.source, cfg.eval.ppl.path, cfg.eval.ppl.text_field)
    calib_cfg = (info.get("config") or {}).get("data")
    if calib_cfg:
        _, src = calibration_and_eval_sources(text_spec(calib_cfg), spec, cfg.paths.cache_dir)
    else:
        src = load_documents(spec, cfg.paths.cache_dir)
    ids = eval_tokens(tok, src, n)[0, :n].tolist()
    return ids, {"source": src.name, "description": src.description, "tokens": len(ids)}


def _source_gguf(ref: Any, info: dict) -> Optional[Path]:
    """The GGUF file the model (or the model it was pruned from) was read from, if any."""
    for r in (ref, ModelRef.of(info["base_model"]) if info.get("base_model") else None):
        if r is not None and r.kind == "gguf" and r.gguf_package and r.gguf_file:
            return gguf_path(r.gguf_package, r.gguf_file)
    return None


def _gguf_tokenizer(opts: Any, ref: Any, info: dict, tok: Any):
    # local: torch, gguf; validation imports this module
    from export.layout import ExportError
    from export.tokenizer import from_gguf, from_hf, same_vocabulary

    if opts.tokenizer in ("auto", "gguf"):
        src = _source_gguf(ref, info)
        if src is not None:
            fields = from_gguf(src)
            if same_vocabulary(fields, tok):
                return fields
            if opts.tokenizer == "gguf":
                raise ExportError(f"export.tokenizer=gguf: {src.name}'s vocabulary differs from the model's tokenizer")
            log.warning("%s's vocabulary differs from the model's tokenizer: building it from the HF tokenizer", src)
        elif opts.tokenizer == "gguf":
            raise ExportError("export.tokenizer=gguf: neither the model nor its base model was read from a GGUF file")
    return from_hf(tok, opts.tokenizer_pre)


def _verify_gguf(path: Path, model: Any, tok: Any, ids: list[int], out_type: str, threads: Optional[int]) -> dict:
    import torch  # local: torch; validation imports this module

    if importlib.util.find_spec("llama_cpp") is None:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}
    llm = llama_cpp_model(path, n_ctx=len(ids) + 16, f32_cache=out_type == "f32", threads=threads)
    try:
        got = llama_cpp_logits(llm, ids)
        with torch.no_grad():
            ref = model(torch.tensor([ids], device=model.device)).logits[0].float().cpu().numpy()
        result = {"runtime": "llama.cpp (llama-cpp-python)", "kv_cache": "f32" if out_type == "f32" else "f16",
                  **compare(ref, got)}
        prompt = ids[:16]
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=8, do_sample=False,
                                  pad_token_id=tok.pad_token_id if tok is not None else None)[0, len(prompt):].tolist()
        have = llama_cpp_greedy(llm, prompt, 8)
        result["generation"] = {"prompt_tokens": len(prompt), "model": want, "llama_cpp": have, "match": want == have}
        text = tok.decode(ids) if tok is not None else None
        if text is not None:
            mine = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            theirs = tok(text, add_special_tokens=False)["input_ids"]
            result["tokenizer_match"] = mine == theirs
    finally:
        llm.close()
    return result


def _verify_dir(path: Path, model: Any, ids: list[int], remote_code: bool) -> dict:
    # local: torch + transformers; validation imports this module
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote_code, dtype=model.dtype)
    loaded.eval()
    with torch.no_grad():
        x = torch.tensor([ids])
        ref = model(x.to(model.device)).logits[0].float().cpu().numpy()
        got = loaded(x).logits[0].float().numpy()
    return {"runtime": f"transformers ({type(loaded).__name__}{', trust_remote_code' if remote_code else ''})",
            **compare(ref, got)}


# bytes per weight written, by GGUF out_type (llama.cpp's own quantisers: the f32 file staged first, then the output)
_GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


def check_early(ref: Any, opts: Any, cache_dir: str, run_dir: Path) -> None:
    """What config.json settles before the weights load: a model the format cannot express (SliceGPT's rotations,
    Llamba's Mamba-2 layers), and room on the disk for the export (as prune checks for its checkpoint)."""
    from core.models import legacy  # local: torch; validation imports this module
    from core.models.llama import params_from_config
    from core.models.ref import model_config
    from export.layout import check_expressible_config
    from export.to_gguf import check_free_space

    if ref.kind == "hf" and ref.path and legacy.detect_format(Path(ref.path).expanduser()).kind == "slicegpt":
        check_expressible_config({"slicing": True}, opts.format)
    config = model_config(ref, cache_dir)
    if config is None:
        return
    check_expressible_config(config, opts.format)
    if opts.format == "gguf":
        out = Path(opts.output).expanduser() if opts.output else run_dir / "model.gguf"
        per = _GGUF_BYTES.get(opts.out_type, 4.0 + 1.0)  # llama.cpp's quantisers: the staged f32 + at most ~1 B
    else:
        out = Path(opts.output).expanduser() if opts.output else run_dir / opts.format
        per = 2.0 if (opts.dtype or ref.dtype) in ("float16", "bfloat16") else 4.0
        out = out / "model.safetensors"
    check_free_space(out, int(params_from_config(config) * per))


def run(cfg: DictConfig, ctx: Any) -> dict:
    # local: torch, transformers, gguf; validation imports this module
    from core.models.load import load_model, torch_dtype
    from export.decilm import write_decilm
    from export.hf import write_hf
    from export.layout import check_expressible
    from export.to_gguf import disk_error, write_gguf

    opts = options(cfg.export)
    ref, run_dir = model_ref(cfg.model), Path(cfg.paths.output_dir)
    info = checkpoint_info(ref)
    check_early(ref, opts, cfg.paths.cache_dir, run_dir)  # before any weight is read
    t0 = time.perf_counter()
    model, tok = load_model(ref, cache_dir=cfg.paths.cache_dir, allow_pickle=cfg.allow_pickle)
    t_load = time.perf_counter() - t0
    check_expressible(model, opts.format)
    ctx.log("model", {"name": ref.name, "path": ref.path, "kind": ref.kind})
    if info.get("method"):
        ctx.log("method", info["method"])
        ctx.log("compression", info.get("compression"))
    base = (info.get("base_model") or {}).get("name")
    name = f"{base}-{info['method']}" if base and info.get("method") else (ref.name or "model")  # smollm2-taylor
    threads = cfg.runtime.threads

    t0 = time.perf_counter()
    if opts.format == "gguf":
        out = Path(opts.output).expanduser() if opts.output else run_dir / f"{name}-{opts.out_type}.gguf"
        fields = _gguf_tokenizer(opts, ref, info, tok)
        if opts.needs_llama_cpp_quantiser:
            # staged inside a partial dir (.<name>.partial-<pid>-*): a killed export leaves nothing task=table misses
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
            except OSError as e:
                raise disk_error(e, out) from None
            staged = stage / "f32.gguf"
            try:
                report = write_gguf(model, fields, staged, "f32", name=name)
                llama_cpp_quantize(staged, out, opts.out_type, threads)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
            report.path, report.out_type, report.bytes = str(out), opts.out_type, out.stat().st_size
        else:
            report = write_gguf(model, fields, out, opts.out_type, name=name)
        log.info("GGUF (%s, %s): %s, %.1f MB, tokenizer from %s", report.architecture, report.out_type, out,
                 report.bytes / 1e6, report.tokenizer)
    else:
        out = Path(opts.output).expanduser() if opts.output else run_dir / opts.format
        writer = write_decilm if opts.format == "decilm" else write_hf
        try:
            report = writer(model, tok, out, dtype=torch_dtype(opts.dtype) if opts.dtype else None,
                            info={"source": ref.to_dict(), "checkpoint_info": {k: info.get(k) for k in (
                                "method", "ratio", "compression", "base_model") if k in info}})
        except OSError as e:
            raise disk_error(e, out) from None
        log.info("%s: %s, %.1f MB, %d query heads per attention layer", opts.format, out, report.bytes / 1e6,
                 report.heads)
    t_write = time.perf_counter() - t0
    ctx.log("export", {"format": opts.format, **report.to_dict()})

    metrics: dict[str, Any] = {"size_mb": report.bytes / 1e6}
    if opts.verify:
        ids, text = _held_out_tokens(tok, cfg, info, opts.verify_tokens)
        t0 = time.perf_counter()
        if opts.format == "gguf":
            result = _verify_gguf(out, model, tok, ids, report.out_type, threads)
        else:
            result = _verify_dir(out, model, ids, remote_code=opts.format == "decilm")
        result["text"] = text
        result["seconds"] = time.perf_counter() - t0
        ctx.log("verify", result)
        if "logit_error" in result:
            metrics.update(logit_error=result["logit_error"], greedy_agreement=result["greedy_agreement"])
            log.info("verified in %s on %d held-out tokens: max |dlogit| %.3g (%.2g of the logit scale %.3g), greedy "
                     "agreement %.4f%s", result["runtime"], result["tokens"], result["max_abs_logit_diff"],
                     result["logit_error"], result["logit_scale"], result["greedy_agreement"],
                     f", generation {'matches' if result['generation']['match'] else 'DIFFERS'}"
                     if "generation" in result else "")
        else:
            log.warning("not verified: %s", result.get("skipped"))
    elif opts.format == "gguf" and importlib.util.find_spec("llama_cpp") is None:
        log.info("llama-cpp-python is not installed: the file was not run")
    ctx.log("timings", {"load_s": t_load, "export_s": t_write})
    return metrics
