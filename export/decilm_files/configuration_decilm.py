# Configuration file shipped inside prunelab's DeciLM-layout exports (referenced by `auto_map` in config.json).
#
# The DeciLM / Nemotron-NAS layout (model_type "nemotron-nas", architectures ["DeciLMForCausalLM"]) is the one
# vLLM's nemotron_nas.py runs: a Llama whose layers each have a `block_configs[i]` entry
#     attention: {no_op, replace_with_linear, n_heads_in_group}   # KV heads = num_attention_heads // n_heads_in_group
#     ffn:       {no_op, replace_with_linear, ffn_mult}           # width: int(2 * ffn_mult * hidden / 3) up to x256
# and read as objects (vLLM asks `block_config.attention.no_op`, `hasattr(block_config.ffn, "ffn_mult")`), as
# NVIDIA's own configuration_decilm.py gives them. Depends on transformers only.
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from transformers import LlamaConfig


@dataclass
class AttentionConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: Optional[int] = None  # None with no_op: no attention in this layer


@dataclass
class FFNConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: Optional[float] = None  # None with no_op: no FFN in this layer


@dataclass
class BlockConfig:
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)

    @staticmethod
    def of(d: Any) -> "BlockConfig":
        if isinstance(d, BlockConfig):
            return d
        return BlockConfig(AttentionConfig(**d.get("attention", {})), FFNConfig(**d.get("ffn", {})))


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The FFN width vLLM (and NVIDIA's modeling code) builds for `ffn_mult`."""
    return find_multiple(int(2 * ffn_mult * hidden_size / 3), 256)


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs: Optional[list] = None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [BlockConfig.of(b) for b in (block_configs or [])]

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["block_configs"] = [asdict(b) if isinstance(b, BlockConfig) else b for b in self.block_configs]
        return out
