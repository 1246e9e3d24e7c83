"""Hybrids: the base model with the donor's decoder layers at given indices.

    donor = DonorLayers.open(donor_dir, like=base)   # reads config.json and the safetensors index, no weights
    with swapped(base, {i: donor[i] for i in (11, 13, 17, 21)}):   # module references, no copies
        ...evaluate...
    assemble(base, donor, [11, 13, 17, 21])          # the same swap, kept (then save_checkpoint)

Any pair whose decoder layers map hidden states to hidden states of the same width qualifies: a pruned or
otherwise damaged Llama with its original, a Llamba (Mamba-2 mixers) with the Llama it was distilled from.
A donor layer is built from the donor's own model class on the meta device and filled with only its own
tensors, read from the donor's (sharded or single) safetensors: an 8B donor is never loaded whole.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import safetensors
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from core.models.llama import layer_types_of
from core.models.llamba import ATTENTION_KEYS, hybrid_config_from_llamba, is_llamba_config, llamba_key_to_hybrid
from core.models.modeling_hybrid import HybridConfig, HybridForCausalLM
from core.models.modeling_pruned import PrunedLlamaConfig, PrunedLlamaForCausalLM
from core.run.errors import ConfigError, LoadError


def check_layers(layers: list[int], depth: int, what: str = "replacement.layers") -> list[int]:
    """Sorted, distinct, in range; a ConfigError otherwise."""
    bad = [i for i in layers if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth]
    if bad:
        raise ConfigError(f"{what}: {bad} out of range: the model has {depth} layers (0..{depth - 1})")
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise ConfigError(f"{what}: layer(s) {dup} given more than once")
    return sorted(layers)


def check_compatible(base_cfg: Mapping[str, Any], donor_cfg: Mapping[str, Any], base_name: str, donor_name: str) -> None:
    """Same hidden width, vocabulary and depth: a donor layer must map the base's hidden states to the same space."""
    def get(cfg: Mapping[str, Any], *keys: str) -> Any:
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        return None

    checks = (("hidden width", ("hidden_size", "d_model")), ("vocabulary", ("vocab_size",)),
              ("depth", ("num_hidden_layers", "n_layer")))
    for label, keys in checks:
        b, d = get(base_cfg, *keys), get(donor_cfg, *keys)
        if b is not None and d is not None and int(b) != int(d):
            raise ConfigError(f"base {base_name} and donor {donor_name} differ in {label} ({b} vs {d}): "
                              "their decoder layers cannot be swapped")


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, from the index of a sharded checkpoint or the single file's header."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{path}: no safetensors weights (the donor must be a safetensors checkpoint dir)")
    out = {}
    for f in files:
        with safetensors.safe_open(str(f), "pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


class DonorLayers:
    """A donor's decoder layers, each built and read from disk the first time it is asked for."""

    def __init__(self, path: Path, config: dict, skeleton: "nn.Module", key_map: Callable[[str], str],
                 device: str = "cpu", dtype: Optional["torch.dtype"] = None):
        self.path, self.config, self._skeleton = path, config, skeleton
        self.device, self.dtype = device, dtype
        self._files = _weight_files(path)
        self._by_layer: dict[int, dict[str, str]] = {}  # layer -> {module-local name: file key}
        for key in self._files:
            mapped = key_map(key)
            parts = mapped.split(".")
            if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
                self._by_layer.setdefault(int(parts[2]), {})[".".join(parts[3:])] = key
        self._cache: dict[int, nn.Module] = {}
        self.depth = len(skeleton.model.layers)

    @staticmethod
    def open(path: str | Path, *, device: str = "cpu", dtype: Optional["torch.dtype"] = None) -> "DonorLayers":
        """The donor at ``path`` (a HF/prunelab/hybrid checkpoint dir, or a Cartesia Llamba dir)."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise LoadError(f"donor {path}: no config.json (give a checkpoint directory)")
        config = json.loads(cfg_file.read_text())
        key_map: Callable[[str], str] = lambda k: k  # noqa: E731
        with torch.device("meta"):
            skeleton, key_map = _skeleton(path, config)
        if is_llamba_config(config):  # compare and adopt in Llama terms (padded vocabulary, depth, width)
            config = hybrid_config_from_llamba(config)
        return DonorLayers(path, config, skeleton, key_map, device=device, dtype=dtype)

    def __len__(self) -> int:
        return self.depth

    def layer_types(self) -> list[str]:
        """"attention" | "mamba2" per donor layer, from its config (no weights read)."""
        return layer_types_of(self._skeleton)

    def __getitem__(self, i: int) -> "nn.Module":
        if i not in self._cache:
            self._cache[i] = self._load(i)
        return self._cache[i]

    def _load(self, i: int) -> "nn.Module":
        if not 0 <= i < self.depth:
            raise ConfigError(f"donor {self.path} has {self.depth} layers; layer {i} does not exist")
        wanted = self._by_layer.get(i)
        if not wanted:
            raise LoadError(f"donor {self.path}: no tensors for layer {i} in its safetensors")
        layer = self._skeleton.model.layers[i]
        own = dict(layer.state_dict())
        missing = sorted(set(own) - set(wanted))
        unexpected = sorted(set(wanted) - set(own))
        if missing or unexpected:
            raise LoadError(f"donor {self.path} layer {i}: tensors do not match its config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        sd = {}
        by_file: dict[Path, list[str]] = {}
        for local, key in wanted.items():
            by_file.setdefault(self._files[key], []).append(local)
        for f, locals_ in by_file.items():
            with safetensors.safe_open(str(f), "pt", device="cpu") as fh:
                for local in locals_:
                    t = fh.get_tensor(wanted[local])
                    if tuple(t.shape) != tuple(own[local].shape):
                        raise LoadError(f"donor {self.path} layer {i}: {local} has shape {tuple(t.shape)}, "
                                        f"config says {tuple(own[local].shape)}")
                    sd[local] = t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t
        layer.load_state_dict(sd, assign=True, strict=True)
        layer.to(self.device)
        layer.eval()
        for p in layer.parameters():
            p.requires_grad_(False)
        return layer


def _skeleton(path: Path, config: dict) -> tuple["nn.Module", Callable[[str], str]]:
    """The donor's model class instantiated on the meta device, and how its file keys map to module keys."""
    model_type = config.get("model_type")
    if model_type == "prunelab_llama":
        cfg = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")}
        return PrunedLlamaForCausalLM(PrunedLlamaConfig(**cfg)), lambda k: k
    if model_type == "prunelab_hybrid":
        cfg = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures")}
        return HybridForCausalLM(HybridConfig(**cfg)), lambda k: k
    if is_llamba_config(config):
        return HybridForCausalLM(HybridConfig(**hybrid_config_from_llamba(config))), llamba_key_to_hybrid
    try:
        cfg = AutoConfig.from_pretrained(path)
        return AutoModelForCausalLM.from_config(cfg), lambda k: k
    except Exception as e:  # noqa: BLE001 - an unknown architecture is one line
        raise LoadError(f"donor {path}: cannot build its layers ({type(e).__name__}: {str(e).splitlines()[0]})") from None


@contextmanager
def swapped(model: "nn.Module", layers: Mapping[int, "nn.Module"]) -> Iterator["nn.Module"]:
    """``model`` with ``layers[i]`` at decoder index i while the block runs (references, no copies)."""
    stack = model.model.layers
    saved = {i: stack[i] for i in layers}
    kinds = getattr(model.config, "layer_types", None)
    homes = {}  # donor layers kept elsewhere (replacement.donor_device=cpu) visit the model's device
    try:
        for i, layer in layers.items():
            here, home = _device(stack[i]), _device(layer)
            if here is not None and home is not None and here != home:
                homes[i] = home
                layer.to(here)
            _place(layer, i)
            stack[i] = layer
        if kinds is not None and getattr(model.config, "model_type", None) == "prunelab_hybrid":
            model.config.layer_types = layer_types_of(model)
        yield model
    finally:
        for i, home in homes.items():
            layers[i].to(home)
        for i, layer in saved.items():
            stack[i] = layer
        if kinds is not None:
            model.config.layer_types = kinds


def _device(module: "nn.Module") -> Optional["torch.device"]:
    p = next(module.parameters(), None)
    return p.device if p is not None else None


def _place(layer: "nn.Module", i: int) -> None:
    """Point a layer's cache index at its new position (attention layers read their KV cache by index)."""
    for m in layer.modules():
        if hasattr(m, "layer_idx"):
            m.layer_idx = i


def adopt_attention(model: "nn.Module", donor: DonorLayers) -> bool:
    """Give a base without attention layers (a Llamba) the donor's attention settings, so that the donor's
    attention layers see the positions, RoPE and heads they were trained with. Returns whether it changed."""
    if "attention" in layer_types_of(model) or "attention" not in donor.layer_types():
        return False
    base_eps, donor_eps = getattr(model.config, "rms_norm_eps", None), donor.config.get("rms_norm_eps")
    if base_eps is not None and donor_eps is not None and float(base_eps) != float(donor_eps):
        # A hybrid config has one eps for its attention layers and final norm: it could not reproduce both.
        raise ConfigError(f"base and donor {donor.path} use different RMSNorm eps ({base_eps} vs {donor_eps}); "
                          "their layers cannot share one hybrid checkpoint")
    for key in ATTENTION_KEYS:
        if donor.config.get(key) is not None:
            setattr(model.config, key, donor.config[key])
    device = next(model.parameters()).device
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config).to(device)
    return True


def _sync_config(model: "nn.Module", layers: list[int], source: str) -> None:
    """The config follows the modules: layer kinds (the cache is built from them) and where each came from."""
    if getattr(model.config, "model_type", None) == "prunelab_hybrid":
        model.config.layer_types = layer_types_of(model)
    sources = list(getattr(model.config, "layer_sources", None) or ["base"] * len(model.model.layers))
    for i in layers:
        sources[i] = source
    model.config.layer_sources = sources


def assemble(model: "nn.Module", donor: DonorLayers, layers: list[int]) -> "nn.Module":
    """Swap ``donor[i]`` into ``model`` for every i in ``layers``, in place, and return the model."""
    layers = check_layers(list(layers), len(model.model.layers))
    adopt_attention(model, donor)
    stack = model.model.layers
    for i in layers:
        layer = donor[i]
        _place(layer, i)
        stack[i] = layer
    _sync_config(model, layers, "donor")
    return model
