"""GGUF files run in llama.cpp itself (llama-cpp-python): logits on every position against the model's own forward.

Tolerances (logit error = max |llama.cpp logit - model logit| / max |model logit|, over every position and token):
f32 file, f32 KV cache: <= 1e-3 and greedy agreement >= 0.99 (measured: below 5e-6). f16 / bf16 / q8_0 files with
llama.cpp's default f16 KV cache, on a random model with weights of std 0.1 (std 0.2 is chaotic enough that q8_0's
rounding of weights and activations moves 17% of the argmaxes): <= 5e-3 / 2e-2 / 5e-2, agreement >= 0.99 / 0.98
/ 0.95 (measured 6e-4 / 5e-3 / 1.5e-2, 1.0 / 0.995 / 0.97).
"""

from __future__ import annotations

import json

import pytest
import torch

from export_helpers import HETERO, hetero_model, tokens, torch_logits

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: GGUF files cannot be run here")

from recipes.export import compare, llama_cpp_greedy, llama_cpp_logits, llama_cpp_model  # noqa: E402

TOL = {"f32": (1e-3, 0.99), "f16": (5e-3, 0.99), "bf16": (2e-2, 0.98), "q8_0": (5e-2, 0.95)}

VARIANTS = {
    "hetero": HETERO,  # per-layer heads / KV / widths, biases, attention-free, FFN-free, removed layer
    "uniform": [(8, 2, 128, False, False)] * 3,  # written as the plain `llama` architecture
    "layer0_attention_free": [(0, 0, 96, False, False), (8, 2, 64, False, False), (4, 1, 32, False, True)],
    "last_layer_ffn_free": [(8, 2, 64, False, False), (4, 2, 40, True, False), (6, 2, 0, False, False)],
    "first_layers_removed": [(0, 0, 0, False, False), (0, 0, 0, False, False), (8, 2, 64, False, False),
                             (2, 2, 16, False, False)],
}


def _export(model, tok, path, out_type="f32", **kw):
    from export.layout import check_expressible
    from export.to_gguf import write_gguf
    from export.tokenizer import from_hf

    check_expressible(model, "gguf")
    return write_gguf(model, from_hf(tok), path, out_type, **kw)


def _run(path, ids, f32_cache=True):
    llm = llama_cpp_model(path, n_ctx=len(ids) + 16, f32_cache=f32_cache, threads=1)
    try:
        return llama_cpp_logits(llm, ids)
    finally:
        llm.close()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_f32_logits_match_the_model(variant, tmp_path):
    model, tok = hetero_model(VARIANTS[variant])
    report = _export(model, tok, tmp_path / "m.gguf")
    assert report.architecture == ("llama" if variant == "uniform" else "deci")
    ids = tokens(200)
    ref = torch_logits(model, ids).numpy()
    result = compare(ref, _run(tmp_path / "m.gguf", ids))
    assert result["logit_scale"] > 1.0
    assert result["logit_error"] <= 1e-3 and result["greedy_agreement"] >= 0.99, result


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},  # wavelengths on both sides of 16..64: all three branches
], ids=["linear", "llama3"])
def test_rope_scaling_matches(rope, tmp_path):
    model, tok = hetero_model(HETERO, rope=rope)
    _export(model, tok, tmp_path / "m.gguf")
    ids = tokens(200)
    result = compare(torch_logits(model, ids).numpy(), _run(tmp_path / "m.gguf", ids))
    assert result["logit_error"] <= 1e-3 and result["greedy_agreement"] >= 0.99, result


def test_an_attention_only_hybrid_exports(tmp_path):
    """task=replace's hybrids whose donor layers are attention (a pruned model's layers in its original)."""
    from llamba_helpers import tiny_hybrid

    model, tok = tiny_hybrid(["attention", "attention", "attention"])
    model.model.layers[1].mlp.down_proj.weight.data.mul_(3.0)
    _export(model, tok, tmp_path / "h.gguf")
    ids = tokens(100)
    result = compare(torch_logits(model, ids).numpy(), _run(tmp_path / "h.gguf", ids))
    assert result["logit_error"] <= 1e-3 and result["greedy_agreement"] >= 0.99, result


def test_the_workarounds_are_where_llama_cpp_needs_them(tmp_path):
    model, tok = hetero_model(VARIANTS["layer0_attention_free"])
    r = _export(model, tok, tmp_path / "a.gguf")
    assert r.dummy_attention == [0] and r.zero_ffn == []
    model, tok = hetero_model(HETERO)
    r = _export(model, tok, tmp_path / "b.gguf")
    assert r.zero_ffn == [3] and r.layers_dropped == [4] and r.blocks == len(HETERO) - 1
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "b.gguf")).fields
    heads = fields["deci.attention.head_count"].contents()
    ffn = fields["deci.feed_forward_length"].contents()
    assert heads == [8, 4, 0, 6, 8] and ffn == [96, 40, 128, 1, 128]  # no rounding, the zero FFN of width 1
    assert fields["prunelab.source_layers"].contents() == [0, 1, 2, 3, 5]


def test_without_the_zero_ffn_llama_cpp_drops_the_attention(tmp_path):
    """The quirk the zero FFN works around: an FFN-free layer's attention output never reaches the residual."""
    layers = [(8, 2, 64, False, False), (6, 2, 0, False, False), (8, 2, 64, False, False)]
    model, tok = hetero_model(layers)
    _export(model, tok, tmp_path / "raw.gguf", fix_quirks=False)
    ids = tokens(64)
    ref = torch_logits(model, ids).numpy()
    raw = compare(ref, _run(tmp_path / "raw.gguf", ids))
    # what llama.cpp computes instead: the model with layer 1 removed entirely
    without, _ = hetero_model([layers[0], (0, 0, 0, False, False), layers[2]])
    without.load_state_dict(model.state_dict(), strict=False)
    assert raw["logit_error"] > 0.05
    assert compare(torch_logits(without, ids).numpy(), _run(tmp_path / "raw.gguf", ids))["logit_error"] <= 1e-3
    _export(model, tok, tmp_path / "fixed.gguf")
    assert compare(ref, _run(tmp_path / "fixed.gguf", ids))["logit_error"] <= 1e-3


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_half_and_q8_0_within_their_tolerance(out_type, tmp_path):
    model, tok = hetero_model(HETERO, std=0.1)
    report = _export(model, tok, tmp_path / "m.gguf", out_type)
    if out_type == "q8_0":
        assert report.ffn_padded == [1] and not report.f16_fallback  # 40 -> 64 (96 is whole blocks): ffn_down quantises
    f32 = _export(model, tok, tmp_path / "f32.gguf")
    assert report.bytes < f32.bytes
    ids = tokens(200)
    result = compare(torch_logits(model, ids).numpy(), _run(tmp_path / "m.gguf", ids, f32_cache=False))
    tol, agree = TOL[out_type]
    assert result["logit_error"] <= tol and result["greedy_agreement"] >= agree, result


def test_generation_through_the_kv_cache_matches(tmp_path):
    model, tok = hetero_model(HETERO)
    _export(model, tok, tmp_path / "m.gguf")
    prompt = tokens(12, seed=3)
    want = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                          pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    llm = llama_cpp_model(tmp_path / "m.gguf", n_ctx=64, threads=1)
    try:
        assert llama_cpp_greedy(llm, prompt, 10) == want
    finally:
        llm.close()


def test_tokenizer_built_from_hf_tokenizes_like_it(tmp_path):
    model, tok = hetero_model(HETERO)
    _export(model, tok, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        for text in ("Hello world, it's 2024!", "  spaces\tand\nnewlines  ", "naïve café — 東京 🚀"):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False)[
                "input_ids"], text
        assert llm.token_eos() == tok.eos_token_id and llm.token_bos() == tok.bos_token_id
    finally:
        llm.close()


def test_llama_cpp_quantiser_types(tmp_path):
    from export.to_gguf import write_gguf
    from export.tokenizer import from_hf
    from recipes.export import llama_cpp_quantize

    model, tok = hetero_model([(8, 2, 256, False, False), (4, 1, 512, False, False)], hidden=256, head_dim=32,
                              std=0.05)
    write_gguf(model, from_hf(tok), tmp_path / "f32.gguf")
    llama_cpp_quantize(tmp_path / "f32.gguf", tmp_path / "q4.gguf", "q4_k_m", threads=1)
    assert (tmp_path / "q4.gguf").stat().st_size < (tmp_path / "f32.gguf").stat().st_size / 4
    ids = tokens(64)
    result = compare(torch_logits(model, ids).numpy(), _run(tmp_path / "q4.gguf", ids, f32_cache=False))
    # a 4-bit file (q5_0 where a row is not whole 256-blocks, llama.cpp's own fallback): measured 0.11 / 0.89
    assert result["logit_error"] < 0.25 and result["greedy_agreement"] >= 0.8, result


def test_task_export_gguf_on_a_checkpoint(tmp_path):
    from conftest import run_task
    from core.models.checkpoint import save_checkpoint

    model, tok = hetero_model(HETERO)
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt", {"method": "test"})
    value, m = run_task(["task=export", f"model={ckpt}", "logger=none", "export.verify_tokens=128",
                         "eval.ppl.source=austen", "runtime.threads=1"], tmp_path / "run")
    assert m["status"] == "completed", m.get("error")
    assert m["export"]["architecture"] == "deci" and m["export"]["tokenizer"] == "hf"
    assert (tmp_path / "run" / "ckpt-f32.gguf").is_file()
    v = m["verify"]
    assert v["logit_error"] <= 1e-3 and v["greedy_agreement"] >= 0.99 and v["generation"]["match"], v
    assert v["tokenizer_match"] and v["kv_cache"] == "f32"
    assert m["optimized_metric"] == {"name": "logit_error", "direction": "minimize", "value": value}
    _, m = run_task(["task=export", f"model={ckpt}", "logger=none", "export.out_type=q4_k_m", "export.verify=false"],
                    tmp_path / "run_q4")
    assert m["status"] == "completed", m.get("error")
    assert m["export"]["out_type"] == "q4_k_m" and not list((tmp_path / "run_q4").glob(".*f32*"))
    json.dumps(m)


def test_a_model_cut_in_every_unit_loads_in_plain_transformers_and_llama_cpp(tmp_path):
    """Issue 27's mixed-unit checkpoint, made by the pruners themselves: a whole layer removed with its linear map
    merged (pruner=depth), then KV groups with their query heads and MLP channels removed and compensated
    (pruner=obs, attention_ratio=0.5). Every layer keeps a valid GQA layout (2 query heads per KV head), the
    saved checkpoint gives the same logits in plain transformers (prunelab not importable) and the GGUF the same
    logits in llama.cpp."""
    import os
    import subprocess
    import sys

    from core.models.checkpoint import save_checkpoint
    from core.models.load import build_tiny
    from pruning.depth import Depth
    from pruning.obs.pruner import StructuredOBS

    model, tok = build_tiny(num_layers=5, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=4, seed=2)
    data = torch.randint(0, 256, (48, 32), generator=torch.Generator().manual_seed(0))
    Depth(num_layers=1, selection="block", attention_layers=(0, None), mlp_layers=(0, None))(model, data)
    StructuredOBS(ratio=0.3, attention_ratio=0.5, tokens=None, seq_len=32, progress=False, autocast=None,
                  attention_layers=(0, None), mlp_layers=(0, None))(model, data)
    layers = model.model.layers
    assert len(layers) == 4 and model.config.removed_layers
    heads = [(l.self_attn.q_proj.out_features // 8, l.self_attn.k_proj.out_features // 8) for l in layers]
    assert all(q == 2 * kv and kv == 2 for q, kv in heads), heads  # 4 -> 2 KV groups, each with its 2 queries
    assert all(l.mlp.down_proj.in_features < 128 for l in layers)
    ids = tokens(120)
    ref = torch_logits(model, ids)
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "depth+obs"})
    torch.save(torch.tensor([ids]), tmp_path / "x.pt")
    torch.save(ref, tmp_path / "ref.pt")
    script = f"""
import sys
for name in ("core", "pruning", "analysis", "replacement", "recovery", "recipes", "export"):
    sys.modules[name] = None  # prunelab is not importable here
import torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
with torch.no_grad():
    print("MAXDIFF", (m(x).logits[0].float() - ref).abs().max().item())
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split("MAXDIFF")[1].split()[0]) < 1e-5, proc.stdout
    _export(model, tok, tmp_path / "m.gguf")
    result = compare(ref.numpy(), _run(tmp_path / "m.gguf", ids))
    assert result["logit_error"] <= 1e-3 and result["greedy_agreement"] >= 0.99, result
