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

from core.models.checkpoint import save_checkpoint
from core.run.errors import ConfigError
from core.models.llama import count_params
from core.models.load import build_tiny, load_model
from core.models.ref import ModelRef
from pruning import PruneError
from pruning.slicegpt import SliceGPT

X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model, x=X):
    with torch.no_grad():
        return model(x).logits


def center_rows(model):
    """SliceGPT's ``fuse_modules`` on the embedding: each row loses its mean (in float64). A tied LM head is
    untied first and keeps the uncentered rows, as there."""
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        w = model.model.embed_tokens.weight
        w64 = w.double()
        model.model.embed_tokens.weight = torch.nn.Parameter((w64 - w64.mean(-1, keepdim=True)).to(w.dtype))
    return model


def offset_rows(model, seed=7):
    """Give each embedding row a mean of its own (a random model's rows are near zero-mean; a trained one's are
    not), so the mean subtraction measurably changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.model.embed_tokens.weight
        w.add_(0.05 * torch.randn(w.shape[0], 1, generator=g))


@pytest.mark.parametrize("orientation", ["pca", "random"])
def test_sparsity_zero_reproduces_the_dense_logits(tiny, calib, orientation):
    model, _ = tiny
    dense = logits(model)
    result = SliceGPT(sparsity=0.0, final_orientation=orientation, batch_size=3, center_embeddings=False,
                      progress=False)(model, calib)
    assert model.model.embed_tokens.weight.shape == (259, 64)  # rotated, not sliced
    assert not any(name.endswith("norm.weight") for name, _ in model.named_parameters())  # scales fused
    torch.testing.assert_close(logits(model), dense, rtol=0, atol=2e-5)
    assert {"embed_s", "layers_s", "pca_s", "rotate_s"} <= set(result.timings)


def test_tied_embeddings_are_untied_and_still_exact(calib):
    model, _ = build_tiny(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    offset_rows(model)
    fused = logits(center_rows(copy.deepcopy(model)))  # the tie is kept in `model` itself
    result = SliceGPT(sparsity=0.0, progress=False)(model, calib)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert result.details["untied_embeddings"] and any("untied" in n for n in result.notes)
    torch.testing.assert_close(logits(model), fused, rtol=0, atol=2e-5)


def test_sparsity_zero_by_default_is_slicegpts_fused_model(tiny, calib):
    """SliceGPT subtracts each embedding row's mean (``fuse_modules``): on a Llama (RMSNorm) that changes the
    outputs a little, so sparsity 0 reproduces the model with centered embedding rows, not the dense one;
    ``center_embeddings=false`` keeps the dense logits."""
    model, _ = tiny
    offset_rows(model)
    dense = logits(model)
    fused = logits(center_rows(copy.deepcopy(model)))
    assert (fused - dense).abs().max() > 1e-3  # the subtraction is not a no-op on this model
    other = copy.deepcopy(model)
    result = SliceGPT(sparsity=0.0, progress=False)(model, calib)
    assert result.details["center_embeddings"] is True and result.details["rotation_dtype"] == "float64"
    torch.testing.assert_close(logits(model), fused, rtol=0, atol=2e-5)
    SliceGPT(sparsity=0.0, center_embeddings=False, rotation_dtype="float32", progress=False)(other, calib)
    torch.testing.assert_close(logits(other), dense, rtol=0, atol=2e-5)


def test_orientation_does_not_change_a_sliced_model(tiny, calib):
    model, _ = tiny
    other = copy.deepcopy(model)
    SliceGPT(sparsity=0.25, final_orientation="pca", progress=False)(model, calib)
    SliceGPT(sparsity=0.25, final_orientation="random", seed=3, progress=False)(other, calib)
    torch.testing.assert_close(logits(model), logits(other), rtol=0, atol=1e-4)


def _reference_slicegpt(model, calib, width):
    """A direct transcription of SliceGPT's ``layernorm_fusion.fuse_modules`` (the LM head untied, each embedding
    row's mean subtracted, the norm scales fused) and ``rotate.rotate_and_slice_sequential`` (pca orientation,
    head not sliced), all in float64: each layer runs twice, once for the signal between its blocks
    (post-attention norm input) and once, rotated and sliced up to its MLP, for its output."""
    import types

    model = copy.deepcopy(model).double().eval()
    inner, hidden = model.model, model.config.hidden_size

    class RMSN(torch.nn.Module):
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / hidden + model.config.rms_norm_eps)

    def forward(self, h, **kw):
        r = h
        a, _ = self.self_attn(hidden_states=self.input_layernorm(h), **kw)
        h = r @ self.attn_shortcut_Q + a
        return h @ self.mlp_shortcut_Q + self.mlp(self.post_attention_layernorm(h))

    def pca(xs):
        cov = sum(torch.sum(x.mT @ x, dim=0) for x in xs)
        cov.diagonal().add_(0.01 * cov.diagonal().mean())
        values, vectors = torch.linalg.eigh(cov)
        return vectors[:, torch.argsort(values, descending=True)]

    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        emb = inner.embed_tokens.weight.data
        inner.embed_tokens.weight.data = emb - emb.mean(dim=-1, keepdim=True)
        for layer in inner.layers:
            for norm, lins in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                               (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                for name in lins:
                    lin = getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj") else layer.mlp, name)
                    lin.weight.data = lin.weight.data * norm.weight
            layer.input_layernorm, layer.post_attention_layernorm = RMSN(), RMSN()
            layer.forward = types.MethodType(forward, layer)
        model.lm_head.weight.data = model.lm_head.weight.data * inner.norm.weight
        inner.norm = RMSN()

        class Catcher(torch.nn.Module):
            def forward(self, *args, **kwargs):
                self.kwargs = kwargs
                self.x = args[0] if args else kwargs.pop("hidden_states")
                raise ValueError

        first, catcher = inner.layers[0], Catcher()
        inner.layers[0] = catcher
        with pytest.raises(ValueError):
            model(input_ids=calib, use_cache=False)
        inner.layers[0] = first
        x, kw = catcher.x, catcher.kwargs
        q = pca([x])
        inner.embed_tokens.weight.data = (inner.embed_tokens.weight.data @ q)[:, :width]
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            layer.attn_shortcut_Q = q.T[:width]
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                lin.weight.data = (lin.weight.data @ q)[:, :width]
            x = (x @ q)[..., :width]
            layer.mlp_shortcut_Q = torch.eye(hidden, dtype=x.dtype)
            signal = []
            hook = layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: signal.append(a[0]))
            layer(x, **kw)
            hook.remove()
            q = pca(signal)
            layer.attn_shortcut_Q = layer.attn_shortcut_Q @ q[:, :width]
            attn.o_proj.weight.data = (q.T @ attn.o_proj.weight.data)[:width]
            layer.mlp_shortcut_Q = q.T[:width]
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.data = (lin.weight.data @ q)[:, :width]
            x = layer(x, **kw)
            q = pca([x])
            out = hidden if i == len(inner.layers) - 1 else width
            layer.mlp_shortcut_Q = (layer.mlp_shortcut_Q @ q)[:, :out]
            mlp.down_proj.weight.data = (q.T @ mlp.down_proj.weight.data)[:out]
        model.lm_head.weight.data = model.lm_head.weight.data @ q
        return model(X).logits.float()


def test_sliced_logits_match_a_transcription_of_slicegpt(tiny, calib):
    """sparsity > 0 against an independent float64 transcription of SliceGPT's fuse_modules and
    rotate_and_slice_sequential (norm scales and embedding row means made non-trivial so their fusion and
    subtraction count): the PCA points, the eigenvector order, the shortcuts ``Q_prev[:, :d]^T Q_next[:, :d]``, the
    MLP-input PCA on the stream after the sliced attention and the embedding mean subtraction all matter. Without
    the subtraction (``center_embeddings=false``, this implementation's behaviour before issue 26) the result is
    another model."""
    model, _ = tiny
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    offset_rows(model)
    dense = logits(model)
    expected = _reference_slicegpt(model, calib, 48)
    old = copy.deepcopy(model)
    SliceGPT(sparsity=0.25, final_orientation="random", progress=False)(model, calib)
    got = logits(model)
    assert (got - dense).abs().max() > 100 * (got - expected).abs().max()  # slicing changed the model
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    SliceGPT(sparsity=0.25, center_embeddings=False, progress=False)(old, calib)
    assert (logits(old) - expected).abs().max() > 100 * (got - expected).abs().max()


def test_float32_rotation_stays_close(tiny, calib):
    """``rotation_dtype=float32`` (weights rotated in float32, stored in the model's dtype either way) is the
    same model to float32 rounding."""
    model, _ = tiny
    other = copy.deepcopy(model)
    SliceGPT(sparsity=0.25, final_orientation="pca", progress=False)(model, calib)
    SliceGPT(sparsity=0.25, final_orientation="pca", rotation_dtype="float32", progress=False)(other, calib)
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=1e-4)


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
    ({"rotation_dtype": "bfloat16"}, "pruner.rotation_dtype='bfloat16' is not one of float64, float32"),
    ({"center_embeddings": 1}, "pruner.center_embeddings=1 must be true or false"),
    ({"offload": True}, "pruner.offload=true needs pruner.device"),
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
    SliceGPT(sparsity=0.0, center_embeddings=False, progress=False)(model, calib)
    torch.testing.assert_close(logits(model, x), dense, rtol=0, atol=2e-3)
    assert model.model.embed_tokens.weight.shape == (49152, 576) and model.lm_head.weight.shape == (49152, 576)
