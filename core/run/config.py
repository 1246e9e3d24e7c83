"""Structured config schema of the groups every task shares, with their types.

Registered in Hydra's ConfigStore as ``prunelab_schema`` (the first entry of ``conf/config.yaml``'s
defaults), so a typo or a wrong type fails at composition, before any model loads. Method options are
not here: ``pruner:`` is whatever ``conf/pruner/<name>.yaml`` says, and its keys are the fields of the
class its ``_target_`` names (bound, and checked, by the prune recipe before any weight loads).
Cross-field checks a type cannot express live in :func:`validate`; checks only a task needs live in
its recipe's ``validate``. Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from core.models.ref import DTYPE_NAMES, KINDS, ModelRef
from core.run.plan import parse_bytes
from core.models.shape import shape_errors

TEXT_SOURCES = ("austen", "boolq", "sciq", "qa", "news", "mix", "text_file")  # core/data/text.py
DIRECTIONS = ("minimize", "maximize")


@dataclass
class PathsConfig:
    root_dir: str = "."
    output_dir: str = "."
    cache_dir: str = ".cache"
    outputs_root: str = "outputs"


@dataclass
class DataConfig:
    name: str = "austen"
    source: str = "austen"  # austen | boolq | sciq | qa | news | mix | text_file
    path: Optional[str] = None
    text_field: str = "text"  # for .jsonl files
    mix: dict[str, float] = field(default_factory=dict)  # source=mix: component -> weight ({}: core.data.text.DEFAULT_MIX)
    num_samples: int = 16
    seq_len: int = 128
    seed: int = 0


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
    """conf/logger/: where a run is mirrored besides metrics.json (core/run/record.py says what goes to W&B)."""

    name: str = "wandb"  # wandb | none
    project: str = "prunelab"
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None  # null: a multirun's jobs share the sweep's group (run.py wandb_group), a run none
    tags: list[str] = field(default_factory=list)
    log_model: bool = False  # the saved checkpoint as a W&B artifact of type "model" (file:// reference)


@dataclass
class RuntimeConfig:
    threads: Optional[int] = None  # torch intra-op threads; null = torch's default
    mmap_threshold_mb: Optional[float] = 1.0  # CPU blocks >= this are mmapped (freed memory goes back); null = glibc default


@dataclass
class PlanConfig:
    """The memory check before loading (core/run/plan.py, recipes/_plan.py)."""

    force: bool = False  # run even when the plan predicts more memory than there is
    device_memory: Optional[str] = None  # plan for this much device memory ("80GB") instead of what is free here
    host_memory: Optional[str] = None  # plan for this much host RAM instead of what is available here
    num_devices: Optional[int] = None  # model.device_map=auto: plan for this many GPUs (null: the ones here, >= 1)


@dataclass
class OptimizedMetric:
    """The number ``run.py`` returns to a sweeper: a metric the task's recipe reports, and which way is better."""

    name: Optional[str] = None  # null: the task's first metric (recipes/<task>.py METRICS)
    direction: Optional[str] = None  # minimize | maximize; null: the metric's own direction


@dataclass
class PrunelabConfig:
    task: str = "prune"  # a recipe of recipes/ (run.py checks the name)
    ratio: float = 0.25  # how much to prune, in the unit ratio_target names
    # The unit `ratio` is read in: a key of the pruner class's RATIO (groups, params, sparsity, ...); null = the
    # pruner's default. The pruner resolves and checks it; task=prune writes the resolved unit back here.
    ratio_target: Optional[str] = None
    seed: int = 42
    dry_run: bool = False  # print the plan (removed, calibration work, peak memory) and stop before reading weights
    plan: PlanConfig = field(default_factory=PlanConfig)
    save_model: bool = True
    save_dtype: Optional[str] = None  # float16 | bfloat16: half-size checkpoint; null = the model's own dtype
    base: Optional[str] = None  # analyze / batch_analyze: the reference model; convert: SliceGPT's base (name or path)
    models_dir: Optional[str] = None  # batch_analyze: folder of models
    runs: list[str] = field(default_factory=list)  # table, report: run dirs or folders of runs
    allow_pickle: bool = False  # legacy torch pickles: opt-in, they can run arbitrary code
    count_nonzero: bool = True  # analyze / batch_analyze: stream weights to count non-zeros (false: headers only)
    next_to_inputs: bool = False  # report / batch_analyze: also write next to the inputs (never over a file)
    # replace / convert / batch_analyze: the name of the results folder inside the run dir (a name, never a path:
    # see output_name_errors); null: derived by the task (llamba_replaced_11_13_17_21, baselines_analysis, ...)
    output_name: Optional[str] = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelRef = field(default_factory=ModelRef)
    data: DataConfig = field(default_factory=DataConfig)
    pruner: Any = None  # conf/pruner/<name>.yaml: its `_target_` class's fields, bound by the prune recipe
    layers: LayersConfig = field(default_factory=LayersConfig)
    replacement: Any = None  # conf/replacement/*.yaml: replacement.spec.ReplacementSpec's fields
    search: Any = None  # conf/search/*.yaml: replacement.spec.SearchSpec's fields
    recovery: Any = None  # conf/recovery/*.yaml: task=finetune, and task=prune's optional recovery stage
    export: Any = None  # conf/export/*.yaml: task=export
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    optimized_metric: OptimizedMetric = field(default_factory=OptimizedMetric)
    experiment: Optional[str] = None
    run_name: Optional[str] = None  # a preset's label (e.g. Wanda_2000): its run dir / sweep subdir name


# The run dir's own entries: a results folder never takes their name (RunContext's record, Hydra's log and
# config, the offline W&B run, the command that reproduces the run).
RUN_DIR_ENTRIES = ("metrics.json", "run.log", ".hydra", "wandb", "command.sh")
NAME_MAX_BYTES = 255  # a file or folder name on Linux and macOS file systems


def output_name_errors(value: Any, key: str = "output_name") -> list[str]:
    """Why ``value`` cannot name a results folder inside the run dir ([] when it can; None: the task derives one).

    A name, not a path: no separator, no ``.`` / ``..``, not hidden (``.hydra``, the ``.<name>.partial-*`` dirs of
    core.run.io), no control character, at most 255 bytes, none of the run dir's own entries. So the folder it names
    is ``<run dir>/<name>`` whatever the working directory or the symlinks around it: it never leaves the run dir
    and never reaches an earlier run."""
    if value is None:
        return []
    name = str(value)
    why = None
    if not name.strip():
        why = "is empty"
    elif name != name.strip():
        why = "starts or ends with a space"
    elif "/" in name or "\\" in name:
        why = "contains a path separator"
    elif name in (".", ".."):
        why = "names the run dir or its parent"
    elif name.startswith("."):
        why = "is hidden (starts with '.')"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "contains a control character"
    elif len(name.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        why = f"is longer than {NAME_MAX_BYTES} bytes"
    elif name in RUN_DIR_ENTRIES:
        why = "is one of the run dir's own entries"
    if why is None:
        return []
    return [f"{key}={name!r} {why}: it names the results folder inside the run dir (a plain folder name such as "
            "llamba_replaced_11_13_17_21; no '/', '..' or leading '.'), never a path"]


def derived_output_name(text: str, fallback: str) -> str:
    """``text`` made a safe ``output_name`` (what a task derives from its inputs): every character outside letters,
    digits and ``._+-`` becomes ``_``; leading dots and dashes go; at most 200 characters; ``fallback`` if nothing
    is left or the result is one of the run dir's own entries."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", text).lstrip(".-")[:200].rstrip(".")
    return name if name and not output_name_errors(name) else fallback


def register_configs() -> None:
    ConfigStore.instance().store(name="prunelab_schema", node=PrunelabConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.kind": KINDS,
    "model.dtype": DTYPE_NAMES,
    "data.source": TEXT_SOURCES,
    "eval.ppl.source": TEXT_SOURCES,
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
    "optimized_metric.direction": (*DIRECTIONS, None),
    "save_dtype": ("float32", "float16", "bfloat16", None),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part] if isinstance(cfg, dict) else getattr(cfg, part)
    return cfg


def validate(cfg: Any) -> list[str]:
    """All problems of a composed config that need neither a model nor a task's code (empty list = fine).

    Each recipe adds its own checks (``recipes.<task>.validate``); layer ranges against the model depth are
    checked once the depth is read from config.json, still before any weight loads.
    """
    errors: list[str] = []
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            errors.append(f"{key}={value!r} is not one of {', '.join(str(a) for a in allowed if a is not None)}")
    threads = _get(cfg, "runtime.threads")
    if threads is not None and threads < 1:
        errors.append(f"runtime.threads={threads} must be >= 1 (or null for torch's default)")
    mmap_mb = _get(cfg, "runtime.mmap_threshold_mb")
    if mmap_mb is not None and not 0 <= float(mmap_mb) <= 32:
        errors.append(f"runtime.mmap_threshold_mb={mmap_mb} must be in [0, 32] MiB (glibc's range) or null")
    if _get(cfg, "model.kind") == "hf" and not _get(cfg, "model.path"):
        errors.append(f"model={_get(cfg, 'model.name')} needs model.path=<local HF checkpoint dir>")
    if _get(cfg, "model.kind") == "shape":  # a shape name and a depth within it: nothing is built yet
        errors += shape_errors(_get(cfg, "model.shape"), _get(cfg, "model.num_layers"))
    device = str(_get(cfg, "model.device"))
    if not (device in ("cpu", "auto") or device.startswith(("cuda", "mps", "xpu", "meta"))):
        errors.append(f"model.device={device!r} is not a device (auto, cpu, cuda, cuda:1, mps)")
    if _get(cfg, "eval.ppl.source") == "mix":
        errors.append("eval.ppl.source=mix: perplexity reads one text; name one source (boolq, austen, sciq, qa, news, "
                      "text_file)")
    if _get(cfg, "data.num_samples") < 1 or _get(cfg, "data.seq_len") < 2:
        errors.append("data.num_samples must be >= 1 and data.seq_len >= 2")
    if _get(cfg, "data.source") == "text_file" and not _get(cfg, "data.path"):
        errors.append("data=text_file needs data.path=<a .txt or .jsonl file>")
    limit = _get(cfg, "eval.limit")
    if limit is not None and limit <= 0:
        errors.append(f"eval.limit={limit} must be a positive number of examples per task (or null for all)")
    ppl = _get(cfg, "eval.ppl")
    if _get(ppl, "enabled") and (_get(ppl, "seq_len") < 2 or _get(ppl, "max_tokens") < _get(ppl, "seq_len")):
        errors.append("eval.ppl: need seq_len >= 2 and max_tokens >= seq_len")
    if _get(ppl, "enabled") and _get(ppl, "batch_size") < 1:
        errors.append(f"eval.ppl.batch_size={_get(ppl, 'batch_size')} must be >= 1")
    if _get(ppl, "source") == "text_file" and not _get(ppl, "path"):
        errors.append("eval.ppl.source=text_file needs eval.ppl.path=<file>")
    for key in ("plan.device_memory", "plan.host_memory"):
        value = _get(cfg, key)
        if value is not None:
            try:
                parse_bytes(value)
            except ValueError:
                errors.append(f"{key}={value!r} is not a size (80GB, 24GiB, 512MB or a number of bytes)")
    num_devices = _get(cfg, "plan.num_devices")
    if num_devices is not None and num_devices < 1:
        errors.append(f"plan.num_devices={num_devices} must be >= 1 (or null: the GPUs here)")
    if _get(cfg, "eval.batch_size") < 1:
        errors.append(f"eval.batch_size={_get(cfg, 'eval.batch_size')} must be >= 1")
    return errors
