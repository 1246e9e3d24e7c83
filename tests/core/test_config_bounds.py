"""Every size read from a config.json or GGUF metadata is bounds-checked before anything is built: one LoadError line
naming the file and the field (core/models/ref.py: check_config_sizes, check_layers_exist, gguf_sizes)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.models.ref import ModelRef, model_config, model_depth, tiny_config
from core.run.errors import LoadError

GOOD = {**tiny_config(num_layers=2), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def _dir(tmp_path: Path, cfg: dict, name: str = "m") -> Path:
    path = tmp_path / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _refused(path: Path, *words: str, file: str = "config.json") -> str:
    """model_config refuses the dir in one line naming ``file`` and ``words``; so does load_model."""
    from core.models.load import load_model

    t0 = time.perf_counter()
    with pytest.raises(LoadError) as e:
        model_config(ModelRef.at(path), tmp_cache(path))
    assert time.perf_counter() - t0 < 2, "refused at once"
    msg = str(e.value)
    assert "\n" not in msg and str(path / file) in msg, msg
    for w in words:
        assert w in msg, msg
    with pytest.raises(LoadError) as e2:
        load_model(ModelRef.at(path), cache_dir=tmp_cache(path))
    assert str(e2.value) == msg
    return msg


def tmp_cache(path: Path) -> Path:
    return path.parent / "cache"


@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", 0, "hidden_size=0 must be at least 1"),
    ("num_hidden_layers", 10 ** 9, "num_hidden_layers=1,000,000,000 is absurd"),
    ("hidden_size", 10 ** 7, "hidden_size=10,000,000 is absurd"),
    ("intermediate_size", -4, "intermediate_size=-4 must be at least 1"),
    ("num_attention_heads", 0, "num_attention_heads=0 must be at least 1"),
    ("num_key_value_heads", 0, "num_key_value_heads=0"),
    ("vocab_size", "32000", "vocab_size='32000' is not a positive integer"),
    ("num_hidden_layers", 2.0, "num_hidden_layers=2.0 is not a positive integer"),
    ("hidden_size", True, "hidden_size=True is not a positive integer"),
    ("max_position_embeddings", 0, "max_position_embeddings=0"),
])
def test_a_bad_size_is_refused_naming_the_field(tmp_path, field, value, words):
    _refused(_dir(tmp_path, {**GOOD, field: value}), words)


def test_a_missing_size_is_named(tmp_path):
    cfg = dict(GOOD)
    del cfg["vocab_size"]
    _refused(_dir(tmp_path, cfg), "has no vocab_size")


def test_heads_must_divide_the_width_unless_head_dim_is_given(tmp_path):
    bad = {**GOOD, "num_attention_heads": 7, "num_key_value_heads": 7}
    del bad["head_dim"]
    _refused(_dir(tmp_path, bad), "num_attention_heads=7 does not divide hidden_size=64")
    ok = _dir(tmp_path, {**bad, "head_dim": 16}, "with_head_dim")
    assert model_config(ModelRef.at(ok), tmp_path)["num_attention_heads"] == 7


def test_kv_heads_must_divide_the_heads(tmp_path):
    _refused(_dir(tmp_path, {**GOOD, "num_key_value_heads": 3}), "num_key_value_heads=3 does not divide "
                                                                   "num_attention_heads=8")


def test_the_parameter_total_is_bounded(tmp_path):
    huge = {**GOOD, "num_hidden_layers": 4096, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
            "num_attention_heads": 512, "num_key_value_heads": 512, "head_dim": 128}
    _refused(_dir(tmp_path, huge), "parameters (more than 10,000,000,000,000)")


@pytest.mark.parametrize("layer_configs,words", [
    ([{"intermediate_size": 128}], "layer_configs must list one entry per layer (num_hidden_layers=2), got 1"),
    ([{}, {"intermediate_size": -1}], "layer_configs[1].intermediate_size=-1 must be >= 0"),
    ([{"num_attention_heads": 8, "num_key_value_heads": 3}, {}], "layer_configs[0].num_key_value_heads=3 does not"),
    ([{"num_attention_heads": 10 ** 9}, {}], "layer_configs[0].num_attention_heads=1,000,000,000 is absurd"),
    ([{}, "wide"], "layer_configs[1] is not an object"),
])
def test_per_layer_configs_are_checked_the_same_way(tmp_path, layer_configs, words):
    cfg = {**GOOD, "model_type": "prunelab_llama", "layer_configs": layer_configs}
    _refused(_dir(tmp_path, cfg), words)


def test_a_removed_block_keeps_zero_widths(tmp_path):
    """Heads 0 (a removed attention or a mamba2 layer) and MLP width 0 (a removed MLP) are real pruned layers."""
    lcs = [{"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 0},
           {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}]
    ok = _dir(tmp_path, {**GOOD, "model_type": "prunelab_llama", "layer_configs": lcs})
    assert model_config(ModelRef.at(ok), tmp_path)["layer_configs"] == lcs


@pytest.mark.parametrize("change,words", [
    ({"d_model": 0}, "d_model=0 must be at least 1"),
    ({"n_layer": 10 ** 9}, "n_layer=1,000,000,000 is absurd"),
    ({"ssm_cfg": {"n_v_heads": 0}}, "ssm_cfg.n_v_heads=0 must be at least 1"),  # was a ZeroDivisionError
    ({"ssm_cfg": {"n_v_heads": 4, "n_qk_heads": 3}}, "ssm_cfg.n_qk_heads=3 does not divide ssm_cfg.n_v_heads=4"),
    ({"ssm_cfg": {"n_v_heads": 5}}, "ssm_cfg.n_v_heads=5 does not divide expand x d_model = 32"),
    ({"mlp_cfg": {"intermediate_size": 0}}, "mlp_cfg.intermediate_size=0"),
])
def test_a_llamba_config_is_checked_in_its_own_fields(tmp_path, change, words):
    from llamba_helpers import TINY_LLAMBA

    cfg = {**TINY_LLAMBA, **change}
    if "ssm_cfg" in change:
        cfg["ssm_cfg"] = {**TINY_LLAMBA["ssm_cfg"], **change["ssm_cfg"]}
    _refused(_dir(tmp_path, cfg), words)


def _tiny_checkpoint(path: Path, layers: int = 2) -> Path:
    from core.models.load import build_tiny

    model, tok = build_tiny(num_layers=layers)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_more_layers_than_tensors_is_refused(tmp_path):
    path = _tiny_checkpoint(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    assert model_depth(ModelRef.at(path), tmp_path) == 2
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 40}))
    _refused(path, "num_hidden_layers=40 but model.safetensors holds tensors for 2 layer(s)")


def test_more_layers_than_a_sharded_index_names_is_refused(tmp_path):
    path = _tiny_checkpoint(tmp_path / "m")
    from analysis.structure import read_safetensors_header

    names = list(read_safetensors_header(path / "model.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(
        names, "model.safetensors")}))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    _refused(path, "model.safetensors.index.json holds tensors for 2 layer(s)")


def test_a_corrupt_safetensors_header_is_one_line(tmp_path):
    path = _dir(tmp_path, GOOD)
    (path / "model.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    _refused(path, "corrupt safetensors file", file="model.safetensors")


def test_analysis_refuses_an_absurd_config_at_once(tmp_path):
    """task=analyze (structure_for_ref) reads the same checks before walking any header."""
    from recipes._common import structure_for_ref

    path = _dir(tmp_path, {**GOOD, "num_hidden_layers": 10 ** 9})
    t0 = time.perf_counter()
    with pytest.raises(LoadError, match="num_hidden_layers=1,000,000,000 is absurd"):
        structure_for_ref(ModelRef.at(path), cache_dir=str(tmp_path / "cache"))
    assert time.perf_counter() - t0 < 2


def _gguf(tmp_path: Path, **sizes) -> Path:
    import gguf

    path = tmp_path / "probe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(sizes.get("block_count", 2))
    w.add_embedding_length(sizes.get("embedding_length", 64))
    w.add_feed_forward_length(sizes.get("feed_forward_length", 128))
    w.add_head_count(sizes.get("head_count", 8))
    w.add_head_count_kv(sizes.get("head_count_kv", 2))
    w.add_context_length(2048)
    w.add_token_list([bytes([i]).hex() for i in range(16)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@pytest.mark.parametrize("sizes,words", [
    ({"block_count": 10 ** 9}, "llama.block_count=1,000,000,000 is absurd"),
    ({"head_count": 0}, "llama.attention.head_count=0 must be at least 1"),  # would divide by zero in conversion
    ({"head_count": 8, "head_count_kv": 3}, "llama.attention.head_count_kv=3 does not divide"),
    ({"embedding_length": 60}, "llama.attention.head_count=8 does not divide llama.embedding_length=60"),
])
def test_gguf_metadata_is_checked_before_conversion(tmp_path, monkeypatch, sizes, words):
    import core.models.load as load
    import core.models.ref as ref

    path = _gguf(tmp_path, **sizes)
    ref_ = ModelRef(name="probe", kind="gguf", gguf_package="nope", gguf_file=path.name)
    monkeypatch.setattr(ref, "gguf_path", lambda package, name: path)
    monkeypatch.setattr(load, "gguf_path", lambda package, name: path)
    with pytest.raises(LoadError, match=words.replace("(", r"\(")) as e:
        model_depth(ref_, tmp_path / "cache")
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LoadError, match="probe.gguf"):
        load.load_model(ref_, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / "probe").exists()


def test_a_sound_gguf_gives_its_depth(tmp_path, monkeypatch):
    import core.models.ref as ref

    path = _gguf(tmp_path, block_count=3)
    monkeypatch.setattr(ref, "gguf_path", lambda package, name: path)
    assert model_depth(ModelRef(name="probe", kind="gguf", gguf_package="x", gguf_file="probe.gguf"), tmp_path) == 3
