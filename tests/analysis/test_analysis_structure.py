"""Structure of one model from a module, a state dict, a shape mapping and safetensors headers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from analysis_helpers import (ATTN_FULL, ATTN_L1, BASE_TOTAL, EMB, HIDDEN, LAYER1, LAYER2, LAYER_FULL, MLP_96,
                              NORM, PRUNED_TOTAL, base_and_pruned, state_dict_copy, tiny)
from analysis.structure import TensorInfo, count_nonzero_safetensors, read_safetensors_header, structure_of
from core.models.checkpoint import save_checkpoint
from core.run.errors import LoadError


def _check_known(s):
    assert s.total_params == PRUNED_TOTAL
    assert s.embedding_params == EMB and s.lm_head_params == EMB and not s.tied_embeddings
    assert [layer.params() for layer in s.layers] == [LAYER_FULL, LAYER1, LAYER2, LAYER_FULL]
    l1 = s.layers[1]
    assert l1.params("attention") == ATTN_L1 and l1.params("mlp") == MLP_96 and l1.params("norm") == NORM
    assert (l1.num_heads, l1.num_kv_heads, l1.intermediate_size) == (4, 1, 96)
    assert (s.layers[2].num_heads, s.layers[2].num_kv_heads, s.layers[2].intermediate_size) == (8, 2, 96)
    assert (s.layers[0].num_heads, s.layers[0].num_kv_heads, s.layers[0].intermediate_size) == (8, 2, 128)
    assert l1.modules["attention.q_proj"].shape == [32, 64]
    assert l1.modules["attention.o_proj"].shape == [64, 32]
    assert l1.modules["mlp.down_proj"].shape == [64, 96]
    j = s.to_json()
    assert j["layer_summary"] == {"num_layers": 4, "total_layer_params": 2 * LAYER_FULL + LAYER1 + LAYER2,
                                  "removed_layers": [], "zero_layers": []}
    lj = j["layers"][1]
    assert lj["attention"]["q_proj"] == 32 * 64 and lj["attention"]["num_heads"] == 4
    assert lj["mlp"]["intermediate_size"] == 96 and lj["norm"] == NORM and lj["is_zero_layer"] is False
    assert lj["attention"]["total"] == ATTN_L1 and lj["total"] == LAYER1


def test_module_state_dict_and_shapes_agree():
    _, pruned, _ = base_and_pruned()
    cfg = pruned.config.to_dict()
    _check_known(structure_of(pruned, name="p"))
    _check_known(structure_of(state_dict_copy(pruned), config=cfg, name="p"))
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in pruned.state_dict().items()}
    _check_known(structure_of(shapes, config=cfg, name="p"))
    s = structure_of(pruned, name="p")
    assert s.class_names == {"attention": "LlamaAttention", "mlp": "LlamaMLP"}
    assert s.to_json()["layers"][0]["attention"]["type"] == "LlamaAttention"


def test_base_counts():
    base, _ = tiny()
    s = structure_of(base, name="b")
    assert s.total_params == BASE_TOTAL == sum(p.numel() for p in base.parameters())
    assert s.layers[0].params("attention") == ATTN_FULL


def test_checkpoint_headers_without_loading(tmp_path, monkeypatch):
    _, pruned, tok = base_and_pruned()
    ckpt = save_checkpoint(pruned, tok, tmp_path / "model", {"method": "test"})
    # headers only: every way of reading weights fails the test
    import safetensors

    import analysis.structure as st

    fail = lambda *a, **k: pytest.fail("weights were read")  # noqa: E731
    monkeypatch.setattr(safetensors, "safe_open", fail)
    monkeypatch.setattr(st, "count_nonzero_safetensors", fail)
    monkeypatch.setattr(torch, "load", fail)
    s = structure_of(ckpt, name="ckpt")
    _check_known(s)
    assert s.format == "prunelab" and s.meta.get("method") == "test"
    assert s.model_dir == str(ckpt)


def test_sharded_checkpoint(tmp_path):
    _, pruned, tok = base_and_pruned()
    ckpt = save_checkpoint(pruned, tok, tmp_path / "model", {"method": "test"}, shard_bytes=200_000)
    assert (ckpt / "model.safetensors.index.json").is_file()
    _check_known(structure_of(ckpt, name="sharded"))


def test_tied_counted_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    for s in (structure_of(m, name="t"), structure_of(m.state_dict(), config=cfg.to_dict(), name="t")):
        assert s.tied_embeddings and s.lm_head_params == 0 and s.embedding_params == 100 * 64
        assert s.total_params == sum(p.numel() for p in m.parameters())
        assert s.to_json()["lm_head_shape"] == [100, 64]
    # saved untied (clone, as safetensors requires) without a config: equal copies still count once
    cloned = {k: v.clone() for k, v in m.state_dict().items()}
    s = structure_of(cloned, name="t")
    assert s.tied_embeddings and s.total_params == sum(p.numel() for p in m.parameters())
    # a genuinely untied head (different values) counts on its own
    cloned["lm_head.weight"] = cloned["lm_head.weight"] + 1
    s = structure_of(cloned, name="t")
    assert not s.tied_embeddings and s.lm_head_params == 100 * 64


def test_nonzero_streaming_and_zero_layer(tmp_path):
    base, _ = tiny()
    sd = state_dict_copy(base)
    for k in [k for k in sd if k.startswith("model.layers.3.")]:
        sd[k].zero_()
    q = sd["model.layers.2.self_attn.q_proj.weight"]
    q[:, ::2] = 0  # 50% unstructured
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(base.config.to_dict()))
    shapes_only = structure_of(tmp_path, name="z")
    assert shapes_only.nonzero_params is None and not shapes_only.layers[3].is_zero
    s = structure_of(tmp_path, name="z", count_nonzero=True)
    assert s.layers[3].is_zero and s.layers[3].nonzero() == 0
    assert s.layers[2].modules["attention.q_proj"].nonzero == 64 * 32
    assert s.to_json()["layer_summary"]["zero_layers"] == [3]
    # chunked streaming (chunks far smaller than a tensor, -0.0 counted as zero) == torch's count
    sd["model.layers.0.mlp.up_proj.weight"][:3] = -0.0
    save_file(sd, tmp_path / "model.safetensors")
    infos = read_safetensors_header(tmp_path / "model.safetensors")
    count_nonzero_safetensors([tmp_path / "model.safetensors"], infos, chunk_bytes=100)
    assert {k: v.nonzero for k, v in infos.items()} == {k: int(torch.count_nonzero(v)) for k, v in sd.items()}


def test_removed_layer_gap_and_extra_tensors():
    base, _ = tiny()
    sd = {k: v for k, v in state_dict_copy(base).items() if not k.startswith("model.layers.2.")}
    sd["model.layers.0.attn_shortcut_Q"] = torch.zeros(HIDDEN, 48)
    s = structure_of(sd, config=base.config.to_dict(), name="gap")
    assert len(s.layers) == 4 and s.layers[2].removed and s.num_layers == 3
    assert s.layers[2].is_zero and s.to_json()["layer_summary"]["removed_layers"] == [2]
    extra = s.to_json()["layers"][0]["extra"]
    assert extra == {"attn_shortcut_Q": {"params": HIDDEN * 48, "shape": [HIDDEN, 48]}}
    assert s.layers[0].params() == LAYER_FULL + HIDDEN * 48


def test_no_config_heads_unknown_then_fallback():
    base, _ = tiny()
    sd = state_dict_copy(base)
    s = structure_of(sd, name="nocfg")
    assert s.layers[0].num_heads is None and any("heads per layer unknown" in n for n in s.notes)
    s2 = structure_of(sd, name="nocfg", fallback_config=base.config.to_dict())
    assert s2.layers[0].num_heads == 8


def test_shape_mapping_accepts_tensorinfo():
    s = structure_of({"model.layers.0.mlp.gate_proj.weight": TensorInfo((96, 64), "bfloat16")},
                     config={"hidden_size": 64, "num_attention_heads": 8}, name="m")
    assert s.layers[0].intermediate_size == 96 and s.param_bytes == 96 * 64 * 2


def test_corrupt_and_not_a_model(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(LoadError, match="corrupt safetensors"):
        structure_of(bad, name="bad")
    trunc = tmp_path / "trunc.safetensors"
    save_file({"w": torch.ones(100)}, trunc)
    data = trunc.read_bytes()
    trunc.write_bytes(data[:-40])
    with pytest.raises(LoadError, match="truncated"):
        read_safetensors_header(trunc)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("hi")
    with pytest.raises(LoadError, match="not a model"):
        structure_of(empty, name="e")
    with pytest.raises(TypeError):
        structure_of(42, name="x")
