"""One loader for every model prunelab reads, addressed by a :class:`ModelRef`.

``load_model(ref)`` handles:
- ``kind=gguf``: a GGUF file inside an installed package (the embedded SmolLM2-135M-Instruct),
  dequantised once by transformers and cached as a safetensors HF dir under
  ``<cache_dir>/models/<name>`` (the GGUF load takes ~25 s, the cached dir ~1 s);
- ``kind=hf``: a local HF dir, a prunelab checkpoint (pruned Llama, sliced Llama or hybrid: its own config
  class, no remote code needed), a Cartesia Llamba dir (``core.models.llamba``: read as a hybrid whose layers are all
  mamba2), SliceGPT's saved output (``core.models.slicegpt``, with the base config.json beside it), or a legacy
  file/dir (``core.models.legacy``; pickles only with ``allow_pickle``);
- ``kind=tiny``: a random-weight GQA Llama with an in-memory byte-level tokenizer, for tests.

``core.models.ref.model_depth(ref)`` reads the number of layers without loading weights, so layer ranges are
validated before an 8B model is read. Any failure to load is a :class:`~core.run.errors.LoadError` with one
line that names the file; missing, unexpected or mis-shaped weights are such a failure, never a model with
random weights. Importing this module imports torch and transformers (seconds): only code that loads or builds a
model imports it; a ``ModelRef`` (config validation) comes from :mod:`core.models.ref`, which imports neither.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import transformers.modeling_utils as mu
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from core.models import legacy, llamba, slicegpt
from core.models.modeling_hybrid import HybridForCausalLM
from core.models.modeling_pruned import PrunedLlamaConfig, PrunedLlamaForCausalLM
from core.models.modeling_sliced import SlicedLlamaForCausalLM
from core.models import shape as shapes
from core.models.ref import (KINDS, ModelRef, _check_path, check_config_sizes, check_gguf_cache, gguf_cache_dir,
                             gguf_path, gguf_sizes, read_checked_config, tiny_config)
from core.run.errors import LoadError, UserError
from core.run.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>, <pad>. No files, no hub."""
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for tok in ("<s>", "</s>", "<pad>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tok


def build_tiny(num_layers: int = 4, hidden_size: int = 64, intermediate_size: int = 128, num_heads: int = 8,
               num_kv_heads: int = 2, vocab_size: int = 256, seed: int = 0):
    """Random-weight Llama (GQA) + byte tokenizer, built in memory in milliseconds."""
    tok = byte_tokenizer()
    cfg = LlamaConfig(**tiny_config(num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads,
                                    max(vocab_size, len(tok))),
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    return model, tok


# --------------------------------------------------------------------------- GGUF (embedded model)


# llama.cpp's pre-tokenizer (``tokenizer.ggml.pre``) -> the tokenizer.json ``pre_tokenizer`` that splits the same way.
# transformers' GGUF conversion writes a plain ByteLevel for every byte-level BPE and so drops SmolLM2's one-digit
# split ("smollm": digits one by one, then GPT-2's regex): "  1" became [" ", " 1"] instead of ["  ", "1"].
GGUF_PRE_TOKENIZERS = {
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
}


def gguf_pre(src: Path) -> Optional[str]:
    """The GGUF's ``tokenizer.ggml.pre`` (llama.cpp's pre-tokenizer name), or None."""
    from gguf import GGUFReader  # local: numpy

    field = GGUFReader(str(src)).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[field.data[0]]).decode(errors="replace") if field is not None and field.data else None


def restore_pre_tokenizer(tok: Any, pre: Optional[str]) -> Any:
    """``tok`` with the pre-tokenizer llama.cpp applies for ``pre`` (:data:`GGUF_PRE_TOKENIZERS`), so the cached
    tokenizer tokenizes exactly as the GGUF does (tests/core/test_gguf_cache.py compares it with llama.cpp's)."""
    make = GGUF_PRE_TOKENIZERS.get(pre or "")
    if make is None:
        if pre:
            log.warning("GGUF pre-tokenizer %r is not mapped: the converted tokenizer keeps transformers' own", pre)
        return tok
    tok.backend_tokenizer.pre_tokenizer = make()
    return tok


def cached_gguf_dir(ref: ModelRef, cache_dir: str | Path) -> Path:
    """Convert the packaged GGUF into a safetensors HF dir once; later loads read that dir.

    The dir is ``<cache_dir>/models/<name>-<key>`` (:func:`core.models.ref.gguf_cache_dir`: package, file, size,
    sha256), with the source in ``source.json``: a dir whose source.json differs is refused, never read."""
    target, source = gguf_cache_dir(ref, cache_dir)
    if (target / "config.json").is_file():
        check_gguf_cache(target, source)
        return target
    src = gguf_path(ref.gguf_package, ref.gguf_file)
    gguf_sizes(src)  # its metadata bounds-checked before transformers converts it

    log.info("converting %s to a cached HF dir %s (once)", src.name, target)
    unkeyed = Path(cache_dir) / "models" / ref.name
    if (unkeyed / "config.json").is_file():
        log.warning("%s (an earlier version's conversion, keyed by the name only) is no longer read: delete it",
                    unkeyed)
    tok = restore_pre_tokenizer(AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name), gguf_pre(src))
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The dequantised weights are plain fp32; drop the GGUF marker so the model saves as a normal checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ref.name
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            atomic_write_json(tmp / "source.json", source)
    except FileExistsError:  # another process converted it meanwhile
        check_gguf_cache(target, source)
    return target


# --------------------------------------------------------------------------- loading


def _is_prunelab(cfg: dict) -> bool:
    return cfg.get("model_type") == "prunelab_llama"


def torch_dtype(name: str):
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, "auto")


def _check_loading_info(path: Path, info: dict) -> None:
    """Missing, unexpected or mis-shaped weights are an error: a model with random weights is never returned."""
    problems = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                       ("mismatched_keys", "wrong shape")):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get(key) or []))
        if names:
            problems.append(f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if problems:
        raise LoadError(f"{path}: the weights do not match config.json: " + "; ".join(problems)
                        + " (a truncated or edited checkpoint?)")


@contextmanager
def _read_not_mapped(enabled: bool) -> Iterator[None]:
    """While active, transformers reads CPU safetensors with ``pread`` instead of mapping the file.

    A mapped checkpoint's weights stay file-backed: every page a forward touches joins the RSS and stays there
    while any tensor of the file lives, so weights a pruner replaces (structured surgery) are never given back
    and a pruned model costs its old weights plus its new ones. Read into private memory, a freed weight is
    freed. Same bytes either way; loading reads the file up front (SmolLM2: 0.6 s instead of 0.15 s of lazy
    mapping). A transformers without this hook loads as before.
    """
    original = getattr(mu, "safe_open", None)
    if not enabled or original is None:
        yield
        return

    def safe_open(file: Any, framework: str = "pt", device: Any = "cpu", backend: Optional[str] = None, **kw: Any):
        if str(device) == "cpu" and backend in (None, "mmap"):
            backend = "pread"
        return original(file, framework=framework, device=device, backend=backend, **kw)

    mu.safe_open = safe_open
    try:
        yield
    finally:
        mu.safe_open = original


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _read_plain_llama(path: Path, cfg: dict, dtype: str) -> Optional[Any]:
    """A plain Llama in one ``model.safetensors`` on the CPU, stored in the dtype asked for (float32, bfloat16 or
    float16; ``auto``: the stored one), read straight into its parameters; else None.

    The model is built in that dtype without initialising its weights (its RoPE buffers are computed as usual), then
    each tensor's bytes are read from the file into the parameter's own memory with ``readinto``: one pass at
    page-cache speed, no mapped file kept alive and no second copy (the peak is the model's bytes, as the planner
    counts it; transformers' own read holds a few tensors' worth more, ~2.4 GiB more for Llama-3-8B's widths).
    Same parameters, buffers, config and generation config as ``from_pretrained`` (tests/core/test_fast_read.py
    compares them). Anything else (a cast, another layout, sharded or quantised weights, a key or shape that does
    not match) returns None and goes through ``from_pretrained``, which reads it or names what is wrong.
    """
    file = path / "model.safetensors"
    if (cfg.get("model_type") != "llama" or cfg.get("quantization_config")
            or cfg.get("architectures", ["LlamaForCausalLM"]) != ["LlamaForCausalLM"] or not file.is_file()
            or (path / "model.safetensors.index.json").exists()):
        return None
    import json

    from transformers import AutoConfig, GenerationConfig
    from transformers.initialization import no_init_weights

    with open(file, "rb", buffering=0) as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 2 <= size <= min(100_000_000, file.stat().st_size - 8):
            return None
        header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        stored = {_SAFETENSORS_DTYPES.get(h.get("dtype")) if isinstance(h, dict) else None for h in header.values()}
        if len(stored) != 1 or None in stored or (dtype != "auto" and stored != {dtype}):
            return None
        want = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[stored.pop()]
        config = AutoConfig.from_pretrained(path)
        if torch.get_default_dtype() != torch.float32:
            return None
        torch.set_default_dtype(want)  # parameters are created in the stored dtype: no float32 copy first
        try:
            with no_init_weights():
                model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
        if want != torch.float32:
            model.config.dtype = want  # as from_pretrained(dtype=...) records it
        model.tie_weights()  # a tied lm_head is the embedding: one parameter, one entry
        params = dict(model.named_parameters())
        width = torch.finfo(want).bits // 8
        if set(header) != set(params) or any(
                params[k].dtype != want or list(params[k].shape) != h.get("shape")
                or h["data_offsets"][1] - h["data_offsets"][0] != params[k].numel() * width for k, h in header.items()):
            return None
        base = 8 + size
        for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            view = memoryview(params[name].data.reshape(-1).view(torch.uint8).numpy())
            fh.seek(base + h["data_offsets"][0])
            done = 0
            while done < len(view):
                n = fh.readinto(view[done:])
                if not n:
                    raise LoadError(f"{file}: truncated (tensor {name} ends past the end of the file)")
                done += n
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


def _from_pretrained(path: Path, cfg: dict, trust_remote_code: bool, kwargs: dict) -> tuple[Any, dict]:
    """(model, loading info) with the project's own classes for its checkpoint formats."""
    if cfg.get("model_type") == "prunelab_hybrid":
        return HybridForCausalLM.from_pretrained(path, **kwargs)
    if _is_prunelab(cfg):
        return PrunedLlamaForCausalLM.from_pretrained(path, **kwargs)
    if cfg.get("model_type") == "prunelab_sliced_llama":
        return SlicedLlamaForCausalLM.from_pretrained(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_hf_dir(path: Path, *, dtype: str = "float32", device: str = "cpu", device_map: Optional[str] = None,
                trust_remote_code: bool = False):
    if shapes.is_header_only_dir(path):  # a header-only shape: its weights are a sparse file of zeros
        raise shapes.header_only_error(path, "this shape model")
    cfg = read_checked_config(path)  # absurd sizes, or more layers than tensors: one line before anything is built
    if llamba.is_llamba_config(cfg):  # Cartesia's layout and key names: read as a hybrid
        return llamba.load_llamba(path, dtype=dtype, device=device, device_map=device_map)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "output_loading_info": True}
    # Weights go straight to their device (an 8B model is never staged in host RAM first);
    # device_map="auto" spreads a model too large for one GPU.
    if device_map or device != "cpu":
        kwargs["device_map"] = device_map or device
    model = None
    if device == "cpu" and not device_map and not trust_remote_code:
        model = _read_plain_llama(path, cfg, dtype)
    if model is None:
        with _read_not_mapped(device == "cpu" and not device_map):
            model, info = _from_pretrained(path, cfg, trust_remote_code, kwargs)
        _check_loading_info(path, info)
    tok = load_tokenizer(path, config=model.config)  # no remote-code prompt for auto_map
    model.eval()
    return model, tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def load_tokenizer(path: Path, **kw: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)``; a random-byte or malformed tokenizer file is one LoadError naming it."""
    try:
        return AutoTokenizer.from_pretrained(path, **kw)
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions (and UnicodeDecodeError, ValueError)
        files = [f for f in TOKENIZER_FILES if (Path(path) / f).is_file()]
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        bad = _unreadable_tokenizer_file(Path(path), files)
        what = f"{Path(path) / bad}: not a valid tokenizer file" if bad else f"{path}: no tokenizer could be read"
        raise LoadError(f"{what} ({type(e).__name__}: {first})") from None


def _unreadable_tokenizer_file(path: Path, files: list[str]) -> Optional[str]:
    """The first tokenizer file that is not UTF-8 JSON, or that the tokenizers library refuses (None: can't tell)."""
    import json

    for name in files:
        if name.endswith(".json"):
            try:
                data = json.loads((path / name).read_bytes().decode("utf-8"))
            except (OSError, ValueError):
                return name
            if name == "tokenizer.json":
                try:
                    Tokenizer.from_str(json.dumps(data))
                except Exception:  # noqa: BLE001 - the library's own refusal ("missing field `single_word`")
                    return name
    return files[0] if len(files) == 1 else None


def check_token_ids(model: Any, tok: Any, where: str) -> None:
    """A LoadError when the tokenizer can produce an id with no embedding row (IndexError in a forward, or worse, a
    checkpoint saved with a tokenizer that does not fit it)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if tok is None or rows is None or not hasattr(tok, "get_vocab"):
        return
    vocab = tok.get_vocab()
    top = max(vocab.values(), default=-1)
    if top >= rows:
        name = max(vocab, key=vocab.get)
        raise LoadError(f"{where}: the tokenizer has token ids up to {top:,} ({name!r}) but the model's embedding has "
                        f"{rows:,} rows: a tokenizer of another model? (put the model's own tokenizer files beside it)")


def check_finite(model: Any, where: str) -> None:
    """A LoadError naming the first weight that holds NaN or Inf: such a model computes nothing meaningful, and a
    run on it must never be recorded as a normal result."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
                continue
            # A sum is finite unless a value is NaN/Inf (or the sum overflows, e.g. in float16, which the exact
            # check below tells apart): one read of the weights, ~10x faster than isfinite on the CPU. In the
            # tensor's own dtype (it accumulates in float32 anyway): sum(dtype=float32) would first copy a bfloat16
            # tensor whole to float32 (+2 GiB for Llama-3-8B's embedding).
            if bool(torch.isfinite(t.detach().sum())):
                continue
            # in slices of 16M values: the check's temporary never costs more than 16 MB, whatever the model
            if not all(bool(torch.isfinite(part).all()) for part in t.detach().reshape(-1).split(1 << 24)):
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise LoadError(f"{where}: weight {name} holds {nan:,} NaN and {inf:,} Inf value(s): refusing a "
                                "model whose weights are not finite (a diverged training or a damaged file)")


def check_device(device: str) -> None:
    """A LoadError before any weight is read when ``device`` does not exist on this machine."""
    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"model.device={device}: this machine has no CUDA device (torch {torch.__version__}, "
                            f"cuda available: no); use model.device=cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise LoadError(f"model.device={device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LoadError(f"model.device={device}: MPS is not available on this machine; use model.device=cpu")


def load_model(ref: ModelRef, *, cache_dir: str | Path, allow_pickle: bool = False):
    """``(model, tokenizer)`` for ``ref``; any failure is one :class:`LoadError` line naming the model."""
    if ref.device == "auto":  # model.device: auto -> CUDA when present (recipes resolve it first, for the record)
        ref = dataclasses.replace(ref, device="cuda" if torch.cuda.is_available() else "cpu")
    check_device(ref.device)
    if isinstance(ref.device_map, str) and ref.device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        check_device(ref.device_map)
    try:
        model, tok = _load(ref, Path(cache_dir), allow_pickle)
        where = ref.path or ref.name
        check_token_ids(model, tok, where)
        check_finite(model, where)
        return model, tok
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken file raises anything; the user gets one line
        where = ref.path or ref.name
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise LoadError(f"could not load model {where!r}: {type(e).__name__}: {first}") from None


def _load(ref: ModelRef, cache_dir: Path, allow_pickle: bool):
    if ref.kind == "tiny":
        model, tok = build_tiny(**dataclasses.asdict(ref.tiny))
        if ref.dtype != "auto":
            model = model.to(torch_dtype(ref.dtype))
        return model.to(ref.device), tok
    if ref.kind == "gguf":
        path = cached_gguf_dir(ref, cache_dir)
        return load_hf_dir(path, dtype=ref.dtype, device=ref.device, device_map=ref.device_map)
    if ref.kind == "shape":  # random weights at a real geometry: built once into the cache (core.models.shape)
        path = shapes.shape_path(ref, cache_dir)
        return load_hf_dir(path, dtype=ref.dtype, device=ref.device, device_map=ref.device_map)
    if ref.kind != "hf":
        raise LoadError(f"unknown model.kind={ref.kind!r} ({', '.join(KINDS)})")
    path = _check_path(ref)
    fmt = legacy.detect_format(path)
    if fmt.kind == "slicegpt":  # SliceGPT's own output, with the base config.json it may have copied beside it
        return load_as_model(path, fmt=fmt, dtype=torch_dtype(ref.dtype), device=ref.device)
    if fmt.kind == "state_dict_pt":  # a *.pt state dict beside config.json (the GA's model_state_dict.pt): no opt-in
        return load_as_model(path, fmt=fmt, dtype=torch_dtype(ref.dtype), device=ref.device)
    if path.is_dir() and (path / "config.json").is_file():
        wp = fmt.weights_path
        if wp is not None and wp.is_file() and wp.suffix == ".bin" and legacy.classify_pickle(wp)[0] in (
                "pickle_bundle", "whole_model_pt"):
            # A pickled object named pytorch_model.bin beside a config.json: refused unless allow_pickle.
            return load_as_model(wp, allow_pickle=allow_pickle, fmt=legacy.detect_format(wp),
                                        dtype=torch_dtype(ref.dtype), device=ref.device)
        return load_hf_dir(path, dtype=ref.dtype, device=ref.device, device_map=ref.device_map,
                           trust_remote_code=ref.trust_remote_code)
    if fmt.kind not in ("unknown", "eval_only"):
        return load_as_model(path, allow_pickle=allow_pickle, fmt=fmt, dtype=torch_dtype(ref.dtype),
                                    device=ref.device)
    raise LoadError(f"{path} is not a model: expected a dir with config.json (HF or prunelab checkpoint)"
                    " or a legacy .bin/.pt file")


def load_as_model(path: str | Path, *, allow_pickle: bool = False, fmt: Optional[legacy.FormatInfo] = None,
                  dtype: Optional["torch.dtype"] = None, device: str = "cpu"):
    """(model, tokenizer) from a legacy file, for :func:`load_model`.

    A bare state dict becomes a model only with a config.json beside it (LlamaForCausalLM, or
    the prunelab class when widths differ per layer); its tokenizer is loaded from that dir when present.
    A SliceGPT output becomes a ``SlicedLlamaForCausalLM`` (``core.models.slicegpt``), also with the base config.json.
    """
    dtype = dtype or torch.float32
    path = Path(path)
    fmt = fmt or legacy.detect_format(path)
    if fmt.kind == "slicegpt":  # rotations + sliced widths: core.models.slicegpt builds the sliced model
        model, tok, _ = slicegpt.load_slicegpt(path, dtype=dtype, device=device)
        return model, tok
    lm = legacy.load_legacy(path, allow_pickle=allow_pickle, fmt=fmt)
    if lm.model is not None:
        model = lm.model.to(dtype=dtype, device=device).eval()
        return model, lm.tokenizer
    if lm.config is None:
        raise LoadError(f"{path}: a state dict without a config.json beside it cannot be built into a model; "
                        "put the base model's config.json next to it")
    cfg = dict(lm.config)
    check_config_sizes(cfg, str(fmt.config_path or path))
    if llamba.is_llamba_config(cfg):  # the GA's model_state_dict.pt: a Llamba with Llama layers, Cartesia's names
        cfg, lm.state_dict = legacy.llamba_state_dict_config(lm.state_dict, cfg, fmt.config_path or path)
        model = HybridForCausalLM(HybridForCausalLM.config_class(**cfg))
    elif cfg.get("model_type") == "prunelab_hybrid":
        model = HybridForCausalLM(HybridForCausalLM.config_class(**{k: v for k, v in cfg.items() if k != "model_type"}))
    elif cfg.get("layer_configs"):
        model = PrunedLlamaForCausalLM(PrunedLlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    else:
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    missing, unexpected = model.load_state_dict(lm.state_dict, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and cfg.get("tie_word_embeddings"))]
    if missing or unexpected:
        raise LoadError(f"{path}: state dict does not match its config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    tok = None
    for tok_dir in ((fmt.config_path.parent, fmt.config_path.parent / "tokenizer") if fmt.config_path else ()):
        try:  # beside config.json, or in the tokenizer/ folder the GA's checkpoints have
            tok = AutoTokenizer.from_pretrained(tok_dir)
            break
        except Exception:  # no tokenizer files there
            tok = None
    return model.to(dtype=dtype, device=device).eval(), tok
