"""Llamba (Cartesia's DiscreteMamba2 distillation of Llama-3) and Llama/Llamba hybrids: math, cache, load, save.

The reference below is the mixer's recurrence written from its definition (Cartesia's DiscreteMamba2 /
Phi-Mamba), one token at a time in float64, reading only a state dict: it shares no code with
core/models/modeling_hybrid.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from core.models.checkpoint import save_checkpoint
from core.run.errors import LoadError
from core.models.llama import Geometry, cache_kwarg, count_params, layer_types_of, output_cache, params_from_config
from core.models.llamba import hybrid_config_from_llamba, is_llamba_config, llamba_key_to_hybrid
from core.models.modeling_hybrid import DiscreteMamba2, HybridForCausalLM, LlambaDecoderLayer, MambaCacheLayer
from core.models.load import build_tiny, load_model
from core.models.ref import ModelRef, model_config, model_depth
from llamba_helpers import TINY_LLAMBA, TINY_SSM, randomize, tiny_hybrid, write_llamba_dir

CACHE = ".cache"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is many times faster than two on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the reference


def reference_mixer(p: dict, ssm: dict, u: torch.Tensor):
    """DiscreteMamba2 on u [b, l, d] from tensors ``p`` (in_proj.weight, z_bias, conv1d.*, D, out_proj.weight).

    in_proj -> [x | B | C | z | A_log]; causal depthwise conv over [x | B | C]; per value head h (query/key
    group h // (H/G)), a_t = exp(-softplus(A_log_t)):  s_t = a_t s_{t-1} + x_t B_t^T,  y_t = s_t C_t + D_h x_t;
    out = out_proj(y * silu(z + z_bias)). Returns (out [b, l, d], final state [b, H, P, N], last conv inputs).
    """
    u = u.double()
    g = {k: v.double() for k, v in p.items()}
    H, G, N, K = ssm["n_v_heads"], ssm["n_qk_heads"], ssm["d_state"], ssm["d_conv"]
    d_inner = g["out_proj.weight"].shape[1]
    P = d_inner // H
    proj = u @ g["in_proj.weight"].T + (g["in_proj.bias"] if "in_proj.bias" in g else 0)
    conv_dim = d_inner + 2 * G * N
    xbc_in, z, a_log = proj[..., :conv_dim], proj[..., conv_dim:conv_dim + d_inner], proj[..., conv_dim + d_inner:]
    b, l, _ = u.shape
    w = g["conv1d.weight"][:, 0]  # [conv_dim, K]; tap K-1 is the current token
    xbc = torch.zeros(b, l, conv_dim, dtype=torch.float64)
    for t in range(l):
        for k in range(K):
            src = t - (K - 1) + k
            if src >= 0:
                xbc[:, t] += w[:, k] * xbc_in[:, src]
    if "conv1d.bias" in g:
        xbc = xbc + g["conv1d.bias"]
    if ssm["activation"] in ("silu", "swish"):
        xbc = F.silu(xbc)
    x = xbc[..., :d_inner].reshape(b, l, H, P)
    B = xbc[..., d_inner:d_inner + G * N].reshape(b, l, G, N)
    C = xbc[..., d_inner + G * N:].reshape(b, l, G, N)
    group = torch.arange(H) // (H // G)
    state = torch.zeros(b, H, P, N, dtype=torch.float64)
    y = torch.zeros(b, l, H, P, dtype=torch.float64)
    for t in range(l):
        a = torch.exp(-F.softplus(a_log[:, t]))  # [b, H]
        state = a[:, :, None, None] * state + x[:, t, :, :, None] * B[:, t, group][:, :, None, :]
        y[:, t] = (state * C[:, t, group][:, :, None, :]).sum(-1) + g["D"][:, None] * x[:, t]
    gate = F.silu(z + (g["z_bias"] if "z_bias" in g else 0))
    out = (y.reshape(b, l, d_inner) * gate) @ g["out_proj.weight"].T
    out = out + (g["out_proj.bias"] if "out_proj.bias" in g else 0)
    last = F.pad(xbc_in.transpose(1, 2), (max(K - l, 0), 0))[..., -K:]
    return out, state, last


def reference_llamba_logits(cfg: dict, sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """Cartesia's LlambaLMHeadModel from its own state dict: embedding, Blocks, final norm, LM head (float64)."""
    def rms(h, w, eps):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()

    h = sd["backbone.embedding.weight"].double()[ids]
    for i in range(cfg["n_layer"]):
        pre = f"backbone.layers.{i}."
        mixer = {k[len(pre) + 6:]: v for k, v in sd.items() if k.startswith(pre + "mixer.")}
        h = h + reference_mixer(mixer, cfg["ssm_cfg"], rms(h, sd[pre + "input_layernorm.weight"], 1e-5))[0]
        m = rms(h, sd[pre + "post_attention_layernorm.weight"], 1e-5)
        gate, up = (m @ sd[pre + f"mlp.{n}.weight"].double().T for n in ("gate_proj", "up_proj"))
        h = h + (F.silu(gate) * up) @ sd[pre + "mlp.down_proj.weight"].double().T
    h = rms(h, sd["backbone.final_layernorm.weight"], cfg["norm_epsilon"])
    head = sd["backbone.embedding.weight"] if cfg.get("tie_embeddings") else sd["lm_head.weight"]
    return h @ head.double().T


def _mixer(seed=0, **ssm):
    torch.manual_seed(seed)
    cfg = {**TINY_SSM, **ssm}
    m = DiscreteMamba2(d_model=16, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p[0].numel() ** 0.5 if p.dim() > 1 else 2))
    return m, cfg


# --------------------------------------------------------------------------- the mixer


@pytest.mark.parametrize("length", [1, 3, 4, 7, 13])
@pytest.mark.parametrize("variant", [{}, {"activation": "silu", "n_qk_heads": 1}, {"bias": True, "d_conv": 2}])
def test_chunked_mixer_equals_the_recurrence(length, variant):
    """Chunk size 4: lengths below, at and across chunk boundaries; GQA-like groups; silu; biases."""
    m, cfg = _mixer(**variant)
    u = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(length))
    ref, ref_state, ref_conv = reference_mixer(m.state_dict(), cfg, u)
    with torch.no_grad():
        torch.testing.assert_close(m(u), ref.float(), rtol=1e-4, atol=1e-5)
        state = MambaCacheLayer()
        m(u, state=state)
    torch.testing.assert_close(state.ssm_state.double(), ref_state, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.conv_state.double(), ref_conv, rtol=1e-6, atol=1e-6)
    assert state.get_seq_length() == length


def test_mixer_continues_from_its_state():
    """Prefill in pieces (multi-token continuation) and token steps all equal the one-shot forward."""
    m, _ = _mixer(activation="silu")
    u = torch.randn(1, 11, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(u)
        state = MambaCacheLayer()
        parts = [m(u[:, :5], state=state), m(u[:, 5:7], state=state)]
        parts += [m(u[:, t:t + 1], state=state) for t in range(7, 11)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- Cartesia checkpoints


@pytest.mark.parametrize("variant", [{}, {"tie_embeddings": True}, {"shards": 2}])
def test_cartesia_checkpoint_loads(tmp_path, variant):
    shards = variant.pop("shards", 1)
    cfg = {**TINY_LLAMBA, **variant}
    path, sd = write_llamba_dir(tmp_path / "llamba", cfg, shards=shards)
    ref = ModelRef.at(path)
    model, tok = load_model(ref, cache_dir=CACHE)
    assert isinstance(model, HybridForCausalLM) and tok is None
    assert layer_types_of(model) == ["mamba2"] * 3
    assert model.config.vocab_size == 264  # 259 padded to a multiple of 8, as LlambaLMHeadModel does
    # Every tensor lands where the key map says, unchanged.
    state = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(state[llamba_key_to_hybrid(k)], v), k
    expected = {llamba_key_to_hybrid(k) for k in sd} | {"lm_head.weight"}
    assert set(state) == expected
    if cfg["tie_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # And it computes Cartesia's model.
    ids = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.double(), reference_llamba_logits(cfg, sd, ids),
                                   rtol=1e-4, atol=1e-4)
    # Depth and config without weights.
    conf = model_config(ref, CACHE)
    assert conf["num_hidden_layers"] == 3 and conf["hidden_size"] == 32 and conf["model_type"] == "llamba"
    assert model_depth(ref, CACHE) == 3
    assert params_from_config(conf) == count_params(model)


@pytest.mark.parametrize("change,message", [
    ({"drop": ("backbone.layers.1.mixer.D",)}, r"1 missing \(backbone\.layers\.1\.mixer\.D\)"),
    ({"reshape": {"backbone.layers.2.mixer.in_proj.weight": (99, 32)}},
     r"wrong shape \(backbone\.layers\.2\.mixer\.in_proj"),
    ({"extra": {"backbone.layers.0.mixer.A_log": torch.zeros(4)}},
     r"1 unexpected \(backbone\.layers\.0\.mixer\.A_log\)"),
])
def test_bad_cartesia_checkpoint_is_a_load_error(tmp_path, change, message):
    path, _ = write_llamba_dir(tmp_path / "bad", **change)
    with pytest.raises(LoadError, match=message) as e:
        load_model(ModelRef.at(path), cache_dir=CACHE)
    assert "\n" not in str(e.value)


def test_llamba_config_to_hybrid_fields():
    assert is_llamba_config(TINY_LLAMBA) and not is_llamba_config({"model_type": "llama", "hidden_size": 8})
    donor = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
             "rope_theta": 500000.0, "max_position_embeddings": 8192}
    h = hybrid_config_from_llamba(TINY_LLAMBA, attention=donor)
    assert h["layer_types"] == ["mamba2"] * 3 and h["ssm_cfg"]["d_state"] == 8 and h["ssm_cfg"]["d_conv"] == 4
    assert (h["num_key_value_heads"], h["rope_theta"], h["max_position_embeddings"]) == (2, 500000.0, 8192)
    with pytest.raises(LoadError, match="hidden_size"):
        hybrid_config_from_llamba(TINY_LLAMBA, attention={**donor, "hidden_size": 64})


# --------------------------------------------------------------------------- decoding with the cache


def _greedy_by_full_forwards(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def _no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("types", [["mamba2", "attention", "attention"], ["attention", "mamba2", "mamba2"],
                                   ["mamba2", "mamba2"]])
def test_generate_with_cache_equals_without(types):
    model, _ = tiny_hybrid(types, seed=1)
    _no_eos(model)
    ids = torch.randint(0, 259, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, _greedy_by_full_forwards(model, ids, 10))
    assert len(set(cached[0, 6:].tolist())) > 1  # not a degenerate model


@pytest.mark.parametrize("types", [["mamba2", "attention", "mamba2"], ["mamba2"] * 3])
def test_incremental_logits_equal_full_forward(types):
    """Every position's logits, fed one token at a time through the cache, equal one full forward."""
    model, _ = tiny_hybrid(types, seed=3)
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :5], use_cache=True)  # prefill, then steps
        pieces, past = [out.logits], output_cache(out)
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], use_cache=True, **{cache_kwarg(): past})
            pieces.append(out.logits)
            past = output_cache(out)
    assert past.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_llamba_layer_swapped_into_a_plain_llama(tmp_path):
    """A LlambaDecoderLayer at index 0 of a stock LlamaForCausalLM: its DynamicCache slot becomes a mamba2 state,
    positions stay right; saving it writes the hybrid format."""
    llama, tok = build_tiny(num_layers=3, hidden_size=32, intermediate_size=48, num_heads=4, num_kv_heads=2, seed=0)
    randomize(llama, 5)
    donor, _ = tiny_hybrid(["mamba2"] * 3, seed=6)
    llama.model.layers[0] = donor.model.layers[0]
    _no_eos(llama)
    ids = torch.randint(0, 259, (1, 7), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cached = llama.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(cached, _greedy_by_full_forwards(llama, ids, 8))
    out = save_checkpoint(llama, tok, tmp_path / "swapped", {"method": "replace"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "prunelab_hybrid" and cfg["layer_types"] == ["mamba2", "attention", "attention"]
    loaded, _ = load_model(ModelRef.at(out), cache_dir=CACHE)
    x = ids[:, :5]
    assert torch.equal(loaded(x).logits, llama(x).logits)


# --------------------------------------------------------------------------- the hybrid checkpoint


def test_hybrid_anatomy():
    model, _ = tiny_hybrid(["attention", "mamba2", "attention"], intermediate_size=48)
    assert layer_types_of(model) == ["attention", "mamba2", "attention"]
    assert isinstance(model.model.layers[1], LlambaDecoderLayer)
    g = Geometry.of(model)
    assert g.heads == (4, 0, 4) and g.kv_heads == (2, 0, 2) and g.widths == (48, 48, 48)
    assert g.group_params(1) == 0
    hs = model(torch.tensor([[1, 2, 3]]), output_hidden_states=True).hidden_states
    assert len(hs) == 4  # embeddings + every layer, mamba2 ones included


def test_hybrid_checkpoint_roundtrip(tmp_path):
    model, tok = tiny_hybrid(["mamba2", "attention", "mamba2", "attention"], seed=8)
    _no_eos(model)
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "hybrid", "layers": [0, 2]})
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_prunelab_hybrid.py", "checkpoint_info.json",
            "tokenizer.json"} <= names and "modeling_prunelab.py" not in names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "prunelab_hybrid"
    assert cfg["layer_types"] == ["mamba2", "attention", "mamba2", "attention"]
    assert cfg["layer_configs"][0] == {"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 48}
    assert cfg["layer_configs"][1] == {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48}
    assert cfg["ssm_cfg"]["d_state"] == 8 and cfg["ssm_cfg"]["chunk_size"] == 4
    assert cfg["auto_map"] == {"AutoConfig": "modeling_prunelab_hybrid.HybridConfig",
                               "AutoModelForCausalLM": "modeling_prunelab_hybrid.HybridForCausalLM"}
    assert params_from_config(cfg) == count_params(model)

    ids = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = model(ids).logits
        gen = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    loaded, ltok = load_model(ModelRef.at(out), cache_dir=CACHE)
    assert isinstance(loaded, HybridForCausalLM) and ltok("ab").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)

    # Plain transformers, prunelab not importable: same logits, and generation with its own cache.
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(ref, tmp_path / "ref.pt")
    torch.save(gen, tmp_path / "gen.pt")
    script = f"""
import sys
for name in ("core", "pruning", "analysis", "replacement", "recipes", "llamba_helpers"):
    sys.modules[name] = None  # prunelab is not importable here
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
assert tok("ab").input_ids
assert type(m).__name__ == "HybridForCausalLM", type(m)
ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
with torch.no_grad():
    print("MAXDIFF", (m(ids).logits - torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)).abs().max().item())
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    gen = m.generate(ids[:1], max_new_tokens=6, do_sample=False)
print("GEN", torch.equal(gen, torch.load({str(tmp_path / 'gen.pt')!r}, weights_only=True)))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MAXDIFF 0.0" in proc.stdout and "GEN True" in proc.stdout, proc.stdout
