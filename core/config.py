"""Structured config schemas: every key `conf/` may set, with its type.

Registered in Hydra's ConfigStore as ``prunelab_schema`` (the first entry of
``conf/config.yaml``'s defaults), so a typo or a wrong type fails at composition,
before any model loads. Cross-field checks that a type cannot express (ratio
ranges, layer ranges against the model depth) live in :func:`validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


class Task(str, Enum):
    prune = "prune"
    evaluate = "evaluate"
    analyze = "analyze"
    batch_analyze = "batch_analyze"
    table = "table"


class RatioTarget(str, Enum):
    groups = "groups"  # LLM-Pruner's meaning: fraction of heads/channels removed inside the ranges
    params = "params"  # fraction of all model parameters removed


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "."
    cache_dir: str = ".cache"
    outputs_root: str = "outputs"


@dataclass
class TinyConfig:
    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 8
    num_kv_heads: int = 2
    vocab_size: int = 256
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = "smollm2"
    # gguf: a GGUF file inside an installed package (converted once, cached);
    # hf: a local HF dir or a prunelab checkpoint; tiny: random weights in memory.
    kind: str = "gguf"
    path: Optional[str] = None
    gguf_package: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "float32"
    device: str = "cpu"
    device_map: Optional[str] = None
    trust_remote_code: bool = False
    tiny: TinyConfig = field(default_factory=TinyConfig)


@dataclass
class DataConfig:
    name: str = "austen"
    source: str = "austen"  # austen | boolq | text_file
    path: Optional[str] = None
    text_field: str = "text"  # for .jsonl files
    num_samples: int = 16
    seq_len: int = 128
    seed: int = 0


@dataclass
class PrunerConfig:
    name: str = "taylor"
    importance: str = "taylor"  # taylor | l1 | l2 | random
    taylor: str = "param_second"  # vectorize | param_first | param_second | param_mix
    group_reduction: str = "sum"  # sum | mean | max
    global_ranking: bool = False
    iterative_steps: int = 1
    attention_ratio: Optional[float] = None  # overrides `ratio` for heads
    mlp_ratio: Optional[float] = None  # overrides `ratio` for MLP channels
    round_to: int = 1  # MLP width kept is a multiple of this
    rounding: str = "floor"  # floor | nearest | ceil: whole KV groups / round_to channel multiples
    batch_size: int = 0  # calibration micro-batch; 0 = all samples in one batch


@dataclass
class RangeConfig:
    start: int = 0
    end: Optional[int] = None  # exclusive; negative counts from the end; null = num_layers


@dataclass
class LayersConfig:
    name: str = "default"
    attention: RangeConfig = field(default_factory=RangeConfig)
    mlp: RangeConfig = field(default_factory=RangeConfig)


@dataclass
class PerplexityConfig:
    enabled: bool = True
    source: str = "boolq"  # boolq | austen | text_file
    path: Optional[str] = None
    text_field: str = "text"
    seq_len: int = 128
    max_tokens: int = 4096
    batch_size: int = 4


@dataclass
class GenerationConfig:
    enabled: bool = True
    prompt: str = "What is the capital of France?"
    max_new_tokens: int = 16


@dataclass
class EfficiencyConfig:
    enabled: bool = False
    prompt_len: int = 128
    batch_size: int = 1
    decode_tokens: int = 32
    warmup: int = 1
    repeats: int = 3


@dataclass
class EvalConfig:
    name: str = "quick"
    ppl: PerplexityConfig = field(default_factory=PerplexityConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    tasks: list[str] = field(default_factory=list)  # lm-eval tasks
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    batch_size: int = 8
    max_length: int = 2048
    compare_base: bool = True


@dataclass
class LoggerConfig:
    name: str = "wandb"
    project: str = "prunelab"
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RuntimeConfig:
    threads: Optional[int] = None  # torch intra-op threads; null = torch's default
    mmap_threshold_mb: Optional[float] = 1.0  # CPU blocks >= this are mmapped (freed memory goes back); null = glibc default


@dataclass
class PrunelabConfig:
    task: Task = Task.prune
    ratio: float = 0.25
    ratio_target: RatioTarget = RatioTarget.groups
    seed: int = 42
    save_model: bool = True
    base: Optional[str] = None  # analyze / batch_analyze: the reference model (name or path)
    models_dir: Optional[str] = None  # batch_analyze: folder of models
    runs: list[str] = field(default_factory=list)  # table: run dirs or folders of runs
    allow_pickle: bool = False  # legacy torch pickles: opt-in, they can run arbitrary code
    count_nonzero: bool = True  # analyze / batch_analyze: stream weights to count non-zeros (false: headers only)
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    experiment: Optional[str] = None


def register_configs() -> None:
    ConfigStore.instance().store(name="prunelab_schema", node=PrunelabConfig)


class ConfigError(ValueError):
    """A configuration that cannot be run; raised before any model loads."""


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": ("gguf", "hf", "tiny"),
    "model.dtype": ("float32", "float16", "bfloat16", "auto"),
    "data.source": ("austen", "boolq", "text_file"),
    "pruner.importance": ("taylor", "l1", "l2", "random"),
    "pruner.taylor": ("vectorize", "param_first", "param_second", "param_mix"),
    "pruner.group_reduction": ("sum", "mean", "max"),
    "pruner.rounding": ("floor", "nearest", "ceil"),
    "eval.ppl.source": ("boolq", "austen", "text_file"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def validate(cfg: Any) -> list[str]:
    """All cross-field problems of a composed config at once (empty list = fine).

    Only checks that need no model; layer ranges against the model depth are
    checked by :func:`pruning.ranges.resolve_range` once the depth is known
    (from config.json, before the weights load).
    """
    errors: list[str] = []
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            errors.append(f"{key}={value!r} is not one of {', '.join(allowed)}")
    task = _get(cfg, "task")
    task = getattr(task, "value", task)
    mmap_mb = _get(cfg, "runtime.mmap_threshold_mb")
    if mmap_mb is not None and not 0 <= float(mmap_mb) <= 32:
        errors.append(f"runtime.mmap_threshold_mb={mmap_mb} must be in [0, 32] MiB (glibc's range) or null")
    if task == "prune":
        for key in ("ratio", "pruner.attention_ratio", "pruner.mlp_ratio"):
            value = _get(cfg, key)
            if value is not None and not 0.0 <= float(value) < 1.0:
                errors.append(f"{key}={value} must be in [0, 1)")
        if _get(cfg, "pruner.iterative_steps") < 1:
            errors.append("pruner.iterative_steps must be >= 1")
        if _get(cfg, "pruner.round_to") < 1:
            errors.append("pruner.round_to must be >= 1")
        if _get(cfg, "data.num_samples") < 1 or _get(cfg, "data.seq_len") < 2:
            errors.append("data.num_samples must be >= 1 and data.seq_len >= 2")
        if _get(cfg, "data.source") == "text_file" and not _get(cfg, "data.path"):
            errors.append("data=text_file needs data.path=<a .txt or .jsonl file>")
        for part in ("attention", "mlp"):
            start, end = _get(cfg, f"layers.{part}.start"), _get(cfg, f"layers.{part}.end")
            if start is not None and end is not None and (start >= 0) == (end >= 0) and end < start:
                errors.append(f"layers.{part}: start={start} is after end={end} (start inclusive, end exclusive)")
    if _get(cfg, "model.kind") == "hf" and not _get(cfg, "model.path"):
        errors.append(f"model={_get(cfg, 'model.name')} needs model.path=<local HF checkpoint dir>")
    if task == "batch_analyze" and not _get(cfg, "models_dir"):
        errors.append("task=batch_analyze needs models_dir=<folder of models>")
    limit = _get(cfg, "eval.limit")
    if limit is not None and limit <= 0:
        errors.append(f"eval.limit={limit} must be a positive number of examples per task (or null for all)")
    ppl = _get(cfg, "eval.ppl")
    if _get(ppl, "enabled") and (_get(ppl, "seq_len") < 2 or _get(ppl, "max_tokens") < _get(ppl, "seq_len")):
        errors.append("eval.ppl: need seq_len >= 2 and max_tokens >= seq_len")
    if _get(ppl, "source") == "text_file" and not _get(ppl, "path"):
        errors.append("eval.ppl.source=text_file needs eval.ppl.path=<file>")
    return errors
