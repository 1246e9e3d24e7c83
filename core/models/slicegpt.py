"""SliceGPT's own saved outputs, read without its package and without unpickling anything (and written back).

SliceGPT (github.com/microsoft/TransformerCompression) ``experiments/run_slicegpt.py --save-dir D`` writes:

    D/<model>_<sparsity>.pt     torch.save(model.state_dict()) of the fused, rotated and sliced model
    D/<model>_<sparsity>.json   SlicingConfig.to_json_string(): {"hidden_size", "layers_num", "do_slice_head",
                                "parallel_blocks", "embedding_dimensions": {"0": d}, "attention_input_dimensions":
                                {"<layer>": d}, "attention_output_dimensions", "mlp_input_dimensions",
                                "mlp_output_dimensions", "head_dimension", "const_dimension"}
    D/*.json, tokenizer files   the base model's config and tokenizer, copied only when it was a local --model-path

and reads them back only with its package (``hf_utils.load_sliced_model``: build the base model, replace its
layers, fuse, slice, load the state dict). With its Llama adapter the state dict holds (``layernorm_fusion``,
``rotate.rotate_and_slice_sequential``): ``model.embed_tokens.weight [vocab, d0]``; per layer the stock
projections with sliced hidden sides, ``model.layers.N.attn_shortcut_Q [d_in, d_attn]`` and
``model.layers.N.mlp_shortcut_Q [d_attn, d_out]``; ``lm_head.weight [vocab, head]`` (norm scale fused); no norm
weights (SliceGPT's weightless RMSN, eps 1e-5, dividing by the original hidden size). That is exactly
``core.models.modeling_sliced``'s layout, so :func:`load_slicegpt` builds a ``SlicedLlamaForCausalLM`` and loads
the state dict as it is: the widths are read off the tensors, checked against the JSON and the base model's
config (``config.json`` beside the file, or the base model given), and any mismatch is one LoadError line
naming the tensor, its shape and the dimension it contradicts. The result saves as a prunelab checkpoint
(``task=convert``) that plain transformers loads.

:data:`SLICED` is that checkpoint format (``core.models.checkpoint`` writes with it): a model whose config has
``slicing`` (per-layer hidden widths, set by ``pruning.slicegpt`` or :func:`load_slicegpt`) is written with
model_type prunelab_sliced_llama, ``slicing``, no norm weights (fused), SliceGPT's
``model.layers.N.{attn,mlp}_shortcut_Q`` matrices and an auto_map to ``modeling_prunelab_sliced.py`` (a copy of
core/models/modeling_sliced.py).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import init_empty_weights
from transformers import AutoTokenizer

from core.models.legacy import detect_format, load_legacy
from core.models.llama import head_dim, is_uniform
from core.models.modeling_sliced import LAYER_KEYS, SlicedLlamaConfig, SlicedLlamaForCausalLM
from core.run.errors import LoadError

log = logging.getLogger(__name__)

RMSN_EPS = 1e-5  # SliceGPT's RMSN fixes its epsilon (slicegpt/modules.py)
SLICING_FIELDS = ("hidden_size", "layers_num", "do_slice_head", "parallel_blocks", "embedding_dimensions",
                  "attention_input_dimensions", "attention_output_dimensions", "mlp_input_dimensions",
                  "mlp_output_dimensions", "head_dimension", "const_dimension")
LLAMA_TYPES = ("llama",)  # SliceGPT's LlamaModelAdapter (Llama 2/3; SmolLM2 is a Llama too)
SUPPORTED = "SliceGPT's Llama layout (its LlamaModelAdapter: Llama 2, Llama 3, Llama-style models such as SmolLM2)"


@dataclass
class SliceGPTFiles:
    """Where one SliceGPT output lives; ``sparsity`` comes from its ``<model>_<sparsity>`` name when it has one."""

    weights: Path
    slicing_config: Optional[Path]  # <model>_<sparsity>.json
    base_config: Optional[Path]  # config.json copied beside it by run_slicegpt (local --model-path only)
    sparsity: Optional[float]

    @staticmethod
    def of(path: str | Path) -> "SliceGPTFiles":
        """The files of the SliceGPT output at ``path`` (its ``.pt`` or the folder holding it)."""
        fmt = detect_format(path)
        if fmt.kind != "slicegpt" or fmt.weights_path is None:
            raise LoadError(f"{path} is not a SliceGPT output (a .pt state dict with *_shortcut_Q matrices): "
                            f"{fmt.kind}, {fmt.reason}")
        wp = fmt.weights_path
        m = re.search(r"_(\d+(?:\.\d*)?(?:e-?\d+)?)$", wp.stem)
        base = wp.parent / "config.json"
        return SliceGPTFiles(wp, fmt.config_path, base if base.is_file() else None,
                             float(m.group(1)) if m else None)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return data


def read_slicing_config(path: Path) -> dict:
    """SliceGPT's SlicingConfig JSON as a dict with int layer keys (``SlicingConfig.from_dict``)."""
    data = _read_json(path)
    unknown = sorted(set(data) - set(SLICING_FIELDS))
    if unknown or "hidden_size" not in data:
        raise LoadError(f"{path} is not SliceGPT's slicing config (SlicingConfig.to_json_string): "
                        f"{'unknown keys ' + ', '.join(unknown) if unknown else 'no hidden_size'}")
    for key in SLICING_FIELDS:
        if key.endswith("_dimensions"):
            try:
                data[key] = {int(k): int(v) for k, v in (data.get(key) or {}).items()}
            except (TypeError, ValueError, AttributeError):
                raise LoadError(f"{path}: {key} must map layer numbers to widths, got {data.get(key)!r}") from None
    return data


def _shape(sd: dict, key: str, where: Path) -> tuple[int, ...]:
    if key not in sd:
        raise LoadError(f"{where.name}: {key} is missing (expected in {SUPPORTED})")
    return tuple(sd[key].shape)


def slicing_of(sd: dict, depth: int, where: Path) -> tuple[dict, list[str]]:
    """``config.slicing`` (``core.models.modeling_sliced``) read off the tensor shapes, and the shortcuts added:
    an absent one (a layer SliceGPT never rotated: its CompressedLlamaDecoderLayer adds the plain residual)
    becomes an identity in ``sd``, which requires equal widths."""
    d0 = _shape(sd, "model.embed_tokens.weight", where)[1]
    layers, added = [], []
    for i in range(depth):
        p = f"model.layers.{i}."
        d_in = _shape(sd, p + "self_attn.q_proj.weight", where)[1]
        d_attn = _shape(sd, p + "self_attn.o_proj.weight", where)[0]
        d_out = _shape(sd, p + "mlp.down_proj.weight", where)[0]
        for key, dims in (("attn_shortcut_Q", (d_in, d_attn)), ("mlp_shortcut_Q", (d_attn, d_out))):
            if p + key not in sd:
                if dims[0] != dims[1]:
                    raise LoadError(f"{where.name}: {p + key} is missing although layer {i} changes width "
                                    f"{dims[0]} -> {dims[1]} there")
                sd[p + key] = torch.eye(dims[0], dtype=sd[p + "self_attn.o_proj.weight"].dtype)
                added.append(p + key)
        expect = {"self_attn.k_proj.weight": (1, d_in), "self_attn.v_proj.weight": (1, d_in),
                  "attn_shortcut_Q": (None, (d_in, d_attn)), "mlp.gate_proj.weight": (1, d_attn),
                  "mlp.up_proj.weight": (1, d_attn), "mlp_shortcut_Q": (None, (d_attn, d_out))}
        for key, (dim, want) in expect.items():
            shape = _shape(sd, p + key, where)
            ok = shape == want if dim is None else len(shape) == 2 and shape[dim] == want
            if not ok:
                raise LoadError(f"{where.name}: {p + key} has shape {list(shape)}, but the stream around it is "
                                f"{d_in} wide into layer {i}, {d_attn} after its attention, {d_out} after its MLP")
        layers.append({"attention_input": d_in, "attention_output": d_attn, "mlp_output": d_out})
    head = _shape(sd, "lm_head.weight", where)[1]
    return {"embedding_dimension": d0, "lm_head_dimension": head, "layers": layers}, added


def check_slicing_config(sd: dict, conf: dict, files: SliceGPTFiles) -> None:
    """LoadError naming the first tensor whose width the SlicingConfig JSON contradicts (``sd``: with both
    shortcuts of every layer, as :func:`slicing_of` leaves it)."""
    name = files.slicing_config.name if files.slicing_config else "the slicing config"
    if conf.get("parallel_blocks"):
        raise LoadError(f"{name}: parallel_blocks=true (Phi-2's layout, one shortcut per layer): prunelab reads "
                        f"{SUPPORTED}")
    n = len({int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
    if conf.get("layers_num") and int(conf["layers_num"]) != n:
        raise LoadError(f"{files.weights.name} has {n} layers but {name} gives layers_num={conf['layers_num']}")
    const = conf.get("const_dimension")
    last = int(conf.get("head_dimension") or conf["hidden_size"]) if const is not None else None

    def want(field: str, i: int) -> Optional[int]:
        table = conf.get(field) or {}
        if i in table:
            return table[i]
        if const is not None and not table:  # a config saved with a constant width only (SliceGPT's fallback)
            return last if field == "mlp_output_dimensions" and i == n - 1 else int(const)
        return None

    checks: list[tuple[str, tuple, str, Optional[int]]] = [
        ("model.embed_tokens.weight", (1,), "embedding_dimensions[0]", want("embedding_dimensions", 0)),
        ("lm_head.weight", (1,), "head_dimension", conf.get("head_dimension"))]
    for i in range(n):
        p = f"model.layers.{i}."
        checks += [(p + "attn_shortcut_Q", (0,), f"attention_input_dimensions[{i}]",
                    want("attention_input_dimensions", i)),
                   (p + "attn_shortcut_Q", (1,), f"attention_output_dimensions[{i}]",
                    want("attention_output_dimensions", i)),
                   (p + "mlp_shortcut_Q", (0,), f"mlp_input_dimensions[{i}]", want("mlp_input_dimensions", i)),
                   (p + "mlp_shortcut_Q", (1,), f"mlp_output_dimensions[{i}]", want("mlp_output_dimensions", i))]
    for key, (dim,), field, value in checks:
        if value is not None and sd[key].shape[dim] != int(value):
            raise LoadError(f"{files.weights.name}: {key} has shape {list(sd[key].shape)} but {name} gives "
                            f"{field}={value}")


def check_base_config(sd: dict, base: dict, files: SliceGPTFiles, base_name: str) -> None:
    """LoadError unless the state dict is a sliced version of the base config's model (family, depth, widths)."""
    family = base.get("model_type")
    if family not in LLAMA_TYPES:
        raise LoadError(f"{files.weights.name}: the base model is a {family!r} model ({base_name}); prunelab reads "
                        f"{SUPPORTED}")
    try:
        hd, heads, kv = head_dim(base), int(base["num_attention_heads"]), int(
            base.get("num_key_value_heads") or base["num_attention_heads"])
        vocab, inter, depth = int(base["vocab_size"]), int(base["intermediate_size"]), int(base["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{base_name} lacks {e} for a Llama config") from None
    n = len({int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
    if n != depth:
        raise LoadError(f"{files.weights.name} has {n} layers but {base_name} gives num_hidden_layers={depth}")
    rows = {"model.embed_tokens.weight": (vocab, "vocab_size"), "lm_head.weight": (vocab, "vocab_size")}
    for i in range(depth):
        p = f"model.layers.{i}."
        rows.update({p + "self_attn.q_proj.weight": (heads * hd, "num_attention_heads x head_dim"),
                     p + "self_attn.k_proj.weight": (kv * hd, "num_key_value_heads x head_dim"),
                     p + "self_attn.v_proj.weight": (kv * hd, "num_key_value_heads x head_dim"),
                     p + "mlp.gate_proj.weight": (inter, "intermediate_size"),
                     p + "mlp.up_proj.weight": (inter, "intermediate_size")})
    for key, (want, field) in rows.items():
        if key in sd and sd[key].shape[0] != want:
            raise LoadError(f"{files.weights.name}: {key} has shape {list(sd[key].shape)} but {base_name} gives "
                            f"{field} = {want} rows")


def _check_family(sd: dict, files: SliceGPTFiles) -> None:
    """LoadError for a SliceGPT output of another adapter (OPT: model.decoder.layers, Phi: mlp.fc1 / dense)."""
    if "model.layers.0.self_attn.q_proj.weight" not in sd or "model.embed_tokens.weight" not in sd:
        sample = next((k for k in sd if "layers." in k and "shortcut" not in k), next(iter(sd), "?"))
        raise LoadError(f"{files.weights.name}: not a Llama-layout SliceGPT output (e.g. {sample}); prunelab reads "
                        f"{SUPPORTED}")


def load_slicegpt(path: str | Path, *, base_config: Optional[dict] = None, base_name: str = "the base config",
                  tokenizer: Any = None, dtype: Any = None, device: str = "cpu") -> tuple[Any, Any, dict]:
    """``(SlicedLlamaForCausalLM, tokenizer, info)`` from SliceGPT's saved output at ``path``.

    ``base_config``: the base model's ``config.json`` dict (default: the one SliceGPT copied beside the file);
    ``tokenizer``: default, the one beside the file, if any. ``dtype``: a torch dtype, or None / "auto" for the
    file's own. ``info``: the source files, sparsity and slicing, for ``checkpoint_info.json``.
    """
    files = SliceGPTFiles.of(path)
    if base_config is None:
        if files.base_config is None:
            raise LoadError(f"{files.weights}: SliceGPT saved no config.json beside it (it copies one only for a "
                            "local --model-path); give the base model: python run.py task=convert "
                            f"model={files.weights} base=<base model name or path>")
        base_config, base_name = _read_json(files.base_config), str(files.base_config)
    sd = load_legacy(files.weights).state_dict or {}  # tensors only: torch's weights-only unpickler
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer of older transformers
    _check_family(sd, files)
    check_base_config(sd, base_config, files, base_name)
    slicing, added = slicing_of(sd, int(base_config["num_hidden_layers"]), files.weights)
    conf = read_slicing_config(files.slicing_config) if files.slicing_config else None
    if conf is not None:
        if int(conf["hidden_size"]) != int(base_config["hidden_size"]):
            raise LoadError(f"{files.slicing_config.name} gives hidden_size={conf['hidden_size']} but {base_name} "
                            f"gives {base_config['hidden_size']}: not the base model of this file")
        check_slicing_config(sd, conf, files)
    hidden = int(base_config["hidden_size"])
    too_wide = [f"{k}={lc[k]}" for lc in slicing["layers"] for k in LAYER_KEYS if lc[k] > hidden]
    if too_wide or max(slicing["embedding_dimension"], slicing["lm_head_dimension"]) > hidden:
        raise LoadError(f"{files.weights.name}: widths above {base_name}'s hidden_size {hidden} "
                        f"({', '.join(too_wide[:3]) or 'embedding / head'}): not a slice of this base model")
    fields = {k: v for k, v in base_config.items()
              if k not in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path",
                           "quantization_config", "slicing", "layer_configs")}
    fields["rms_norm_eps"] = RMSN_EPS  # SliceGPT's RMSN, whatever the base model used
    cfg = SlicedLlamaConfig(slicing=slicing, **fields)
    cfg.architectures = ["SlicedLlamaForCausalLM"]
    with init_empty_weights(include_buffers=False):  # no random weights: the state dict is assigned below
        model = SlicedLlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise LoadError(f"{files.weights.name} does not match {SUPPORTED}: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    if dtype not in (None, "auto"):
        model = model.to(dtype)
    model = model.to(device).eval()
    if tokenizer is None and any(files.weights.parent.glob("tokenizer*")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(files.weights.parent)
        except Exception as e:  # noqa: BLE001 - a model without a tokenizer still loads (analysis)
            log.warning("tokenizer beside %s unreadable: %s", files.weights, e)
    info = {"weights": str(files.weights), "slicing_config": str(files.slicing_config) if files.slicing_config
            else None, "base_config": base_name, "sparsity": files.sparsity, "slicing": slicing,
            "hidden_size": hidden, "identity_shortcuts_added": added}
    return model, tokenizer, info


def _bundle_meta(folder: Path) -> tuple[dict, Optional[str], Optional[str]]:
    """(plain entries, file name, why not read) of the seed's converted bundle beside SliceGPT's files
    (``convert_slicegpt_model.py``'s dill ``pruned_model.bin``: ``{'model', 'tokenizer', 'method', 'pruning_ratio',
    'actual_ratio', 'config': {'sparsity', 'round_interval', ...}}``), read by the restricted reader: nothing in it
    runs. A bundle in torch's old (non-zip) format would be read whole, so it is left unread."""
    import zipfile

    from core.models.legacy import BUNDLE_NAMES, read_restricted

    for name in BUNDLE_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if not zipfile.is_zipfile(path):
            return {}, name, "not torch's zip format: it would be read whole, so it was left unread"
        try:
            return read_restricted(path).meta, name, None
        except LoadError as e:
            return {}, name, f"unreadable without running code ({str(e)[:120]})"
    return {}, None, None


def seed_fields(info: dict) -> dict:
    """The fields the seed's ``convert_slicegpt_model.py`` wrote beside a SliceGPT model (``pruning_ratio``,
    ``actual_ratio``, ``config.round_interval``), derived from the files for ``checkpoint_info.json`` and the run
    record, each with where it came from in ``seed_fields_source`` (or why it is null).

    ``info``: :func:`load_slicegpt`'s (``weights``, ``sparsity`` from the file name, ``slicing`` as read off the
    tensors, the base's ``hidden_size``). ``pruning_ratio``: the sparsity asked of SliceGPT (its file name
    ``<model>_<sparsity>.pt``, else the seed's bundle beside it). ``actual_ratio``: what the slicing achieved,
    ``1 - width / hidden_size`` (the "sparsity" SliceGPT itself logs after rounding; the last layer's output, which
    feeds the unsliced LM head, is not a sliced width). ``round_interval``: stated by the seed's bundle when there is
    one; otherwise inferred from SliceGPT's rounding, ``width = t - t % round_interval`` with
    ``t = int((1 - sparsity) * hidden)``, when exactly one power of two gives the saved width (run_slicegpt.py's
    default is 8; other intervals that fit are listed); null, with the reason, when several fit (no rounding
    happened, or a small width) or nothing can be compared."""
    hidden = int(info["hidden_size"])
    slicing = info["slicing"]
    weights = Path(str(info["weights"]))
    meta, bundle, unread = _bundle_meta(weights.parent)
    stated = {**(meta.get("config") if isinstance(meta.get("config"), dict) else {}), **meta}
    source: dict[str, str] = {}

    requested = info.get("sparsity")
    if requested is not None:
        ratio = float(requested)
        source["pruning_ratio"] = f"the file name {weights.name} (run_slicegpt.py's <model>_<sparsity>.pt)"
        other = stated.get("pruning_ratio", stated.get("sparsity"))
        if isinstance(other, (int, float)) and float(other) != ratio:
            source["pruning_ratio"] += f"; {bundle} states {other}"
    elif isinstance(stated.get("pruning_ratio", stated.get("sparsity")), (int, float)):
        ratio = float(stated.get("pruning_ratio", stated.get("sparsity")))
        source["pruning_ratio"] = f"stated by {bundle}"
    else:
        ratio = None
        source["pruning_ratio"] = (f"null: neither the file name {weights.name} (no _<sparsity> suffix) nor a bundle "
                                   "beside it states the sparsity asked of SliceGPT"
                                   + (f" ({bundle}: {unread})" if unread else ""))

    widths = [int(slicing["embedding_dimension"])] + [int(lc[k]) for lc in slicing["layers"] for k in LAYER_KEYS]
    widths = widths[:-1]  # the last layer's output feeds the LM head, which SliceGPT leaves whole by default
    width = widths[0] if len(set(widths)) == 1 else None
    if width is not None:
        actual = 1.0 - width / hidden
        source["actual_ratio"] = f"1 - {width} / {hidden}: the sliced hidden width over the base's"
    else:
        actual = 1.0 - sum(widths) / len(widths) / hidden
        source["actual_ratio"] = (f"1 - the mean of the {len(widths)} hidden widths ({min(widths)}..{max(widths)}) "
                                  f"/ {hidden}: the widths vary by layer")

    interval: Optional[int] = None
    told = stated.get("round_interval")
    if isinstance(told, int) and not isinstance(told, bool) and told > 0:
        interval = told
        source["round_interval"] = f"stated by {bundle} (config.round_interval)"
        if width is not None and ratio is not None:
            target = int((1 - ratio) * hidden)
            if target - target % told != width:
                source["round_interval"] += (f"; but rounding int((1 - {ratio}) * {hidden}) = {target} to a multiple "
                                             f"of {told} gives {target - target % told}, not the saved {width}")
    elif ratio is None:
        source["round_interval"] = "null: without the sparsity asked, the saved width shows no rounding"
    elif width is None:
        source["round_interval"] = ("null: the widths vary by layer, not SliceGPT's constant slicing "
                                    "(run_slicegpt.py rounds one width)")
    else:
        target = int((1 - ratio) * hidden)
        fits = [r for r in range(1, target + 1) if target - target % r == width]
        powers = [r for r in fits if r & (r - 1) == 0]
        shown = ", ".join(map(str, fits[:6])) + (", ..." if len(fits) > 6 else "")
        rounding = f"int((1 - {ratio}) * {hidden}) = {target} rounded down to the saved width {width}"
        if not fits:
            source["round_interval"] = f"null: no interval gives {rounding}"
        elif len(powers) == 1:
            interval = powers[0]
            others = [r for r in fits if r != interval]
            source["round_interval"] = (f"inferred: the one power of two that gives {rounding}"
                                        + (f" (other intervals that fit: {', '.join(map(str, others[:5]))}"
                                           f"{', ...' if len(others) > 5 else ''})" if others else ""))
        else:
            source["round_interval"] = (f"null: several intervals give {rounding} ({shown}), "
                                        + ("no rounding was needed" if width == target else "none of them is singled "
                                           "out by the widths"))
    if unread and "stated by" not in source["round_interval"]:
        source["round_interval"] += f" ({bundle} beside it: {unread})"
    return {"pruning_ratio": ratio, "actual_ratio": actual, "round_interval": interval,
            "seed_fields_source": source}


def save_slicegpt(model: Any, out_dir: str | Path, model_name: str, sparsity: float) -> Path:
    """Write a sliced model (``config.slicing``) as run_slicegpt.py --save-dir does, for SliceGPT's own tools
    (``--sliced-model-path``): ``<model_name>_<sparsity>.pt`` (the state dict, SliceGPT's key names),
    ``<model_name>_<sparsity>.json`` (SlicingConfig.to_json_string) and the base ``config.json``. Returns the .pt.

    SliceGPT's loader uses RMSN's fixed eps 1e-5, whatever ``config.rms_norm_eps`` says.
    """
    slicing = model.config.slicing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hidden, layers = model.config.hidden_size, slicing["layers"]
    conf = {"hidden_size": hidden, "layers_num": len(layers),
            "do_slice_head": slicing["lm_head_dimension"] != hidden, "parallel_blocks": False,
            "embedding_dimensions": {0: slicing["embedding_dimension"]},
            "attention_input_dimensions": {i: lc["attention_input"] for i, lc in enumerate(layers)},
            "attention_output_dimensions": {i: lc["attention_output"] for i, lc in enumerate(layers)},
            "mlp_input_dimensions": {i: lc["attention_output"] for i, lc in enumerate(layers)},
            "mlp_output_dimensions": {i: lc["mlp_output"] for i, lc in enumerate(layers)},
            "head_dimension": slicing["lm_head_dimension"], "const_dimension": None}
    weights = out / f"{model_name}_{sparsity}.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights)
    (out / f"{model_name}_{sparsity}.json").write_text(json.dumps(conf))
    base = {k: v for k, v in model.config.to_dict().items() if k not in ("slicing", "auto_map", "architectures")}
    base.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (out / "config.json").write_text(json.dumps(base, indent=2))
    return weights


class SlicedFormat:
    """The sliced checkpoint format (``core.models.checkpoint.CheckpointFormat``): a model with ``config.slicing``."""

    config_keys = ("slicing",)  # per-layer hidden widths, taken from model.config
    modeling_file = Path(__file__).parent / "modeling_sliced.py"
    modeling_name = "modeling_prunelab_sliced.py"

    @staticmethod
    def claims(model: Any) -> bool:
        return getattr(model.config, "slicing", None) is not None

    @staticmethod
    def config(model: Any, base_cfg: dict) -> Any:
        """The SlicedLlamaConfig of a SliceGPT-sliced model (hidden widths per layer in ``config.slicing``)."""
        if not is_uniform(model):
            raise ValueError("a sliced model with per-layer head or MLP widths has no checkpoint format (slice the "
                             "dense model, or prune heads / channels before slicing is not supported)")
        cfg = SlicedLlamaConfig(slicing=model.config.slicing, **base_cfg)
        cfg.architectures = ["SlicedLlamaForCausalLM"]
        cfg.auto_map = {"AutoConfig": "modeling_prunelab_sliced.SlicedLlamaConfig",
                        "AutoModelForCausalLM": "modeling_prunelab_sliced.SlicedLlamaForCausalLM"}
        return cfg


SLICED = SlicedFormat()
