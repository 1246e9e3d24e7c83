"""Checkpoints: save -> load through prunelab and through plain transformers (no prunelab) give the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from core.models.checkpoint import save_checkpoint
from core.run.errors import LoadError
from core.models.llama import count_params
from core.models.load import load_model
from core.models.ref import ModelRef
from pruning.llm_pruner import LLMPruner

PRUNER = LLMPruner(attention_ratio=0.5, mlp_ratio=0.25, attention_layers=(1, 3), mlp_layers=(0, 3),
                   taylor="param_first", progress=False)


@pytest.fixture
def saved(tiny, calib, tmp_path):
    model, tok = tiny
    PRUNER(model, calib)
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "taylor", "ratio": 0.5})
    return model, tok, out


def test_checkpoint_layout(saved):
    model, _, out = saved
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_prunelab.py", "checkpoint_info.json",
            "generation_config.json", "tokenizer.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "prunelab_llama"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_prunelab.PrunedLlamaForCausalLM"
    assert cfg["layer_configs"][1] == {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 96}
    assert cfg["layer_configs"][3] == {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 128}
    info = json.loads((out / "checkpoint_info.json").read_text())
    assert info["method"] == "taylor" and "creation_time" in info and "git_commit" in info
    # Bytes on disk ~ parameter bytes: safetensors adds only a small JSON header.
    weights = (out / "model.safetensors").stat().st_size
    assert count_params(model) * 4 <= weights < count_params(model) * 4 * 1.01 + 16384
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_roundtrip_through_project_loader(saved):
    model, _, out = saved
    x = torch.randint(0, 256, (2, 12))
    loaded, tok = load_model(ModelRef.of({"name": "ck", "kind": "hf", "path": str(out), "dtype": "float32", "device": "cpu"}),
                             cache_dir=".cache")
    assert torch.equal(model(x).logits, loaded(x).logits)
    assert tok("hello")["input_ids"]


def test_roundtrip_through_plain_transformers_without_prunelab(saved, tmp_path):
    model, _, out = saved
    x = torch.randint(0, 256, (2, 12))
    torch.save(x, tmp_path / "x.pt")
    torch.save(model(x).logits.detach(), tmp_path / "ref.pt")
    script = f"""
import sys
for name in ("core", "pruning", "analysis", "replacement"):
    sys.modules[name] = None  # prunelab is not importable here
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
assert tok("ab").input_ids
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
assert type(m).__name__ == "PrunedLlamaForCausalLM", type(m)
print("MAXDIFF", (m(x).logits - ref).abs().max().item())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MAXDIFF 0.0" in proc.stdout


def test_sharded_checkpoint(tiny, tmp_path):
    model, tok = tiny
    out = save_checkpoint(model, tok, tmp_path / "m", {}, shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded, _ = load_model(ModelRef.of({"name": "m", "kind": "hf", "path": str(out), "dtype": "float32", "device": "cpu"}),
                           cache_dir=".cache")
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    import core.models.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(model, tok, tmp_path / "model", {})
    assert list(tmp_path.iterdir()) == []


def test_existing_checkpoint_not_overwritten(saved):
    model, tok, out = saved
    with pytest.raises(FileExistsError):
        save_checkpoint(model, tok, out, {})


def test_safetensors_only_no_pickle(saved):
    _, _, out = saved
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.1.self_attn.q_proj.weight" in f.keys()


@pytest.mark.parametrize("path,msg", [("/nonexistent/model", "does not exist")])
def test_missing_model_path(path, msg):
    with pytest.raises(LoadError, match=msg):
        load_model(ModelRef.of({"name": "x", "kind": "hf", "path": path, "dtype": "float32", "device": "cpu"}), cache_dir=".cache")


def test_dir_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LoadError, match="not a model"):
        load_model(ModelRef.of({"name": "x", "kind": "hf", "path": str(tmp_path), "dtype": "float32", "device": "cpu"}),
                   cache_dir=".cache")


def test_corrupt_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoadError, match="unreadable"):
        load_model(ModelRef.of({"name": "x", "kind": "hf", "path": str(tmp_path), "dtype": "float32", "device": "cpu"}),
                   cache_dir=".cache")


def test_project_loader_never_asks_about_remote_code(saved):
    """The tokenizer of a checkpoint with auto_map loads without transformers' interactive trust prompt."""
    _, _, out = saved
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from core.models.load import load_hf_dir
m, t = load_hf_dir(Path({str(out)!r}))
print("LOADED", type(m).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED PrunedLlamaForCausalLM" in proc.stdout
    assert "custom code" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_dtype_halves_the_checkpoint(saved, tmp_path, dtype):
    model, tok, full = saved
    half = save_checkpoint(model, tok, tmp_path / "half", {"method": "taylor"}, save_dtype=dtype)
    ratio = (half / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52
    assert json.loads((half / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    assert next(model.parameters()).dtype == torch.float32  # the in-memory model is left as it was
    loaded, _ = load_model(ModelRef.at(half, dtype="auto"), cache_dir=".cache")
    assert next(loaded.parameters()).dtype == dtype
    x = torch.randint(0, 256, (2, 12))
    torch.testing.assert_close(loaded(x).logits.float(), model(x).logits, rtol=0.05, atol=0.05)


def _plain_transformers_logits(out: Path, x: torch.Tensor, tmp_path: Path, remote: bool) -> torch.Tensor:
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys
for name in ("core", "pruning", "analysis", "replacement"):
    sys.modules[name] = None  # prunelab is not importable here
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code={remote})
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
torch.save(m(x).logits.detach(), {str(tmp_path / 'got.pt')!r})
g = m.generate(x[:1, :4], max_new_tokens=6, do_sample=False)
print("GEN", g.shape[1], type(m).__name__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GEN 10" in proc.stdout
    return torch.load(tmp_path / "got.pt", weights_only=True), proc.stdout


def test_added_biases_and_removed_sub_blocks_round_trip(tiny, tmp_path):
    """FLAP's output biases and ShortGPT's removed sub-blocks (layer 0's attention included: the KV cache's length
    is read from layer 0) load in plain transformers with the same logits, and generation works."""
    from torch import nn

    from core.models.llama import layer_configs, params_from_config
    from core.models.modeling_pruned import RemovedAttention, RemovedMLP

    model, tok = tiny
    layers = model.model.layers
    o = layers[1].self_attn.o_proj
    layers[1].self_attn.o_proj = nn.Linear(o.in_features, o.out_features, bias=True)
    layers[1].self_attn.o_proj.weight.data.copy_(o.weight.data)
    nn.init.normal_(layers[1].self_attn.o_proj.bias)
    d = layers[2].mlp.down_proj
    layers[2].mlp.down_proj = nn.Linear(d.in_features, d.out_features, bias=True)
    layers[2].mlp.down_proj.weight.data.copy_(d.weight.data)
    nn.init.normal_(layers[2].mlp.down_proj.bias)
    layers[0].self_attn = RemovedAttention(0, 8)
    layers[3].mlp = RemovedMLP()
    lcs = layer_configs(model)
    assert lcs[0]["num_attention_heads"] == 0 and lcs[3]["intermediate_size"] == 0
    assert lcs[1]["o_proj_bias"] and lcs[2]["down_proj_bias"] and "o_proj_bias" not in lcs[2]
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(x).logits
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "test"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "prunelab_llama"
    assert params_from_config(cfg) == count_params(model)
    got, stdout = _plain_transformers_logits(out, x, tmp_path, remote=True)
    assert "PrunedLlamaForCausalLM" in stdout
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_uniform_model_saves_as_stock_llama(tiny, tmp_path):
    """Fewer layers of full width (ShortGPT) or zeros in dense shapes: no remote code needed."""
    model, tok = tiny
    del model.model.layers[1]
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(model.model.layers)
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ref = model(x).logits
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "test"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and cfg["num_hidden_layers"] == 3
    assert not list(out.glob("modeling_*.py"))
    got, stdout = _plain_transformers_logits(out, x, tmp_path, remote=False)
    assert "LlamaForCausalLM" in stdout
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_flops_per_token_counts_dense_matmuls(tiny):
    """2 x every linear (LM head included) + attention over the context; zeros do not reduce dense FLOPs."""
    from core.models.llama import flops_per_token

    model, _ = tiny
    linears = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 4 * 128 * 64 * len(model.model.layers)  # 8 heads x head_dim 8 = 64 query channels per layer
    assert flops_per_token(model, 128) == 2 * linears + attention
    before = flops_per_token(model, 128)
    model.model.layers[0].mlp.down_proj.weight.data.zero_()
    assert flops_per_token(model, 128) == before
    del model.model.layers[1]
    assert flops_per_token(model, 128) < before
