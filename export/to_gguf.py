"""A pruned Llama as one GGUF file for llama.cpp: the ``deci`` architecture for per-layer widths, ``llama`` otherwise.

    write_gguf(model, from_hf(tokenizer), Path("model-f32.gguf"), out_type="f32")

llama.cpp's ``deci`` architecture (Nemotron-NAS) reads per-layer arrays of query heads, KV heads and FFN widths,
so any width a pruner leaves runs as is (no rounding, no padded heads). Its graph has three corners a pruned
model meets, each handled here so the file computes what the model computes:

- head size and RoPE width are read from layer 0's head count: with layer 0's attention removed they become 0
  for every layer. Layer 0 then gets a one-head attention with all-zero weights (it adds exactly 0).
- a layer with attention and no FFN skips the residual update that follows the FFN (its attention output is
  dropped; as the last layer it aborts). Such a layer gets an all-zero FFN of one block's width (adds 0).
- a layer with neither is the identity and is left out (the blocks are renumbered).

Weights follow llama.cpp's converter: q and k rows permuted from transformers' half-split RoPE layout to GGML's
interleaved pairs, 1-D tensors (norms, biases) in f32, 2-D ones in the output type; a row length that is not a
whole number of quantisation blocks stays f16. For q8_0 the FFN widths are zero-padded to a multiple of 32 so
``ffn_down`` quantises too. o_proj / down_proj biases (FLAP, OBS compensation) are written as
``attn_output.bias`` / ``ffn_down.bias``, which both architectures' loaders read. The file is written under a
temporary name and linked into place, so a crash leaves nothing that looks complete, and an existing file is
never replaced.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from gguf import (GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType,
                  RopeScalingType)
from gguf.quants import quant_shape_to_byte_shape, quantize
from torch import nn

from core.models.llama import decoder_layers, head_dim
from export.layout import ExportError, LayerShape, check_expressible, layer_shapes, round_up, rope_settings
from export.tokenizer import GGUFTokenizer

Q = GGMLQuantizationType
OUT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}


@dataclass(frozen=True)
class GGUFLayer:
    """One block of the file: which model layer it is and the widths written for it."""

    source: int  # the model's decoder layer index
    heads: int
    kv_heads: int
    ffn: int
    dummy_attention: bool = False  # a zero one-head attention (layer 0 without attention)
    zero_ffn: bool = False  # a zero FFN (a layer with attention and no FFN)


def plan_layers(shapes: list[LayerShape], ffn_multiple: int = 1, *, fix_quirks: bool = True) -> list[GGUFLayer]:
    """The blocks to write for these layer shapes (see the module docstring); ``fix_quirks=False`` writes the
    shapes as they are (tests show what llama.cpp then computes)."""
    plan: list[GGUFLayer] = []
    for i, s in enumerate(shapes):
        if not s.has_attention and not s.has_ffn:
            continue  # identity: nothing to compute
        heads, kv, dummy = s.heads, s.kv_heads, False
        if fix_quirks and not plan and not s.has_attention:
            heads, kv, dummy = 1, 1, True
        ffn, zero = round_up(s.ffn, ffn_multiple), False
        if fix_quirks and not s.has_ffn:
            ffn, zero = max(1, ffn_multiple), True
        plan.append(GGUFLayer(i, heads, kv, ffn, dummy, zero))
    if not plan:
        raise ExportError("every decoder layer is removed: there is nothing to export")
    return plan


def architecture(plan: list[GGUFLayer]) -> str:
    """``llama`` when every block has the same widths (a stock file every llama.cpp build reads), else ``deci``."""
    first = plan[0]
    same = all((b.heads, b.kv_heads, b.ffn) == (first.heads, first.kv_heads, first.ffn) for b in plan)
    plain = all(b.heads > 0 and b.ffn > 0 and not b.dummy_attention and not b.zero_ffn for b in plan)
    return "llama" if same and plain else "deci"


def permute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of q or k from transformers' RoPE layout (per head: first half, second half) to GGML's (pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE scaling (``rope_type: llama3``), llama.cpp's ``rope_freqs``."""
    base = rope["theta"]
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]  # float32 array of ``shape``
    qtype: GGMLQuantizationType = Q.F32


@dataclass
class GGUFReport:
    """What was written: enough to tell a reader how the file relates to the model."""

    path: str
    architecture: str
    out_type: str
    bytes: int
    blocks: int
    layers_dropped: list[int] = field(default_factory=list)
    dummy_attention: list[int] = field(default_factory=list)  # model layer indices
    zero_ffn: list[int] = field(default_factory=list)
    ffn_padded: list[int] = field(default_factory=list)  # layers whose FFN width was rounded up (q8_0 blocks)
    f16_fallback: list[str] = field(default_factory=list)  # tensors whose rows are not whole blocks
    tokenizer: str = ""
    tokenizer_notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _padded_rows(w: torch.Tensor, n: int) -> np.ndarray:
    a = _np(w)
    return a if a.shape[0] == n else np.concatenate([a, np.zeros((n - a.shape[0], *a.shape[1:]), np.float32)])


def _tensors(model: nn.Module, shapes: list[LayerShape], plan: list[GGUFLayer]) -> list[_Tensor]:
    """Every tensor of the file, as (name, shape, producer); GGUF shapes are written as numpy's [rows, cols]."""
    cfg = model.config
    hd, hidden = head_dim(cfg), int(cfg.hidden_size)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    out = [_Tensor("token_embd.weight", tuple(emb.shape), lambda: _np(emb)),
           _Tensor("output_norm.weight", (hidden,), lambda: _np(model.model.norm.weight))]
    if head.data_ptr() != emb.data_ptr():
        out.append(_Tensor("output.weight", tuple(head.shape), lambda: _np(head)))
    rope = rope_settings(cfg)
    if rope["type"] == "llama3":
        out.append(_Tensor("rope_freqs.weight", (hd // 2,), lambda: llama3_rope_factors(rope, hd)))
    layers = decoder_layers(model)
    zeros = lambda *shape: (lambda: np.zeros(shape, np.float32))  # noqa: E731
    ones = lambda n: (lambda: np.ones(n, np.float32))  # noqa: E731
    for j, b in enumerate(plan):
        layer, s, p = layers[b.source], shapes[b.source], f"blk.{j}."
        if b.dummy_attention:
            out += [_Tensor(p + "attn_norm.weight", (hidden,), ones(hidden)),
                    _Tensor(p + "attn_q.weight", (hd, hidden), zeros(hd, hidden)),
                    _Tensor(p + "attn_k.weight", (hd, hidden), zeros(hd, hidden)),
                    _Tensor(p + "attn_v.weight", (hd, hidden), zeros(hd, hidden)),
                    _Tensor(p + "attn_output.weight", (hidden, hd), zeros(hidden, hd))]
        elif b.heads:
            a, h, k = layer.self_attn, b.heads, b.kv_heads
            out += [_Tensor(p + "attn_norm.weight", (hidden,), lambda l=layer: _np(l.input_layernorm.weight)),
                    _Tensor(p + "attn_q.weight", (h * hd, hidden),
                            lambda a=a, h=h: permute_rope(_np(a.q_proj.weight), h)),
                    _Tensor(p + "attn_k.weight", (k * hd, hidden),
                            lambda a=a, k=k: permute_rope(_np(a.k_proj.weight), k)),
                    _Tensor(p + "attn_v.weight", (k * hd, hidden), lambda a=a: _np(a.v_proj.weight)),
                    _Tensor(p + "attn_output.weight", (hidden, h * hd), lambda a=a: _np(a.o_proj.weight))]
            if s.qkv_bias:
                out += [_Tensor(p + "attn_q.bias", (h * hd,), lambda a=a, h=h: permute_rope(_np(a.q_proj.bias), h)),
                        _Tensor(p + "attn_k.bias", (k * hd,), lambda a=a, k=k: permute_rope(_np(a.k_proj.bias), k)),
                        _Tensor(p + "attn_v.bias", (k * hd,), lambda a=a: _np(a.v_proj.bias))]
            if s.o_bias:
                out.append(_Tensor(p + "attn_output.bias", (hidden,), lambda a=a: _np(a.o_proj.bias)))
        f = b.ffn
        if b.zero_ffn:
            out += [_Tensor(p + "ffn_norm.weight", (hidden,), ones(hidden)),
                    _Tensor(p + "ffn_gate.weight", (f, hidden), zeros(f, hidden)),
                    _Tensor(p + "ffn_up.weight", (f, hidden), zeros(f, hidden)),
                    _Tensor(p + "ffn_down.weight", (hidden, f), zeros(hidden, f))]
        elif f:
            m = layer.mlp
            out += [_Tensor(p + "ffn_norm.weight", (hidden,), lambda l=layer: _np(l.post_attention_layernorm.weight)),
                    _Tensor(p + "ffn_gate.weight", (f, hidden), lambda m=m, f=f: _padded_rows(m.gate_proj.weight, f)),
                    _Tensor(p + "ffn_up.weight", (f, hidden), lambda m=m, f=f: _padded_rows(m.up_proj.weight, f)),
                    _Tensor(p + "ffn_down.weight", (hidden, f),
                            lambda m=m, f=f: np.ascontiguousarray(_padded_rows(m.down_proj.weight.t(), f).T))]
            if s.gate_up_bias:
                out += [_Tensor(p + "ffn_gate.bias", (f,), lambda m=m, f=f: _padded_rows(m.gate_proj.bias, f)),
                        _Tensor(p + "ffn_up.bias", (f,), lambda m=m, f=f: _padded_rows(m.up_proj.bias, f))]
            if s.down_bias:
                out.append(_Tensor(p + "ffn_down.bias", (hidden,), lambda m=m: _np(m.down_proj.bias)))
    return out


def _nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[tuple[int, ...], int]:
    """(shape as stored, bytes): quantised types store rows of blocks."""
    if qtype == Q.F32:
        return shape, 4 * math.prod(shape)
    if qtype == Q.F16:
        return shape, 2 * math.prod(shape)
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, math.prod(byte_shape)


def disk_error(e: OSError, out: Path) -> ExportError:
    """One line for an OSError while writing ``out``: a full disk, a read-only or unwritable target."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on the device"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = f"the target is not writable ({e.strerror})"
    else:
        why = f"{e.strerror or e}"
    return ExportError(f"cannot write {out}: {why}; choose another export.output or free some space")


def check_free_space(out: str | Path, nbytes: int) -> None:
    """ExportError unless the filesystem ``out`` goes to has ``nbytes`` free (+5%), before anything is written."""
    probe = Path(out).parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(nbytes * 1.05)
    if free < need:
        raise ExportError(f"not enough free space for {out}: about {need / 2**20:,.1f} MiB needed, "
                          f"{free / 2**20:,.1f} MiB free in {probe} (free some space or choose another export.output)")


def write_gguf(model: nn.Module, tokenizer: GGUFTokenizer, out: str | Path, out_type: str = "f32", *,
               name: Optional[str] = None, fix_quirks: bool = True) -> GGUFReport:
    """Write ``model`` and ``tokenizer`` to ``out``; a model GGUF cannot express is refused first
    (:func:`export.layout.check_expressible`)."""
    if out_type not in OUT_TYPES:
        raise ExportError(f"out_type={out_type!r} is not written by the GGUF exporter ({', '.join(OUT_TYPES)}; other "
                          "types through llama.cpp's quantiser)")
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} already exists; refusing to overwrite it")
    check_expressible(model, "gguf")
    qtype, ftype = OUT_TYPES[out_type]
    block = GGML_QUANT_SIZES[qtype][0]
    cfg = model.config
    shapes = layer_shapes(model)
    plan = plan_layers(shapes, ffn_multiple=block, fix_quirks=fix_quirks)
    arch = architecture(plan)
    hd = head_dim(cfg)
    n_vocab = int(model.get_input_embeddings().weight.shape[0])
    tokenizer = tokenizer.padded_to(n_vocab)

    w = GGUFWriter(None, arch)
    w.add_type("model")
    w.add_name(name or str(getattr(cfg, "name_or_path", "") or "prunelab-export"))
    w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(len(plan))
    if arch == "llama":
        w.add_feed_forward_length(plan[0].ffn)
        w.add_head_count(plan[0].heads)
        w.add_head_count_kv(plan[0].kv_heads)
    else:
        w.add_feed_forward_length([b.ffn for b in plan])
        w.add_head_count([b.heads for b in plan])
        w.add_head_count_kv([b.kv_heads for b in plan])
    rope = rope_settings(cfg)
    w.add_rope_freq_base(rope["theta"])
    if rope["type"] == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(n_vocab)
    w.add_file_type(int(ftype))
    if qtype not in (Q.F32, Q.F16):
        w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_array("prunelab.source_layers", [b.source for b in plan])
    tokenizer.write(w)

    tensors = _tensors(model, shapes, plan)
    fallback = []
    for t in tensors:
        if len(t.shape) == 2:
            t.qtype = qtype
            if t.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
                t.qtype = Q.F16
                fallback.append(t.name)
        stored, nbytes = _nbytes(t.shape, t.qtype)
        w.add_tensor_info(t.name, stored, np.dtype(np.uint8) if t.qtype not in (Q.F32, Q.F16) else
                          np.dtype(np.float32 if t.qtype == Q.F32 else np.float16), nbytes,
                          raw_dtype=t.qtype if t.qtype not in (Q.F32, Q.F16) else None)

    total = sum(_nbytes(t.shape, t.qtype)[1] for t in tensors)
    check_free_space(out, total + (1 << 20))  # + header, tokenizer and alignment
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # The file is written inside a partial dir (``.<name>.partial-<pid>-*``, as core.run.io.atomic_dir's): a
        # killed export leaves that dir, which task=table removes once the run has ended.
        part = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise disk_error(e, out) from None
    tmp = part / out.name
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            arr = t.make()
            if arr.shape != t.shape:
                raise AssertionError(f"{t.name}: produced {arr.shape}, planned {t.shape}")
            w.write_tensor_data(quantize(arr, t.qtype))
        w.fout[0].flush()  # type: ignore[index]
        os.fsync(w.fout[0].fileno())  # type: ignore[index]
        w.close()
        try:
            os.link(tmp, out)  # fails if `out` appeared meanwhile: never replaces a file
        except FileExistsError:
            raise ExportError(f"{out} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise disk_error(e, out) from None
    finally:
        with contextlib.suppress(OSError):  # a failed cleanup never hides the error that caused it
            w.close()
        shutil.rmtree(part, ignore_errors=True)
    ffn_padded = [b.source for b in plan if not b.zero_ffn and b.ffn != shapes[b.source].ffn]
    return GGUFReport(path=str(out), architecture=arch, out_type=out_type, bytes=out.stat().st_size, blocks=len(plan),
                      layers_dropped=[i for i, s in enumerate(shapes) if not s.has_attention and not s.has_ffn],
                      dummy_attention=[b.source for b in plan if b.dummy_attention],
                      zero_ffn=[b.source for b in plan if b.zero_ffn], ffn_padded=ffn_padded, f16_fallback=fallback,
                      tokenizer=tokenizer.source, tokenizer_notes=tokenizer.notes)
