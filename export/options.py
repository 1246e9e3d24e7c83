"""The options of ``task=export``, one class per format (``conf/export/<format>.yaml`` names it with ``_target_``).

Each is checked when built, before any weight loads (and before torch is imported): an unknown output type or
tokenizer source is one line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar, Optional

from core.run.errors import ConfigError

# Written by export.to_gguf itself (numpy / gguf-py): its OUT_TYPES. Named here so that checking a config
# imports neither torch nor gguf.
WRITTEN_TYPES = ("f32", "f16", "bf16", "q8_0")

# Types llama.cpp's own quantiser writes (llama-cpp-python's llama_model_quantize, LLAMA_FTYPE_MOSTLY_<NAME>).
LLAMA_CPP_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
                   "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "tq1_0", "tq2_0")
DTYPES = (None, "float32", "float16", "bfloat16")


def _common(fmt: str, expected: str, verify_tokens: int) -> None:
    if fmt != expected:
        raise ConfigError(f"export.format={fmt!r} does not match this option ({expected}); choose export={fmt}")
    if verify_tokens < 2:
        raise ConfigError(f"export.verify_tokens={verify_tokens} must be >= 2 (tokens compared with the runtime)")


@dataclass(frozen=True)
class GGUFExport:
    """GGUF for llama.cpp (``deci`` architecture for per-layer widths, ``llama`` for uniform ones)."""

    format: str = "gguf"
    out_type: str = "f32"  # f32 | f16 | bf16 | q8_0 written here; LLAMA_CPP_TYPES through llama.cpp's quantiser
    output: Optional[str] = None  # the .gguf path; null: <run dir>/<base>-<method>-<out_type>.gguf
    tokenizer: str = "auto"  # auto (the source GGUF's tokenizer.ggml.* when there is one, else hf) | gguf | hf
    tokenizer_pre: Optional[str] = None  # llama.cpp's pre-tokenizer name for an HF tokenizer it cannot tell
    verify: bool = True  # run the file in llama.cpp (llama-cpp-python) on held-out text and record the logit error
    verify_tokens: int = 256
    FORMAT: ClassVar[str] = "gguf"

    def __post_init__(self) -> None:
        _common(self.format, self.FORMAT, self.verify_tokens)
        if self.out_type not in WRITTEN_TYPES and self.out_type not in LLAMA_CPP_TYPES:
            raise ConfigError(f"export.out_type={self.out_type!r} is not a supported GGUF type: written here "
                              f"{', '.join(WRITTEN_TYPES)}; through llama.cpp's quantiser {', '.join(LLAMA_CPP_TYPES)}")
        if self.out_type in LLAMA_CPP_TYPES and importlib.util.find_spec("llama_cpp") is None:
            raise ConfigError(f"export.out_type={self.out_type} needs llama.cpp's quantiser: pip install "
                              "llama-cpp-python (or export out_type=q8_0 / f16 and run llama-quantize yourself)")
        if self.tokenizer not in ("auto", "gguf", "hf"):
            raise ConfigError(f"export.tokenizer={self.tokenizer!r} is not one of auto, gguf, hf")

    @property
    def needs_llama_cpp_quantiser(self) -> bool:
        return self.out_type in LLAMA_CPP_TYPES


@dataclass(frozen=True)
class _DirExport:
    format: str = ""
    output: Optional[str] = None  # the directory; null: <run dir>/<format>
    dtype: Optional[str] = None  # float32 | float16 | bfloat16; null: the model's own
    verify: bool = True  # load the directory in transformers and compare its logits with the model's
    verify_tokens: int = 256
    FORMAT: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _common(self.format, self.FORMAT, self.verify_tokens)
        if self.dtype not in DTYPES:
            raise ConfigError(f"export.dtype={self.dtype!r} is not one of float32, float16, bfloat16 (or null)")


@dataclass(frozen=True)
class DeciLMExport(_DirExport):
    """The DeciLM / Nemotron-NAS layout vLLM serves (block_configs, FFN widths padded to 256, dummy heads)."""

    format: str = "decilm"
    FORMAT: ClassVar[str] = "decilm"


@dataclass(frozen=True)
class HFExport(_DirExport):
    """A stock transformers Llama (widths zero-padded to one shape): no trust_remote_code anywhere."""

    format: str = "hf"
    FORMAT: ClassVar[str] = "hf"
