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

import codecs
import io
import json
import logging
import pickle
import pickletools
import re
import types
import warnings
import zipfile
from collections import OrderedDict
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
    module_classes: dict = field(default_factory=dict)  # read_restricted: module path -> the class the pickle names
    stubbed: list = field(default_factory=list)  # read_restricted: the classes it stood in for, never imported


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
    # no HF weights: legacy pickles. SliceGPT's own .pt + .json first (its folder may also hold the dill bundle
    # convert_slicegpt_model.py wrote, which needs SliceGPT's classes), then, beside a config.json, a state dict
    # (the GA's model_state_dict.pt beside its model.pt: safe to read), then pickles by name, then any .pt/.bin
    pickles = sorted(p for p in files if p.suffix in (".pt", ".pth", ".bin"))
    for p in pickles:
        if p.suffix == ".pt" and p.with_suffix(".json").is_file():
            info = _detect_file(p)
            if info.kind == "slicegpt":
                bundles = sorted(names & set(BUNDLE_NAMES))
                if bundles:
                    info.reason += f"; preferred over {', '.join(bundles)} (a pickle of the same model)"
                return info
    if cfg_path.is_file():
        by_name = sorted(pickles, key=lambda p: (p.name != "model_state_dict.pt", p.name))
        for p in by_name:
            info = _detect_file(p)
            if info.kind == "state_dict_pt":
                others = sorted(q.name for q in pickles if q != p)
                if others:
                    info.reason += f"; beside config.json, preferred over {', '.join(others)}"
                return info
    for name in BUNDLE_NAMES + ("model.pt",):
        if name in names:
            return _detect_file(path / name)
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


# keys under which a wrapper dict holds the state dict: {'state_dict': sd}, the old scripts' {'model': sd, ...},
# {'model_state_dict': sd} (training checkpoints)
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def _as_state_dict(obj: Any) -> Optional[dict[str, torch.Tensor]]:
    """``obj`` as a state dict (a dict of tensors, or one of them nested one level down under
    :data:`STATE_DICT_KEYS` beside other entries), else None."""
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def _wrapper_meta(obj: Any, sd: dict) -> dict:
    """The plain entries beside a nested state dict ({'model': sd, 'method': ..., 'pruning_ratio': ...})."""
    if not isinstance(obj, dict) or obj is sd:
        return {}
    return {str(k): v for k, v in obj.items() if v is not sd and isinstance(v, (str, int, float, bool, type(None)))}


def _safe_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, the plain entries beside it when nested) read with torch's weights-only unpickler;
    ``_SafeLoadRefused`` when it refuses the file."""
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
        raise LoadError(f"{path}: expected a dict of tensors (or one under {', '.join(map(repr, STATE_DICT_KEYS))}),"
                        f" got {type(obj).__name__}" + (f" with keys {sorted(map(str, obj))[:6]}"
                                                        if isinstance(obj, dict) else ""))
    return sd, _wrapper_meta(obj, sd)


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
            sd, meta = _safe_state_dict(wp)
            return LegacyModel(fmt.kind, state_dict=sd, config=config, meta=meta)
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


def read_for_analysis(path: str | Path, allow_pickle: bool = False, fmt: Optional[FormatInfo] = None) -> LegacyModel:
    """Tensors and config of a legacy file for analysis (structure, sizes, comparison), running none of its code.

    Bundles, whole-model pickles and state dicts torch's tensors-only loader refuses (pickle protocol 4, a stray
    non-tensor class) are read by :func:`read_restricted`, with or without ``allow_pickle``: it imports nothing and
    calls only torch's tensor-rebuild functions, so it needs no opt-in (docs/decisions.md#restricted-reader). Only
    a file it cannot make sense of is fully unpickled, and only with ``allow_pickle``.
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt.kind not in ("pickle_bundle", "whole_model_pt"):
        try:
            return load_legacy(path, allow_pickle=False, fmt=fmt)
        except PickleNotAllowed as refused:
            first: LoadError = refused
    else:
        first = _pickle_refusal(fmt.weights_path or path, fmt.kind)
    try:
        lm = read_restricted(path, fmt)
    except LoadError as e:
        if not allow_pickle:
            raise PickleNotAllowed(f"{e}; {first}") from None
        log.warning("%s; falling back to a full unpickle (allow_pickle=true)", e)
        return load_legacy(path, allow_pickle=True, fmt=fmt)
    if lm.kind == "state_dict_pt" and fmt.kind in ("slicegpt", "hf"):
        lm.kind = fmt.kind
    return lm


def _full_unpickle(wp: Path, config: Optional[dict], state_dict_kind: str = "state_dict_pt") -> LegacyModel:
    """``torch.load(weights_only=False)``: runs whatever the file holds; call only with ``allow_pickle``."""
    log.warning("unpickling %s (allow_pickle=true): this runs whatever code the file contains", wp)
    try:
        obj = torch.load(wp, map_location="cpu", weights_only=False)
    except Exception as e:  # missing classes (e.g. a SliceGPT module without its package), corrupt file
        hint = ""
        if isinstance(e, (AttributeError, ModuleNotFoundError, ImportError)):
            hint = (" (the file names a class this environment does not have, e.g. one of an older transformers: "
                    "task=analyze and task=batch_analyze read it without unpickling any code)")
        raise LoadError(f"could not unpickle {wp}: {type(e).__name__}: {str(e)[:300]}{hint}") from None
    if isinstance(obj, torch.nn.Module):
        return LegacyModel("whole_model_pt", model=obj, config=_module_config(obj) or config)
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        meta = {k: v for k, v in obj.items() if k not in ("model", "tokenizer")
                and isinstance(v, (str, int, float, bool, dict, list, type(None)))}
        return LegacyModel("pickle_bundle", model=obj["model"], tokenizer=obj.get("tokenizer"),
                           config=_module_config(obj["model"]) or config, meta=meta)
    sd = _as_state_dict(obj)
    if sd is not None:
        return LegacyModel(state_dict_kind, state_dict=sd, config=config, meta=_wrapper_meta(obj, sd))
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


# --------------------------------------------------------------------------- restricted reading (analysis)
#
# A bundle pickled under another transformers (LLM-Pruner's llama3.py under 4.4x references LlamaSdpaAttention,
# GPT2TokenizerFast, ...) cannot be fully unpickled here, and a full unpickle runs whatever the file holds. For
# analysis only tensors, names and the config matter: ``read_restricted`` unpickles with an unpickler that imports
# nothing. Its allow-list (:data:`_SAFE_GLOBALS`) is torch's tensor-rebuild functions, a few containers and torch's
# value types; every other class or function the pickle names becomes a :class:`Stub` subclass of that name, which
# records what the pickle gives it (constructor arguments, state, items) and runs nothing. The module tree is then
# walked through the stubs' recorded ``_parameters`` / ``_buffers`` / ``_modules``.


class Stub:
    """An instance of a class the restricted reader did not import. ``_stub_args``: what a call or ``__new__``
    got; ``_stub_state``: what ``__setstate__`` (pickle's BUILD) got; ``_stub_items`` / ``_stub_list``: what
    ``SETITEMS`` / ``APPENDS`` added. Nothing of the original class runs."""

    _stub_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Stub":
        obj = object.__new__(cls)
        d = obj.__dict__
        d["_stub_args"], d["_stub_kwargs"], d["_stub_state"] = args, kwargs, None
        d["_stub_items"], d["_stub_list"] = {}, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # a REDUCE call: the arguments are kept by __new__
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "Stub":  # what a stubbed function returned, called again
        return _stub_class(self._stub_name + "()")(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_stub_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._stub_items[key] = value

    def append(self, value: Any) -> None:
        self._stub_list.append(value)

    def extend(self, values: Any) -> None:
        self._stub_list.extend(values)

    def __repr__(self) -> str:
        return f"<stub {self._stub_name}>"

    @property
    def stub_dict(self) -> dict:
        """The object's attributes as pickled (``__dict__`` state, or the dict half of ``(state, slotstate)``)."""
        st = self._stub_state
        if isinstance(st, tuple) and len(st) == 2:
            st = st[0] if isinstance(st[0], dict) else st[1]
        return st if isinstance(st, dict) else {}


_STUB_CLASSES: dict[str, type] = {}


def _stub_class(qualified: str) -> type:
    cls = _STUB_CLASSES.get(qualified)
    if cls is None:
        module, _, name = qualified.rpartition(".")
        cls = type(name or qualified, (Stub,), {"_stub_name": qualified, "__module__": f"<stub {module}>"})
        _STUB_CLASSES[qualified] = cls
    return cls


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor`` (protocols 0 and 1), for stubs only."""
    if isinstance(cls, type) and issubclass(cls, Stub):
        return cls()
    raise pickle.UnpicklingError(f"restricted reader: copyreg._reconstructor of {cls!r}")


def _newobj(cls: Any, *args: Any) -> Any:
    """``copyreg.__newobj__``, for stubs and the allowed containers only."""
    if isinstance(cls, type) and (issubclass(cls, Stub) or cls in (OrderedDict, set, frozenset)):
        return cls.__new__(cls, *args)
    raise pickle.UnpicklingError(f"restricted reader: copyreg.__newobj__ of {cls!r}")


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2`` for a plain tensor or Parameter rebuilt by an allowed function
    (transformers 5 pickles parameters carrying ``_is_hf_initialized`` this way); anything else is refused."""
    if func not in _REBUILD_FUNCS or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError(f"restricted reader: _rebuild_from_type_v2 with {func!r}, {new_type!r}")
    return torch._tensor._rebuild_from_type_v2(func, new_type, args, state)


def _dill_create_type(typeobj: Any, name: Any, bases: Any = (), namespace: Any = None) -> type:
    """dill's by-value class (SliceGPT's ``UninitializedLlamaForCausalLM``): a stub class of that name; the class
    body (``namespace``, functions dill rebuilt as stubs) is never executed."""
    return _stub_class(f"<dill>.{name}" if isinstance(name, str) else "<dill>.?")


_REBUILD_FUNCS = frozenset(getattr(torch._utils, n) for n in (
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state") if hasattr(torch._utils, n))


def _safe_globals() -> dict[str, Any]:
    out: dict[str, Any] = {f"torch._utils.{f.__name__}": f for f in _REBUILD_FUNCS}
    out.update({
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Tensor": torch.Tensor, "torch.nn.parameter.Parameter": torch.nn.Parameter,
        "torch.Size": torch.Size, "torch.device": torch.device,
        "collections.OrderedDict": OrderedDict, "_codecs.encode": codecs.encode,
        "copyreg._reconstructor": _reconstructor, "copyreg.__newobj__": _newobj,
        "dill._dill._create_type": _dill_create_type,
    })
    for mod in ("builtins", "__builtin__"):
        out.update({f"{mod}.set": set, f"{mod}.frozenset": frozenset, f"{mod}.bytearray": bytearray,
                    f"{mod}.complex": complex, f"{mod}.slice": slice})
    out.update({f"torch.{n}": v for n, v in vars(torch).items() if isinstance(v, torch.dtype)})
    return out


_SAFE_GLOBALS = _safe_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_SAFE_GLOBALS`; any other global is a :class:`Stub` class named after it.
    (torch's loader subclasses this and resolves its storage types first; storages come through its
    ``persistent_load``, which reads the archive's tensor records.)"""

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        found = _SAFE_GLOBALS.get(qualified)
        if found is not None:
            return found
        _STUBBED.add(qualified)
        return _stub_class(qualified)


_STUBBED: set[str] = set()  # the classes stubbed by the current read_restricted (reset by it; one at a time)


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# what torch.load needs of a pickle module: its Unpickler (subclassed for storages) and load (legacy headers)
RESTRICTED_PICKLE = types.SimpleNamespace(__name__="prunelab_restricted_pickle", Unpickler=_RestrictedUnpickler,
                                          load=_restricted_load)


def _is_module_stub(obj: Any) -> bool:
    return isinstance(obj, Stub) and isinstance(obj.stub_dict.get("_modules"), dict)


def _walk_modules(root: Stub) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, module path -> class name) from a stubbed ``nn.Module`` tree, as ``state_dict()`` names
    them: parameters, then persistent buffers, of every module (shared tensors under each name, as torch does)."""
    sd: dict[str, torch.Tensor] = {}
    classes: dict[str, str] = {}
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        prefix, mod = stack.pop()
        if prefix.count(".") > 64:  # a cycle in a crafted file: torch's own state_dict() would recurse forever
            raise LoadError("the pickled module tree is more than 64 levels deep (a cycle?)")
        st = mod.stub_dict
        classes[prefix.rstrip(".")] = mod._stub_name
        for key in ("_parameters", "_buffers"):
            entries = st.get(key)
            skip = st.get("_non_persistent_buffers_set") if key == "_buffers" else None
            skip = skip if isinstance(skip, (set, frozenset, list, tuple)) else ()
            if isinstance(entries, dict):
                for name, t in entries.items():
                    if isinstance(t, torch.Tensor) and name not in skip:
                        sd[prefix + str(name)] = t
        children = [(prefix + str(n) + ".", c) for n, c in st["_modules"].items() if _is_module_stub(c)]
        stack.extend(reversed(children))
    return sd, classes


def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON-able copy of a recovered value: stubs, tensors and other objects become None."""
    if depth > 20:
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in value]
    return None


def _config_of(root: Stub) -> Optional[dict]:
    """The pickled model's ``config`` (a stubbed PretrainedConfig: its attributes) as a config.json-like dict;
    ``model_type`` (a class attribute, not pickled) from the config class's module path."""
    cfg = root.stub_dict.get("config")
    if not isinstance(cfg, Stub):
        return None
    out = {k: v for k, v in _plain(cfg.stub_dict).items() if not k.startswith("_") or k == "_name_or_path"}
    if "model_type" not in out:
        m = re.match(r"transformers\.models\.(\w+)\.configuration_\w+\.", cfg._stub_name)
        if m:
            out["model_type"] = m.group(1)
    if not out.get("architectures"):
        out["architectures"] = [root._stub_name.rpartition(".")[2]]
    return out


def read_restricted(path: str | Path, fmt: Optional[FormatInfo] = None) -> LegacyModel:
    """A bundle or whole-model pickle read for analysis without running any of its code (see :class:`Stub`).

    Returns the tensors as ``state_dict`` (the names ``model.state_dict()`` had), the model's config when it
    was pickled with one, ``module_classes`` (module path -> the class the pickle names) and the bundle's other
    plain entries as ``meta``. A LoadError when no module tree can be recovered (e.g. a pickle whose classes
    were made by code that must run).
    """
    path = Path(path)
    fmt = fmt or detect_format(path)
    wp = fmt.weights_path if fmt.weights_path is not None else path
    _STUBBED.clear()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            obj = torch.load(wp, map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE,
                             mmap=zipfile.is_zipfile(wp))
    except Exception as e:  # noqa: BLE001 - a pickle the stubs cannot stand in for, a corrupt file
        raise LoadError(f"{wp}: could not be read without unpickling code ({type(e).__name__}: "
                        f"{str(e)[:200]})") from None
    stubbed = sorted(_STUBBED)
    meta: dict = {}
    root = obj
    if isinstance(obj, dict) and "model" in obj:
        root = obj["model"]
        meta = {str(k): _plain(v) for k, v in obj.items() if k not in ("model", "tokenizer")
                and isinstance(v, (str, int, float, bool, dict, list, type(None)))}
    if isinstance(root, dict):  # a state dict (plain, or nested under 'model' / 'state_dict'): the tensors as they are
        sd = _as_state_dict(root)
        if sd is None:
            raise LoadError(f"{wp}: a dict that holds no state dict (keys {sorted(map(str, root))[:6]})")
        return LegacyModel("state_dict_pt", state_dict=sd, config=_read_json(fmt.config_path)
                           if fmt.config_path else None, meta=meta or _wrapper_meta(root, sd), stubbed=stubbed)
    if not _is_module_stub(root):
        what = root._stub_name if isinstance(root, Stub) else type(root).__name__
        raise LoadError(f"{wp}: no nn.Module found in the pickle (got {what}), nothing to analyse")
    sd, classes = _walk_modules(root)
    if not sd:
        raise LoadError(f"{wp}: the pickled module holds no tensors")
    config = _config_of(root)
    if config is None and fmt.config_path is not None:
        config = _read_json(fmt.config_path)
    log.info("%s read without unpickling code: %d tensors, %d classes stood in for (%s)", wp, len(sd),
             len(stubbed), ", ".join(s.rpartition(".")[2] for s in stubbed[:6]) + (" ..." if len(stubbed) > 6 else ""))
    return LegacyModel(fmt.kind if fmt.kind in ("pickle_bundle", "whole_model_pt") else "whole_model_pt",
                       state_dict=sd, config=config, meta=meta, module_classes=classes, stubbed=stubbed)


def llamba_state_dict_config(sd: dict[str, torch.Tensor], cfg: dict, where: str | Path) -> tuple[dict, dict]:
    """(``HybridConfig`` kwargs, the state dict in ``HybridForCausalLM``'s names) for a state dict in Cartesia's
    names saved beside a Llamba ``config.json``: the GA's ``model_state_dict.pt``, a Llamba whose layers listed in
    ``checkpoint_info.json``'s ``replaced_layers`` are Llama decoder layers. A layer holding ``self_attn.*`` is an
    attention layer; its heads come from the attention fields of ``config.json`` (the donor Llama's), which must
    then be there."""
    from core.models.llamba import hybrid_config_from_llamba, llamba_key_to_hybrid  # light: no torch at import

    sd = {llamba_key_to_hybrid(k): v for k, v in sd.items()}
    n = int(cfg["n_layer"])
    types = ["attention" if f"model.layers.{i}.self_attn.q_proj.weight" in sd else "mamba2" for i in range(n)]
    attention = [i for i, t in enumerate(types) if t == "attention"]
    if attention and not cfg.get("num_attention_heads"):
        raise LoadError(f"{where}: layers {attention} are Llama attention layers, but config.json (a Llamba config) "
                        "has no num_attention_heads / num_key_value_heads / head_dim: add the donor Llama's attention "
                        "fields (from its config.json) to it")
    kwargs = hybrid_config_from_llamba(cfg, attention=cfg if attention else None)
    kwargs["layer_types"] = types
    kwargs["layer_sources"] = ["donor" if t == "attention" else "llamba" for t in types]
    return kwargs, sd
