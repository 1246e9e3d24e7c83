"""LoRA on a compressed model through ``peft``: the options, the target modules of each architecture, attach, merge.

    spec = LoRASpec(rank=8, alpha=16)                 # conf/recovery/lora.yaml: _target_: recovery.lora.LoRASpec
    targets = resolve_targets(model, spec)            # full module names; a name matching nothing is an error
    peft_model = attach(model, spec, targets)         # only the adapters require grad; weights stay as they are
    ... recovery.train.train(peft_model, ...)
    save_adapter(peft_model, out / "adapter")         # the unmerged adapters (PeftModel.from_pretrained)
    model = merge(peft_model)                         # W + (alpha / r) B A, the same modules as before

Targets are the ``nn.Linear`` modules inside the decoder layers, found by walking the model, so every layout the
project produces is covered without a table per architecture: a Llama's ``q,k,v,o_proj`` / ``gate,up,down_proj``
at whatever per-layer width pruning left (a removed sub-block has no linear to target; an output bias added by a
method is part of the frozen base layer), a sliced Llama's resized projections (SliceGPT's shortcut matrices are
not linears and stay frozen), a hybrid's Mamba-2 ``in_proj`` / ``out_proj`` next to its attention layers. The LM
head and embeddings are never targets (LLM-Pruner's recipe; peft's ``all-linear`` leaves the head out too).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from core.models.llama import decoder_layers
from core.run.errors import ConfigError
from core.run.io import atomic_dir
from recovery.data import DataSpec

if TYPE_CHECKING:
    from torch import nn

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
ALL_LINEAR = "all-linear"
# The training text's default: the calibration mix without its Q&A pairs (conf/recovery/lora.yaml says why).
TRAINING_MIX = {"austen": 0.4, "sciq": 0.3, "qa": 0.0, "news": 0.1}
# options that change nothing in the trained adapters: a resumed run may differ in these
RESUME_FREE = ("resume", "save_every", "gradient_checkpointing", "save_adapter")
# footprint(): what one layer saves for backward per token, in elements: the norms' inputs and outputs, the
# dropout copies of every adapted linear's input (q, k, v: 3; o; gate, up: 2; down: 1 x intermediate), q, k, v and
# the attention output around RoPE / SDPA (hidden, 3 x kv width), gate, up and silu(gate) (3 x intermediate)
LORA_SAVED_PER_TOKEN = {"hidden": 12, "kv": 3, "intermediate": 4}


@dataclass(frozen=True)
class LoRASpec:
    """Recovery fine-tuning options (``recovery=lora``). Defaults follow LLM-Pruner's ``post_training.py`` (r 8,
    alpha 16, dropout 0.05, lr 1e-4, every linear of the decoder); the length is one of ``epochs``, ``tokens`` or
    ``steps`` (the first that is set)."""

    name: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: Any = ALL_LINEAR  # "all-linear" or module names: [q_proj, v_proj], [in_proj, out_proj] (Mamba-2), ...
    lr: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant, after `warmup_steps` of linear warm-up
    warmup_steps: int = 0
    steps: Optional[int] = 200  # optimizer steps (used when neither tokens nor epochs is set)
    tokens: Optional[int] = None  # training tokens: steps = tokens / (micro_batch x grad_accum x seq_len)
    epochs: Optional[float] = None  # passes over the training split (LLM-Pruner: 2 epochs of Alpaca)
    micro_batch: int = 4  # rows per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 128  # tokens per row
    packing: bool = True  # running text: documents joined by EOS into full rows (false: one document per row)
    seed: int = 0  # adapter initialisation, data order, dropout
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on a GPU that has it) | fp32 | bf16 (autocast)
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # gradient clipping (null: none)
    eval_every: int = 50  # held-out perplexity every N steps (and before the first and after the last); 0: ends only
    eval_tokens: int = 4096  # held-out tokens per evaluation
    patience: Optional[int] = None  # early stopping: stop after N evaluations without a better held-out perplexity
    restore_best: bool = True  # with early stopping: keep the adapters of the best evaluation
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more time
    train_on_inputs: bool = False  # instruction data: also train on the prompt
    save_every: int = 50  # resumable state every N steps (and at the end); 0: at the end only
    resume: Any = False  # false | true (the newest unfinished run under paths.outputs_root) | a run dir / state dir
    save_adapter: bool = True  # also write the unmerged adapters (<run dir>/adapter)
    data: Any = field(default_factory=lambda: {"mix": dict(TRAINING_MIX)})  # recovery.data.DataSpec's fields

    def __post_init__(self) -> None:
        if not isinstance(self.data, DataSpec):
            object.__setattr__(self, "data", DataSpec(**(self.data or {})))
        errors = []
        if not isinstance(self.rank, int) or self.rank <= 0:
            errors.append(f"recovery.rank={self.rank} must be a positive integer")
        if not self.alpha > 0:
            errors.append(f"recovery.alpha={self.alpha} must be > 0")
        if not 0 <= self.dropout < 1:
            errors.append(f"recovery.dropout={self.dropout} must be in [0, 1)")
        if not self.lr > 0:
            errors.append(f"recovery.lr={self.lr} must be > 0")
        if self.schedule not in SCHEDULES:
            errors.append(f"recovery.schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            errors.append(f"recovery.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for key in ("micro_batch", "grad_accum"):
            if getattr(self, key) < 1:
                errors.append(f"recovery.{key}={getattr(self, key)} must be >= 1")
        if self.seq_len < 2:
            errors.append(f"recovery.seq_len={self.seq_len} must be >= 2")
        for key in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, key) < 0:
                errors.append(f"recovery.{key}={getattr(self, key)} must be >= 0")
        if self.epochs is not None and not self.epochs > 0:
            errors.append(f"recovery.epochs={self.epochs} must be > 0 (or null)")
        elif self.tokens is not None and self.tokens < 1:
            errors.append(f"recovery.tokens={self.tokens} must be >= 1 (or null)")
        elif self.epochs is None and self.tokens is None and (self.steps is None or self.steps < 1):
            errors.append(f"recovery.steps={self.steps} must be >= 1 (or set recovery.tokens or recovery.epochs)")
        if self.eval_tokens < self.seq_len:
            errors.append(f"recovery.eval_tokens={self.eval_tokens} must be >= recovery.seq_len={self.seq_len}")
        if self.patience is not None and self.patience < 1:
            errors.append(f"recovery.patience={self.patience} must be >= 1 (or null: no early stopping)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            errors.append(f"recovery.max_grad_norm={self.max_grad_norm} must be > 0 (or null)")
        if isinstance(self.targets, str):
            if self.targets != ALL_LINEAR:
                errors.append(f"recovery.targets={self.targets!r}: '{ALL_LINEAR}' or a list of module names "
                              "([q_proj, v_proj])")
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            errors.append(f"recovery.targets={self.targets!r}: '{ALL_LINEAR}' or a non-empty list of module names")
        if errors:
            raise ConfigError("; ".join(errors))

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    def footprint(self, cfg: dict, tokens: int, dtype: str, device: str) -> Any:
        """Peak memory and work of this recovery on a model of ``config.json`` ``cfg`` (torch-free;
        core/run/plan.py), as recovery/train.py trains it, on the model's device: the frozen weights; the adapters
        (``rank x (in + out)`` per targeted linear, float32) with their gradients and AdamW's two moments; the
        activations one micro-batch (``micro_batch x seq_len`` tokens) saves for backward in every layer
        (:data:`LORA_SAVED_PER_TOKEN`; ``gradient_checkpointing``: each layer's input, and one layer's set); the
        logits of that micro-batch with their float32 loss. ``tokens``: training tokens (0: from ``steps``)."""
        from core.run.plan import (LOGITS_LIVE_TENSORS, Placement, accelerator, dtype_bytes, geometry, logits_bytes,
                                   model_bytes)

        geo = geometry(cfg)
        shapes = {"q_proj": (geo.hidden, max(geo.heads) * geo.head_dim),
                  "k_proj": (geo.hidden, max(geo.kv_heads) * geo.head_dim),
                  "v_proj": (geo.hidden, max(geo.kv_heads) * geo.head_dim),
                  "o_proj": (max(geo.heads) * geo.head_dim, geo.hidden), "gate_proj": (geo.hidden, max(geo.widths)),
                  "up_proj": (geo.hidden, max(geo.widths)), "down_proj": (max(geo.widths), geo.hidden)}
        chosen = shapes if self.targets == ALL_LINEAR else {k: v for k, v in shapes.items() if k in self.targets}
        adapters = geo.depth * sum(self.rank * (i + o) for i, o in chosen.values())
        bf16 = self.precision == "bf16" or (self.precision == "auto" and str(device).startswith("cuda"))
        act = 2 if bf16 else dtype_bytes(dtype, cfg)
        t = self.micro_batch * self.seq_len
        h, k, i = geo.hidden, max(geo.kv_heads) * geo.head_dim, max(geo.widths)
        per_layer = (LORA_SAVED_PER_TOKEN["hidden"] * h + LORA_SAVED_PER_TOKEN["kv"] * k
                     + LORA_SAVED_PER_TOKEN["intermediate"] * i) * act * t
        saved = (geo.depth * h * act * t + per_layer) if self.gradient_checkpointing else geo.depth * per_layer
        p = Placement({"frozen weights": model_bytes(cfg, dtype),
                       "adapters + gradients + AdamW moments (float32)": 16 * adapters,
                       "activations saved for backward": saved,
                       "logits and their float32 loss": logits_bytes(t, cfg) * LOGITS_LIVE_TENSORS
                       + t * int(cfg["vocab_size"]) * act}, {}, accelerator(device), str(device))
        rows = self.rows_per_step * self.seq_len
        steps = math.ceil(tokens / rows) if tokens else (math.ceil(self.tokens / rows) if self.tokens else
                                                         (self.steps or 0))
        notes = [f"{adapters:,} adapter parameters on {', '.join(chosen)} of {geo.depth} layers (rank {self.rank})"]
        if self.epochs is not None:
            notes.append(f"recovery.epochs={self.epochs}: the steps follow the training text's size (known once it "
                         "is read); the work is not counted")
            steps = 0
        forwards = steps * self.grad_accum * geo.depth * (3 if self.gradient_checkpointing else 2)
        return p.footprint(layer_forwards=forwards, tokens=steps * rows, notes=notes)

    def fingerprint(self) -> dict[str, Any]:
        """Every option that changes the trained adapters (a resume state must match these)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RESUME_FREE}
        out["data"] = self.data.to_dict()
        out["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["data"] = self.data.to_dict()
        out["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return out


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder layers, by its full module name, in model order."""
    from torch import nn  # not at config validation, which builds LoRASpec from this module

    try:
        inside = {id(m) for m in decoder_layers(model).modules()}
    except AttributeError:
        raise ConfigError(f"{type(model).__name__} has no decoder layers (model.model.layers): recovery fine-tunes "
                          "Llama-style decoders, pruned, sliced or hybrid") from None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside}


def resolve_targets(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Full names of the modules that get adapters; ConfigError for a name matching nothing or a rank too large."""
    linears = {n: (lin.in_features, lin.out_features) for n, lin in decoder_linears(model).items()}
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no linear layer in its decoder layers to adapt")
    return _choose(linears, spec)


def _choose(linears: dict[str, tuple[int, int]], spec: LoRASpec) -> list[str]:
    """The names in ``linears`` (name -> (in, out)) that ``spec.targets`` selects, each checked against the rank."""
    if spec.targets == ALL_LINEAR:
        chosen = list(linears)
    else:
        chosen, leaves = [], sorted({n.rsplit(".", 1)[-1] for n in linears})
        for t in spec.targets:
            hits = [n for n in linears if n == t or n.endswith("." + t)]
            if not hits:
                raise ConfigError(f"recovery.targets: {t!r} matches no linear layer of this model (its decoder's "
                                  f"linear layers: {', '.join(leaves)})")
            chosen += [n for n in hits if n not in chosen]
        order = list(linears)
        chosen.sort(key=order.index)
    for name in chosen:
        fan_in, fan_out = linears[name]
        width = min(fan_in, fan_out)
        if spec.rank > width:
            raise ConfigError(f"recovery.rank={spec.rank} is larger than {name}'s width {width} (in {fan_in}, "
                              f"out {fan_out}): lower recovery.rank or leave it out of recovery.targets")
    return chosen


LLAMA_TYPES = ("llama", "mistral", "qwen2", "prunelab_llama")


def config_linears(cfg: Optional[dict]) -> Optional[dict[str, tuple[int, int]]]:
    """The decoder's linear layers (name -> (in, out)) that a Llama-style ``config.json`` describes (per-layer widths of
    a prunelab checkpoint included; a block pruned to 0 has none), read before any weight; None for other models."""
    if not cfg or cfg.get("model_type") not in LLAMA_TYPES:
        return None
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    hd = int(cfg.get("head_dim") or hidden // heads)
    per_layer = cfg.get("layer_configs") or [{}] * int(cfg["num_hidden_layers"])
    out: dict[str, tuple[int, int]] = {}
    for i, lc in enumerate(per_layer):
        h = lc.get("num_attention_heads", heads)
        k = lc.get("num_key_value_heads", kv)
        ffn = lc.get("intermediate_size", cfg["intermediate_size"])
        at = f"model.layers.{i}."
        if h:
            out.update({at + "self_attn.q_proj": (hidden, h * hd), at + "self_attn.k_proj": (hidden, k * hd),
                        at + "self_attn.v_proj": (hidden, k * hd), at + "self_attn.o_proj": (h * hd, hidden)})
        if ffn:
            out.update({at + "mlp.gate_proj": (hidden, ffn), at + "mlp.up_proj": (hidden, ffn),
                        at + "mlp.down_proj": (ffn, hidden)})
    return out


def check_targets_config(cfg: Optional[dict], spec: LoRASpec) -> None:
    """:func:`resolve_targets` from ``config.json`` alone: a bad target or a rank above a width fails before the
    weights load (other architectures are checked once loaded)."""
    linears = config_linears(cfg)
    if linears:
        _choose(linears, spec)


def attach(model: nn.Module, spec: LoRASpec, targets: list[str]) -> Any:
    """``peft.get_peft_model`` with adapters on ``targets`` (initialised from ``spec.seed``). The base weights are
    frozen in their own dtype; adapters of a half-precision model are kept in float32 (peft's autocast)."""
    import torch  # torch and peft (seconds): not at config validation, which builds LoRASpec from this module
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets),
                        bias="none")
    with warnings.catch_warnings():  # peft asks transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config, autocast_adapter_dtype=True)


def trainable_parameters(peft_model: Any) -> dict[str, Any]:
    """The parameters that train (the adapters), by name, in model order."""
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def save_adapter(peft_model: Any, out_dir: str | Path, readme: str = "") -> Path:
    """The unmerged adapters as peft writes them (adapter_config.json, adapter_model.safetensors), atomically."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp)
        if readme:
            (tmp / "README.txt").write_text(readme)
    return out_dir


def merge(peft_model: Any) -> nn.Module:
    """The base model with ``W + (alpha / r) B A`` folded into each adapted weight: the same module types and shapes
    as before adapters were attached (it saves in the model's own checkpoint format)."""
    model = peft_model.merge_and_unload(progressbar=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def resolve_precision(precision: str, device: Any) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it, fp32 otherwise."""
    import torch  # not at config validation, which builds LoRASpec from this module

    if precision != "auto":
        return precision
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"
