"""Structure of one model: parameter counts and shapes per layer and module, from names and shapes alone.

Everything is computed from a ``name -> TensorInfo(shape, dtype[, nonzero])`` mapping plus an
optional config dict, so a safetensors checkpoint is analysed from its JSON header without
reading a single weight. Sources accepted by :func:`structure_of`: an ``nn.Module``, a state
dict, a ``name -> (shape, dtype)`` mapping, or a path (prunelab / HF dir, bare safetensors,
legacy pickles through ``core.models.legacy``). Non-zero counts (unstructured sparsity) are optional
and streamed one tensor at a time.

Llama naming (other decoder-only models with ``layers.N.`` / ``h.N.`` / ``blocks.N.`` work too):
``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight``, ``model.layers.{i}.*layernorm.weight``,
``model.norm.weight``, ``lm_head.weight`` (absent when tied). Unknown per-layer tensors land in the layer's
``extra`` group: SliceGPT's residual rotations ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` (a SliceGPT output, a sliced
prunelab checkpoint) thus count in their layer's parameters, and give its sliced hidden widths.
"""

from __future__ import annotations

import json
import re
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch

from core.models.legacy import detect_format, read_for_analysis
from core.models.llamba import is_llamba_config, llamba_key_to_hybrid
from core.models.llama import head_dim
from core.run.errors import LoadError

# safetensors dtype codes -> (torch-style name, bytes per element)
ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
_LAYER_RE = re.compile(r"^(?P<prefix>.*?)(?:^|\.)(?:layers|h|blocks)\.(?P<idx>\d+)\.(?P<rest>.+)$")
SHORTCUTS = ("attn_shortcut_Q", "mlp_shortcut_Q")  # SliceGPT's [width in, width out] residual rotations
_CONFIG_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                "torch_dtype", "dtype", "layer_configs", "removed_layers")


@dataclass
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str
    nonzero: Optional[int] = None  # None = not counted

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def dtype_size(dtype: str) -> int:
    for name, size in ST_DTYPES.values():
        if name == dtype:
            return size
    try:
        return torch.empty((), dtype=getattr(torch, dtype)).element_size()
    except (AttributeError, TypeError):
        return 4


@dataclass
class ModuleInfo:
    """One module (q_proj, gate_proj, input_layernorm, attn_shortcut_Q, ...): weight + bias summed."""

    group: str  # attention | mlp | norm | extra
    name: str
    params: int = 0
    shape: Optional[list[int]] = None  # the weight's shape ([out, in] for a Linear)
    nonzero: Optional[int] = None
    dtype: Optional[str] = None
    tensors: list[str] = field(default_factory=list)


@dataclass
class LayerStructure:
    idx: int
    modules: dict[str, ModuleInfo] = field(default_factory=dict)  # key "attention.q_proj", ...
    removed: bool = False  # absent from the checkpoint (ShortGPT-style deletion) or marked removed
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None

    def group(self, name: str) -> dict[str, ModuleInfo]:
        return {k.split(".", 1)[1]: m for k, m in self.modules.items() if m.group == name}

    def params(self, group: Optional[str] = None) -> int:
        return sum(m.params for m in self.modules.values() if group is None or m.group == group)

    def nonzero(self, group: Optional[str] = None) -> Optional[int]:
        mods = [m for m in self.modules.values() if group is None or m.group == group]
        if any(m.nonzero is None for m in mods):
            return None
        return sum(m.nonzero for m in mods)  # type: ignore[misc]

    @property
    def is_zero(self) -> bool:
        """Removed, or present with every weight zero (a layer pruned to a no-op)."""
        if self.removed:
            return True
        nz = self.nonzero()
        return nz == 0 and bool(self.modules) if nz is not None else False


@dataclass
class ModelStructure:
    name: str
    tensors: dict[str, TensorInfo]  # deduplicated (tied weights once)
    config: dict = field(default_factory=dict)
    source: str = ""
    format: str = ""
    tied_embeddings: bool = False
    head_dim: Optional[int] = None
    layers: list[LayerStructure] = field(default_factory=list)
    embedding: list[str] = field(default_factory=list)  # tensor names
    lm_head: list[str] = field(default_factory=list)
    final_norm: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    class_names: dict[str, str] = field(default_factory=dict)  # "attention"/"mlp" -> class name
    meta: dict = field(default_factory=dict)  # checkpoint_info.json, bundle extras
    model_dir: Optional[str] = None
    # a few values of each layer tensor, read on demand (analysis.compare aligns renumbered layers by content)
    samples: Optional["TensorSamples"] = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ totals
    def _sum(self, names: list[str]) -> int:
        return sum(self.tensors[n].numel for n in names)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nonzero_params(self) -> Optional[int]:
        if any(t.nonzero is None for t in self.tensors.values()):
            return None
        return sum(t.nonzero for t in self.tensors.values())  # type: ignore[misc]

    @property
    def embedding_params(self) -> int:
        return self._sum(self.embedding)

    @property
    def lm_head_params(self) -> int:
        return self._sum(self.lm_head)  # 0 when tied: the shared matrix counts once, as embedding

    @property
    def layer_params(self) -> int:
        return sum(layer.params() for layer in self.layers)

    @property
    def num_layers(self) -> int:
        """Layers present (removed ones excluded)."""
        return sum(1 for layer in self.layers if not layer.removed)

    @property
    def param_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.numel
        return out

    # ------------------------------------------------------------------ seed JSON
    def layer_json(self, layer: LayerStructure) -> dict:
        attn, mlp, norm, extra = (layer.group(g) for g in ("attention", "mlp", "norm", "extra"))
        a_type = self.class_names.get("attention", "Attention")
        m_type = self.class_names.get("mlp", "MLP")
        attention: dict[str, Any] = {"type": a_type, "total": layer.params("attention")}
        attention.update({k: m.params for k, m in attn.items()})
        attention.update({"num_heads": layer.num_heads, "num_kv_heads": layer.num_kv_heads,
                          "shapes": {k: m.shape for k, m in attn.items()}})
        mlp_d: dict[str, Any] = {"type": m_type, "total": layer.params("mlp")}
        mlp_d.update({k: m.params for k, m in mlp.items()})
        mlp_d.update({"intermediate_size": layer.intermediate_size, "shapes": {k: m.shape for k, m in mlp.items()}})
        out: dict[str, Any] = {
            "layer_idx": layer.idx, "total": layer.params(), "attention": attention, "mlp": mlp_d,
            "norm": layer.params("norm"), "norm_shapes": {k: m.shape for k, m in norm.items()},
            "is_zero_layer": layer.is_zero, "removed": layer.removed,
        }
        if extra:
            out["extra"] = {k: {"params": m.params, "shape": m.shape} for k, m in extra.items()}
        a, m = extra.get(SHORTCUTS[0]), extra.get(SHORTCUTS[1])
        if a is not None and m is not None and a.shape and m.shape:  # a sliced layer's residual widths
            out["hidden_dims"] = {"attention_input": a.shape[0], "attention_output": a.shape[1],
                                  "mlp_output": m.shape[1]}
        if layer.nonzero() is not None:
            out["nonzero"] = {"total": layer.nonzero(), "attention": layer.nonzero("attention"),
                              "mlp": layer.nonzero("mlp"),
                              **{k: m.nonzero for k, m in layer.modules.items()}}
        dts = sorted({m.dtype for m in layer.modules.values() if m.dtype})
        out["dtype"] = dts[0] if len(dts) == 1 else dts
        return out

    def to_json(self) -> dict:
        emb_shape = self.tensors[self.embedding[0]].shape if self.embedding else None
        head_shape = (self.tensors[self.lm_head[0]].shape if self.lm_head
                      else (emb_shape if self.tied_embeddings else None))
        return {
            "model_name": self.name,
            "total_params": self.total_params,
            "embedding_params": self.embedding_params,
            "lm_head_params": self.lm_head_params,
            "layer_summary": {"num_layers": self.num_layers, "total_layer_params": self.layer_params,
                              "removed_layers": [layer.idx for layer in self.layers if layer.removed],
                              "zero_layers": [layer.idx for layer in self.layers if layer.is_zero]},
            "layers": [self.layer_json(layer) for layer in self.layers],
            # additions to the seed's format
            "source": self.source, "format": self.format,
            "tied_embeddings": self.tied_embeddings,
            "tied_note": ("lm_head shares the embedding matrix: counted once, under embedding_params"
                          if self.tied_embeddings else None),
            "embedding_shape": list(emb_shape) if emb_shape else None,
            "lm_head_shape": list(head_shape) if head_shape else None,
            "final_norm_params": self._sum(self.final_norm),
            "other_params": {n: self.tensors[n].numel for n in self.other},
            "head_dim": self.head_dim,
            "nonzero_params": self.nonzero_params,
            "param_bytes": self.param_bytes,
            "dtypes": self.dtypes,
            "config": {k: self.config[k] for k in _CONFIG_KEYS if k in self.config and k != "layer_configs"},
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- building


def _classify(rest: str) -> tuple[str, str]:
    """Sub-name inside a layer -> (group, module). ``self_attn.q_proj.weight`` -> (attention, q_proj)."""
    parts = rest.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    if parts[0] in ("self_attn", "attn", "attention") and len(parts) > 1:
        return "attention", ".".join(parts[1:])
    if parts[0] in ("mlp", "feed_forward", "ffn") and len(parts) > 1:
        return "mlp", ".".join(parts[1:])
    if "norm" in parts[-1] or parts[-1].startswith("ln"):
        return "norm", ".".join(parts)
    return "extra", ".".join(parts)


def _head_dim(config: dict) -> Optional[int]:
    """``core.models.llama.head_dim``, or None for a config without the keys (structure is still read from shapes)."""
    try:
        return head_dim(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def build_structure(tensors: Mapping[str, TensorInfo], config: Optional[dict] = None, *, name: str,
                    source: str = "", fmt: str = "", tied: Optional[bool] = None,
                    class_names: Optional[dict[str, str]] = None, meta: Optional[dict] = None) -> ModelStructure:
    """The core: group tensors into embedding / layers / head / norm and derive heads and widths."""
    config = dict(config or {})
    s = ModelStructure(name=name, tensors=dict(tensors), config=config, source=source, format=fmt,
                       meta=dict(meta or {}))
    s.head_dim = _head_dim(config)
    layers: dict[int, LayerStructure] = {}
    for tname, info in s.tensors.items():
        m = _LAYER_RE.match(tname)
        if m:
            idx = int(m.group("idx"))
            group, mod = _classify(m.group("rest"))
            layer = layers.setdefault(idx, LayerStructure(idx))
            key = f"{group}.{mod}"
            mi = layer.modules.setdefault(key, ModuleInfo(group, mod))
            mi.params += info.numel
            mi.tensors.append(tname)
            if tname.endswith("weight") or mi.shape is None:
                mi.shape, mi.dtype = list(info.shape), info.dtype
        elif tname.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight")):
            s.embedding.append(tname)
        elif tname.split(".")[0] in ("lm_head", "output") or tname.endswith("lm_head.weight"):
            s.lm_head.append(tname)
        elif "norm" in tname or tname.split(".")[-2:-1] in (["ln_f"],):
            s.final_norm.append(tname)
        else:
            s.other.append(tname)
    s.tied_embeddings = bool(tied) if tied is not None else (
        not s.lm_head and bool(s.embedding) and bool(config.get("tie_word_embeddings", True)))
    # layer count: config says how many there should be; missing indices were removed
    removed_cfg = set(int(i) for i in (config.get("removed_layers") or s.meta.get("removed_layers") or []))
    n_cfg = int(config.get("num_hidden_layers") or 0)
    layer_cfgs = config.get("layer_configs") or []
    n = max([n_cfg, len(layer_cfgs)] + [i + 1 for i in layers])
    for layer in layers.values():
        for mi in layer.modules.values():
            nzs = [s.tensors[t].nonzero for t in mi.tensors]
            mi.nonzero = None if any(v is None for v in nzs) else sum(nzs)  # type: ignore[arg-type]
    for i in range(n):
        layer = layers.get(i)
        if layer is None:
            layer = layers[i] = LayerStructure(i, removed=True)
            s.notes.append(f"layer {i} is absent from the checkpoint (config has {n} layers): reported removed")
        lc = layer_cfgs[i] if i < len(layer_cfgs) and isinstance(layer_cfgs[i], dict) else {}
        if lc.get("removed") or (i in removed_cfg and not layer.modules):
            layer.removed = True
        _derive_widths(layer, s.head_dim, lc)
    s.layers = [layers[i] for i in sorted(layers)]
    s.class_names = dict(class_names or {})
    if not s.class_names:
        arch = (config.get("architectures") or [""])[0]
        stem = arch.replace("ForCausalLM", "") or str(config.get("model_type", "")).capitalize()
        s.class_names = {"attention": f"{stem}Attention", "mlp": f"{stem}MLP"}
    if s.head_dim is None and any(layer.modules for layer in s.layers):
        s.notes.append("no config with head_dim / hidden_size: heads per layer unknown")
    note = _slicing_note(s)
    if note:
        s.notes.append(note)
    return s


def _slicing_note(s: ModelStructure) -> Optional[str]:
    """What a SliceGPT-sliced model's shapes say: the widths of its residual stream, what its shortcuts cost."""
    found = [e for e in (layer.group("extra") for layer in s.layers) if any(k in e for k in SHORTCUTS)]
    if not found:
        return None
    params = sum(m.params for e in found for k, m in e.items() if k in SHORTCUTS)
    widths = sorted({d for e in found for k, m in e.items() if k in SHORTCUTS and m.shape for d in m.shape})
    emb = s.tensors[s.embedding[0]].shape[-1] if s.embedding else "?"
    head = s.tensors[s.lm_head[0]].shape[-1] if s.lm_head else "?"
    return (f"SliceGPT-sliced: hidden size {s.config.get('hidden_size', '?')} -> embedding {emb}, residual widths "
            f"{', '.join(map(str, widths))}, LM head input {head}; the shortcut rotations "
            f"({', '.join(SHORTCUTS)}, {params:,} parameters) count in their layers' params")


def _derive_widths(layer: LayerStructure, head_dim: Optional[int], lc: dict) -> None:
    """Heads = q_proj rows / head_dim, KV heads = k_proj rows / head_dim, MLP width = gate_proj rows."""
    attn, mlp = layer.group("attention"), layer.group("mlp")
    q, k = attn.get("q_proj"), attn.get("k_proj")
    if head_dim and q is not None and q.shape:
        layer.num_heads = q.shape[0] // head_dim if q.shape[0] % head_dim == 0 else None
    if head_dim and k is not None and k.shape:
        layer.num_kv_heads = k.shape[0] // head_dim if k.shape[0] % head_dim == 0 else None
    if layer.num_heads is None and "num_attention_heads" in lc:
        layer.num_heads = lc["num_attention_heads"]
    if layer.num_kv_heads is None and "num_key_value_heads" in lc:
        layer.num_kv_heads = lc["num_key_value_heads"]
    g = mlp.get("gate_proj") or mlp.get("up_proj")
    if g is not None and g.shape:
        layer.intermediate_size = g.shape[0]
    elif "intermediate_size" in lc:
        layer.intermediate_size = lc["intermediate_size"]
    # a block that is gone (whole layer removed, or attention / MLP dropped) has zero width
    if not attn and (layer.modules or layer.removed) and not lc:
        layer.num_heads, layer.num_kv_heads = 0, 0
    if not mlp and (layer.modules or layer.removed) and not lc:
        layer.intermediate_size = 0


# --------------------------------------------------------------------------- sources


def _read_header(path: Path) -> tuple[int, dict]:
    """(header length, validated header dict) of a safetensors file: 8-byte LE length + JSON."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise LoadError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size or n > 100 << 20:
            raise LoadError(f"{path}: corrupt safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise LoadError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise LoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_len = size - 8 - n
    for tname, meta in header.items():
        if tname == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            meta["dtype"], meta["shape"]
        except (KeyError, TypeError, ValueError):
            raise LoadError(f"{path}: corrupt safetensors header entry for {tname!r}") from None
        if end > data_len:
            raise LoadError(f"{path}: truncated safetensors file ({tname} ends at {end}, data has {data_len} bytes)")
    return n, header


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo from a safetensors file's header only: no weight is read."""
    _, header = _read_header(Path(path))
    return {tname: TensorInfo(tuple(int(d) for d in meta["shape"]),
                              ST_DTYPES.get(meta["dtype"], (meta["dtype"].lower(), 4))[0])
            for tname, meta in header.items() if tname != "__metadata__"}


def safetensors_files(weights: Path) -> list[Path]:
    """The shard files of a checkpoint (a file, or a dir with an index / several shards)."""
    if weights.is_file():
        return [weights]
    index = weights / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise LoadError(f"{index} is unreadable: {e}") from None
        files = sorted({weights / f for f in wmap.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LoadError(f"{weights}: shards listed in the index are missing: {missing}")
        return files
    return sorted(weights.glob("*.safetensors"))


def loader_weight_files(path: str | Path) -> Optional[list[Path]]:
    """The weight files the loader reads for the model at ``path`` (``detect_format``: the safetensors shards, or
    the one pickle / ``pytorch_model.bin`` shards), or None when ``path`` is not a model it can read. Other weight
    files beside them (an HF download's ``original/consolidated.00.pth``, a ``pytorch_model.bin`` next to the
    safetensors) are not part of the model as loaded."""
    fmt = detect_format(Path(path))
    wp = fmt.weights_path
    if fmt.kind in ("unknown", "eval_only") or wp is None:
        return None
    if wp.is_file():
        return [wp]
    try:
        files = safetensors_files(wp)
    except LoadError:
        return None
    if files:
        return files
    index = wp / "pytorch_model.bin.index.json"
    try:
        return sorted({wp / f for f in json.loads(index.read_text())["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def count_nonzero_safetensors(files: list[Path], tensors: dict[str, TensorInfo],
                              chunk_bytes: int = 32 << 20) -> None:
    """Fill ``nonzero`` by reading each tensor's bytes in chunks into one reused buffer.

    Plain reads, not mmap: peak memory stays at ``chunk_bytes`` whatever the model size, and no
    file pages are mapped into the process (safe_open's mmap would count the whole file in RSS).
    """
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    for f in files:
        n, header = _read_header(f)
        with open(f, "rb") as fh:
            for tname, meta in header.items():
                if tname == "__metadata__" or tname not in tensors:
                    continue
                dtype = getattr(torch, ST_DTYPES.get(meta["dtype"], ("uint8", 1))[0])
                esize = torch.empty((), dtype=dtype).element_size()
                start, end = meta["data_offsets"]
                fh.seek(8 + n + start)
                remaining, nz = end - start, 0
                step = chunk_bytes // esize * esize
                while remaining > 0:
                    got = fh.readinto(view[:min(step, remaining)])
                    if not got:
                        raise LoadError(f"{f}: truncated while reading {tname}")
                    # count as the stored dtype, so -0.0 counts as zero
                    nz += int(torch.count_nonzero(torch.frombuffer(buf, dtype=dtype, count=got // esize)))
                    remaining -= got
                tensors[tname].nonzero = nz


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# --------------------------------------------------------------------------- content samples (layer alignment)

SAMPLES_PER_TENSOR = 16


def sample_positions(numel: int, k: int = SAMPLES_PER_TENSOR) -> list[int]:
    """``k`` flat indices spread over a tensor (the same for every tensor of that size), all of them when smaller."""
    if numel <= k:
        return list(range(numel))
    return [(2 * j + 1) * numel // (2 * k) for j in range(k)]


class TensorSamples(ABC):
    """A few values of each layer tensor, as float32 (``get(name)``; None when unknown): enough to tell which base
    layer a renumbered layer is a copy of (``analysis.compare.align_layers``), at the cost of a few reads."""

    @abstractmethod
    def get(self, name: str) -> Optional[torch.Tensor]:
        """The samples of tensor ``name`` (None when it is unknown or not a layer tensor)."""


class StateDictSamples(TensorSamples):
    """Samples taken when the tensors were in memory (a state dict, a module): kept, the tensors are not."""

    def __init__(self, sd: Mapping[str, torch.Tensor], names: Any):
        self._values: dict[str, torch.Tensor] = {}
        for name in names:
            t = sd.get(name)
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or not _LAYER_RE.match(name):
                continue
            flat = t.detach().reshape(-1)
            self._values[name] = flat[sample_positions(flat.numel())].to("cpu", torch.float32).clone()

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self._values.get(name)


class SafetensorsSamples(TensorSamples):
    """Samples read on demand from safetensors files: one small read per value, nothing mapped or kept open."""

    def __init__(self, files: list[Path]):
        self._files = list(files)
        self._where: Optional[dict[str, tuple[Path, int, str, int]]] = None

    def _index(self) -> dict[str, tuple[Path, int, str, int]]:
        if self._where is None:
            where = {}
            for f in self._files:
                n, header = _read_header(f)
                for tname, meta in header.items():
                    if tname != "__metadata__" and meta["dtype"] in ST_DTYPES:
                        numel = 1
                        for d in meta["shape"]:
                            numel *= int(d)
                        where[tname] = (f, 8 + n + int(meta["data_offsets"][0]), meta["dtype"], numel)
            self._where = where
        return self._where

    def get(self, name: str) -> Optional[torch.Tensor]:
        entry = self._index().get(name)
        if entry is None:
            return None
        f, start, code, numel = entry
        dtype = getattr(torch, ST_DTYPES[code][0])
        esize = ST_DTYPES[code][1]
        raw = bytearray()
        try:
            with open(f, "rb") as fh:
                for pos in sample_positions(numel):
                    fh.seek(start + pos * esize)
                    chunk = fh.read(esize)
                    if len(chunk) != esize:
                        return None
                    raw += chunk
        except OSError:
            return None
        if not raw:
            return torch.empty(0)
        return torch.frombuffer(raw, dtype=dtype).to(torch.float32)


def _samples_of_state_dict(sd: Mapping[str, torch.Tensor], tensors: Mapping[str, TensorInfo]) -> TensorSamples:
    return StateDictSamples(sd, tensors)


def tensors_from_state_dict(sd: Mapping[str, torch.Tensor], count_nonzero: bool = False,
                            equal_copies_tied: bool = False) -> tuple[dict[str, TensorInfo], bool]:
    """(name -> TensorInfo, tied?) with shared storages counted once (the first name wins).

    ``equal_copies_tied``: a bare state dict whose ``lm_head.weight`` equals the embedding but does not share
    its storage (cloned to save it, as safetensors requires) is a tied model saved untied: counted once.
    """
    out: dict[str, TensorInfo] = {}
    seen: dict[tuple, str] = {}
    tied = False
    for tname, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.device.type == "meta":
            key: tuple = ("id", id(t))
        else:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen and t.numel() > 0:
            if tname.endswith("lm_head.weight") or seen[key].endswith("lm_head.weight"):
                tied = True
            continue
        seen[key] = tname
        nz = int(torch.count_nonzero(t.detach())) if count_nonzero and t.device.type != "meta" else None
        out[tname] = TensorInfo(tuple(t.shape), _dtype_name(t.dtype), nz)
    if equal_copies_tied and not tied:
        head = next((k for k in out if k.endswith("lm_head.weight")), None)
        emb = next((k for k in out if k.endswith("embed_tokens.weight")), None)
        if head and emb:
            a, b = sd[head], sd[emb]
            if a.device.type != "meta" and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
                del out[head]
                tied = True
    return out, tied


def _module_class_names(model: torch.nn.Module) -> dict[str, str]:
    return _class_names_of_paths({mname: type(mod).__name__ for mname, mod in model.named_modules()})


def _class_names_of_paths(classes: Mapping[str, str]) -> dict[str, str]:
    """{"attention": ..., "mlp": ...}: the class of the first layer's attention / MLP module (``module path ->
    class name``; a qualified name, as a legacy pickle names it, gives its last part)."""
    names: dict[str, str] = {}
    for mname, cls in classes.items():
        m = _LAYER_RE.match(mname + ".x")
        if not m:
            continue
        rest = m.group("rest")[:-2]
        cls = cls.rpartition(".")[2]
        if rest in ("self_attn", "attn", "attention") and "attention" not in names:
            names["attention"] = cls
        elif rest in ("mlp", "feed_forward") and "mlp" not in names:
            names["mlp"] = cls
    return names


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path} is unreadable: {e}") from None


def structure_of(source: Any, *, config: Optional[dict] = None, name: str, count_nonzero: bool = False,
                 allow_pickle: bool = False, fallback_config: Optional[dict] = None) -> ModelStructure:
    """Structure of a model given as an nn.Module, a path, a state dict or a name -> (shape, dtype) mapping.

    Paths to safetensors checkpoints are read from headers (no weights in memory unless
    ``count_nonzero``, which streams). ``fallback_config`` (e.g. the base model's config) is used
    when the source carries none, so heads can still be derived for a bare state dict.
    """
    if isinstance(source, torch.nn.Module):
        cfg = config if config is not None else (_config_dict(source) or fallback_config)
        tensors, tied = tensors_from_state_dict(source.state_dict(keep_vars=True), count_nonzero)
        tensors = {k: v for k, v in tensors.items() if not k.endswith(("inv_freq", "rotary_emb.inv_freq"))}
        tied = tied or _is_tied_module(source)
        s = build_structure(tensors, cfg, name=name, source=f"<{type(source).__name__}>", fmt="module",
                            tied=tied or None, class_names=_module_class_names(source))
        s.samples = StateDictSamples(source.state_dict(keep_vars=True), tensors)
        return s
    if isinstance(source, (str, Path)):
        return _structure_of_path(Path(source), config=config, name=name, count_nonzero=count_nonzero,
                                  allow_pickle=allow_pickle, fallback_config=fallback_config)
    if isinstance(source, Mapping):
        values = list(source.values())
        if values and all(isinstance(v, torch.Tensor) for v in values):
            tensors, tied = tensors_from_state_dict(source, count_nonzero, equal_copies_tied=True)
            s = build_structure(tensors, config or fallback_config, name=name, source="<state dict>",
                                fmt="state_dict", tied=tied or None)
            s.samples = StateDictSamples(source, tensors)
            return s
        tensors = {}
        for k, v in source.items():
            if isinstance(v, TensorInfo):
                tensors[k] = v
            elif isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], (tuple, list, torch.Size)):
                tensors[k] = TensorInfo(tuple(int(d) for d in v[0]), str(v[1]).replace("torch.", ""))
            else:
                raise TypeError(f"{k}: expected a tensor, TensorInfo or (shape, dtype), got {type(v).__name__}")
        return build_structure(tensors, config or fallback_config, name=name, source="<shapes>", fmt="shapes")
    raise TypeError(f"cannot analyse a {type(source).__name__}: give an nn.Module, a path, a state dict "
                    "or a name -> (shape, dtype) mapping")


def _config_dict(model: torch.nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    try:
        return cfg.to_dict()
    except Exception:  # not a transformers config
        return dict(vars(cfg)) if hasattr(cfg, "__dict__") else None


def _is_tied_module(model: torch.nn.Module) -> bool:
    try:
        inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return inp is not None and out is not None and inp.weight is out.weight


def _structure_of_path(path: Path, *, config: Optional[dict], name: str, count_nonzero: bool,
                       allow_pickle: bool, fallback_config: Optional[dict]) -> ModelStructure:
    fmt = detect_format(path)
    if fmt.kind in ("unknown", "eval_only") or fmt.weights_path is None:
        raise LoadError(f"{path} is not a model: {fmt.reason}")
    cfg = config
    if cfg is None and fmt.kind == "slicegpt":  # its *.json is a slicing config; the model's is config.json beside it
        beside = (fmt.model_dir or path) / "config.json"
        cfg = _read_json(beside) if beside.is_file() else None
    elif cfg is None and fmt.config_path is not None:
        cfg = _read_json(fmt.config_path)
    meta: dict = {}
    info_file = (fmt.model_dir or path) / "checkpoint_info.json"
    if info_file.is_file():
        meta = _read_json(info_file)
    wp = fmt.weights_path
    st_files = safetensors_files(wp) if (wp.is_dir() or wp.suffix == ".safetensors") else []
    if st_files:
        tensors: dict[str, TensorInfo] = {}
        for f in st_files:
            tensors.update(read_safetensors_header(f))
        if count_nonzero:
            count_nonzero_safetensors(st_files, tensors)
        s = build_structure(tensors, cfg or fallback_config, name=name, source=str(path), fmt=fmt.kind, meta=meta)
        s.samples = SafetensorsSamples(st_files)
    else:
        # bundles and whole-model pickles: read without running their code (core.models.legacy.read_restricted)
        lm = read_for_analysis(path if path.is_file() else wp, allow_pickle=allow_pickle, fmt=fmt)
        try:
            if lm.model is not None:
                s = structure_of(lm.model, config=cfg if cfg is not None else lm.config, name=name,
                                 count_nonzero=count_nonzero, fallback_config=fallback_config)
            else:
                sd = lm.state_dict or {}
                config = cfg or lm.config or fallback_config
                if config and is_llamba_config(config):  # Cartesia's backbone.* names (a Llamba or a GA hybrid)
                    sd = {llamba_key_to_hybrid(k): v for k, v in sd.items()}
                tensors, tied = tensors_from_state_dict(sd, count_nonzero, equal_copies_tied=True)
                tensors = {k: v for k, v in tensors.items() if not k.endswith("inv_freq")}
                s = build_structure(tensors, config, name=name, source=str(path), fmt=fmt.kind, tied=tied or None,
                                    meta={**lm.meta, **meta}, class_names=_class_names_of_paths(lm.module_classes))
                s.samples = _samples_of_state_dict(sd, tensors)
            if lm.stubbed:  # the model's own classes first, torch's and the kernels' last
                named = sorted(lm.stubbed, key=lambda c: (c.startswith(("torch.", "kernels.")), c.rpartition(".")[2]))
                s.notes.append(f"read without unpickling any code: the {len(named)} classes it names were not "
                               f"imported ({', '.join(c.rpartition('.')[2] for c in named[:12])}"
                               f"{', ...' if len(named) > 12 else ''})")
        finally:
            del lm
        s.source, s.format = str(path), fmt.kind
        s.meta.update(meta)
    if cfg is None and fallback_config and s.config == dict(fallback_config):
        s.notes.append("no config beside the weights: head_dim taken from the base model's config")
    s.model_dir = str(fmt.model_dir) if fmt.model_dir else None
    return s


def iter_layer_modules(s: ModelStructure) -> Iterator[tuple[LayerStructure, str, ModuleInfo]]:
    for layer in s.layers:
        for key, mod in layer.modules.items():
            yield layer, key, mod
