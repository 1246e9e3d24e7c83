"""Pieces several recipes share: config node -> plain argument (a ModelRef, a TextSpec, a built pruner)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from core.data.text import TextSpec
from core.models.card import write_model_card
from core.models.ref import ModelRef
from core.run.errors import ConfigError, LoadError, RunDirError, UserError

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def plain(node: Any) -> Any:
    """A config node as plain Python containers (resolved)."""
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if isinstance(node, DictConfig) else node


def model_ref(node: Any) -> ModelRef:
    return _placed(ModelRef.of(plain(node)))


def _placed(ref: ModelRef) -> ModelRef:
    """``device: auto`` -> the device it means here: cuda when present, else cpu (recipes/_plan.py)."""
    if ref.device != "auto":
        return ref
    return dataclasses.replace(ref, device=resolve_device(ref.device))


def _no_gpu_files() -> bool:
    """True when no GPU device node exists (no NVIDIA or ROCm driver): there is no CUDA without importing torch."""
    dev = Path("/dev")
    return not ((dev / "nvidiactl").exists() or (dev / "kfd").exists() or any(dev.glob("nvidia[0-9]*")))


def cuda_count(import_torch: bool = True) -> int:
    """CUDA devices here (torch's count). ``import_torch=False`` answers 0 without torch where there is no GPU
    device node, and imports torch otherwise."""
    if not import_torch and "torch" not in sys.modules and _no_gpu_files():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(device: Any, count: Optional[int] = None) -> str:
    """``auto`` -> ``cuda`` when CUDA is present, else ``cpu``; anything else as given."""
    if str(device) != "auto":
        return str(device)
    return "cuda" if (cuda_count(import_torch=False) if count is None else count) > 0 else "cpu"


def text_spec(node: Any) -> TextSpec:
    """``data`` / ``eval.ppl`` (or a checkpoint's recorded ``data``) -> TextSpec; ``mix`` keeps its order."""
    d = plain(node)
    mix = tuple((str(k), float(v)) for k, v in (d.get("mix") or {}).items())
    return TextSpec(d["source"], d.get("path"), d.get("text_field", "text"), mix)


def headline_metrics(result: dict) -> dict:
    """The numbers of one ``analysis.evaluate.evaluate_model`` result a sweeper can optimise (those measured)."""
    out = {"ppl": (result.get("ppl") or {}).get("value"), "avg_acc": result.get("task_average"),
           "mmlu": (result.get("mmlu") or {}).get("average")}
    return {k: v for k, v in out.items() if v is not None}


def model_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _is_option(name_or_path: str) -> bool:
    return "/" not in name_or_path and (CONF_DIR / "model" / f"{name_or_path}.yaml").is_file()


def resolve_model(name_or_path: str) -> ModelRef:
    """``base=smollm2`` (an option of conf/model/) or ``base=/path/to/model`` -> a ModelRef."""
    if _is_option(name_or_path):
        option = CONF_DIR / "model" / f"{name_or_path}.yaml"
        merged = OmegaConf.merge(OmegaConf.structured(ModelRef), OmegaConf.load(option))
        return _placed(OmegaConf.to_object(merged))  # type: ignore[arg-type]
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise LoadError(f"'{name_or_path}' is neither a model name ({', '.join(model_names())}) nor an existing path")
    return ModelRef.at(path)


def replacement_models(spec: Any) -> tuple[ModelRef, ModelRef]:
    """(base, donor) of ``task=replace`` / ``task=search`` as they are loaded. The base: a conf/model/ option with its
    own dtype and device, a path in its checkpoint's own dtype on CUDA when present; ``replacement.dtype`` /
    ``.device`` override either (replacement/spec.py). The donor (loaded whole only for search.fitness=kl's targets;
    otherwise its layers are read one at a time): an option keeps its own, a path takes the base's placement."""
    base = resolve_model(spec.base)
    if not _is_option(spec.base):
        base = dataclasses.replace(base, dtype="auto", device="auto")
    if spec.dtype is not None:
        base = dataclasses.replace(base, dtype=spec.dtype)
    if spec.device is not None:
        base = dataclasses.replace(base, device=spec.device)
    base = _placed(base)
    donor = resolve_model(spec.donor)
    if not _is_option(spec.donor):
        donor = dataclasses.replace(donor, dtype=base.dtype, device=base.device)
    return base, donor


def donor_dir(ref: ModelRef, cache_dir: str) -> Path:
    """The safetensors checkpoint dir of a model reference (the embedded GGUF: its cached conversion)."""
    if ref.kind == "gguf":
        from core.models.load import cached_gguf_dir  # local: torch + transformers, and validation imports this module

        return cached_gguf_dir(ref, cache_dir)
    if ref.kind != "hf" or not ref.path or not Path(ref.path).is_dir():
        raise ConfigError(f"donor {ref.name}: layers are read from a checkpoint directory; give a path or a model "
                          "name whose weights are on disk")
    return Path(ref.path)


def tokenizer_or_donors(tok: Any, donor_path: Path) -> Any:
    """A base without tokenizer files (Cartesia's Llamba ships none) uses the donor's (Llama-3's, for Llamba)."""
    if tok is not None:
        return tok
    from transformers import AutoTokenizer  # local: validation imports this module

    try:
        return AutoTokenizer.from_pretrained(donor_path)
    except Exception as e:  # noqa: BLE001 - one line
        raise ConfigError(f"the base has no tokenizer and the donor's cannot be read ({donor_path}): "
                          f"{type(e).__name__}") from None


def build(node: Any, group: str) -> Any:
    """Instantiate an option's ``_target_`` with its keys; a bad key or value is one ConfigError line."""
    d = plain(node) or {}
    target = d.get("_target_")
    if not target:
        raise ConfigError(f"{group}: the option names no code (no _target_ in conf/{group}/*.yaml)")
    try:
        cls = get_class(target)
    except Exception as e:  # noqa: BLE001 - an unimportable target is a config error
        raise ConfigError(f"{group}._target_={target!r} cannot be imported: {e}") from None
    params = inspect.signature(cls).parameters
    unknown = sorted(set(d) - {"_target_"} - set(params))
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise ConfigError(f"{', '.join(f'{group}.{k}' for k in unknown)}: not an option of {target} "
                          f"(options: {', '.join(params)})")
    try:
        return instantiate(d, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise ConfigError(f"{group} ({target}): {cause or e}") from None


def checkpoint_info(ref: ModelRef) -> dict:
    """``checkpoint_info.json`` of a prunelab checkpoint (empty for anything else)."""
    info = Path(ref.path) / "checkpoint_info.json" if ref.path else None
    if info is not None and info.is_file():
        try:
            return json.loads(info.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("cannot read %s: %s", info, e)
    return {}


def structure_for_ref(ref: ModelRef, *, cache_dir: str, count_nonzero: bool = False, allow_pickle: bool = False,
                      fallback_config: Optional[dict] = None):
    """(structure, model dir or None) of a model; checkpoints are read from headers, not loaded."""
    from analysis.structure import structure_of  # local: torch, and validation imports this module

    if ref.kind == "tiny":
        from core.models.load import build_tiny  # local: transformers (seconds), only to build a model

        model, _ = build_tiny(**dataclasses.asdict(ref.tiny))
        return structure_of(model, name=ref.name, count_nonzero=count_nonzero), None
    if ref.kind == "gguf":
        from core.models.load import cached_gguf_dir  # local: transformers (seconds), only for the GGUF

        path = cached_gguf_dir(ref, cache_dir)  # converts once (~20 s), then a safetensors dir
    elif ref.kind == "shape":
        from core.models.shape import shape_path

        path = shape_path(ref, cache_dir, header_ok=True)  # model.num_layers=null: the full depth, header only
    else:
        if not ref.path:
            raise ConfigError(f"model '{ref.name}' has no path: give model=<path> or a model name")
        path = Path(ref.path)
    _check_readable_structure(ref, path, count_nonzero)
    s = structure_of(path, name=ref.name, count_nonzero=count_nonzero, allow_pickle=allow_pickle,
                     fallback_config=fallback_config)
    return s, Path(s.model_dir) if s.model_dir else path


def _check_readable_structure(ref: ModelRef, path: Path, count_nonzero: bool) -> None:
    """Before any header is walked: config.json's sizes bounds-checked (an absurd config is one line, never gigabytes
    of layer records), and no non-zero count over a header-only shape's sparse file (its weights are not written)."""
    from core.models.ref import read_checked_config
    from core.models.shape import is_header_only_dir

    if path.is_dir() and (path / "config.json").is_file():
        read_checked_config(path)
    if count_nonzero and path.is_dir() and is_header_only_dir(path):
        raise ConfigError(f"model={ref.name} is header-only (no weight bytes, {path}): count_nonzero=false reads "
                          "its parameters from the header; model.num_layers=N builds N layers of real weights")


def run_command() -> Optional[str]:
    """``python run.py <this job's overrides>`` (shell-quoted) when Hydra launched the run, else None."""
    if not HydraConfig.initialized():
        return None
    return " ".join(["python run.py", *(shlex.quote(str(o)) for o in HydraConfig.get().overrides.task)])


def write_card(model_dir: Path, ctx: Any, *, settings: tuple[str, ...] = (), label: Optional[str] = None) -> None:
    """Refresh the model card (``README.md``, ``core.models.card``) of a checkpoint this run saved, once the run's
    record holds its evaluations: the metrics with their protocol, the ``settings`` config groups, the command
    line, how to evaluate it. ``label``: which of the record's evaluated models it is (default: the last one).
    The checkpoint is complete without it, so a failure is a warning."""
    evaluate = ("```bash\npython run.py task=evaluate model=path/to/this/folder eval=zeroshot\n```\n\n"
                "`eval=mmlu`, `eval=full` or `eval.tasks=[...]` for other benchmarks; `eval.limit=N` for a quick look.")
    write_model_card(model_dir, dict(getattr(ctx, "metrics", None) or {}), warn=True, settings=settings, label=label,
                     command=run_command(), sections={"Evaluate it with prunelab": evaluate})


def results_folder(ctx: Any, run_dir: Path, name: str, derived: bool, *, what: str = "checkpoint",
                   writes: bool = True) -> Path:
    """``<run dir>/<name>``, the folder ``output_name`` names (replace, convert, batch_analyze), recorded as the run's
    ``output`` (``written`` turns true once it is complete). It must not exist yet (a fresh run dir holds none):
    nothing is ever written into what is there. ``writes=False``: nothing will be written (``save_model=false``)."""
    out = run_dir / name
    if writes and (out.exists() or out.is_symlink()):
        raise RunDirError(f"output_name={name}: {out} already exists; the {what} is always a new folder")
    ctx.log("output", {"name": name, "path": str(out) if writes else None, "derived": derived, "written": False})
    return out
