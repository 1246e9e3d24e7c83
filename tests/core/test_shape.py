"""Shape models (core/models/shape.py): the real geometry's exact parameter counts from the config alone, depth
checks at validation, and (integration) real-width weights built once, cached, loaded and run."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import CACHE_DIR, ROOT
from core.models import shape
from core.models.llama import Geometry, params_from_config
from core.models.ref import ModelRef, _as_llama_fields, model_config, model_depth
from core.run.errors import ConfigError, LoadError

LLAMA3_8B_PARAMS = 8_030_261_248  # Meta-Llama-3-8B-Instruct, as published (model card / safetensors index)
LLAMA31_70B_PARAMS = 70_553_706_496  # Llama-3.1-70B


def _params(name: str, num_layers=None) -> int:
    return params_from_config(_as_llama_fields(shape.shape_config(name, num_layers)))


def test_llama3_8b_has_the_exact_parameter_count():
    cfg = shape.shape_config("llama3_8b")
    assert _params("llama3_8b") == LLAMA3_8B_PARAMS
    per_layer = _params("llama3_8b", 2) - _params("llama3_8b", 1)
    assert per_layer == 218_112_000
    assert cfg["vocab_size"] * cfg["hidden_size"] == 525_336_576  # the embedding, and again the untied head
    assert LLAMA3_8B_PARAMS == 32 * per_layer + 2 * 525_336_576 + 4096  # + the final norm
    g = Geometry.from_config(cfg)
    assert (g.hidden, g.head_dim, g.heads[0], g.kv_heads[0], g.widths[0], g.depth) == (4096, 128, 32, 8, 14336, 32)
    assert (cfg["rope_theta"], cfg["rope_scaling"], cfg["max_position_embeddings"]) == (500000.0, None, 8192)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["tie_word_embeddings"]) == (128000, 128009, False)


def test_llama3_70b_has_the_exact_parameter_count():
    cfg = shape.shape_config("llama3_70b")
    assert _params("llama3_70b") == LLAMA31_70B_PARAMS
    g = Geometry.from_config(cfg)
    assert (g.hidden, g.head_dim, g.heads[0], g.kv_heads[0], g.widths[0], g.depth) == (8192, 128, 64, 8, 28672, 80)
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg["max_position_embeddings"] == 131072 and not cfg["tie_word_embeddings"]


def test_llamba_8b_parameter_count_follows_from_its_mixer_sizes():
    """Llamba-8B (LlambaConfig's defaults, cartesia-ai/edge; the same ssm_cfg as cartesia-ai/Llamba-3B's config.json):
    per layer a DiscreteMamba2 mixer (d_model 4096, expand 1, 32 value / 32 qk heads, d_state 64, d_conv 4,
    conv bias) and Llama-3-8B's MLP, untied head."""
    cfg = shape.shape_config("llamba_8b")
    assert (cfg["d_model"], cfg["n_layer"], cfg["vocab_size"], cfg["tie_embeddings"]) == (4096, 32, 128256, False)
    d, inner, qk, heads = 4096, 4096, 32 * 64, 32
    conv_dim = inner + 2 * qk
    mixer = d * (conv_dim + inner + heads) + inner + conv_dim * 4 + conv_dim + heads + inner * d
    assert mixer == 67_285_024
    layer = mixer + 3 * 4096 * 14336 + 2 * 4096
    expected = 32 * layer + 2 * 128256 * 4096 + 4096
    assert expected == 8_841_204_736 == _params("llamba_8b")
    # the tensor list written to disk has exactly these parameters
    assert sum(_numel(s) for _, s in shape.tensor_specs(cfg)) == expected


def _numel(shape_: tuple) -> int:
    n = 1
    for d in shape_:
        n *= d
    return n


@pytest.mark.parametrize("name", sorted(shape.SHAPES))
def test_tensor_specs_count_what_the_config_counts(name):
    cfg = shape.shape_config(name, 3)
    assert sum(_numel(s) for _, s in shape.tensor_specs(cfg)) == _params(name, 3)
    assert shape.checkpoint_bytes(cfg, "bfloat16") == 2 * _params(name, 3)


def test_shape_configs_need_no_torch():
    code = ("import sys; from core.models.shape import shape_config; from core.models.ref import ModelRef, "
            "model_config; model_config(ModelRef(kind='shape', shape='llama3_70b', num_layers=None), '.cache'); "
            "shape_config('llamba_8b', 2); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_shape_config_depth_and_model_config():
    cfg = shape.shape_config("llama3_70b", 2)
    assert cfg["num_hidden_layers"] == 2 and shape.SHAPES["llama3_70b"]["num_hidden_layers"] == 80  # a copy
    ref = ModelRef(name="llamba_8b_shape", kind="shape", shape="llamba_8b", num_layers=3)
    hybrid = model_config(ref, CACHE_DIR)
    assert hybrid["num_hidden_layers"] == 3 and hybrid["layer_types"] == ["mamba2"] * 3
    assert hybrid["hidden_size"] == 4096 and hybrid["ssm_cfg"]["n_v_heads"] == 32
    assert model_depth(ModelRef(kind="shape", shape="llama3_70b"), CACHE_DIR) == 80


@pytest.mark.parametrize("value,words", [(200, "beyond llama3_70b's 80 layers"), (0, "at least 1"),
                                         (-3, "at least 1"), (2.5, "not a whole number"),
                                         ("two", "not a whole number"), (True, "not a whole number")])
def test_bad_num_layers_is_one_line(value, words):
    (problem,) = shape.shape_errors("llama3_70b", value)
    assert words in problem and "\n" not in problem
    with pytest.raises(ConfigError, match="model.num_layers"):
        shape.shape_config("llama3_70b", value)


def test_unknown_shape_name():
    assert "not a shape model" in shape.shape_errors("llama4", None)[0]


def test_compose_and_validate_the_70b_shape(tmp_path):
    from run import compose_and_validate

    (cfg,) = compose_and_validate(["model=llama3_70b_shape", f"paths.cache_dir={CACHE_DIR}",
                                   f"paths.outputs_root={tmp_path}"])
    assert (cfg.model.kind, cfg.model.shape, cfg.model.num_layers, cfg.model.dtype) == (
        "shape", "llama3_70b", None, "bfloat16")
    (cfg,) = compose_and_validate(["model=llama3_8b_shape", "model.num_layers=2", f"paths.outputs_root={tmp_path}"])
    assert cfg.model.num_layers == 2


@pytest.mark.parametrize("value", ["200", "0", "abc", "2.5"])
def test_num_layers_out_of_range_fails_validation_in_one_line(value, tmp_path):
    from run import compose_and_validate

    with pytest.raises(ConfigError) as e:
        compose_and_validate(["model=llama3_70b_shape", f"model.num_layers={value}", f"paths.outputs_root={tmp_path}"])
    (line,) = [ln for ln in str(e.value).splitlines() if "model.num_layers" in ln]
    assert value in line


def test_shape_cache_dir_names():
    ref = ModelRef(kind="shape", shape="llama3_8b", num_layers=2, dtype="bfloat16")
    assert shape.shape_dir(ref, "/c").as_posix() == "/c/models/shape-llama3_8b-L2-bfloat16"
    ref = ModelRef(kind="shape", shape="llama3_70b", num_layers=None, dtype="auto")
    assert shape.shape_dir(ref, "/c").as_posix() == "/c/models/shape-llama3_70b-L80-bfloat16-header"


def test_loading_a_header_only_shape_is_refused_before_anything_is_built(tmp_path):
    from core.models.load import load_model

    ref = ModelRef(name="llama3_70b_shape", kind="shape", shape="llama3_70b", num_layers=None, dtype="bfloat16")
    with pytest.raises(LoadError, match="header-only") as e:
        load_model(ref, cache_dir=tmp_path)
    assert "\n" not in str(e.value) and "model.num_layers=N" in str(e.value)
    assert not (tmp_path / "models").exists()


def test_the_tokenizer_ids_stay_below_the_vocabulary():
    tok = shape._tokenizer(shape.shape_config("llama3_8b"))
    ids = tok("Grüße, 1234 — ok?")["input_ids"]
    assert ids[0] == 128000 and max(ids) < 128256 and len(tok) == 128256
    assert tok.decode(ids, skip_special_tokens=True) == "Grüße, 1234 — ok?"
    assert tok.eos_token_id == 128009 and tok.pad_token_id == 128004
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.startswith("<|begin_of_text|><|start_header_id|>user") and chat.endswith("<|end_header_id|>\n\n")


def test_the_full_70b_header_only_dir_is_sparse_and_readable(tmp_path):
    """num_layers=null: the full 80-layer 70B as a header plus a sparse file (no weight bytes on disk)."""
    from core.models.ref import layers_in_weights, read_checked_config

    ref = ModelRef(name="llama3_70b_shape", kind="shape", shape="llama3_70b", num_layers=None, dtype="bfloat16")
    t0 = time.perf_counter()
    path = shape.shape_path(ref, tmp_path, header_ok=True)
    assert time.perf_counter() - t0 < 30
    st = (path / "model.safetensors").stat()
    assert st.st_size > shape.checkpoint_bytes(shape.shape_config("llama3_70b")) > 141e9
    assert st.st_blocks * 512 < 64 << 20  # nothing allocated beyond the header
    assert read_checked_config(path)["num_hidden_layers"] == 80
    assert layers_in_weights(path)[0] == 80
    assert shape.is_header_only_dir(path)
    assert shape.shape_path(ref, tmp_path, header_ok=True) == path  # reused
    from analysis.structure import read_safetensors_header  # what task=analyze reads (never maps the file)

    tensors = read_safetensors_header(path / "model.safetensors")
    assert tensors["model.layers.79.mlp.down_proj.weight"].shape == (8192, 28672) and len(tensors) == 80 * 9 + 3


def test_an_edited_shape_cache_is_refused(tmp_path):
    ref = ModelRef(name="llama3_70b_shape", kind="shape", shape="llama3_70b", num_layers=1, header_only=True)
    path = shape.shape_path(ref, tmp_path, header_ok=True)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "rope_theta": 10000.0}))
    with pytest.raises(LoadError, match="does not match"):
        shape.shape_path(ref, tmp_path, header_ok=True)


# --------------------------------------------------------------------------- real-width weights (integration)


@pytest.mark.integration
def test_a_two_layer_llama3_8b_shape_builds_loads_runs_and_is_cached(monkeypatch):
    import torch

    from core.models.load import load_model

    ref = ModelRef(name="llama3_8b_shape", kind="shape", shape="llama3_8b", num_layers=2, dtype="bfloat16")
    path = shape.shape_dir(ref, CACHE_DIR)
    t0 = time.perf_counter()
    model, tok = load_model(ref, cache_dir=CACHE_DIR)
    first = time.perf_counter() - t0
    assert (path / "model.safetensors").stat().st_size > shape.checkpoint_bytes(shape.shape_config("llama3_8b", 2))
    assert len(model.model.layers) == 2 and model.lm_head.weight.shape == (128256, 4096)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (1024, 4096)
    assert model.dtype == torch.bfloat16 and model.config.rope_parameters["rope_theta"] == 500000.0
    std = model.model.layers[1].mlp.down_proj.weight.float().std().item()
    assert abs(std - 0.02) < 0.001
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 128256) and torch.isfinite(logits).all()
    del model

    # the second load reads the cache: nothing is built again
    monkeypatch.setattr(shape, "_build", lambda *a, **k: pytest.fail("rebuilt a cached shape"))
    t0 = time.perf_counter()
    model, _ = load_model(ref, cache_dir=CACHE_DIR)
    print(f"first load (build if uncached) {first:.1f} s, cached load {time.perf_counter() - t0:.1f} s")
    assert len(model.model.layers) == 2


@pytest.mark.integration
def test_a_llamba_8b_shape_loads_as_a_cartesia_llamba_dir():
    """The Llamba shape is a Cartesia dir: kind=hf loading through core/models/llamba.py, at the real width."""
    import torch

    from core.models.llama import layer_types_of
    from core.models.load import load_model

    # 2 layers: the depth the presets' shape test reads too, so the suite builds one Llamba shape (2.9 GB), not two
    ref = ModelRef(name="llamba_8b_shape", kind="shape", shape="llamba_8b", num_layers=2, dtype="bfloat16")
    path = shape.shape_path(ref, CACHE_DIR)
    assert json.loads((path / "config.json").read_text())["model_type"] == "llamba"
    model, tok = load_model(ModelRef.at(path, dtype="bfloat16"), cache_dir=CACHE_DIR)  # as any Llamba dir
    assert layer_types_of(model) == ["mamba2"] * 2
    mixer = model.model.layers[0].mixer
    assert mixer.in_proj.weight.shape == (4096 + 2 * 32 * 64 + 4096 + 32, 4096) and mixer.headdim == 128
    ids = tok("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 128256) and torch.isfinite(logits).all()
