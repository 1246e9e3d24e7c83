"""Legacy formats: detected without unpickling, read with opt-in, refused without it."""

from __future__ import annotations

import json

import pytest
import torch

from analysis_helpers import PRUNED_TOTAL, Tok, base_and_pruned, state_dict_copy
from analysis.structure import structure_of
from core.checkpoint import save_checkpoint
from core.legacy import PickleNotAllowed, detect_format, load_as_model, load_legacy, scan_pickle
from core.errors import LoadError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    _, pruned, tok = base_and_pruned()
    (root / "bundle").mkdir()
    torch.save({"model": pruned, "tokenizer": Tok(), "method": "taylor"}, root / "bundle" / "pytorch_model.bin")
    (root / "bundle2").mkdir()
    torch.save({"model": pruned, "tokenizer": Tok()}, root / "bundle2" / "pruned_model.bin")
    (root / "whole").mkdir()
    torch.save(pruned, root / "whole" / "model.pt")
    (root / "sd").mkdir()
    torch.save(state_dict_copy(pruned), root / "sd" / "weights.pt")
    (root / "sd_cfg").mkdir()
    torch.save(state_dict_copy(pruned), root / "sd_cfg" / "weights.pt")
    cfg = pruned.config.to_dict()
    cfg["layer_configs"] = [{"num_attention_heads": h, "num_key_value_heads": k, "intermediate_size": i}
                            for h, k, i in ((8, 2, 128), (4, 1, 96), (8, 2, 96), (8, 2, 128))]
    (root / "sd_cfg" / "config.json").write_text(json.dumps(cfg))
    (root / "slice").mkdir()
    sd = state_dict_copy(pruned)
    sd["model.layers.0.attn_shortcut_Q"] = torch.eye(64)[:, :48].contiguous()
    sd["model.layers.0.mlp_shortcut_Q"] = torch.eye(48, 64).contiguous()
    torch.save(sd, root / "slice" / "Llama_0.25.pt")
    (root / "slice" / "Llama_0.25.json").write_text(json.dumps(pruned.config.to_dict()))
    (root / "evals").mkdir()
    (root / "evals" / "evaluation_results.json").write_text("{}")
    save_checkpoint(pruned, tok, root / "ckpt", {"method": "known"})
    return root, pruned


def test_detect_without_unpickling(files, monkeypatch):
    root, _ = files
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("detection must not unpickle"))
    kinds = {d: detect_format(root / d).kind for d in
             ("bundle", "bundle2", "whole", "sd", "slice", "evals", "ckpt")}
    assert kinds == {"bundle": "pickle_bundle", "bundle2": "pickle_bundle", "whole": "whole_model_pt",
                     "sd": "state_dict_pt", "slice": "slicegpt", "evals": "eval_only", "ckpt": "prunelab"}
    assert detect_format(root / "slice").config_path.name == "Llama_0.25.json"
    assert "evaluation_results.json" in detect_format(root / "evals").reason
    assert detect_format(root / "nope").kind == "unknown"
    assert "LlamaForCausalLM" in " ".join(scan_pickle(root / "whole" / "model.pt").globals)


@pytest.mark.parametrize("d", ["bundle", "whole"])
def test_full_pickles_refused_without_opt_in(files, d):
    root, _ = files
    with pytest.raises(PickleNotAllowed) as e:
        load_legacy(root / d)
    msg = str(e.value)
    assert "allow_pickle=true" in msg and "arbitrary code" in msg
    assert isinstance(e.value, LoadError)
    with pytest.raises(PickleNotAllowed):
        structure_of(root / d, name=d)


@pytest.mark.parametrize("d", ["bundle", "bundle2", "whole"])
def test_full_pickles_read_with_opt_in(files, d, caplog):
    root, pruned = files
    lm = load_legacy(root / d, allow_pickle=True)
    assert isinstance(lm.model, torch.nn.Module) and "unpickling" in caplog.text
    if d == "bundle":
        assert isinstance(lm.tokenizer, Tok) and lm.meta == {"method": "taylor"}
    s = structure_of(root / d, name=d, allow_pickle=True)
    assert s.total_params == PRUNED_TOTAL and s.layers[1].num_heads == 4 and s.format == lm.kind


def test_state_dicts_are_safe_and_need_no_opt_in(files):
    root, pruned = files
    lm = load_legacy(root / "sd")
    assert lm.model is None and set(lm.state_dict) == set(pruned.state_dict())
    s = structure_of(root / "sd", name="sd", fallback_config=pruned.config.to_dict())
    assert s.total_params == PRUNED_TOTAL and s.layers[1].num_kv_heads == 1
    model, tok = load_as_model(root / "sd_cfg")  # config.json with layer_configs beside it
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pruned(ids).logits)
    with pytest.raises(LoadError, match="without a config.json"):
        load_as_model(root / "sd")


def test_slicegpt_structure_has_rotations(files):
    root, _ = files
    s = structure_of(root / "slice", name="slice")
    assert s.format == "slicegpt"
    extra = s.to_json()["layers"][0]["extra"]
    assert extra["attn_shortcut_Q"] == {"params": 64 * 48, "shape": [64, 48]}
    assert extra["mlp_shortcut_Q"]["shape"] == [48, 64]
    with pytest.raises(LoadError, match="SliceGPT"):
        load_as_model(root / "slice")


def test_corrupt_pickle(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a pickle at all")
    info = detect_format(tmp_path)
    assert info.kind == "unknown" and "not a readable torch file" in info.reason
    with pytest.raises(LoadError, match="not a model"):
        load_legacy(tmp_path)
