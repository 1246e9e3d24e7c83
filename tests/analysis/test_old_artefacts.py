"""The user's old files (seeds 000-004), each built the way the old scripts built it, analysed and loaded.

- ``prune_log/<name>/pytorch_model.bin``: LLM-Pruner's llama3.py, ``torch.save({'model': model, 'tokenizer': tok})``
  under transformers 4.4x, whose pickle names classes transformers 5 no longer has (``LlamaSdpaAttention``,
  ``tokenization_gpt2_fast.GPT2TokenizerFast``). Built here by registering those names for the time of the
  ``torch.save`` and removing them before anything reads the file.
- ``baselines/SliceGPT_2000/``: SliceGPT's own ``<model>_<sparsity>.pt`` + ``.json`` + config.json, and the
  ``pruned_model.bin`` that convert_slicegpt_model.py wrote with dill in the ``slicegpt`` environment (its classes
  are SliceGPT's, absent here).
- ``model_checkpoints/llamba_replaced_<layers>/``: create_replaced_model_checkpoint.py's ``model.pt`` (the whole
  module, Cartesia's classes), ``model_state_dict.pt``, ``tokenizer/``, ``checkpoint_info.json``, README.txt, with a
  config.json beside them.
- ``{'model': <state dict>}`` bundles, a model one folder down (``Magnitude_2000/pruned_model/``), and a ShortGPT
  model whose config.json has fewer layers and no ``removed_layers``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import types

import pytest
import torch

from analysis_helpers import BASE_TOTAL, PRUNED_TOTAL, base_and_pruned, state_dict_copy, tiny
from analysis.batch import batch_analyze
from analysis.compare import compare
from analysis.structure import structure_of
from conftest import run_task
from core.models import legacy
from core.models.legacy import PickleNotAllowed, detect_format, load_legacy, read_restricted
from core.models.llama import count_params
from core.models.load import byte_tokenizer, load_as_model
from core.models.slicegpt import save_slicegpt
from core.run.errors import LoadError
from pruning.slicegpt import SliceGPT

LLAMA_MOD = "transformers.models.llama.modeling_llama"
FAST_TOK_MOD = "transformers.models.gpt2.tokenization_gpt2_fast"  # transformers 4.x; gone in 5


@contextlib.contextmanager
def _classes_under(qualified: dict[str, type]):
    """Make each class importable as ``module.Name`` while inside (creating modules that do not exist), then remove
    every trace: a pickle written inside names classes that nothing outside can import."""
    added_modules, added_attrs = [], []
    try:
        for name, cls in qualified.items():
            mod_name, _, attr = name.rpartition(".")
            parts = mod_name.split(".")
            for k in range(1, len(parts) + 1):  # the package chain, as import needs it
                if ".".join(parts[:k]) not in sys.modules:
                    sys.modules[".".join(parts[:k])] = types.ModuleType(".".join(parts[:k]))
                    added_modules.append(".".join(parts[:k]))
            mod = sys.modules[mod_name]
            cls.__module__, cls.__qualname__, cls.__name__ = mod_name, attr, attr
            assert not hasattr(mod, attr), f"{name} exists: the test would not build an old file"
            setattr(mod, attr, cls)
            added_attrs.append((mod, attr))
        yield
    finally:
        for mod, attr in added_attrs:
            delattr(mod, attr)
        for mod_name in added_modules:
            del sys.modules[mod_name]


def write_llm_pruner_bundle(model, path):
    """LLM-Pruner's llama3.py ``--save_model`` under transformers 4.4x: attention modules of class
    LlamaSdpaAttention, a GPT2TokenizerFast (SmolLM2's tokenizer class there), the whole module pickled."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = copy.deepcopy(model)
    sdpa = type("LlamaSdpaAttention", (LlamaAttention,), {})
    fast = type("GPT2TokenizerFast", (), {})
    with _classes_under({f"{LLAMA_MOD}.LlamaSdpaAttention": sdpa, f"{FAST_TOK_MOD}.GPT2TokenizerFast": fast}):
        for layer in model.model.layers:
            layer.self_attn.__class__ = sdpa
        tok = fast()
        tok.__dict__.update(vocab_size=259, model_max_length=8192, _tokenizer=byte_tokenizer().backend_tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model, "tokenizer": tok}, path)


@pytest.fixture(scope="module")
def old(tmp_path_factory):
    """The user's folders, as the seeds describe them."""
    root = tmp_path_factory.mktemp("old")
    base, pruned, tok = base_and_pruned()
    # seed 000: prune_log/llama_prune/ with the final bundle and a timestamped run folder
    log_dir = root / "prune_log" / "llama_prune"
    write_llm_pruner_bundle(pruned, log_dir / "pytorch_model.bin")
    (log_dir / "description.txt").write_text("pruning_ratio: 0.25\n")
    run = log_dir / "2025-11-12-10-48-13"
    run.mkdir()
    (run / "train.sh").write_text("python llama3.py --pruning_ratio 0.25 --save_model\n")
    (run / "training.log").write_text("...\n")
    return root, base, pruned, tok


# --------------------------------------------------------------------------- LLM-Pruner bundles of transformers 4.4x


def test_llm_pruner_bundle_premise(old):
    """Today's full unpickle fails on it, allow_pickle or not: the class is gone."""
    root, *_ = old
    bundle = root / "prune_log" / "llama_prune" / "pytorch_model.bin"
    assert detect_format(bundle.parent).kind == "pickle_bundle"
    with pytest.raises(LoadError, match="LlamaSdpaAttention.*without unpickling"):
        load_legacy(bundle, allow_pickle=True)
    with pytest.raises(LoadError, match="LlamaSdpaAttention"):
        load_as_model(bundle, allow_pickle=True)


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_llm_pruner_bundle_analysed_without_running_code(old, monkeypatch, allow_pickle):
    root, base, pruned, _ = old
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("pickle_module")) or real_load(*a, **k))
    s = structure_of(root / "prune_log" / "llama_prune", name="llama_prune", allow_pickle=allow_pickle)
    assert loads == [legacy.RESTRICTED_PICKLE]  # only the restricted reader ran
    assert s.format == "pickle_bundle" and s.total_params == PRUNED_TOTAL
    assert [(la.num_heads, la.num_kv_heads, la.intermediate_size) for la in s.layers] == [
        (8, 2, 128), (4, 1, 96), (8, 2, 96), (8, 2, 128)]
    assert s.class_names == {"attention": "LlamaSdpaAttention", "mlp": "LlamaMLP"}
    assert s.config["hidden_size"] == 64 and s.config["model_type"] == "llama"
    assert any("LlamaSdpaAttention" in n and "GPT2TokenizerFast" in n for n in s.notes)
    cmp = compare(structure_of(base, name="base"), s)
    assert cmp["total_params"]["reduced"] == BASE_TOTAL - PRUNED_TOTAL
    assert cmp["layers"][1]["attention"]["num_heads"] == {"original": 8, "pruned": 4}


def test_llm_pruner_bundle_through_analyze_and_batch(old, tmp_path):
    root, *_ = old
    _, metrics = run_task(["task=analyze", f"model={root / 'prune_log' / 'llama_prune'}", "base=tiny",
                           "logger=none"], tmp_path / "a")
    assert metrics["status"] == "completed" and metrics["analysis"]["total_params"] == PRUNED_TOTAL
    assert metrics["analysis"]["original_params"] == BASE_TOTAL
    res = batch_analyze(root / "prune_log", structure_of(tiny()[0], name="tiny"), tmp_path / "b")
    assert [(m["name"], m["format"], m["status"]) for m in res["models"]] == [
        ("llama_prune", "pickle_bundle", "ok")]


class _Payload:
    """An object whose unpickling runs code (the attack a full unpickle is open to)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class _SetState:
    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):  # would run in a full unpickle
        open(state["marker"], "w").write("ran")


def test_restricted_reader_runs_nothing(old, tmp_path):
    _, _, pruned, _ = old
    path = tmp_path / "pytorch_model.bin"
    with _classes_under({"oldlib.evil.SetState": _SetState}):
        torch.save({"model": pruned, "tokenizer": _SetState(tmp_path / "b"), "hook": _Payload(tmp_path / "a")}, path)
    lm = read_restricted(path)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert {"builtins.exec", "__builtin__.exec"} & set(lm.stubbed) and "oldlib.evil.SetState" in lm.stubbed
    assert set(lm.state_dict) == set(pruned.state_dict()) - {k for k, _ in pruned.named_buffers()}
    for k, v in pruned.state_dict().items():
        if k in lm.state_dict:
            assert torch.equal(lm.state_dict[k], v), k
    with pytest.raises(PickleNotAllowed):  # full loading stays behind the opt-in
        load_legacy(path)


def test_restricted_reader_refuses_what_is_not_a_model(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": _Payload(tmp_path / "x"), "tokenizer": None}, path)
    with pytest.raises(PickleNotAllowed, match="no nn.Module.*allow_pickle=true"):
        structure_of(path, name="x")
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- {'model': <state dict>}


def test_nested_state_dict_bundle(old, tmp_path):
    """The regression: 'expected a dict of tensors, got dict'."""
    _, base, pruned, _ = old
    folder = tmp_path / "baselines" / "Wanda_2000"
    folder.mkdir(parents=True)
    torch.save({"model": state_dict_copy(pruned), "method": "wanda", "pruning_ratio": 0.2}, folder / "pruned_model.bin")
    (folder / "config.json").write_text(json.dumps(pruned.config.to_dict()))
    assert detect_format(folder).kind == "state_dict_pt"
    lm = load_legacy(folder)
    assert set(lm.state_dict) == set(pruned.state_dict()) and lm.meta == {"method": "wanda", "pruning_ratio": 0.2}
    res = batch_analyze(tmp_path / "baselines", structure_of(base, name="base"), tmp_path / "run")
    (m,) = res["models"]
    assert m["status"] == "ok", m.get("error")
    assert m["summary"]["total_params"] == PRUNED_TOTAL


# --------------------------------------------------------------------------- one folder down


def test_model_one_folder_down(old, tmp_path):
    """baselines/Magnitude_2000/pruned_model/ (save_pretrained) beside evaluation/ results."""
    _, base, pruned, tok = old
    folder = tmp_path / "baselines" / "Magnitude_2000"
    pruned.save_pretrained(folder / "pruned_model")
    tok.save_pretrained(folder / "pruned_model")
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "evaluation_results.json").write_text("{}")
    (folder / "evaluation_results.json").write_text("{}")
    info = detect_format(folder)
    assert info.kind == "hf" and info.model_dir == folder / "pruned_model" and "pruned_model/" in info.reason
    res = batch_analyze(tmp_path / "baselines", structure_of(base, name="base"), tmp_path / "run")
    assert [(m["name"], m["status"]) for m in res["models"]] == [("Magnitude_2000", "ok")]
    _, metrics = run_task(["task=analyze", f"model={folder}", "base=tiny", "logger=none"], tmp_path / "a")
    assert metrics["status"] == "completed" and metrics["analysis"]["total_params"] == PRUNED_TOTAL


# --------------------------------------------------------------------------- SliceGPT folder with the dill bundle


def _sliced(base):
    model = copy.deepcopy(base)
    model.config.rms_norm_eps = 1e-5
    SliceGPT(sparsity=0.25, progress=False)(model, torch.randint(0, 256, (4, 24),
                                                                 generator=torch.Generator().manual_seed(0)))
    return model


def test_slicegpt_folder_prefers_its_own_pt(old, tmp_path):
    import dill

    _, base, _, tok = old
    sliced = _sliced(base)
    folder = tmp_path / "baselines" / "SliceGPT_2000"
    save_slicegpt(sliced, folder, "Llama", 0.25)  # run_slicegpt.py's .pt + .json (+ the base config.json)
    # convert_slicegpt_model.py, in the slicegpt environment: the loaded model, dill-pickled, with SliceGPT's classes
    # (its model class is local to load_sliced_model, so dill writes it by value)
    uninit = type("UninitializedLlamaForCausalLM", (type(sliced),), {
        "__module__": "slicegpt.hf_utils", "__qualname__": "load_sliced_model.<locals>.UninitializedLlamaForCausalLM"})
    bundle_model = copy.deepcopy(sliced)
    bundle_model.__class__ = uninit
    torch.save({"model": bundle_model, "tokenizer": tok, "method": "SliceGPT", "pruning_ratio": 0.25,
                "actual_ratio": 0.25, "config": {"sparsity": 0.25, "round_interval": 8}},
               folder / "pruned_model.bin", pickle_module=dill)
    assert "dill._dill._create_type" in legacy.scan_pickle(folder / "pruned_model.bin").globals
    with pytest.raises(PickleNotAllowed):  # the bundle needs a full unpickle (and dill)
        load_legacy(folder / "pruned_model.bin")
    # read alone, the dill bundle is analysed too: its by-value class stands in as a stub, never built
    alone = structure_of(folder / "pruned_model.bin", name="bundle")
    assert alone.total_params == count_params(sliced) and alone.meta["method"] == "SliceGPT"
    info = detect_format(folder)
    assert info.kind == "slicegpt" and info.weights_path.name == "Llama_0.25.pt"
    assert "preferred over pruned_model.bin" in info.reason
    s = structure_of(folder, name="SliceGPT_2000")
    assert s.format == "slicegpt" and s.total_params == count_params(sliced)
    model, _ = load_as_model(folder)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, sliced(ids).logits)
    res = batch_analyze(tmp_path / "baselines", structure_of(base, name="base"), tmp_path / "run")
    assert [(m["name"], m["format"], m["status"]) for m in res["models"]] == [("SliceGPT_2000", "slicegpt", "ok")]


# --------------------------------------------------------------------------- the GA's checkpoint folder


def test_ga_checkpoint_state_dict_beside_config(tmp_path):
    """create_replaced_model_checkpoint.py --layers 1: a Llamba (Cartesia's names) whose layer 1 is a Llama layer."""
    from llamba_helpers import TINY_LLAMBA, tiny_hybrid

    hybrid, tok = tiny_hybrid(["mamba2", "attention", "mamba2"], vocab_size=264, rms_norm_eps=1e-5)
    cartesia = {legacy_name(k): v.clone() for k, v in hybrid.state_dict().items()}
    assert "backbone.layers.1.self_attn.q_proj.weight" in cartesia and "backbone.embedding.weight" in cartesia
    ckpt = tmp_path / "model_checkpoints" / "llamba_replaced_1"
    ckpt.mkdir(parents=True)
    cartesia_cls = type("LlambaLMHeadModel", (type(hybrid),), {})
    whole = copy.deepcopy(hybrid)
    with _classes_under({"cartesia_pytorch.Llamba.llamba.LlambaLMHeadModel": cartesia_cls}):
        whole.__class__ = cartesia_cls
        torch.save(whole, ckpt / "model.pt")
    torch.save(cartesia, ckpt / "model_state_dict.pt")
    tok.save_pretrained(ckpt / "tokenizer")
    (ckpt / "checkpoint_info.json").write_text(json.dumps({"replaced_layers": [1], "mmlu_score": 0.57,
                                                           "creation_time": "2025-10-15 12:00:00"}))
    (ckpt / "README.txt").write_text("model = torch.load('model.pt')\n")
    attention = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256}
    (ckpt / "config.json").write_text(json.dumps({**TINY_LLAMBA, **attention}))

    info = detect_format(ckpt)
    assert info.kind == "state_dict_pt" and info.weights_path.name == "model_state_dict.pt"
    assert info.config_path == ckpt / "config.json" and "preferred over model.pt" in info.reason
    s = structure_of(ckpt, name="llamba_replaced_1")  # no opt-in: a state dict
    assert s.total_params == count_params(hybrid) and s.meta["replaced_layers"] == [1]
    assert s.embedding == ["model.embed_tokens.weight"]
    assert set(s.layers[1].group("attention")) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert s.layers[1].num_heads == 4 and s.layers[1].num_kv_heads == 2
    assert {"mixer.in_proj", "mixer.out_proj"} <= set(s.layers[0].group("extra")) and not s.layers[0].group("attention")
    model, loaded_tok = load_as_model(ckpt)
    assert model.config.layer_types == ["mamba2", "attention", "mamba2"] and loaded_tok is not None
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hybrid(ids).logits)
    # without the donor's attention fields the attention layer cannot be built: one line saying what to add
    (ckpt / "config.json").write_text(json.dumps(TINY_LLAMBA))
    with pytest.raises(LoadError, match=r"layers \[1\] are Llama attention layers.*num_attention_heads"):
        load_as_model(ckpt)


def legacy_name(name: str) -> str:
    """HybridForCausalLM's name -> Cartesia's (core.models.llamba.KEY_PREFIXES, inverted)."""
    from core.models.llamba import KEY_PREFIXES

    for cartesia, ours in KEY_PREFIXES:
        if name.startswith(ours):
            return cartesia + name[len(ours):]
    return name


# --------------------------------------------------------------------------- ShortGPT from the old baselines folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shortgpt_aligned_by_content(tmp_path, dtype):
    """ShortGPT's code deletes the layers with the lowest block influence (here 2 and 5 of 8, not the last ones),
    then save_pretrained writes config.json with num_hidden_layers=6 and no record of which went."""
    base, tok = tiny(num_layers=8)
    short = copy.deepcopy(base)
    removed = [2, 5]
    for i in sorted(removed, reverse=True):
        del short.model.layers[i]
    short.config.num_hidden_layers = len(short.model.layers)
    folder = tmp_path / "baselines" / "ShortGPT_remove_2"
    short.to(dtype).save_pretrained(folder / "pruned_model")
    cfg = json.loads((folder / "pruned_model" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and "removed_layers" not in cfg
    b = structure_of(base, name="base")
    cmp = compare(b, structure_of(folder, name="ShortGPT_remove_2"))
    assert cmp["consistency"]["removed_layers"] == removed
    assert [e["pruned_layer_idx"] for e in cmp["layers"]] == [0, 1, None, 2, 3, None, 4, 5]
    assert "found by matching" in cmp["alignment_notes"][0]
    assert cmp["consistency"]["untouched_layers"] == [0, 1, 3, 4, 6, 7]
    # the base read from disk too (safetensors samples on both sides)
    base.save_pretrained(tmp_path / "base")
    cmp2 = compare(structure_of(tmp_path / "base", name="base"), structure_of(folder, name="s"))
    assert cmp2["consistency"]["removed_layers"] == removed


def test_shortgpt_content_that_does_not_match_falls_back(tmp_path):
    """Layers that are not copies of the base's (another base, retrained): the old assumption, said so."""
    base, _ = tiny(num_layers=8)
    other, _ = tiny(num_layers=8, seed=1)
    del other.model.layers[6:]
    other.config.num_hidden_layers = 6
    cmp = compare(structure_of(base, name="base"), structure_of(other, name="other"))
    assert cmp["consistency"]["removed_layers"] == [6, 7]
    assert "matches no base layer" in cmp["alignment_notes"][0] and "assuming the last" in cmp["alignment_notes"][0]
