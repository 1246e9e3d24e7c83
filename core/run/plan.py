"""Memory and work of a run, known before it: bytes from a ``config.json`` dict, a method's :class:`Footprint`, and
the check that stops a run which cannot fit (:func:`check_fits`).

    fp = pruner.footprint(config, tokens=131072, dtype="bfloat16", device="cuda")   # each method's own formula
    check_fits(fp, device_free=80 * GIB, host_free=available, knobs=["pruner.offload=true", ...])

Everything here is arithmetic on a ``config.json`` dict (a Llama-style decoder: ``hidden_size``,
``intermediate_size``, heads, ``vocab_size``, per-layer ``layer_configs``; a Llamba's mixer layers through
``core.models.llama.params_from_config``): no torch, no weights, no task and no method. The methods say what
they hold (``footprint`` on each pruner class, the replacement search's spec, the LoRA spec) with these helpers;
the recipes (recipes/_plan.py) add the phases around them (loading, evaluation) and the process baseline.

Conventions: bytes are exact integers where the quantity is (weights), estimates where it is not (activations);
``device_bytes`` is memory on the accelerator (0 for a CPU run: everything is host memory), ``host_bytes`` is
resident host memory of the process on top of :data:`PROCESS_BASELINE_BYTES`. "GiB" is 2**30 bytes; a size
given as ``80GB`` is read the way GPU memory is quoted, 80 x 2**30.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from core.models.llama import Geometry, params_from_config
from core.run.errors import PlanError

GIB = 2**30
MIB = 2**20

# Resident memory of a prunelab process before it holds any model: Python + torch + transformers (+ the Llama
# modeling module, Hydra, OmegaConf). Measured once with psutil's RSS right after
#   import torch, transformers, hydra, omegaconf; from transformers import LlamaForCausalLM
# on this project's 2-core CPU machine (Python 3.11, torch 2.13.0+cpu, transformers 5.25.0): 441.9 MiB in each of
# three runs. A CUDA build of torch adds its CUDA context on the host and on the device; that part is not
# measured yet (CUDA_CONTEXT_* below stay 0 until the GPU script, tests/gpu/run.sh, measures them).
PROCESS_BASELINE_BYTES = 442 * MIB
# What a run holds besides its model once it has loaded one: the tokenizer, the calibration and evaluation text, the
# data modules. Measured from three runs of task=prune on the embedded SmolLM2 (float32, 513.1 MiB of weights; obs,
# taylor, wanda) on the same machine: peak RSS after loading 1140.1-1141.8 MiB, minus the weights, the 108 MiB
# embedding the load phase reads through the host, and PROCESS_BASELINE_BYTES: 77 MiB.
RUN_EXTRA_BYTES = 77 * MIB
CUDA_CONTEXT_HOST_BYTES = 0
CUDA_CONTEXT_DEVICE_BYTES = 0

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# Transient tensors of one decoder layer's forward on a micro-batch, in units of its tensors (calibration
# constants; tests/bench/scale_bench.py holds the plan to measurements): the MLP's gate and up outputs and their
# product live together (x 3 of [tokens, intermediate]); the attention block holds its normed input, q, its
# output and o_proj's output next to the residual (x 4 of [tokens, hidden]) plus k and v.
MLP_LIVE_TENSORS = 3
ATTENTION_LIVE_TENSORS = 4
# Logits of an evaluation forward: the float32 logits, their float32 copy for the loss and log-softmax.
LOGITS_LIVE_TENSORS = 3
# A Taylor pass's LM-head loss runs over chunks of tokens whose float32 logits take at most this many bytes
# (pruning.calibration.lm_loss_backward): 24 MiB is five chunks for 10 x 64 tokens of a 49k vocabulary, 13 of a 128k
# vocabulary (8 MiB was 15 chunks for SmolLM2 and cost a tenth of its Taylor pass), and bounded whatever the batch.
LOGITS_CHUNK_BYTES = 24 * 2**20

KNOBS = ("pruner.offload", "pruner.tokens", "pruner.batch_size", "model.dtype", "model.device_map", "pruner.states")


# --------------------------------------------------------------------------- sizes


def parse_bytes(value: Any) -> int:
    """``80GB``, ``80GiB``, ``80G``, ``512MB``, ``1.5TB`` or a number of bytes -> bytes (K/M/G/T are powers of 2**10,
    the way GPU memory is quoted: an "80 GB" GPU has 80 x 2**30 bytes). ValueError for anything else."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is not a size")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size (e.g. 80GB, 24GiB, 512MB, or a number of bytes)")
    unit = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]
    return int(float(m.group(1)) * 1024 ** unit)


def fmt_bytes(n: Optional[float]) -> str:
    """``1.73 GiB``, ``512.0 MiB``, ``—`` for None."""
    if n is None:
        return "—"
    n = float(n)
    for unit, size in (("TiB", 2**40), ("GiB", GIB), ("MiB", MIB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def dtype_bytes(dtype: str, cfg: Optional[Mapping[str, Any]] = None) -> int:
    """Bytes per element of a dtype name; ``auto`` is the checkpoint's own (``config.json``'s ``torch_dtype`` /
    ``dtype``; float32 when it says nothing, as transformers loads it then)."""
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        name = str((cfg or {}).get("dtype") or (cfg or {}).get("torch_dtype") or "float32").removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPE_BYTES)} or auto")
    return DTYPE_BYTES[name]


def dtype_name(dtype: str, cfg: Optional[Mapping[str, Any]] = None) -> str:
    """The dtype a model is held in (``auto`` resolved against its config)."""
    if str(dtype) != "auto":
        return str(dtype)
    return str((cfg or {}).get("dtype") or (cfg or {}).get("torch_dtype") or "float32").removeprefix("torch.")


# --------------------------------------------------------------------------- bytes from a config.json dict


def geometry(cfg: Mapping[str, Any]) -> Geometry:
    return Geometry.from_config(cfg)


def depth(cfg: Mapping[str, Any]) -> int:
    return int(cfg["num_hidden_layers"])


def model_params(cfg: Mapping[str, Any]) -> int:
    """Parameters of the whole model (a tied embedding counted once), from its config."""
    return params_from_config(cfg)


def model_bytes(cfg: Mapping[str, Any], dtype: str) -> int:
    """The weights' bytes at ``dtype`` (Llama-3-8B at bfloat16: 2 x 8,030,261,248)."""
    return model_params(cfg) * dtype_bytes(dtype, cfg)


def _one_layer(cfg: Mapping[str, Any], i: int) -> dict:
    """A config holding only decoder layer ``i`` (its per-layer entries kept), for params_from_config."""
    one = dict(cfg)
    one["num_hidden_layers"] = 1
    for key in ("layer_configs", "layer_types", "layer_sources"):
        if isinstance(cfg.get(key), list):
            one[key] = [cfg[key][i]]
    return one


def embedding_params(cfg: Mapping[str, Any]) -> int:
    """Embedding, LM head (unless tied) and final norm."""
    h = int(cfg["hidden_size"])
    return int(cfg["vocab_size"]) * h * (1 if cfg.get("tie_word_embeddings", False) else 2) + h


def layer_params(cfg: Mapping[str, Any], i: int) -> int:
    """Parameters of decoder layer ``i`` (its own widths: a pruned checkpoint's ``layer_configs`` honoured)."""
    one = _one_layer(cfg, i)
    return params_from_config(one) - embedding_params(one)


def layer_bytes(cfg: Mapping[str, Any], i: int, dtype: str) -> int:
    return layer_params(cfg, i) * dtype_bytes(dtype, cfg)


def max_layer_bytes(cfg: Mapping[str, Any], dtype: str) -> int:
    """The largest decoder layer (what a layer-streamed method moves to its device at once)."""
    return max((layer_bytes(cfg, i, dtype) for i in range(depth(cfg))), default=0)


def embedding_bytes(cfg: Mapping[str, Any], dtype: str) -> int:
    return embedding_params(cfg) * dtype_bytes(dtype, cfg)


def hidden_bytes(tokens: int, cfg: Mapping[str, Any], dtype: str) -> int:
    """One copy of the hidden states of ``tokens`` tokens (``[tokens, hidden]`` at ``dtype``)."""
    return int(tokens) * int(cfg["hidden_size"]) * dtype_bytes(dtype, cfg)


def intermediate_bytes(tokens: int, cfg: Mapping[str, Any], dtype: str) -> int:
    """One ``[tokens, intermediate]`` tensor at the widest MLP (down_proj's input)."""
    return int(tokens) * max(geometry(cfg).widths or (0,)) * dtype_bytes(dtype, cfg)


def attention_scores_bytes(batch: int, seq_len: int, cfg: Mapping[str, Any], dtype: str) -> int:
    """Eager attention's scores ``[batch, heads, seq, seq]`` (SDPA / flash kernels never hold them)."""
    return int(batch) * max(geometry(cfg).heads or (0,)) * int(seq_len) ** 2 * dtype_bytes(dtype, cfg)


def logits_bytes(tokens: int, cfg: Mapping[str, Any]) -> int:
    """float32 logits of ``tokens`` tokens."""
    return int(tokens) * int(cfg["vocab_size"]) * 4


def layer_forward_bytes(batch: int, seq_len: int, cfg: Mapping[str, Any], dtype: str, *,
                        attention: str = "sdpa") -> int:
    """Transient memory of one decoder layer's forward on ``batch`` x ``seq_len`` tokens (no grad):
    :data:`MLP_LIVE_TENSORS` x ``[tokens, intermediate]`` + :data:`ATTENTION_LIVE_TENSORS` x ``[tokens, hidden]``
    + k and v, and with ``attention="eager"`` the ``[batch, heads, seq, seq]`` scores twice (scores, softmax)."""
    g = geometry(cfg)
    tokens = int(batch) * int(seq_len)
    kv = max(g.kv_heads or (0,)) * g.head_dim * tokens * dtype_bytes(dtype, cfg)
    out = (MLP_LIVE_TENSORS * intermediate_bytes(tokens, cfg, dtype)
           + ATTENTION_LIVE_TENSORS * hidden_bytes(tokens, cfg, dtype) + 2 * kv)
    if attention == "eager":
        out += 2 * attention_scores_bytes(batch, seq_len, cfg, dtype)
    return out


def forward_bytes(batch: int, seq_len: int, cfg: Mapping[str, Any], dtype: str, *, attention: str = "sdpa") -> int:
    """Transient memory of a whole-model forward with logits (an evaluation batch, no grad): the residual stream,
    one layer's working set, and :data:`LOGITS_LIVE_TENSORS` float32 ``[tokens, vocab]``."""
    tokens = int(batch) * int(seq_len)
    return (2 * hidden_bytes(tokens, cfg, dtype) + layer_forward_bytes(batch, seq_len, cfg, dtype, attention=attention)
            + LOGITS_LIVE_TENSORS * logits_bytes(tokens, cfg))


def is_cuda(device: Optional[str]) -> bool:
    return str(device or "").startswith("cuda")


def accelerator(device: Optional[str]) -> bool:
    """A device other than the host's memory (cuda, mps, xpu)."""
    return bool(device) and str(device).split(":")[0] not in ("cpu", "meta")


# --------------------------------------------------------------------------- a method's footprint


@dataclass
class Footprint:
    """What one code path holds at its peak, and the work it does; a method's ``footprint(...)`` returns one.

    ``device_bytes`` / ``host_bytes``: peak bytes on the accelerator / in host RAM (the process baseline not
    included); ``disk_bytes``: scratch space on disk; ``layer_forwards``: decoder-layer forwards over the
    calibration tokens (a full model forward of an ``L``-layer model is ``L``); ``tokens``: calibration tokens.
    ``device_parts`` / ``host_parts`` name the terms of the peak (what a calibration adjusts); ``removes``: what
    the method would remove, in lines a person reads; ``widths``: per-layer widths after it, where the method's
    budget logic gives them without weights."""

    device_bytes: int = 0
    host_bytes: int = 0
    disk_bytes: int = 0
    layer_forwards: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)
    device_parts: dict[str, int] = field(default_factory=dict)
    host_parts: dict[str, int] = field(default_factory=dict)
    removes: list[str] = field(default_factory=list)
    widths: Optional[list[dict]] = None

    @staticmethod
    def of(device: Mapping[str, float], host: Mapping[str, float], *, on_device: bool, **kw: Any) -> "Footprint":
        """A footprint from named terms. ``on_device`` False (a CPU run): the "device" terms are host memory too."""
        dev = {k: int(v) for k, v in device.items() if v}
        hst = {k: int(v) for k, v in host.items() if v}
        if not on_device:
            hst = {**hst, **{k if k not in hst else f"{k} (device)": v for k, v in dev.items()}}
            dev = {}
        return Footprint(device_bytes=sum(dev.values()), host_bytes=sum(hst.values()), device_parts=dev,
                         host_parts=hst, **kw)

    def record(self) -> dict[str, Any]:
        out = {"device_bytes": self.device_bytes, "host_bytes": self.host_bytes, "disk_bytes": self.disk_bytes,
               "layer_forwards": self.layer_forwards, "tokens": self.tokens, "device_parts": self.device_parts,
               "host_parts": self.host_parts, "notes": self.notes, "removes": self.removes}
        if self.widths is not None:
            out["widths"] = self.widths
        return out


def peak(phases: Mapping[str, Footprint]) -> tuple[Footprint, dict[str, str]]:
    """The peak over phases that run one after the other (device and host peaks may come from different phases);
    ``{"device": phase, "host": phase}`` says which."""
    if not phases:
        return Footprint(), {}
    dev = max(phases, key=lambda k: phases[k].device_bytes)
    host = max(phases, key=lambda k: phases[k].host_bytes)
    out = Footprint(device_bytes=phases[dev].device_bytes, host_bytes=phases[host].host_bytes,
                    disk_bytes=max(p.disk_bytes for p in phases.values()),
                    layer_forwards=sum(p.layer_forwards for p in phases.values()),
                    tokens=max(p.tokens for p in phases.values()),
                    device_parts=dict(phases[dev].device_parts), host_parts=dict(phases[host].host_parts))
    return out, {"device": dev, "host": host}


# --------------------------------------------------------------------------- devices named in a configuration


def device_errors(device: Optional[str], cuda_count: int, what: str = "model.device") -> list[str]:
    """``device`` against the CUDA devices there are (``cuda_count``; 0 without CUDA). One line per problem."""
    if device is None or str(device) in ("cpu", "meta", "auto", "disk"):
        return []
    d = str(device)
    if d.isdigit():  # accelerate's device_map values: a GPU index
        d = f"cuda:{d}"
    if not d.startswith("cuda"):
        return []
    index = int(d.split(":")[1]) if ":" in d and d.split(":")[1].isdigit() else 0
    if cuda_count == 0:
        return [f"{what}={device}: this machine has no CUDA device; use cpu (or dry_run=true to plan for a GPU "
                "elsewhere)"]
    if index >= cuda_count:
        return [f"{what}={device}: only {cuda_count} CUDA device(s) here (cuda:0..cuda:{cuda_count - 1})"]
    return []


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def device_map_errors(device_map: Any, cuda_count: int) -> list[str]:
    """A ``model.device_map`` (a strategy, a device, or ``{module: device}``) that names devices this machine lacks."""
    if device_map is None:
        return []
    if isinstance(device_map, Mapping):
        errors = []
        for module, dev in device_map.items():
            errors += device_errors(str(dev), cuda_count, f"model.device_map[{module}]")
        return errors[:1] if cuda_count == 0 else errors
    if str(device_map) in DEVICE_MAP_STRATEGIES:
        return []
    return device_errors(str(device_map), cuda_count, "model.device_map")


def map_devices(device_map: Any, device: str, cuda_count: int) -> list[str]:
    """The accelerators a model is placed on: every CUDA device for a strategy (``auto``), the ones a
    ``{module: device}`` map names, else ``device`` alone when it is an accelerator."""
    if device_map is None:
        return [device] if accelerator(device) else []
    if isinstance(device_map, Mapping):
        names = {f"cuda:{d}" if str(d).isdigit() else str(d) for d in device_map.values()}
        return sorted(n for n in names if accelerator(n))
    if str(device_map) in DEVICE_MAP_STRATEGIES:
        return [f"cuda:{i}" for i in range(cuda_count)] or (["cuda"] if is_cuda(device) else [])
    return [str(device_map)] if accelerator(str(device_map)) else []


# --------------------------------------------------------------------------- where the weights and the work are


@dataclass
class Placement:
    """Where a code path's memory goes: ``work`` on the device its layers run on (``work_device``), ``host`` in
    host RAM; ``on_device``: the work device is an accelerator (else ``work`` is host memory too)."""

    work: dict[str, int]
    host: dict[str, int]
    on_device: bool
    work_device: str

    def add(self, **terms: float) -> "Placement":
        """Terms held where the layers run (hidden states, activations, statistics)."""
        for k, v in terms.items():
            self.work[k] = self.work.get(k, 0) + int(v)
        return self

    def add_host(self, **terms: float) -> "Placement":
        for k, v in terms.items():
            self.host[k] = self.host.get(k, 0) + int(v)
        return self

    def footprint(self, **kw: Any) -> Footprint:
        return Footprint.of(self.work, self.host, on_device=self.on_device, **kw)


def placement(cfg: Mapping[str, Any], dtype: str, model_device: str, work_device: Optional[str] = None,
              offload: bool = False) -> Placement:
    """The weights of a model placed on ``model_device`` whose layers run on ``work_device`` (None: the model's).
    ``offload`` (a work device other than the model's): the weights stay where the model is and the largest
    decoder layer visits the work device at a time (plus the embedding while the first layer's inputs are made)."""
    work_device = str(work_device or model_device)
    offload = bool(offload) and work_device != str(model_device)
    weights = model_bytes(cfg, dtype)
    p = Placement({}, {}, accelerator(work_device), work_device)
    if offload:
        embed = int(cfg["vocab_size"]) * int(cfg["hidden_size"]) * dtype_bytes(dtype, cfg)
        p.work["one decoder layer"] = max(max_layer_bytes(cfg, dtype), embed + layer_bytes(cfg, 0, dtype))
        (p.host if not accelerator(model_device) else p.work)["weights"] = weights
    elif accelerator(model_device) or not accelerator(work_device):
        p.work["weights"] = weights
    else:
        p.host["weights"] = weights
    return p


# --------------------------------------------------------------------------- the check


def check_fits(footprint: Footprint, device_free: Optional[int], host_free: Optional[int],
               knobs: Sequence[str] = (), *, force_key: str = "plan.force=true") -> None:
    """PlanError, one line, when ``footprint`` exceeds what is free: the prediction, what is available, the knobs
    that would make it fit, and the key that runs it anyway. ``None`` = not known (not checked)."""
    over = []
    if device_free is not None and footprint.device_bytes > device_free:
        over.append(f"device memory {fmt_bytes(footprint.device_bytes)} > {fmt_bytes(device_free)} free")
    if host_free is not None and footprint.host_bytes > host_free:
        over.append(f"host memory {fmt_bytes(footprint.host_bytes)} > {fmt_bytes(host_free)} available")
    if not over:
        return
    hint = f"; to fit, try {', '.join(knobs)}" if knobs else ""
    raise PlanError(f"this run cannot fit: predicted peak {' and '.join(over)}{hint} (dry_run=true shows the plan; "
                    f"{force_key} runs it anyway)")


def fits(footprint: Footprint, device_free: Optional[int], host_free: Optional[int]) -> bool:
    try:
        check_fits(footprint, device_free, host_free)
    except PlanError:
        return False
    return True


def table(rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns (for a printed plan)."""
    rows = [list(map(str, r)) for r in rows]
    if not rows:
        return []
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(max(map(len, rows)))]
    return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]


def span(r: Sequence[int]) -> str:
    """``[start, end)`` of a layer range."""
    return f"[{r[0]}, {r[1]})"


def ceil_div(a: int, b: int) -> int:
    return -(-int(a) // max(1, int(b)))


__all__ = ["Footprint", "PlanError", "PROCESS_BASELINE_BYTES", "GIB", "MIB", "KNOBS", "parse_bytes", "fmt_bytes",
           "dtype_bytes", "dtype_name", "model_bytes", "model_params", "layer_bytes", "layer_params",
           "max_layer_bytes", "embedding_bytes", "hidden_bytes", "intermediate_bytes", "attention_scores_bytes",
           "logits_bytes", "layer_forward_bytes", "forward_bytes", "check_fits", "fits", "peak", "device_errors",
           "device_map_errors", "map_devices"]
