"""Hybrids on tiny models: donor layers read lazily, swapped by reference, saved and reloaded; the fitness."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from core.models.checkpoint import save_checkpoint
from core.run.errors import ConfigError, LoadError
from core.models.load import build_tiny, load_model
from core.models.ref import ModelRef
from pruning.llm_pruner import LLMPruner
from replacement.fitness import HybridFitness, donor_logprobs
from replacement.hybrid import DonorLayers, assemble, check_compatible, check_layers, swapped


@pytest.fixture
def pair(tmp_path):
    """(base, donor model, donor dir): a pruned tiny Llama and its original, saved as a plain HF dir."""
    donor, tok = build_tiny(num_layers=4, seed=0)
    donor.save_pretrained(tmp_path / "donor")
    tok.save_pretrained(tmp_path / "donor")
    base, _ = build_tiny(num_layers=4, seed=0)
    calib = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    LLMPruner(ratio=0.5, mlp_ratio=0.5, attention_ratio=0.5, attention_layers=(0, 4), mlp_layers=(0, 4),
              progress=False)(base, calib)
    return base, donor, tmp_path / "donor", tok


def _logits(model, x):
    with torch.no_grad():
        return model(x, use_cache=False).logits


def test_all_layers_from_the_donor_is_the_donor_and_none_is_the_base(pair):
    base, donor, path, _ = pair
    x = torch.randint(0, 256, (2, 12))
    layers = DonorLayers.open(path)
    base_out = _logits(base, x)
    with swapped(base, {i: layers[i] for i in range(4)}):
        torch.testing.assert_close(_logits(base, x), _logits(donor, x), rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(base, x), base_out, rtol=0, atol=0)  # restored: the same modules again
    with swapped(base, {}):
        torch.testing.assert_close(_logits(base, x), base_out, rtol=0, atol=0)


def test_donor_layers_are_read_lazily_and_swapped_by_reference(pair, monkeypatch):
    base, _, path, _ = pair
    import safetensors

    layers = DonorLayers.open(path)
    reads = []
    real = safetensors.safe_open

    def counting(*a, **k):
        reads.append(a[0])
        return real(*a, **k)
    monkeypatch.setattr(safetensors, "safe_open", counting)
    layer2 = layers[2]
    assert layers[2] is layer2 and len(reads) == 1  # read once, only when asked
    assert set(layers._cache) == {2}
    with swapped(base, {2: layer2}):
        assert base.model.layers[2] is layer2  # the module itself, no copy
        assert layer2.self_attn.layer_idx == 2


def test_saved_hybrid_reloads_in_plain_transformers(pair, tmp_path):
    base, donor, path, tok = pair
    assemble(base, DonorLayers.open(path), [1, 3])
    assert base.config.layer_sources == ["base", "donor", "base", "donor"]
    out = save_checkpoint(base, tok, tmp_path / "hybrid", {"method": "replace", "replaced_layers": [1, 3]})
    cfg = json.loads((out / "config.json").read_text())
    assert [l["intermediate_size"] for l in cfg["layer_configs"]] == [64, 128, 64, 128]
    x = torch.randint(0, 256, (2, 12))
    want = _logits(base, x)
    loaded, _ = load_model(ModelRef.at(out), cache_dir=tmp_path)
    torch.testing.assert_close(_logits(loaded, x), want, rtol=0, atol=0)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys\n"
            "for name in ('core', 'pruning', 'replacement', 'recovery', 'analysis', 'recipes'):\n"
            "    sys.modules[name] = None  # prunelab is not importable here\n"
            "import torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
            f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
            f"torch.save(m(x, use_cache=False).logits, {str(tmp_path / 'y.pt')!r})\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=0, atol=0)


def test_bad_layers_and_pairs_are_one_line():
    with pytest.raises(ConfigError, match=r"\[7\] out of range: the model has 4 layers"):
        check_layers([1, 7], 4)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[2\] given more than once"):
        check_layers([2, 2], 4)
    with pytest.raises(ConfigError, match="base a and donor b differ in hidden width \\(64 vs 128\\)"):
        check_compatible({"hidden_size": 64, "vocab_size": 259}, {"hidden_size": 128, "vocab_size": 259}, "a", "b")
    with pytest.raises(ConfigError, match="differ in vocabulary"):
        check_compatible({"hidden_size": 64, "vocab_size": 259}, {"d_model": 64, "vocab_size": 300}, "a", "b")


def test_donor_without_the_layer_is_a_load_error(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, path, _ = pair
    sd = load_file(path / "model.safetensors")
    for k in [k for k in sd if k.startswith("model.layers.3.")]:
        del sd[k]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    layers = DonorLayers.open(path)
    layers[1]  # the others still load
    with pytest.raises(LoadError, match="no tensors for layer 3"):
        layers[3]


def test_fitness_kl_prefix_cache_and_ppl(pair):
    base, donor, path, _ = pair
    tokens = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))
    layers = DonorLayers.open(path)
    targets = donor_logprobs(donor, tokens)
    cached = HybridFitness(base, layers, tokens, targets=targets, prefix_cache=True, batch=4)
    plain = HybridFitness(base, layers, tokens, targets=targets, prefix_cache=False, batch=4)
    for cand in [(), (2,), (1, 3), (0, 1, 2, 3)]:
        assert cached(cand) == pytest.approx(plain(cand), rel=1e-6)
        assert cached(cand, 16) == pytest.approx(plain(cand, 16), rel=1e-6)  # first row only
    assert cached((0, 1, 2, 3)) == pytest.approx(0.0, abs=2e-3)  # the donor itself (fp16 targets)
    assert cached(()) > cached((1, 3)) > 0
    ppl = HybridFitness(base, layers, tokens, metric="ppl")
    assert ppl((0, 1, 2, 3)) == pytest.approx(
        torch.exp(torch.nn.functional.cross_entropy(_logits(donor, tokens)[:, :-1].reshape(-1, 259),
                                                    tokens[:, 1:].reshape(-1))).item(), rel=1e-5)


def test_llamba_base_with_llama_layers(tmp_path):
    """The seed's workflow in miniature: a Cartesia-layout Llamba with two layers back from a Llama donor."""
    from core.models.llama import layer_types_of
    from llamba_helpers import write_llamba_dir

    base_dir, _ = write_llamba_dir(tmp_path / "llamba")
    donor, tok = build_tiny(num_layers=3, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2,
                            vocab_size=264, seed=1)
    donor.config.rms_norm_eps = 1e-5  # Llama-3's, and Llamba's (another eps is refused: one line)
    donor.save_pretrained(tmp_path / "llama")
    layers = DonorLayers.open(tmp_path / "llama")
    assert layers.layer_types() == ["attention"] * 3
    base, _ = load_model(ModelRef.at(base_dir), cache_dir=tmp_path)
    from core.models.ref import model_config

    check_compatible(model_config(ModelRef.at(base_dir), tmp_path), layers.config, "llamba", "llama")
    assemble(base, layers, [0, 2])
    assert layer_types_of(base) == ["attention", "mamba2", "attention"] == base.config.layer_types
    assert base.config.num_attention_heads == 4 and base.config.head_dim == 8  # the donor's attention settings
    x = torch.randint(0, 259, (1, 6))
    with torch.no_grad():
        cached = base.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
        plain = base.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)
    out = save_checkpoint(base, tok, tmp_path / "hybrid", {"method": "replace", "replaced_layers": [0, 2]})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "prunelab_hybrid" and cfg["layer_types"] == ["attention", "mamba2", "attention"]
    assert cfg["layer_sources"] == ["donor", "llamba", "donor"]
    loaded, _ = load_model(ModelRef.at(out), cache_dir=tmp_path)
    torch.testing.assert_close(_logits(loaded, x), _logits(base, x), rtol=0, atol=0)
