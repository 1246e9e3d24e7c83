"""SliceGPT: rotation alone keeps the dense logits, slicing saves and reloads exactly (also in plain transformers)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from core.checkpoint import save_checkpoint
from core.errors import ConfigError
from core.llama import count_params
from core.models import ModelRef, build_tiny, load_model
from pruning import PruneError
from pruning.slicegpt import SliceGPT

X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("orientation", ["pca", "random"])
def test_sparsity_zero_reproduces_the_dense_logits(tiny, calib, orientation):
    model, _ = tiny
    dense = logits(model)
    result = SliceGPT(sparsity=0.0, final_orientation=orientation, batch_size=3, progress=False)(model, calib)
    assert model.model.embed_tokens.weight.shape == (259, 64)  # rotated, not sliced
    assert not any(name.endswith("norm.weight") for name, _ in model.named_parameters())  # scales fused
    torch.testing.assert_close(logits(model), dense, rtol=0, atol=2e-5)
    assert {"embed_s", "layers_s", "pca_s", "rotate_s"} <= set(result.timings)


def test_tied_embeddings_are_untied_and_still_exact(calib):
    model, _ = build_tiny(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    dense = logits(model)
    result = SliceGPT(sparsity=0.0, progress=False)(model, calib)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert result.details["untied_embeddings"] and any("untied" in n for n in result.notes)
    torch.testing.assert_close(logits(model), dense, rtol=0, atol=2e-5)


def test_orientation_does_not_change_a_sliced_model(tiny, calib):
    model, _ = tiny
    other = copy.deepcopy(model)
    SliceGPT(sparsity=0.25, final_orientation="pca", progress=False)(model, calib)
    SliceGPT(sparsity=0.25, final_orientation="random", seed=3, progress=False)(other, calib)
    torch.testing.assert_close(logits(model), logits(other), rtol=0, atol=1e-4)


@pytest.fixture
def sliced(tiny, calib, tmp_path):
    model, tok = tiny
    dense_params = count_params(model)
    result = SliceGPT(sparsity=0.25, progress=False)(model, calib)
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "slicegpt", "sparsity": 0.25})
    return model, tok, out, result, dense_params


def test_widths_record_and_checkpoint_layout(sliced):
    model, _, out, result, dense_params = sliced
    # hidden 64 -> int(0.75 * 64) = 48 (a multiple of round_interval 8) everywhere, except the last layer's
    # output and the LM head (SliceGPT does not slice the head by default)
    assert model.model.embed_tokens.weight.shape == (259, 48) and model.lm_head.weight.shape == (259, 64)
    layer0, last = model.model.layers[0], model.model.layers[-1]
    assert layer0.self_attn.q_proj.weight.shape == (64, 48) and layer0.self_attn.o_proj.weight.shape == (48, 64)
    assert layer0.mlp.gate_proj.weight.shape == (128, 48) and layer0.mlp.down_proj.weight.shape == (48, 128)
    assert layer0.attn_shortcut_Q.shape == (48, 48) and last.mlp_shortcut_Q.shape == (48, 64)
    assert result.params_before == dense_params and result.params_after == count_params(model)
    shortcuts = 4 * 2 * 48 * 48 - 48 * 48 + 48 * 64
    assert result.details["shortcut_params"] == shortcuts
    assert result.compression == {"unit": "slicing", "amount": 0.25, "hidden_kept": 0.75,
                                  "params_removed": pytest.approx(1 - result.params_after / dense_params)}
    assert result.layers[3] == {"layer": 3, "attention_input": [64, 48], "attention_output": [64, 48],
                                "mlp_output": [64, 64]}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "prunelab_sliced_llama" and cfg["tie_word_embeddings"] is False
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_prunelab_sliced.SlicedLlamaForCausalLM"
    assert cfg["slicing"]["embedding_dimension"] == 48 and cfg["slicing"]["lm_head_dimension"] == 64
    assert (out / "modeling_prunelab_sliced.py").is_file()
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.2.attn_shortcut_Q" in keys and "lm_head.weight" in keys
    assert not [k for k in keys if "norm" in k]  # SliceGPT's layout: the norms hold no weights
    assert sum(f.numel() for f in model.parameters()) == result.params_after


def test_reload_through_prunelab_is_identical_and_generates(sliced):
    model, _, out, _, _ = sliced
    loaded, tok = load_model(ModelRef.at(out), cache_dir=out.parent)
    assert type(loaded).__name__ == "SlicedLlamaForCausalLM"
    assert torch.equal(logits(loaded), logits(model))
    ids = tok("The", return_tensors="pt").input_ids
    a = loaded.generate(ids, max_new_tokens=6, do_sample=False)
    b = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b) and a.shape[1] == ids.shape[1] + 6


def test_reload_through_plain_transformers_without_prunelab(sliced, tmp_path):
    model, _, out, _, _ = sliced
    torch.save(X, tmp_path / "x.pt")
    torch.save(logits(model), tmp_path / "ref.pt")
    script = f"""
import sys
for name in ("core", "pruning", "analysis", "replacement", "recipes"):
    sys.modules[name] = None  # prunelab is not importable here
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(m).__name__ == "SlicedLlamaForCausalLM", type(m)
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
print("MAXDIFF", (m(x).logits - ref).abs().max().item())
print("GENERATED", m.generate(x[:1, :4], max_new_tokens=5, do_sample=False).shape[1])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MAXDIFF 0.0" in proc.stdout and "GENERATED 9" in proc.stdout


def test_slice_head(tiny, calib):
    model, _ = tiny
    result = SliceGPT(sparsity=0.25, slice_head=True, progress=False)(model, calib)
    assert model.lm_head.weight.shape == (259, 48) and model.model.layers[-1].mlp_shortcut_Q.shape == (48, 48)
    assert result.details["lm_head_dimension"] == 48 and logits(model).isfinite().all()


@pytest.mark.parametrize("kw,match", [
    ({"sparsity": 1.0}, r"pruner.sparsity=1.0 must be in \[0, 1\)"),
    ({"round_interval": 0}, "pruner.round_interval=0 must be an integer >= 1"),
    ({"final_orientation": "svd"}, "pruner.final_orientation='svd' is not one of random, pca"),
    ({"offload": True}, "pruner.offload=true moves one layer at a time to pruner.device"),
])
def test_bad_options_fail_at_build_time(kw, match):
    with pytest.raises(ConfigError, match=match):
        SliceGPT(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"sparsity": 0.9}, r"leaves int\(0.1 x 64\) = 6 of 64 hidden dims, which rounds down to width 0 with "
                        r"pruner.round_interval=8"),
    ({"sparsity": 0.2, "round_interval": 128}, "rounds down to width 0 with pruner.round_interval=128"),
    ({"sparsity": 1e-17}, "rounds to the full width 64 of 64 with pruner.round_interval=8"),
])
def test_widths_that_round_away_are_refused_before_any_change(tiny, calib, kw, match):
    model, _ = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PruneError, match=match):
        SliceGPT(progress=False, **kw)(model, calib)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_models_are_named(tiny, calib):
    model, _ = tiny

    class Odd(torch.nn.Module):
        pass

    with pytest.raises(PruneError, match="unsupported architecture Odd.*supported: Llama"):
        SliceGPT(progress=False)(Odd(), calib)
    SliceGPT(sparsity=0.25, progress=False)(model, calib)
    with pytest.raises(PruneError, match="already sliced"):
        SliceGPT(progress=False)(model, calib)
    with pytest.raises(PruneError, match="needs calibration tokens"):
        SliceGPT(progress=False)(build_tiny(num_layers=2)[0], None)
    if not torch.cuda.is_available():
        with pytest.raises(PruneError, match="pruner.device='cuda': this machine has no CUDA device"):
            SliceGPT(device="cuda", offload=True, progress=False)(build_tiny(num_layers=2)[0], calib)


@pytest.mark.integration
def test_smollm2_rotation_alone_keeps_the_logits():
    """The real model (tied embeddings, trained norms): sparsity 0 reproduces the dense logits."""
    from conftest import CACHE_DIR
    from recipes._common import resolve_model

    model, tok = load_model(resolve_model("smollm2"), cache_dir=CACHE_DIR)
    calib = tok(["It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife."] * 2, return_tensors="pt").input_ids
    x = tok("The capital of France is", return_tensors="pt").input_ids
    dense = logits(model, x)
    SliceGPT(sparsity=0.0, progress=False)(model, calib)
    torch.testing.assert_close(logits(model, x), dense, rtol=0, atol=2e-3)
    assert model.model.embed_tokens.weight.shape == (49152, 576) and model.lm_head.weight.shape == (49152, 576)
