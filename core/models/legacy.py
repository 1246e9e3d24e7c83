"""Legacy model files: detect what a path holds, read it safely, unpickle only on request.

Formats (``FormatInfo.kind``):
- ``prunelab``        : a prunelab checkpoint dir (config.json with model_type prunelab_llama or checkpoint_info.json)
- ``hf``              : a plain HF dir (config.json + safetensors / pytorch_model.bin), or a bare .safetensors file
- ``pickle_bundle``   : LLM-Pruner's ``pytorch_model.bin`` / ``pruned_model.bin`` = ``{'model': nn.Module, 'tokenizer': ...}``
- ``whole_model_pt``  : ``model.pt`` = a pickled nn.Module
- ``state_dict_pt``   : a ``*.pt`` / ``*.bin`` holding a state dict (tensors only)
- ``slicegpt``        : SliceGPT output: a state-dict ``*.pt`` with ``*_shortcut_Q`` keys + a ``*.json`` config
- ``eval_only``       : a folder with results but no weights (skipped, with the reason)
- ``unknown``

Detection never unpickles: torch's zip files are inspected with ``pickletools.genops``, which
lists the classes a pickle would import without importing them. A state dict needs only
torch's tensor-rebuild functions, so it loads with ``torch.load(weights_only=True)``; a bundle or
a whole model needs a full unpickle, which can execute arbitrary code, hence ``allow_pickle``.
"""

from __future__ import annotations

import io
import json
import logging
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from core.run.errors import LoadError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
RESULT_SUFFIXES = (".json", ".csv", ".txt", ".log", ".md", ".png", ".yaml", ".yml", ".sh")
BUNDLE_NAMES = ("pytorch_model.bin", "pruned_model.bin")
# classes a plain state-dict pickle references (everything else means "needs a full unpickle")
_STATE_DICT_GLOBALS_PREFIXES = (
    "torch._utils._rebuild", "collections.OrderedDict", "torch.", "builtins.set", "_codecs.encode",
    "numpy.core.multiarray._reconstruct", "numpy.dtype", "numpy.ndarray",
)
_NON_TENSOR_TORCH = ("torch.nn.", "torch.fx.", "torch.jit.")


class PickleNotAllowed(LoadError):
    """A file needs a full unpickle (arbitrary code) and ``allow_pickle`` was not given."""


@dataclass
class FormatInfo:
    kind: str
    weights_path: Optional[Path]  # the file (or dir, for sharded checkpoints) holding the weights
    reason: str
    config_path: Optional[Path] = None  # config.json, or SliceGPT's *.json
    model_dir: Optional[Path] = None  # the dir the model lives in (for the size report)


@dataclass
class LegacyModel:
    """What a legacy file gave: a module (bundle / whole model) or a state dict, plus extras."""

    kind: str
    model: Optional[torch.nn.Module] = None
    state_dict: Optional[dict[str, torch.Tensor]] = None
    tokenizer: Any = None
    config: Optional[dict] = None
    meta: dict = field(default_factory=dict)  # other keys of a bundle (method, pruning_ratio, ...)


# --------------------------------------------------------------------------- pickle inspection


@dataclass
class PickleScan:
    globals: set[str]
    strings: set[str]
    zip_format: bool

    @property
    def needs_full_unpickle(self) -> bool:
        for g in self.globals:
            if g.startswith(_NON_TENSOR_TORCH):
                return True
            if not g.startswith(_STATE_DICT_GLOBALS_PREFIXES):
                return True
        return False


# opcodes whose argument is a str the unpickler pushes (the *STRING ones decode to str under Python 3)
_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"})
_MEMO_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_MEMO_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MARK = object()  # a MARK on the simulated stack
UNRESOLVED_GLOBAL = "<unresolved STACK_GLOBAL>"  # module/name not literal strings: treated as needing a full unpickle


def _scan_ops(ops, globals_: set[str], strings: list[str], max_strings: int) -> None:
    """Simulate one pickle's stack and memo, keeping only strings (every other value is ``None``).

    Enough of the VM to resolve ``STACK_GLOBAL``'s module and name when they were memoised and re-fetched
    (``MEMOIZE`` / ``*PUT`` then ``*GET``, as every protocol >= 2 pickler does for repeated strings).
    The stack effect of each opcode comes from ``pickletools``' own opcode table; nothing is imported.
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, _pos in ops:
        name = op.name
        if name == "MEMOIZE" or name in _MEMO_PUT_OPS:  # stores the top, leaves the stack as it is
            top = stack[-1] if stack and stack[-1] is not _MARK else None
            memo[len(memo) if name == "MEMOIZE" else arg] = top
            continue
        before, after = op.stack_before, op.stack_after
        if pickletools.markobject in before:  # pop up to and including the topmost MARK, then what lies below it
            while stack and stack[-1] is not _MARK:
                stack.pop()
            if stack:
                stack.pop()
            npop = before.index(pickletools.markobject)
        elif name == "POP" and stack and stack[-1] is _MARK:  # POP on a MARK discards the mark
            npop = 1
        else:
            npop = len(before)
        popped = stack[max(0, len(stack) - npop):] if npop else []
        if npop:
            del stack[-npop:]
        if name in _STRING_OPS:
            stack.append(arg)
            if len(strings) < max_strings:
                strings.append(arg)
        elif name in _MEMO_GET_OPS:
            stack.append(memo.get(arg))
        elif name == "DUP":
            stack.extend(popped * 2)
        elif name in ("GLOBAL", "INST"):  # module and name are the opcode's own argument: "module name"
            globals_.add(str(arg).replace(" ", "."))
            stack.append(None)
        elif name == "STACK_GLOBAL":
            mod, qual = popped if len(popped) == 2 else (None, None)
            if isinstance(mod, str) and isinstance(qual, str):
                globals_.add(f"{mod}.{qual}")
            else:
                globals_.add(UNRESOLVED_GLOBAL)
            stack.append(None)
        elif pickletools.markobject in after:  # MARK
            stack.append(_MARK)
        else:
            stack.extend([None] * len(after))


def scan_pickle(path: Path, max_strings: int = 200_000) -> PickleScan:
    """Classes and strings a torch pickle references, read without executing it."""
    raw: bytes
    zip_format = zipfile.is_zipfile(path)
    if zip_format:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if not pkl:
                raise LoadError(f"{path}: a zip file without data.pkl is not a torch checkpoint")
            raw = zf.read(pkl[0])
    else:
        with open(path, "rb") as f:
            raw = f.read(64 << 20)  # legacy (non-zip) torch files: the object pickle comes 2nd
    globals_: set[str] = set()
    strings: list[str] = []
    stream = io.BytesIO(raw)
    try:
        # legacy torch format: magic number, protocol, sys info, then the object pickle
        for _ in range(1 if zip_format else 4):
            _scan_ops(pickletools.genops(stream), globals_, strings, max_strings)
            if stream.tell() >= len(raw):
                break
    except Exception as e:  # truncated / not a pickle
        if not globals_ and not strings:
            raise LoadError(f"{path} is not a readable torch file ({type(e).__name__}: {e})") from None
    return PickleScan(globals_, set(strings), zip_format)


def classify_pickle(path: Path) -> tuple[str, str]:
    """(kind, reason) for one .pt/.bin file: pickle_bundle | whole_model_pt | state_dict_pt | slicegpt."""
    scan = scan_pickle(path)
    if not scan.needs_full_unpickle:
        if any(s.endswith("shortcut_Q") for s in scan.strings):
            return "slicegpt", "state dict with *_shortcut_Q rotation matrices (SliceGPT)"
        return "state_dict_pt", "state dict (tensors only)"
    if {"model", "tokenizer"} <= scan.strings:
        return "pickle_bundle", "pickled dict with 'model' and 'tokenizer' (LLM-Pruner style)"
    if path.name in BUNDLE_NAMES and "model" in scan.strings:
        return "pickle_bundle", "pickled dict with a 'model' entry"
    return "whole_model_pt", "pickled nn.Module (" + ", ".join(sorted(g for g in scan.globals
                                                                      if "ForCausalLM" in g)[:2] or ["whole model"]) + ")"


# --------------------------------------------------------------------------- detection


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path} is unreadable: {e}") from None


def _detect_file(path: Path) -> FormatInfo:
    parent = path.parent
    if path.suffix == ".safetensors":
        cfg = parent / "config.json"
        return FormatInfo("hf", path, "bare safetensors file", cfg if cfg.is_file() else None, parent)
    if path.suffix not in (".bin", ".pt", ".pth"):
        return FormatInfo("unknown", None, f"{path.name}: not a weight file ({', '.join(WEIGHT_SUFFIXES)})")
    try:
        kind, reason = classify_pickle(path)
    except LoadError as e:  # corrupt file: reported, never raised, so a batch scan goes on
        return FormatInfo("unknown", path, f"unreadable: {e}", None, parent)
    cfg: Optional[Path] = None
    if kind == "slicegpt":  # run_slicegpt.py writes <model>_<sparsity>.pt and its slicing config <...>.json
        cfg = path.with_suffix(".json") if path.with_suffix(".json").is_file() else None
    elif (parent / "config.json").is_file():
        cfg = parent / "config.json"
    return FormatInfo(kind, path, reason, cfg, parent)


def detect_format(path: str | Path, _depth: int = 0) -> FormatInfo:
    """What ``path`` holds (a file or a dir); never unpickles anything."""
    path = Path(path)
    if not path.exists():
        return FormatInfo("unknown", None, f"{path} does not exist")
    if path.is_file():
        return _detect_file(path)
    files = [p for p in path.iterdir() if p.is_file()]
    names = {p.name for p in files}
    cfg_path = path / "config.json"
    safetensors = sorted(p for p in files if p.suffix == ".safetensors")
    if cfg_path.is_file():
        index = path / "model.safetensors.index.json"
        weights: Optional[Path] = None
        if index.is_file() or len(safetensors) > 1:
            weights = path
        elif safetensors:
            weights = safetensors[0]
        elif "pytorch_model.bin" in names:
            weights = path / "pytorch_model.bin"
        elif (path / "pytorch_model.bin.index.json").is_file():
            weights = path
        if weights is not None:
            try:
                cfg = json.loads(cfg_path.read_text())
            except (OSError, ValueError):
                cfg = {}
            if cfg.get("model_type") == "prunelab_llama" or "checkpoint_info.json" in names:
                return FormatInfo("prunelab", weights, "prunelab checkpoint", cfg_path, path)
            if weights.is_file() and weights.suffix == ".bin":
                info = _detect_file(weights)
                if info.kind in ("pickle_bundle", "unknown"):  # an old bundle next to a config.json, or corrupt
                    return info
            return FormatInfo("hf", weights, f"HF dir ({cfg.get('model_type', '?')})", cfg_path, path)
    # no config.json: legacy pickles, by name first, then any .pt/.bin
    for name in BUNDLE_NAMES + ("model.pt",):
        if name in names:
            return _detect_file(path / name)
    pickles = sorted(p for p in files if p.suffix in (".pt", ".pth", ".bin"))
    for p in pickles:
        info = _detect_file(p)
        if info.kind == "slicegpt":
            if info.config_path is None:
                info.reason += " (no *.json config beside it)"
            return info
    if pickles:
        return _detect_file(pickles[0])
    if safetensors:
        return FormatInfo("hf", safetensors[0], "safetensors without config.json", None, path)
    # a model one level down (e.g. Magnitude_2000/pruned_model/)
    if _depth == 0:
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and p.name != "analysis"):
            info = detect_format(sub, _depth=1)
            if info.kind not in ("unknown", "eval_only"):
                info.reason += f" (in {sub.name}/)"
                return info
    results = sorted(p.name for p in files if p.suffix in RESULT_SUFFIXES)
    if results:
        return FormatInfo("eval_only", None, "no weight files, only results: " + ", ".join(results[:5])
                          + (" ..." if len(results) > 5 else ""), None, path)
    return FormatInfo("unknown", None, f"{path}: no config.json and no weight file", None, path)


# --------------------------------------------------------------------------- loading


def _pickle_refusal(path: Path, kind: str, detail: str = "") -> PickleNotAllowed:
    return PickleNotAllowed(
        f"{path} is a {kind.replace('_', ' ')}{detail}: reading it needs a full unpickle, which can execute "
        "arbitrary code hidden in the file. Re-run with allow_pickle=true only if you trust the file (you made it, "
        "or it comes from someone you trust); better, convert it once to a prunelab checkpoint (safetensors).")


class _SafeLoadRefused(Exception):
    """torch's weights-only unpickler refused the file; ``what`` and ``detail`` say why, for the refusal."""

    def __init__(self, what: str, detail: str = ""):
        super().__init__(what + detail)
        self.what, self.detail = what, detail

    @classmethod
    def from_torch(cls, msg: str) -> "_SafeLoadRefused":
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m:  # a class/function beyond tensors
            return cls("pickle that is not a plain state dict", f" (it references {m.group(1)})")
        m = re.search(r"Unsupported operand (\d+)", msg)
        if m:  # an opcode the weights-only unpickler lacks (it reads pickle protocol 2 only)
            op = pickletools.code2op.get(chr(int(m.group(1))))
            how = f"opcode {op.name}, pickle protocol {op.proto}" if op else f"opcode {m.group(1)}"
            return cls("pickle that torch's tensors-only loader cannot read", f" ({how})")
        return cls("pickle that torch's tensors-only loader refuses")


def _as_state_dict(obj: Any) -> Optional[dict[str, torch.Tensor]]:
    """``obj`` as a state dict (a dict of tensors, or ``{'state_dict': {...}, ...}``), else None."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def _safe_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read with torch's weights-only unpickler; ``_SafeLoadRefused`` when it refuses the file."""
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ...": a refusal below says it our way
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle.UnpicklingError, RuntimeError from a corrupt zip
        msg = str(e)
        if "weights_only" in msg or "Weights only" in msg or "Unsupported global" in msg:
            raise _SafeLoadRefused.from_torch(msg) from None
        raise LoadError(f"{path} is not a readable torch state dict: {type(e).__name__}: {msg[:200]}") from None
    sd = _as_state_dict(obj)
    if sd is None:
        raise LoadError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return sd


def load_legacy(path: str | Path, allow_pickle: bool = False, fmt: Optional[FormatInfo] = None) -> LegacyModel:
    """Read a legacy file (or dir holding one). State dicts are read safely; full pickles need ``allow_pickle``.

    A file detected as a state dict that torch's weights-only unpickler still refuses (it references a class
    the scan let through, or it was written with pickle protocol > 2) is refused without ``allow_pickle``,
    and fully unpickled with it.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt.kind in ("unknown", "eval_only") or fmt.weights_path is None:
        raise LoadError(f"{path} is not a model: {fmt.reason}")
    wp = fmt.weights_path
    config = None
    if fmt.config_path is not None:
        config = _read_json(fmt.config_path)
    if fmt.kind in ("state_dict_pt", "slicegpt") or (fmt.kind == "hf" and wp.suffix == ".bin"):
        try:
            return LegacyModel(fmt.kind, state_dict=_safe_state_dict(wp), config=config)
        except _SafeLoadRefused as e:
            if not allow_pickle:
                raise _pickle_refusal(wp, e.what, e.detail) from None
            log.info("%s: detected as %s, but it is a %s%s; falling back to a full unpickle",
                     wp, fmt.kind, e.what, e.detail)
        return _full_unpickle(wp, config, state_dict_kind=fmt.kind)
    if fmt.kind not in ("pickle_bundle", "whole_model_pt"):
        raise LoadError(f"{path} is a {fmt.kind} model: read it with core.models.load.load_model, not core.models.legacy")
    if not allow_pickle:
        raise _pickle_refusal(wp, fmt.kind)
    return _full_unpickle(wp, config)


def _full_unpickle(wp: Path, config: Optional[dict], state_dict_kind: str = "state_dict_pt") -> LegacyModel:
    """``torch.load(weights_only=False)``: runs whatever the file holds; call only with ``allow_pickle``."""
    log.warning("unpickling %s (allow_pickle=true): this runs whatever code the file contains", wp)
    try:
        obj = torch.load(wp, map_location="cpu", weights_only=False)
    except Exception as e:  # missing classes (e.g. a SliceGPT module without its package), corrupt file
        raise LoadError(f"could not unpickle {wp}: {type(e).__name__}: {str(e)[:300]}") from None
    if isinstance(obj, torch.nn.Module):
        return LegacyModel("whole_model_pt", model=obj, config=_module_config(obj) or config)
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        meta = {k: v for k, v in obj.items() if k not in ("model", "tokenizer")
                and isinstance(v, (str, int, float, bool, dict, list, type(None)))}
        return LegacyModel("pickle_bundle", model=obj["model"], tokenizer=obj.get("tokenizer"),
                           config=_module_config(obj["model"]) or config, meta=meta)
    sd = _as_state_dict(obj)
    if sd is not None:
        return LegacyModel(state_dict_kind, state_dict=sd, config=config)
    raise LoadError(f"{wp}: unpickled a {type(obj).__name__}, expected an nn.Module, a {{'model', 'tokenizer'}} "
                    "dict or a state dict")


def _module_config(model: torch.nn.Module) -> Optional[dict]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    try:
        return cfg.to_dict()
    except Exception:  # a config object without to_dict
        return None
