"""Cartesia's Llamba checkpoints, read as prunelab hybrids (every layer "mamba2").

A Llamba dir (Cartesia's ``cartesia_pytorch.Llamba``: ``LlambaLMHeadModel``) holds a ``config.json`` with
``LlambaConfig``'s fields (``model_type: llamba``, ``d_model``, ``n_layer``, ``vocab_size``,
``pad_vocab_size_multiple``, ``tie_embeddings``, ``lm_head_bias``, ``norm_epsilon``, ``resid_dropout``,
``mlp_cfg {intermediate_size, act_fn, bias}``, ``ssm_cfg {d_state, n_v_heads, n_qk_heads, expand, chunk_size,
activation, bias, conv_bias?, d_conv?}``) and safetensors with ``backbone.*`` keys:

    backbone.embedding.weight                        -> model.embed_tokens.weight
    backbone.layers.{i}.mixer.{in_proj.weight, z_bias, conv1d.weight, conv1d.bias, D, out_proj.weight}
    backbone.layers.{i}.{input_layernorm, post_attention_layernorm}.weight
    backbone.layers.{i}.mlp.{gate_proj, up_proj, down_proj}.weight
                                                     -> model.layers.{i}.(same)
    backbone.final_layernorm.weight                  -> model.norm.weight
    lm_head.weight (absent when tie_embeddings)      -> lm_head.weight

``load_llamba(path)`` builds a :class:`~core.models.modeling_hybrid.HybridForCausalLM` from it; ``core.models.load``
routes a ``kind=hf`` dir whose config is a Llamba config here. Llamba repositories ship no tokenizer
(they use Llama-3's); one is returned only when the dir has tokenizer files.

:data:`HYBRID` is the checkpoint format of any model with a Llamba (mamba2) layer (``core.models.checkpoint``
writes with it): config.json has model_type prunelab_hybrid, ``layer_types`` ("attention" | "mamba2" per layer),
``layer_configs`` (heads 0 for mamba2 layers), ``ssm_cfg`` and an auto_map to ``modeling_prunelab_hybrid.py`` (a
copy of core/models/modeling_hybrid.py: HybridConfig / HybridForCausalLM).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

from core.models import llama
from core.run.errors import LoadError

if TYPE_CHECKING:
    from torch import nn

# Cartesia's prefixes -> HybridForCausalLM's (everything under a layer keeps its name).
KEY_PREFIXES = (("backbone.embedding.", "model.embed_tokens."), ("backbone.layers.", "model.layers."),
                ("backbone.final_layernorm.", "model.norm."), ("lm_head.", "lm_head."))
# LlambaConfig / DiscreteMamba2 defaults for keys a config.json may leave out.
SSM_DEFAULTS = {"d_state": 64, "n_v_heads": 32, "n_qk_heads": 32, "expand": 1, "chunk_size": 128,
                "activation": "identity", "bias": False, "conv_bias": True, "d_conv": 4}
MLP_DEFAULTS = {"intermediate_size": 14336, "bias": False, "act_fn": "silu"}
CARTESIA_BLOCK_NORM_EPS = 1e-5  # Cartesia's Block builds its two RMSNorms with eps=1e-5 whatever norm_epsilon says
ATTENTION_KEYS = ("num_attention_heads", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling",
                  "rope_parameters", "max_position_embeddings", "attention_bias", "attention_dropout")


def is_llamba_config(cfg: Mapping[str, Any]) -> bool:
    """A Cartesia Llamba ``config.json`` (by model_type, or by its LlambaConfig fields)."""
    if cfg.get("model_type") == "llamba":
        return True
    return all(k in cfg for k in ("d_model", "n_layer", "ssm_cfg")) and "hidden_size" not in cfg


def padded_vocab(cfg: Mapping[str, Any]) -> int:
    """LlambaLMHeadModel pads the vocabulary up to a multiple of ``pad_vocab_size_multiple`` (the weights' rows)."""
    vocab, mult = int(cfg["vocab_size"]), int(cfg.get("pad_vocab_size_multiple") or 1)
    return vocab + (-vocab) % mult


def hybrid_config_from_llamba(cfg: Mapping[str, Any], attention: Optional[Mapping[str, Any]] = None) -> dict:
    """``HybridConfig(**result)`` kwargs for a Llamba config: every layer "mamba2".

    ``attention``: a Llama ``config.json`` (the donor Llama-3) whose attention fields (heads, head_dim, rope,
    max_position_embeddings) are copied, for hybrids that will hold its attention layers; by default the heads
    are the mixer's value heads (placeholders: a pure Llamba has no attention layer).
    """
    if not is_llamba_config(cfg):
        raise LoadError(f"not a Llamba config (model_type {cfg.get('model_type')!r})")
    if cfg.get("lm_head_bias"):
        raise LoadError("Llamba with lm_head_bias=true is not supported (a Llama LM head has no bias)")
    ssm = {**SSM_DEFAULTS, **(cfg.get("ssm_cfg") or {})}
    mlp = {**MLP_DEFAULTS, **(cfg.get("mlp_cfg") or {})}
    d_model, n_layer = int(cfg["d_model"]), int(cfg["n_layer"])
    heads = int(ssm["n_v_heads"]) if d_model % int(ssm["n_v_heads"]) == 0 else 1
    out: dict[str, Any] = {
        "vocab_size": padded_vocab(cfg), "hidden_size": d_model, "num_hidden_layers": n_layer,
        "intermediate_size": int(mlp["intermediate_size"]), "hidden_act": mlp["act_fn"], "mlp_bias": bool(mlp["bias"]),
        "rms_norm_eps": float(cfg.get("norm_epsilon", 1e-5)), "tie_word_embeddings": bool(cfg.get("tie_embeddings")),
        "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": d_model // heads,
        "layer_types": ["mamba2"] * n_layer,
        "ssm_cfg": {**ssm, "layer_norm_eps": CARTESIA_BLOCK_NORM_EPS},
        "layer_sources": ["llamba"] * n_layer,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if isinstance(dtype, str):
        out["dtype"] = dtype
    if attention:
        if int(attention.get("hidden_size", d_model)) != d_model:
            raise LoadError(f"attention config has hidden_size {attention['hidden_size']}, the Llamba {d_model}")
        out.update({k: attention[k] for k in ATTENTION_KEYS if attention.get(k) is not None})
    return out


def llamba_key_to_hybrid(name: str) -> str:
    """A Cartesia tensor name -> its HybridForCausalLM name (unknown names are returned unchanged)."""
    for old, new in KEY_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def layer_types_of(model: "nn.Module") -> list[str]:
    """Per decoder layer, "attention" or "mamba2" (by module type); see also ``core.models.llama.layer_types_of``."""
    return llama.layer_types_of(model)


class HybridFormat:
    """The hybrid checkpoint format (``core.models.checkpoint.CheckpointFormat``): a model with any mamba2 layer."""

    config_keys = ("layer_types", "layer_configs", "ssm_cfg")  # written from the model's modules
    modeling_file = Path(__file__).parent / "modeling_hybrid.py"
    modeling_name = "modeling_prunelab_hybrid.py"

    @staticmethod
    def claims(model: "nn.Module") -> bool:
        return "mamba2" in llama.layer_types_of(model)

    @staticmethod
    def config(model: "nn.Module", base_cfg: dict) -> Any:
        """The HybridConfig of a model with Llamba (mamba2) layers: kinds and widths read off its modules."""
        # local: torch/transformers; config validation imports this module (through core.models.ref)
        from core.models.modeling_hybrid import HybridConfig

        types = llama.layer_types_of(model)
        ssm_cfgs = []
        for layer, kind in zip(model.model.layers, types):
            if kind == "mamba2":
                ssm = dict(layer.mixer.ssm_cfg)
                ssm["layer_norm_eps"] = layer.input_layernorm.variance_epsilon
                if ssm not in ssm_cfgs:
                    ssm_cfgs.append(ssm)
        if len(ssm_cfgs) != 1:
            raise ValueError(f"the mamba2 layers differ in their mixer settings ({ssm_cfgs}): one ssm_cfg per "
                             "checkpoint")
        cfg = HybridConfig(layer_types=types, layer_configs=llama.layer_configs(model), ssm_cfg=ssm_cfgs[0],
                           **base_cfg)
        cfg.architectures = ["HybridForCausalLM"]
        cfg.auto_map = {"AutoConfig": "modeling_prunelab_hybrid.HybridConfig",
                        "AutoModelForCausalLM": "modeling_prunelab_hybrid.HybridForCausalLM"}
        return cfg


HYBRID = HybridFormat()


def _weight_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], Path]]:
    """tensor name -> (shape, file), from the safetensors headers (sharded or not); no tensor is read."""
    from safetensors import safe_open  # local: config validation imports this module (core.models.ref)

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = (path / "pytorch_model.bin").exists()
        extra = " (a pickled pytorch_model.bin: convert it to safetensors first)" if pickled else ""
        raise LoadError(f"{path}: no safetensors weights{extra}")
    out = {}
    for f in files:
        if not f.is_file():
            raise LoadError(f"{path}: shard {f.name} named in the index is missing")
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                out[k] = (tuple(fh.get_slice(k).get_shape()), f)
    return out


def check_llamba_weights(path: Path, expected: Mapping[str, tuple[int, ...]]) -> None:
    """LoadError (one line, naming tensors) unless the files hold exactly ``expected`` (hybrid names -> shapes)."""
    found = {llamba_key_to_hybrid(k): (k, shape) for k, (shape, _) in _weight_shapes(path).items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(found[k][0] for k in set(found) - set(expected))
    wrong = sorted(f"{found[k][0]} {list(found[k][1])} != {list(expected[k])}"
                   for k in set(found) & set(expected) if tuple(found[k][1]) != tuple(expected[k]))
    problems = []
    for label, names in (("missing", [_cartesia_name(k) for k in missing]), ("unexpected", unexpected),
                         ("wrong shape", wrong)):
        if names:
            problems.append(f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if problems:
        raise LoadError(f"{path}: the Llamba weights do not match its config.json: " + "; ".join(problems))


def _cartesia_name(hybrid_name: str) -> str:
    for old, new in KEY_PREFIXES:
        if hybrid_name.startswith(new):
            return old + hybrid_name[len(new):]
    return hybrid_name


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_llamba(path: str | Path, dtype: Any = "float32", device: str = "cpu", device_map: Optional[str] = None):
    """``(HybridForCausalLM, tokenizer or None)`` from a Cartesia Llamba dir.

    ``dtype``: "float32" | "float16" | "bfloat16" | "auto" (the checkpoint's) or a torch dtype. Missing,
    unexpected or mis-shaped tensors are a LoadError naming them (Cartesia's names), before any weight is read.
    """
    # local: torch/transformers; config validation imports this module (through core.models.ref)
    import torch
    from transformers import AutoTokenizer

    from core.models.modeling_hybrid import HybridConfig, HybridForCausalLM

    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoadError(f"{path}/config.json is unreadable: {e}") from None
    hcfg = HybridConfig(**hybrid_config_from_llamba(cfg))
    with torch.device("meta"):
        skeleton = HybridForCausalLM(hcfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if hcfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # tied: the embedding serves as LM head, as in Cartesia's model
    check_llamba_weights(path, expected)
    del skeleton

    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, "auto")
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True,
                              "key_mapping": {"^" + old.replace(".", r"\."): new for old, new in KEY_PREFIXES[:3]}}
    if device_map or device != "cpu":
        kwargs["device_map"] = device_map or device
    model, info = HybridForCausalLM.from_pretrained(path, config=hcfg, **kwargs)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:  # the header check above should have caught these
        raise LoadError(f"{path}: Llamba weights did not load cleanly: {problems}")
    model.eval()
    tok = AutoTokenizer.from_pretrained(path) if _has_tokenizer(path) else None
    return model, tok
