"""Shape models: random weights with a real model's geometry, generated locally and cached.

``model=llama3_8b_shape`` / ``llama3_70b_shape`` / ``llamba_8b_shape`` (``kind: shape``) stand for the users' models
on any machine: the real widths, heads, vocabulary, RoPE settings and (for Llamba) Mamba-2 mixer sizes, with
random weights and a shortened depth (``model.num_layers``), so every path runs at the real widths.

:data:`SHAPES` holds each model's ``config.json`` as its authors publish it (:data:`SOURCES` says where it comes
from); :func:`shape_config` gives it at a depth, without torch. :func:`shape_path` builds or reads the cached dir

    <cache_dir>/models/shape-<name>-L<layers>-<dtype>/          real random weights (model.num_layers=N)
    <cache_dir>/models/shape-<name>-L<layers>-<dtype>-header/   header only (model.num_layers=null, or header_only)

holding ``config.json``, one ``model.safetensors``, a tokenizer and ``prunelab_shape.json`` (what was built, checked on
every reuse). The llama shapes are Llama dirs (``model.*`` tensor names); the Llamba shape is a Cartesia Llamba dir
(``backbone.*`` names, LlambaConfig fields), read by ``core.models.llamba`` exactly like a downloaded Llamba.

Weights are written tensor by tensor, in chunks, straight into the safetensors file (peak memory: one chunk of
16 Mi values, whatever the model): normal(0, 0.02) for every matrix, norms and Mamba's D at 1, biases at 0, from a
generator seeded by (SEED, tensor name), so a 2-layer and a 4-layer shape share their first two layers.

**Header only.** ``model.num_layers=null`` (the default) means the shape's full depth *without weight bytes*: the
safetensors header, then a file truncated to its full size (a sparse file: nothing is written or allocated), so
``dry_run``, planning and ``task=analyze count_nonzero=false`` read a full 80-layer 70B (141 GB of bfloat16) in
seconds. Loading weights from it is refused in one line (they would be zeros): ``model.num_layers=N`` builds N
layers of real random weights (``N`` = the full depth builds the whole model, if the disk holds it).

**Tokenizer.** Llama-3's layout without its merges: ids 0-255 are the 256 bytes (byte-level, no merges), 256-127999
are never produced (placeholders), 128000-128255 are Llama-3's special tokens (``<|begin_of_text|>`` 128000,
``<|end_of_text|>`` 128001, ``<|eot_id|>`` 128009, ...), and a Llama-3 chat template. Every id it produces is below
the vocabulary; text costs one token per byte.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator, Optional

from core.run.errors import ConfigError, LoadError, UserError
from core.run.io import atomic_dir

log = logging.getLogger(__name__)

SEED = 0
INIT_STD = 0.02
FORMAT_VERSION = 1  # bump when what a shape dir holds changes: older dirs are then refused (see _check_marker)
MARKER = "prunelab_shape.json"
CHUNK = 16 << 20  # values generated and written at a time

LLAMA3_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128009, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256,
}
LLAMA31_70B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 8192,
    "initializer_range": 0.02, "intermediate_size": 28672, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
LLAMBA_8B = {
    "model_type": "llamba", "vocab_size": 128256, "tie_embeddings": False, "pad_vocab_size_multiple": 8,
    "lm_head_bias": False, "d_model": 4096, "n_layer": 32, "resid_dropout": 0.0, "norm_epsilon": 1e-5,
    "mlp_cfg": {"intermediate_size": 14336, "bias": False, "act_fn": "silu"},
    "ssm_cfg": {"d_state": 64, "n_v_heads": 32, "n_qk_heads": 32, "expand": 1, "chunk_size": 128,
                "activation": "identity", "bias": False},
}

SHAPES: dict[str, dict] = {"llama3_8b": LLAMA3_8B_INSTRUCT, "llama3_70b": LLAMA31_70B, "llamba_8b": LLAMBA_8B}
SOURCES = {
    "llama3_8b": "meta-llama/Meta-Llama-3-8B-Instruct config.json (Llama-3.0: rope_scaling null, eos <|eot_id|>)",
    "llama3_70b": "meta-llama/Llama-3.1-70B config.json (llama3 RoPE scaling, 128k context)",
    "llamba_8b": "cartesia-ai/Llamba-8B: LlambaConfig (cartesia-ai/edge, cartesia_pytorch/Llamba/configuration_llamba.py)"
                 " defaults, written for the 8B (d_model 4096, 32 layers, MLP 14336, untied), whose ssm_cfg "
                 "cartesia-ai/Llamba-3B's published config.json also uses; DiscreteMamba2's d_conv 4, conv_bias",
}
DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}

# Llama-3(.1)'s 256 special tokens, 128000-128255.
_SPECIAL = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
            128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>",
            128010: "<|python_tag|>"}
FIRST_SPECIAL = 128000
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


# --------------------------------------------------------------------------- configs (no torch)


def is_llamba(cfg: dict) -> bool:
    return cfg.get("model_type") == "llamba"


def depth_key(cfg: dict) -> str:
    return "n_layer" if is_llamba(cfg) else "num_hidden_layers"


def full_depth(name: str) -> int:
    cfg = _base(name)
    return int(cfg[depth_key(cfg)])


def _base(name: str) -> dict:
    if name not in SHAPES:
        raise ConfigError(f"model.shape={name!r} is not a shape model ({', '.join(SHAPES)})")
    return SHAPES[name]


def shape_errors(name: Any, num_layers: Any) -> list[str]:
    """Problems of ``model.shape`` / ``model.num_layers`` (config validation: one line each, nothing built)."""
    if name not in SHAPES:
        return [f"model.shape={name!r} is not a shape model ({', '.join(SHAPES)})"]
    if num_layers is None:
        return []
    depth = full_depth(name)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        return [f"model.num_layers={num_layers!r} is not a whole number of layers: give 1..{depth}, or null for "
                f"{name}'s full depth (header only)"]
    if num_layers < 1:
        return [f"model.num_layers={num_layers} must be at least 1 (1..{depth}, or null for {name}'s full depth)"]
    if num_layers > depth:
        return [f"model.num_layers={num_layers} is beyond {name}'s {depth} layers (1..{depth}, or null for the "
                "full depth)"]
    return []


def shape_config(name: str, num_layers: Optional[int] = None, *, dtype: Optional[str] = None) -> dict:
    """The ``config.json`` dict of shape ``name`` with ``num_layers`` layers (None: its full depth); no torch.

    A Llamba shape comes in Cartesia's format (``d_model``, ``n_layer``, ``ssm_cfg``...): ``core.models.ref.model_config``
    gives its Llama-style fields. ``dtype``: the stored dtype written as ``torch_dtype`` (default bfloat16).
    """
    problems = shape_errors(name, num_layers)
    if problems:
        raise ConfigError(problems[0])
    cfg = copy.deepcopy(SHAPES[name])
    if num_layers is not None:
        cfg[depth_key(cfg)] = int(num_layers)
    if dtype is not None and not is_llamba(cfg):
        cfg["torch_dtype"] = dtype
    return cfg


def storage_dtype(dtype: Optional[str]) -> str:
    """The dtype a shape's weights are stored in: ``model.dtype``, or bfloat16 for ``auto`` (the real models')."""
    if dtype in (None, "auto"):
        return "bfloat16"
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}: a shape model is stored in {', '.join(DTYPES)} (or auto)")
    return dtype


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a shape's checkpoint, in file order (embedding, layer by layer, norm, head)."""
    if is_llamba(cfg):
        return _llamba_specs(cfg)
    h, v, n = int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or h // heads)
    width = int(cfg["intermediate_size"])
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("shape models have no attention or MLP biases")
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(n):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (heads * hd, h)), (p + "self_attn.k_proj.weight", (kv * hd, h)),
                (p + "self_attn.v_proj.weight", (kv * hd, h)), (p + "self_attn.o_proj.weight", (h, heads * hd)),
                (p + "mlp.gate_proj.weight", (width, h)), (p + "mlp.up_proj.weight", (width, h)),
                (p + "mlp.down_proj.weight", (h, width)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h)))
    return out


def _llamba_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Cartesia's LlambaLMHeadModel state dict (DiscreteMamba2 mixer + Llama MLP per layer), from its config."""
    from core.models.llamba import MLP_DEFAULTS, SSM_DEFAULTS, padded_vocab

    d, n, v = int(cfg["d_model"]), int(cfg["n_layer"]), padded_vocab(cfg)
    s = {**SSM_DEFAULTS, **(cfg.get("ssm_cfg") or {})}
    width = int({**MLP_DEFAULTS, **(cfg.get("mlp_cfg") or {})}["intermediate_size"])
    if s["bias"] or (cfg.get("mlp_cfg") or {}).get("bias"):
        raise ValueError("shape models have no mixer or MLP biases")
    inner, qk, heads = int(s["expand"]) * d, int(s["n_qk_heads"]) * int(s["d_state"]), int(s["n_v_heads"])
    conv_dim = inner + 2 * qk
    out: list[tuple[str, tuple[int, ...]]] = [("backbone.embedding.weight", (v, d))]
    for i in range(n):
        p = f"backbone.layers.{i}."
        out += [(p + "mixer.in_proj.weight", (conv_dim + inner + heads, d)), (p + "mixer.z_bias", (inner,)),
                (p + "mixer.conv1d.weight", (conv_dim, 1, int(s["d_conv"])))]
        if s["conv_bias"]:
            out.append((p + "mixer.conv1d.bias", (conv_dim,)))
        out += [(p + "mixer.D", (heads,)), (p + "mixer.out_proj.weight", (d, inner)),
                (p + "mlp.gate_proj.weight", (width, d)), (p + "mlp.up_proj.weight", (width, d)),
                (p + "mlp.down_proj.weight", (d, width)),
                (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    out.append(("backbone.final_layernorm.weight", (d,)))
    if not cfg.get("tie_embeddings", False):
        out.append(("lm_head.weight", (v, d)))
    return out


def checkpoint_bytes(cfg: dict, dtype: str = "bfloat16") -> int:
    """Bytes of the shape's weights in ``dtype`` (the safetensors file's data, header not counted)."""
    size = DTYPES[storage_dtype(dtype)][1]
    total = 0
    for _, shape in tensor_specs(cfg):
        numel = 1
        for d in shape:
            numel *= d
        total += numel * size
    return total


def _init_kind(name: str) -> str:
    """How a tensor starts: "ones" (norms, Mamba's D), "zeros" (biases) or "normal" (std INIT_STD)."""
    if name.endswith("norm.weight") or name.endswith("mixer.D"):
        return "ones"
    if name.endswith(".bias") or name.endswith("z_bias"):
        return "zeros"
    return "normal"


# --------------------------------------------------------------------------- the cached dir


def _ref_fields(ref: Any) -> tuple[str, Optional[int], bool, str]:
    name, num_layers = getattr(ref, "shape", None), getattr(ref, "num_layers", None)
    problems = shape_errors(name, num_layers)
    if problems:
        raise ConfigError(problems[0])
    header_only = bool(getattr(ref, "header_only", False)) or num_layers is None
    return name, num_layers, header_only, storage_dtype(getattr(ref, "dtype", None))


def shape_dir(ref: Any, cache_dir: str | Path) -> Path:
    """Where ``ref``'s shape is (or would be) cached; nothing is built."""
    name, num_layers, header_only, dtype = _ref_fields(ref)
    layers = num_layers if num_layers is not None else full_depth(name)
    return Path(cache_dir) / "models" / f"shape-{name}-L{layers}-{dtype}{'-header' if header_only else ''}"


def is_header_only_dir(path: str | Path) -> bool:
    """True for a header-only shape dir (its weights are a sparse file of zeros: never load them)."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("header_only"))
    except (OSError, ValueError, AttributeError):
        return False


def header_only_error(path: str | Path, what: str) -> LoadError:
    return LoadError(f"{what} ({path}) is header-only: its weights are not written (model.num_layers=null means the "
                     "full depth, for dry runs, planning and task=analyze count_nonzero=false); set "
                     "model.num_layers=N to build N layers of real random weights")


def shape_path(ref: Any, cache_dir: str | Path, *, header_ok: bool = False) -> Path:
    """The cached dir of ``ref``'s shape, built first if missing (atomically; a concurrent build is reused).

    A header-only shape (``num_layers`` null or ``header_only``) is refused unless ``header_ok``: its weights are not
    written, so it serves config and header readers only.
    """
    name, num_layers, header_only, dtype = _ref_fields(ref)
    target = shape_dir(ref, cache_dir)
    what = f"model={getattr(ref, 'name', name)} ({name}, {num_layers or full_depth(name)} layers, {dtype})"
    if header_only and not header_ok:
        raise header_only_error(target, what)
    cfg = shape_config(name, num_layers, dtype=dtype)
    marker = _marker(name, cfg, dtype, header_only)
    if not (target / MARKER).is_file():
        try:
            _build(target, cfg, dtype, header_only, marker, what)
        except UserError:
            raise
        except OSError as e:  # FileExistsError / ENOTEMPTY: another process built it first (fine), or a stray dir
            if not (target / MARKER).is_file():
                raise LoadError(f"could not build {what} in {target}: {type(e).__name__}: {e} (remove {target} "
                                "to rebuild it)") from None
    _check_marker(target, marker, cfg, what)
    return target


def _marker(name: str, cfg: dict, dtype: str, header_only: bool) -> dict:
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    return {"shape": name, "layers": int(cfg[depth_key(cfg)]), "dtype": dtype, "header_only": header_only,
            "seed": SEED, "init_std": INIT_STD, "version": FORMAT_VERSION, "config_sha256": digest,
            "source": SOURCES[name]}


def _check_marker(target: Path, marker: dict, cfg: dict, what: str) -> None:
    """A cached dir is reused only if it is what this code would build (same config, seed, dtype, format)."""
    try:
        found = json.loads((target / MARKER).read_text())
        on_disk = json.loads((target / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{target}: unreadable shape cache ({e}); remove the dir to rebuild it") from None
    keys = [k for k in marker if k != "source"]  # (the source's wording may change; what was built may not)
    if not isinstance(found, dict) or any(found.get(k) != marker[k] for k in keys) or on_disk != cfg:
        diff = sorted(k for k in keys if found.get(k) != marker[k]) if isinstance(found, dict) else ["marker"]
        raise LoadError(f"{target} does not match {what} (differs in {', '.join(diff) or 'config.json'}): "
                        "built by another prunelab version or edited; remove the dir to rebuild it")


def _build(target: Path, cfg: dict, dtype: str, header_only: bool, marker: dict, what: str) -> None:
    specs = tensor_specs(cfg)
    data_bytes = checkpoint_bytes(cfg, dtype)
    if not header_only:
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
        if data_bytes * 1.02 + (64 << 20) > free:
            raise LoadError(f"{what} needs {data_bytes / 1e9:.1f} GB in {target.parent}, which has "
                            f"{free / 1e9:.1f} GB free: use fewer model.num_layers, or paths.cache_dir on a bigger disk")
    log.info("building %s in %s (%s, %.2f GB%s; once)", what, target, SOURCES[marker["shape"]].split(" ")[0],
             data_bytes / 1e9, ", header only" if header_only else "")
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        _write_safetensors(tmp / "model.safetensors", specs, dtype, header_only)
        _tokenizer(cfg).save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


# --------------------------------------------------------------------------- safetensors, written by hand


def _header(specs: list[tuple[str, tuple[int, ...]]], dtype: str) -> tuple[bytes, int]:
    """(the safetensors header block: 8-byte length + JSON padded to 8 bytes, data length)."""
    code, size = DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "prunelab_shape": "random"}}
    offset = 0
    for name, shape in specs:
        numel = 1
        for d in shape:
            numel *= d
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + numel * size]}
        offset += numel * size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def _chunks(name: str, numel: int, dtype: str) -> Iterator[Any]:
    """The tensor's values, CHUNK at a time (torch tensors of ``dtype``)."""
    import torch

    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    kind = _init_kind(name)
    gen = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode()))
    done = 0
    while done < numel:
        n = min(CHUNK, numel - done)
        if kind == "normal":
            yield torch.empty(n, dtype=tdtype).normal_(0.0, INIT_STD, generator=gen)
        else:
            yield (torch.ones if kind == "ones" else torch.zeros)(n, dtype=tdtype)
        done += n


def _write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], dtype: str, header_only: bool) -> None:
    """Write a safetensors file tensor by tensor; ``header_only``: the header, then a sparse file of full size."""
    import torch

    head, data_len = _header(specs, dtype)
    with open(path, "wb") as f:
        f.write(head)
        if header_only:
            f.truncate(len(head) + data_len)
        else:
            for name, shape in specs:
                numel = 1
                for d in shape:
                    numel *= d
                for chunk in _chunks(name, numel, dtype):
                    view = chunk.view(torch.int16) if chunk.dtype == torch.bfloat16 else chunk
                    f.write(view.numpy().data)
    if header_only:
        st = os.stat(path)
        if getattr(st, "st_blocks", 0) * 512 > (len(head) + (64 << 20)):
            path.unlink()
            raise LoadError(f"{path.parent}: this filesystem does not keep sparse files, so a header-only shape would "
                            f"take {data_len / 1e9:.1f} GB of disk: put paths.cache_dir on another filesystem, or set "
                            "model.num_layers=N")


# --------------------------------------------------------------------------- tokenizer


def _eos_id(cfg: dict) -> int:
    eos = cfg.get("eos_token_id", 128009)  # a Llamba config names none: Llama-3.1-Instruct's <|eot_id|>
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos)


def _tokenizer(cfg: dict):
    """Byte-level tokenizer on Llama-3's id layout (see the module docstring): every id < the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab_size = int(cfg["vocab_size"])
    if vocab_size <= FIRST_SPECIAL:
        raise ValueError(f"a shape tokenizer needs a vocabulary above {FIRST_SPECIAL} (Llama-3's), got {vocab_size}")
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for i in range(len(vocab), FIRST_SPECIAL):
        vocab[f"<|unused_{i}|>"] = i  # placeholders: never produced (no merges)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    specials = [_SPECIAL.get(i, f"<|reserved_special_token_{i - FIRST_SPECIAL}|>")
                for i in range(FIRST_SPECIAL, vocab_size)]
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = _SPECIAL[128000]
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, 128000)])
    eos = specials[_eos_id(cfg) - FIRST_SPECIAL]
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos,
                                  pad_token=_SPECIAL[128004], model_max_length=int(cfg.get("max_position_embeddings",
                                                                                           131072)))
    tok.chat_template = CHAT_TEMPLATE
    if tok.convert_tokens_to_ids(eos) != _eos_id(cfg) or len(tok) != vocab_size:
        raise AssertionError(f"shape tokenizer layout: {len(tok)} tokens, eos {tok.convert_tokens_to_ids(eos)}")
    return tok

