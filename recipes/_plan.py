"""The plan of a run, known before any weight is read: what the task would remove or replace, the calibration work,
and the peak host and device memory; ``dry_run=true`` prints it and stops, a real run checks it before loading.

    python run.py model=llama3_70b_shape dry_run=true                          # the plan; status dry_run
    python run.py model=llama3_70b_shape model.device=cuda plan.device_memory=80GB dry_run=true

A task that loads a model declares ``plan(cfg) -> Plan`` (recipes/__init__.py) with one of the ``plan_<task>``
functions here. run.py calls :func:`prepare` once the config is valid (``model.device: auto`` resolved to the
device actually used, the devices a configuration names checked against this machine, the plan computed from
``config.json`` / the shape's config / the GGUF's metadata), then :func:`dry_run`, or :func:`enforce` after the
record opens: a run whose predicted peak exceeds the free device memory (``torch.cuda.mem_get_info``) or the
host's available RAM (psutil) stops there with one line naming the knobs that would make it fit, unless
``plan.force=true``. ``plan.device_memory`` / ``plan.host_memory`` replace what is measured here (plan for a GPU
elsewhere). The formulas are the methods' own (``footprint`` of each pruner, of the replacement and search specs,
of the LoRA spec); the byte helpers are ``core.run.plan``'s.

Nothing here imports torch, except to resolve ``auto`` and to read the free memory of CUDA devices that exist.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from core.run import plan as P
from core.run.errors import ConfigError, LoadError, UserError
from recipes._common import build, cuda_count, plain, replacement_models, resolve_device, resolve_model

log = logging.getLogger(__name__)

STATUS = "dry_run"  # the status of a dry run's record (analysis/results_table.py lists it apart)
BASELINE = P.PROCESS_BASELINE_BYTES + P.RUN_EXTRA_BYTES  # host memory of a run before its model (core/run/plan.py)


# --------------------------------------------------------------------------- this machine


def free_device_bytes(devices: list[str]) -> Optional[int]:
    """Free memory summed over ``devices`` (``torch.cuda.mem_get_info``); None when none of them is here."""
    import torch

    if not devices or not torch.cuda.is_available():
        return None
    total = 0
    try:
        for d in devices:
            index = int(d.split(":")[1]) if ":" in d else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                return None
            total += int(torch.cuda.mem_get_info(index)[0])
    except (RuntimeError, AssertionError) as e:  # a device that cannot be queried: not checked
        log.warning("free device memory unknown (%s): the device side of the plan is not checked", e)
        return None
    return total


def available_host_bytes() -> Optional[int]:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil: the host side is not checked
        return None


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What one run would load and hold, phase by phase, without its weights."""

    task: str
    model: str  # what the model is, in one line
    device: str  # where the model is placed (model.device, resolved)
    dtype: str
    phases: dict[str, P.Footprint] = field(default_factory=dict)  # in order; host bytes without the process baseline
    lines: list[tuple[str, str]] = field(default_factory=list)  # (label, text): what is removed, the calibration
    notes: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # the accelerators it uses
    unknown: Optional[str] = None  # why no memory can be predicted (a config only loading reads)
    # knob settings and their plans: computed on first use (a dry run, a refusal; a run that fits never needs them)
    variant_source: Optional[Callable[[], list[tuple[str, "Plan"]]]] = field(default=None, repr=False)
    _variants: Optional[list[tuple[str, "Plan"]]] = field(default=None, repr=False)

    @property
    def variants(self) -> list[tuple[str, "Plan"]]:
        if self._variants is None:
            self._variants = self.variant_source() if self.variant_source is not None else []
        return self._variants

    def peak(self) -> tuple[P.Footprint, dict[str, str]]:
        """The peak over the phases, the process baseline (and the CUDA context) included."""
        fp, where = P.peak(self.phases)
        if self.phases:
            fp.host_bytes += BASELINE + (P.CUDA_CONTEXT_HOST_BYTES if self.devices else 0)
            fp.host_parts["process baseline (Python, torch, transformers)"] = P.PROCESS_BASELINE_BYTES
            fp.host_parts["tokenizer, texts, data modules"] = P.RUN_EXTRA_BYTES
            if self.devices:
                fp.device_bytes += P.CUDA_CONTEXT_DEVICE_BYTES
        return fp, where

    def record(self) -> dict[str, Any]:
        fp, where = self.peak()
        return {"task": self.task, "model": self.model, "device": self.device, "dtype": self.dtype,
                "devices": self.devices, "unknown": self.unknown,
                "peak": {"device_bytes": fp.device_bytes, "host_bytes": fp.host_bytes, "phase": where,
                         "device_parts": fp.device_parts, "host_parts": fp.host_parts,
                         "layer_forwards": fp.layer_forwards, "tokens": fp.tokens,
                         "process_baseline_bytes": P.PROCESS_BASELINE_BYTES, "run_extra_bytes": P.RUN_EXTRA_BYTES},
                "phases": {k: v.record() for k, v in self.phases.items()},
                "what": {k: v for k, v in self.lines}, "notes": self.notes,
                # the knob variants when they were computed (a dry run, a plan that does not fit)
                "variants": {label: {"device_bytes": v.peak()[0].device_bytes, "host_bytes": v.peak()[0].host_bytes}
                             for label, v in (self._variants or [])}}


@dataclass
class Available:
    """The memory a plan is checked against, and where each figure comes from."""

    device: Optional[int]
    host: Optional[int]
    device_source: str
    host_source: str


def available(cfg: DictConfig, plan: Plan) -> Available:
    """``plan.device_memory`` / ``plan.host_memory`` when given, else what is free here (None: not known)."""
    given_d, given_h = OmegaConf.select(cfg, "plan.device_memory"), OmegaConf.select(cfg, "plan.host_memory")
    if not plan.devices:
        device, d_src = None, "no accelerator used"
    elif given_d is not None:
        per = P.parse_bytes(given_d)
        device, d_src = per * len(plan.devices), f"plan.device_memory={given_d}" + (
            f" x {len(plan.devices)} devices" if len(plan.devices) > 1 else "")
    else:
        device = free_device_bytes(plan.devices) if cuda_count(import_torch=False) else None
        d_src = (f"free on {', '.join(plan.devices)} here" if device is not None else
                 "no CUDA device here: give plan.device_memory=<size> (e.g. 80GB) to check it")
    if given_h is not None:
        host, h_src = P.parse_bytes(given_h), f"plan.host_memory={given_h}"
    else:
        host = available_host_bytes()
        h_src = "available here" if host is not None else "unknown (no psutil)"
    return Available(device, host, d_src, h_src)


def variant_fits(cfg: DictConfig, variant: Plan) -> bool:
    """Whether a variant's plan fits what it would have (a device it needs that cannot be measured here and is not
    given by plan.device_memory does not count as fitting)."""
    a = available(cfg, variant)
    if (variant.devices and a.device is None) or a.host is None:
        return False
    return P.fits(variant.peak()[0], a.device, a.host)


def knobs(cfg: DictConfig, plan: Plan) -> list[str]:
    """The knob settings (variants) whose plan fits, each with its peak; else the knobs to look at."""
    fitting = []
    for label, v in plan.variants:
        fp, _ = v.peak()
        if variant_fits(cfg, v):
            fitting.append(f"{label} (device {P.fmt_bytes(fp.device_bytes) if v.devices else '-'}, "
                           f"host {P.fmt_bytes(fp.host_bytes)})")
    if fitting:
        return fitting
    names = sorted({k.split("=")[0] for label, _ in plan.variants for k in label.split()})
    if not names:
        return ["a machine with more memory (plan.device_memory / plan.host_memory plan one from here)"]
    return [f"{', '.join(names)} (none fits alone here: combine them, or a machine with more memory)"]


def render(plan: Plan, avail: Optional[Available] = None, cfg: Optional[DictConfig] = None) -> list[str]:
    """The plan as a person reads it."""
    out = [f"plan of task={plan.task}: {plan.model}"]
    out += [f"  {label}: {text}" for label, text in plan.lines]
    if plan.unknown:
        return out + [f"  memory: not predicted: {plan.unknown}"] + [f"  note: {n}" for n in plan.notes]
    fp, where = plan.peak()
    rows = [("  phase", "device", "host")]
    for name, ph in plan.phases.items():
        rows.append((f"  {name}", P.fmt_bytes(ph.device_bytes) if plan.devices else "-",
                     P.fmt_bytes(ph.host_bytes + BASELINE)))
    rows.append(("  peak", (f"{P.fmt_bytes(fp.device_bytes)} ({where['device']})" if plan.devices else "-"),
                 f"{P.fmt_bytes(fp.host_bytes)} ({where['host']})"))
    out.append(f"  memory (predicted; host includes the process baseline of {P.fmt_bytes(BASELINE)}):")
    out += P.table(rows)
    if plan.devices:
        out.append("  device peak: " + ", ".join(f"{k} {P.fmt_bytes(v)}" for k, v in fp.device_parts.items()))
    out.append("  host peak: " + ", ".join(f"{k} {P.fmt_bytes(v)}" for k, v in fp.host_parts.items()))
    if fp.layer_forwards or fp.tokens:
        out.append(f"  work: {fp.layer_forwards:,} decoder-layer passes (forward or backward) over {fp.tokens:,} "
                   "tokens")
    if avail is not None:
        out.append(f"  available: device {P.fmt_bytes(avail.device)} ({avail.device_source}); "
                   f"host {P.fmt_bytes(avail.host)} ({avail.host_source})")
        verdict = "fits" if P.fits(fp, avail.device, avail.host) else "does not fit"
        unchecked = [k for k, v in (("device", avail.device if plan.devices else 0), ("host", avail.host)) if v is None]
        out.append(f"  verdict: {verdict}" + (f" ({' and '.join(unchecked)} not checked)" if unchecked else ""))
        if verdict == "does not fit" and cfg is not None:
            out.append(f"  to fit: {'; '.join(knobs(cfg, plan))}")
    for label, v in plan.variants:
        vp, _ = v.peak()
        fit = "" if cfg is None else ("  fits" if variant_fits(cfg, v) else "  does not fit" if not v.devices or
                                      available(cfg, v).device is not None else "  (device not known here)")
        out.append(f"  with {label}: device {P.fmt_bytes(vp.device_bytes) if v.devices else '-'}, "
                   f"host {P.fmt_bytes(vp.host_bytes)}{fit}")
    out += [f"  note: {n}" for n in plan.notes]
    return out


# --------------------------------------------------------------------------- run.py's calls


@dataclass
class Prepared:
    """What :func:`prepare` found: the plan (None: the task loads no model), or the bad input it stopped at (raised
    by :func:`dry_run` at once, by :func:`enforce` once the record holds the config)."""

    plan: Optional[Plan] = None
    error: Optional[UserError] = None


def prepare(cfg: DictConfig, recipe: Any) -> Prepared:
    """Before the record opens: ``model.device: auto`` becomes the device used (the record stores it), the devices
    the configuration names are checked against this machine (not under ``dry_run``: it may plan for another),
    and the task's plan is computed from the model's config, before any weight is read."""
    dry = bool(OmegaConf.select(cfg, "dry_run", default=False))
    try:
        count = cuda_count(import_torch=not dry)
        device = str(OmegaConf.select(cfg, "model.device", default="cpu"))
        if device == "auto":
            with read_write(cfg), open_dict(cfg):
                cfg.model.device = resolve_device(device, count)
        if not dry:
            errors = device_errors(cfg, count)
            if errors:
                raise ConfigError("; ".join(errors))
        planner: Optional[Callable[[DictConfig], Plan]] = getattr(recipe, "plan", None)
        if planner is None:
            return Prepared()
        plan = planner(cfg)
        plan.variant_source = lambda: _variants(cfg, planner, plan)  # before the run: cfg as validated
        return Prepared(plan)
    except UserError as e:
        return Prepared(error=e)


def _device_options(node: Any, path: str) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every ``device`` option in a nested option mapping."""
    if not isinstance(node, dict):
        return []
    out = [(f"{path}.device", node["device"])] if "device" in node else []
    for key, value in node.items():
        out += _device_options(value, f"{path}.{key}")
    return out


def device_errors(cfg: DictConfig, count: int) -> list[str]:
    """Devices a configuration names that this machine lacks: model.device, model.device_map, every pruner option
    named ``device`` (pruner=joint: its stages'), replacement.donor_device."""
    errors = P.device_errors(OmegaConf.select(cfg, "model.device"), count)
    device_map = OmegaConf.select(cfg, "model.device_map")
    if isinstance(device_map, DictConfig):
        device_map = OmegaConf.to_container(device_map)
    errors += P.device_map_errors(device_map, count)
    if str(cfg.task) == "prune":  # every `device` of the pruner's options (pruner=joint: its stages' too)
        for key, value in _device_options(OmegaConf.to_container(cfg.pruner, resolve=True), "pruner"):
            errors += P.device_errors(value, count, key)
    if str(cfg.task) in ("replace", "search"):
        for key in ("replacement.device", "replacement.donor_device"):
            errors += P.device_errors(OmegaConf.select(cfg, key), count, key)
    return errors


def dry_run(job: Any, cfg: DictConfig, prepared: Prepared) -> None:
    """Print the plan and record it (status ``dry_run``, no W&B, nothing else written); nothing is loaded."""
    from core.run.record import RunContext

    if prepared.error is not None:
        raise prepared.error
    plan = prepared.plan
    ctx = RunContext(job.run_dir, task=str(cfg.task), config=OmegaConf.to_container(cfg, resolve=True),
                     logger="none", heartbeat_s=None)
    job.ctx = ctx
    ctx.log("config", OmegaConf.to_container(cfg, resolve=True))
    if plan is None:
        text = [f"plan of task={cfg.task}: it loads no model into memory; nothing to plan"]
        ctx.log("plan", {"task": str(cfg.task), "unknown": "the task loads no model"})
    else:
        avail = None if plan.unknown else available(cfg, plan)
        text = render(plan, avail, cfg)
        record = plan.record()
        if avail is not None:
            fp, _ = plan.peak()
            record["available"] = {"device_bytes": avail.device, "host_bytes": avail.host,
                                   "device_source": avail.device_source, "host_source": avail.host_source,
                                   "fits": P.fits(fp, avail.device, avail.host)}
        ctx.log("plan", record)
    print("\n".join(text), flush=True)
    ctx.finish(STATUS)
    log.info("dry run (nothing loaded); plan recorded in %s", ctx.path)


def enforce(cfg: DictConfig, prepared: Prepared, ctx: Any) -> None:
    """Record the plan; PlanError (one line: prediction, available, knobs) when it cannot fit, unless plan.force."""
    if prepared.error is not None:
        raise prepared.error
    plan = prepared.plan
    if plan is None:
        return
    if plan.unknown:
        ctx.log("plan", plan.record())
        return
    avail = available(cfg, plan)
    fp, _ = plan.peak()
    ok = P.fits(fp, avail.device, avail.host)
    record = plan.record() if ok else (plan.variants, plan.record())[1]  # a refusal records the knobs it names
    record["available"] = {"device_bytes": avail.device, "host_bytes": avail.host, "device_source": avail.device_source,
                           "host_source": avail.host_source, "fits": ok}
    ctx.log("plan", record)
    log.info("plan: peak device %s, host %s (available: device %s, host %s)%s", P.fmt_bytes(fp.device_bytes),
             P.fmt_bytes(fp.host_bytes), P.fmt_bytes(avail.device), P.fmt_bytes(avail.host),
             "" if ok else ": does not fit")
    if ok:
        return
    if OmegaConf.select(cfg, "plan.force", default=False):
        log.warning("plan.force=true: running although the plan predicts more memory than there is")
        return
    P.check_fits(fp, avail.device, avail.host, knobs(cfg, plan))


# --------------------------------------------------------------------------- knobs: the same plan with one change


def _variants(cfg: DictConfig, planner: Callable[[DictConfig], Plan], plan: Plan) -> list[tuple[str, Plan]]:
    """The plan again with each knob that lowers memory (offload, states, tokens, batch size, dtype, device_map)."""
    if plan.unknown or not plan.phases:
        return []
    out = []
    for overrides in _knob_settings(cfg, plan):
        variant = copy.deepcopy(cfg)
        try:
            with read_write(variant), open_dict(variant):
                for key, value in overrides.items():
                    OmegaConf.update(variant, key, value, force_add=True)
            out.append((" ".join(f"{k}={_show(v)}" for k, v in overrides.items()), planner(variant)))
        except UserError:
            continue  # a setting this configuration cannot take
    return out


def _show(v: Any) -> str:
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _knob_settings(cfg: DictConfig, plan: Plan) -> list[dict[str, Any]]:
    task = str(cfg.task)
    settings: list[dict[str, Any]] = []
    pruner = OmegaConf.select(cfg, "pruner") if task == "prune" else None
    accel = next(iter(plan.devices), None) or (str(OmegaConf.select(cfg, "pruner.device") or "")
                                               if task == "prune" else "")
    if pruner is not None and "offload" in pruner and not pruner.offload:
        target = accel if P.accelerator(accel) else "cuda"
        settings.append({"model.device": "cpu", "pruner.offload": True, "pruner.device": target})
    if pruner is not None and "states" in pruner:
        for where in ("host", "disk"):
            if pruner.states != where:
                settings.append({"pruner.states": where})
    tokens = plan.peak()[0].tokens
    if pruner is not None and "tokens" in pruner and (isinstance(pruner.tokens, int) or str(pruner.tokens) == "auto"):
        if tokens >= 2 * int(OmegaConf.select(pruner, "seq_len", default=128)):
            settings.append({"pruner.tokens": tokens // 2})
    elif pruner is not None and tokens and int(cfg.data.num_samples) > 1:
        settings.append({"data.num_samples": max(1, int(cfg.data.num_samples) // 2)})
    if pruner is not None and "batch_size" in pruner and pruner.batch_size != 1:
        settings.append({"pruner.batch_size": 1})
    if not plan.devices and task in ("prune", "evaluate", "finetune", "export"):
        settings.append({"model.device": "cuda"})  # the same run on a GPU (planned here with plan.device_memory)
    if plan.dtype == "float32" and task != "convert":
        settings.append({"model.dtype": "bfloat16"})
    if task == "search":
        if OmegaConf.select(cfg, "search.prefix_cache"):
            settings.append({"search.prefix_cache": False})
        if int(OmegaConf.select(cfg, "search.tokens")) >= 2 * int(cfg.data.seq_len):
            settings.append({"search.tokens": int(OmegaConf.select(cfg, "search.tokens")) // 2})
    if task in ("replace", "search") and P.accelerator(plan.device) and \
            OmegaConf.select(cfg, "replacement.donor_device") in (None, plan.device):
        settings.append({"replacement.donor_device": "cpu"})
    spread = OmegaConf.select(cfg, "plan.num_devices") or cuda_count(import_torch=False)
    if P.accelerator(plan.device) and spread > 1 and OmegaConf.select(cfg, "model.device_map") is None and \
            task in ("prune", "evaluate", "finetune", "export"):
        settings.append({"model.device_map": "auto"})  # accelerate spreads the model over the GPUs
    return settings


# --------------------------------------------------------------------------- model configs without weights


def model_config(ref: Any, cache_dir: str) -> tuple[Optional[dict], Optional[str]]:
    """``(config.json dict, None)`` of a model, read without weights (a GGUF not yet converted: its metadata), or
    ``(None, why not)``."""
    from core.models.ref import model_config as read

    try:
        cfg = read(ref, cache_dir)
    except LoadError:
        raise
    if cfg is not None:
        return cfg, None
    if ref.kind == "gguf":
        got = gguf_config(ref)
        if got is not None:
            return got, None
    return None, f"{ref.path or ref.name} has no config.json to read before loading (a legacy file is read whole)"


def gguf_config(ref: Any) -> Optional[dict]:
    """The Llama geometry a GGUF's metadata gives (``core.models.ref.gguf_sizes``, bounds-checked; its conversion's
    config.json is written on the first load), with a tied head when the file has no ``output.weight``."""
    from gguf import GGUFReader

    from core.models.ref import gguf_path, gguf_sizes

    path = gguf_path(ref.gguf_package, ref.gguf_file)
    cfg = dict(gguf_sizes(path))
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if any(k not in cfg for k in need) or cfg.get("intermediate_size", 1) <= 1:
        return None
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg["tie_word_embeddings"] = not any(t.name == "output.weight" for t in GGUFReader(str(path)).tensors)
    return cfg


def describe(name: str, cfg: dict, dtype: str, device: str) -> str:
    g = P.geometry(cfg)
    widths = sorted(set(g.widths))
    mlp = f"MLP {widths[0]}" if len(widths) == 1 else f"MLP {widths[0]}-{widths[-1]}"
    heads = f"{max(g.heads)} / {max(g.kv_heads)} heads" if max(g.heads or (0,)) else "no attention"
    mamba = sum(t == "mamba2" for t in (cfg.get("layer_types") or []))
    return (f"{name}: {g.depth} layers{f' ({mamba} Mamba-2)' if mamba else ''}, hidden {g.hidden}, {mlp}, {heads}, "
            f"vocab {cfg['vocab_size']}{', tied head' if cfg.get('tie_word_embeddings') else ''}; "
            f"{P.model_params(cfg):,} parameters = {P.fmt_bytes(P.model_bytes(cfg, dtype))} in {dtype}, on {device}")


def _devices(cfg: DictConfig, ref: Any, extra: tuple[Optional[str], ...] = ()) -> list[str]:
    """The accelerators a run uses: the model's (every GPU for ``device_map=auto``: ``plan.num_devices`` of them
    when given, else the ones here, at least one) and ``extra`` (a pruner's or a donor's device)."""
    device_map = ref.device_map
    if isinstance(device_map, DictConfig):
        device_map = OmegaConf.to_container(device_map)
    count = OmegaConf.select(cfg, "plan.num_devices") or max(1, cuda_count(import_torch=False))
    out: list[str] = []
    for d in [*P.map_devices(device_map, str(ref.device), int(count)), *extra]:
        if d and P.accelerator(d):
            d = str(d) if ":" in str(d) else f"{d}:0"
            if d not in out:
                out.append(d)
    return out


def _unknown(task: str, name: str, why: str, device: str, dtype: str) -> Plan:
    return Plan(task, name, device, dtype, unknown=why)


def _reads_in_place(ref: Any, cfg_json: dict, dtype: str) -> bool:
    """True where core/models/load.py reads the weights in place (``_read_plain_llama``): a plain Llama on the CPU
    in one ``model.safetensors`` stored in the dtype asked for (the shapes, the embedded model's float32 cache,
    Llama-3-8B in bfloat16). Nothing is staged on the way then; elsewhere transformers stages one tensor at a time."""
    from core.models import shape as shapes
    from core.models.ref import weights_dtype

    if (str(ref.device) != "cpu" or ref.device_map or cfg_json.get("model_type") != "llama"
            or cfg_json.get("quantization_config")):
        return False
    if ref.kind == "shape":
        return shapes.storage_dtype(ref.dtype) == dtype
    if ref.kind == "gguf":
        return dtype == "float32"  # the cached conversion is float32
    path = Path(str(ref.path or "")).expanduser()
    return (ref.kind == "hf" and path.is_dir() and (path / "model.safetensors").is_file()
            and not (path / "model.safetensors.index.json").exists() and weights_dtype(path) == dtype)


def _load_phase(cfg_json: dict, dtype: str, device: str, ref: Any = None) -> P.Footprint:
    """The weights where they go, and one tensor read through the host on its way (the largest: the embedding),
    unless they are read in place (:func:`_reads_in_place`)."""
    weights = P.model_bytes(cfg_json, dtype)
    staged = {} if ref is not None and _reads_in_place(ref, cfg_json, dtype) else {
        "one tensor being read": int(cfg_json["vocab_size"]) * int(cfg_json["hidden_size"])
        * P.dtype_bytes(dtype, cfg_json)}
    return P.Footprint.of({"weights": weights}, staged, on_device=P.accelerator(device))


def _eval_phase(cfg: DictConfig, cfg_json: dict, dtype: str, device: str, weights: Optional[int] = None) -> P.Footprint:
    """The model with one perplexity batch's forward (lm-eval's batches are not counted)."""
    w = P.model_bytes(cfg_json, dtype) if weights is None else weights
    terms = {"weights": w}
    if cfg.eval.ppl.enabled:
        terms["evaluation forward (perplexity batch)"] = P.forward_bytes(int(cfg.eval.ppl.batch_size),
                                                                         int(cfg.eval.ppl.seq_len), cfg_json, dtype)
    return P.Footprint.of(terms, {}, on_device=P.accelerator(device))


def _save_phase(cfg: DictConfig, cfg_json: dict, dtype: str, device: str) -> P.Footprint:
    """The model and one tensor's copy as it is written (the largest: the embedding)."""
    save_dtype = str(cfg.save_dtype) if cfg.save_dtype else dtype
    return P.Footprint.of({"weights": P.model_bytes(cfg_json, dtype)},
                          {"one tensor being written": int(cfg_json["vocab_size"]) * int(cfg_json["hidden_size"])
                           * P.dtype_bytes(save_dtype, cfg_json)}, on_device=P.accelerator(device))


def _model_ref(node: Any) -> Any:
    from core.models.ref import ModelRef
    return ModelRef.of(plain(node))


def _begin(task: str, cfg: DictConfig, ref: Any, label: Optional[str] = None,
           extra_devices: tuple = ()) -> "Plan | tuple[dict, str, Plan]":
    """The start every model-loading task's plan shares: ``(config.json, the dtype it resolves to, an empty Plan)``,
    or the Plan that says why nothing can be planned (no config readable before loading)."""
    config, why = model_config(ref, cfg.paths.cache_dir)
    if config is None:
        return _unknown(task, ref.name, why or "", ref.device, str(ref.dtype))
    dtype = P.dtype_name(str(ref.dtype), config)
    plan = Plan(task, describe(label or ref.name, config, dtype, ref.device), ref.device, dtype,
                devices=_devices(cfg, ref, extra_devices))
    return config, dtype, plan


# --------------------------------------------------------------------------- the tasks


def plan_prune(cfg: DictConfig) -> Plan:
    """task=prune: load, evaluate the base, prune (the pruner's footprint), evaluate, [recover,] save."""
    ref = _model_ref(cfg.model)
    pruner = build(cfg.pruner, "pruner")
    started = _begin("prune", cfg, ref, extra_devices=(getattr(pruner, "device", None),))
    if isinstance(started, Plan):
        return started
    config, dtype, plan = started
    depth = int(config["num_hidden_layers"])
    pruner.check(depth)
    cal = pruner.calibration_plan(config) if hasattr(pruner, "calibration_plan") else None
    if cal is not None:
        samples, seq_len, rule = cal.samples, cal.seq_len, cal.rule
    else:
        samples, seq_len = int(cfg.data.num_samples), int(cfg.data.seq_len)
        rule = f"data.num_samples={samples} x data.seq_len={seq_len}"
    tokens = samples * seq_len if pruner.needs_calibration else 0
    avail = available(cfg, plan)  # what the run will have: states=auto decides by it, as the run does
    free = (avail.device, None if avail.host is None else max(0, avail.host - BASELINE))
    fp = pruner.footprint(config, tokens, dtype, ref.device, seq_len=seq_len, free=free)
    plan.lines.append(("removes", "; ".join(fp.removes) or "(the pruner says)"))
    plan.lines.append(("calibration", f"{tokens:,} tokens ({rule}), {fp.layer_forwards:,} decoder-layer passes"
                                      if tokens else f"none ({pruner.name} reads no text)"))
    if fp.widths:
        changed = [w for w in fp.widths if any(v[0] != v[1] for k, v in w.items() if k != "layer")]
        if changed:
            plan.lines.append(("widths after", _widths_line(fp.widths)))
    plan.phases["load"] = _load_phase(config, dtype, ref.device, ref)
    if cfg.eval.compare_base:
        plan.phases["evaluate base"] = _eval_phase(cfg, config, dtype, ref.device)
    plan.phases["prune"] = fp
    plan.phases["evaluate pruned"] = _eval_phase(cfg, config, dtype, ref.device)
    from recipes import _recovery as recovery_stage

    if recovery_stage.enabled(cfg):
        spec = recovery_stage.spec_of(cfg)
        plan.phases["recovery (LoRA)"] = spec.footprint(config, 0, dtype, ref.device)
    if cfg.save_model:
        plan.phases["save"] = _save_phase(cfg, config, dtype, ref.device)
    plan.notes += fp.notes
    return plan


def _widths_line(widths: list[dict]) -> str:
    """Per-layer widths after a prune, runs of equal layers merged: ``0-31: kv 8->6, MLP 14336->10752``."""
    def key(w: dict) -> str:
        return ", ".join(f"{k.replace('intermediate_size', 'MLP').replace('kv_heads', 'kv')} {v[0]}->{v[1]}"
                         for k, v in w.items() if k != "layer")

    runs: list[list[Any]] = []
    for w in widths:
        k = key(w)
        if runs and runs[-1][2] == k and runs[-1][1] == w["layer"] - 1:
            runs[-1][1] = w["layer"]
        else:
            runs.append([w["layer"], w["layer"], k])
    return "; ".join(f"{a}{f'-{b}' if b != a else ''}: {k}" for a, b, k in runs)


def plan_evaluate(cfg: DictConfig) -> Plan:
    """task=evaluate: the model (then its base, when it is a prunelab checkpoint), one at a time, evaluated."""
    ref = _model_ref(cfg.model)
    started = _begin('evaluate', cfg, ref)
    if isinstance(started, Plan):
        return started
    config, dtype, plan = started
    plan.lines.append(("evaluates", f"eval={cfg.eval.name}" + (f", tasks {list(cfg.eval.tasks)}" if cfg.eval.tasks
                                                                 else "")))
    plan.phases["load"] = _load_phase(config, dtype, ref.device, ref)
    plan.phases["evaluate"] = _eval_phase(cfg, config, dtype, ref.device)
    plan.notes.append("lm-eval's batches and a prunelab checkpoint's base model (evaluated after the model is freed) "
                      "are not counted")
    return plan


def plan_finetune(cfg: DictConfig) -> Plan:
    """task=finetune: load, evaluate, LoRA (the spec's footprint), evaluate, save."""
    from recipes import _recovery as recovery_stage

    ref = _model_ref(cfg.model)
    started = _begin("finetune", cfg, ref)
    if isinstance(started, Plan):
        return started
    config, dtype, plan = started
    spec = recovery_stage.spec_of(cfg)
    fp = spec.footprint(config, 0, dtype, ref.device)
    plan.lines.append(("trains", f"LoRA rank {spec.rank} on {spec.targets}, {fp.tokens:,} tokens "
                                 f"(micro-batch {spec.micro_batch} x {spec.seq_len}), {fp.layer_forwards:,} "
                                 "decoder-layer passes (forward + backward)"))
    plan.phases["load"] = _load_phase(config, dtype, ref.device, ref)
    plan.phases["evaluate"] = _eval_phase(cfg, config, dtype, ref.device)
    plan.phases["recovery (LoRA)"] = fp
    if cfg.save_model:
        plan.phases["save"] = _save_phase(cfg, config, dtype, ref.device)
    plan.notes += fp.notes
    return plan


def plan_export(cfg: DictConfig) -> Plan:
    """task=export: load, write (one tensor at a time, in float32 at most)."""
    ref = _model_ref(cfg.model)
    started = _begin('export', cfg, ref)
    if isinstance(started, Plan):
        return started
    config, dtype, plan = started
    fmt = OmegaConf.select(cfg, "export.format", default=None) or OmegaConf.select(cfg, "export.name", default="")
    plan.lines.append(("writes", f"export={fmt}"))
    plan.phases["load"] = _load_phase(config, dtype, ref.device, ref)
    largest = int(config["vocab_size"]) * int(config["hidden_size"])
    plan.phases["write"] = P.Footprint.of({"weights": P.model_bytes(config, dtype)},
                                          {"one tensor converted (float32, twice)": 2 * 4 * largest},
                                          on_device=P.accelerator(ref.device))
    return plan


def _donor(cfg: DictConfig, spec: Any) -> tuple[Any, Any, Optional[dict]]:
    base_ref, donor_ref = replacement_models(spec)
    donor_cfg, _ = model_config(donor_ref, cfg.paths.cache_dir)
    return base_ref, donor_ref, donor_cfg


def plan_replace(cfg: DictConfig) -> Plan:
    """task=replace: the base with the donor's layers (the spec's footprint), evaluated, saved."""
    spec = build(cfg.replacement, "replacement")
    base_ref, donor_ref, donor_cfg = _donor(cfg, spec)
    started = _begin("replace", cfg, base_ref, f"base {spec.base}", (spec.donor_device,))
    if isinstance(started, Plan):
        return started
    config, dtype, plan = started
    fp = spec.footprint(config, 0, dtype, base_ref.device, donor_cfg=donor_cfg)
    plan.lines.append(("replaces", "; ".join(fp.removes)))
    plan.phases["load + swap"] = fp
    plan.phases["evaluate"] = _eval_phase(cfg, config, dtype, base_ref.device, weights=fp.device_bytes + fp.host_bytes)
    if cfg.save_model:
        plan.phases["save"] = _save_phase(cfg, config, dtype, base_ref.device)
    return plan


def plan_search(cfg: DictConfig) -> Plan:
    """task=search: base, donor targets, prefix cache, donor layers, the fitness evaluations (the spec's footprint)."""
    rspec, sspec = build(cfg.replacement, "replacement"), build(cfg.search, "search")
    base_ref, donor_ref, donor_cfg = _donor(cfg, rspec)
    started = _begin("search", cfg, base_ref, f"base {rspec.base}", (rspec.donor_device,))
    if isinstance(started, Plan):
        return started
    config, dtype, plan = started
    donor_dtype = P.dtype_name(str(donor_ref.dtype), donor_cfg or config)
    fp = sspec.footprint(config, sspec.tokens, dtype, base_ref.device, donor_cfg=donor_cfg, donor_dtype=donor_dtype,
                         donor_device=rspec.donor_device or base_ref.device, seq_len=int(cfg.data.seq_len))
    plan.lines.append(("searches", "; ".join(fp.removes)))
    plan.lines.append(("calibration", f"{fp.tokens:,} tokens (search.tokens in windows of data.seq_len), at most "
                                      f"{fp.layer_forwards:,} decoder-layer passes"))
    plan.phases["search"] = fp
    plan.notes += fp.notes
    return plan


def plan_convert(cfg: DictConfig) -> Plan:
    """task=convert: SliceGPT's pickled state dict read whole, then the sliced model built beside it."""
    from core.models.ref import read_config_json
    path = Path(str(cfg.model.path)).expanduser()
    config = None
    if cfg.base:
        config, _ = model_config(resolve_model(str(cfg.base)), cfg.paths.cache_dir)
    elif ((path if path.is_dir() else path.parent) / "config.json").is_file():
        config = read_config_json(path if path.is_dir() else path.parent)
    device, dtype_req = str(cfg.model.device), str(cfg.model.dtype)
    if config is None:
        return _unknown("convert", path.name, "the base model's config.json is not readable", device, dtype_req)
    dtype = P.dtype_name(dtype_req, config)
    plan = Plan("convert", describe(path.name, config, dtype, device), device, dtype,
                devices=[device] if P.accelerator(device) else [])
    weights = P.model_bytes(config, dtype)
    plan.phases["read + build"] = P.Footprint.of({"sliced model (at most the base's size)": weights},
                                                 {"SliceGPT's state dict (read whole)": weights},
                                                 on_device=P.accelerator(device))
    plan.notes.append("sizes are the base model's: the sliced model is smaller")
    return plan


__all__ = ["Plan", "prepare", "dry_run", "enforce", "render", "plan_prune", "plan_evaluate", "plan_finetune",
           "plan_export", "plan_replace", "plan_search", "plan_convert", "resolve_device"]
