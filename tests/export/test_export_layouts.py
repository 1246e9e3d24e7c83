"""DeciLM layout (vLLM) and stock-Llama exports: exact logits in transformers, vLLM's reading of the config, and
every refusal as one line. No llama.cpp needed here (tests/export/test_gguf_llama_cpp.py runs the GGUF files)."""

from __future__ import annotations

import json

import pytest
import torch

from export_helpers import (HETERO, hetero_model, safetensors_shapes, tokens, torch_logits, vllm_expectations,
                            vllm_ffn_width)

@pytest.fixture(scope="module")
def hetero():
    return hetero_model()


def test_decilm_padded_logits_equal_the_models(hetero, tmp_path):
    from transformers import AutoModelForCausalLM

    from export.decilm import write_decilm
    from export.layout import check_expressible

    model, tok = hetero
    check_expressible(model, "decilm")
    report = write_decilm(model, tok, tmp_path / "decilm")
    assert report.params_written > report.params_model  # padding added zeros
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "decilm", trust_remote_code=True).eval()
    assert type(loaded).__name__ == "DeciLMForCausalLM"
    ids = tokens(48)
    ref = torch_logits(model, ids)
    assert ref.abs().max() > 1.0  # far from uniform: a wrong head or channel would show
    torch.testing.assert_close(torch_logits(loaded, ids), ref, rtol=0, atol=1e-5)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    prompt = torch.tensor([ids[:7]])
    assert loaded.generate(prompt, **gen).tolist() == model.generate(prompt, **gen).tolist()  # through the KV cache


def test_decilm_config_is_what_vllm_reads(hetero, tmp_path):
    from export.decilm import write_decilm

    model, tok = hetero
    out = tmp_path / "decilm"
    write_decilm(model, tok, out)
    assert safetensors_shapes(out) == vllm_expectations(out)  # every tensor vLLM allocates, its shape; nothing more
    cfg = json.loads((out / "config.json").read_text())
    blocks = cfg["block_configs"]
    for (h, k, f, _, _), b in zip(HETERO, blocks):
        assert b["attention"]["no_op"] == (h == 0) and b["ffn"]["no_op"] == (f == 0)
        if f:
            assert vllm_ffn_width(b["ffn"]["ffn_mult"], 64) == -(-f // 256) * 256
    assert cfg["num_attention_heads"] == 8 and cfg["attention_bias"] and cfg["qkv_bias"] is False and cfg["mlp_bias"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig",
                               "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    info = json.loads((out / "export_info.json").read_text())
    assert info["ffn_widths_model"] == [f for _, _, f, _, _ in HETERO]


def test_decilm_gives_layer_0_an_attention_when_the_model_removed_it(tmp_path):
    from transformers import AutoModelForCausalLM

    from export.decilm import write_decilm

    model, tok = hetero_model([(0, 0, 64, False, False), (8, 2, 64, False, False), (4, 2, 0, False, False)])
    report = write_decilm(model, tok, tmp_path / "d")
    assert any("layer 0" in n for n in report.notes)
    blocks = json.loads((tmp_path / "d" / "config.json").read_text())["block_configs"]
    assert not blocks[0]["attention"]["no_op"] and blocks[0]["attention"]["n_heads_in_group"] == 8  # one KV head
    assert blocks[2]["ffn"]["no_op"]
    assert safetensors_shapes(tmp_path / "d") == vllm_expectations(tmp_path / "d")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d", trust_remote_code=True).eval()
    ids = tokens(32)
    torch.testing.assert_close(torch_logits(loaded, ids), torch_logits(model, ids), rtol=0, atol=1e-5)


def test_head_padding_picks_the_cheapest_global_count():
    from export.layout import LayerShape, head_padding

    smol = [LayerShape(9, 3, 1536), LayerShape(6, 2, 768), LayerShape(0, 0, 768)]
    pad = head_padding(smol, uniform_kv=False)
    assert pad.heads == 9 and pad.kv_heads == (3, 3, 0)  # 6 heads / 2 KV: one zero KV group of 3 heads
    mixed = [LayerShape(8, 2, 1), LayerShape(4, 1, 1), LayerShape(6, 2, 1)]
    pad = head_padding(mixed, uniform_kv=False)
    for s, kv in zip(mixed, pad.kv_heads):  # every real group fits a padded one
        assert pad.heads % kv == 0 and kv >= s.kv_heads and pad.heads // kv >= s.heads // s.kv_heads
    uniform = head_padding(mixed, uniform_kv=True)
    assert len(set(uniform.kv_heads)) == 1


def test_hf_export_is_a_stock_llama_with_the_same_logits(hetero, tmp_path):
    from transformers import AutoModelForCausalLM

    from export.hf import write_hf

    model, tok = hetero
    report = write_hf(model, tok, tmp_path / "hf", dtype=torch.float32)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert not list((tmp_path / "hf").glob("*.py")) and report.layers_dropped == [4]  # the identity layer
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # no trust_remote_code
    assert type(loaded).__name__ == "LlamaForCausalLM" and len(loaded.model.layers) == len(HETERO) - 1
    ids = tokens(48)
    torch.testing.assert_close(torch_logits(loaded, ids), torch_logits(model, ids), rtol=0, atol=1e-5)


def test_large_exports_are_streamed_into_shards(hetero, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import export.hf
    from export.decilm import write_decilm

    model, tok = hetero
    monkeypatch.setattr(export.hf, "SHARD_BYTES", 200_000)
    write_decilm(model, tok, tmp_path / "d")
    index = json.loads((tmp_path / "d" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and not list((tmp_path / "d").glob(".shard-*"))
    assert safetensors_shapes(tmp_path / "d") == vllm_expectations(tmp_path / "d")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d", trust_remote_code=True).eval()
    ids = tokens(16)
    torch.testing.assert_close(torch_logits(loaded, ids), torch_logits(model, ids), rtol=0, atol=1e-5)


def test_a_uniform_model_exports_unpadded(tiny, tmp_path):
    from export.hf import write_hf

    model, tok = tiny
    report = write_hf(model, tok, tmp_path / "hf")
    assert report.params_written == report.params_model  # nothing padded


# --------------------------------------------------------------------------- refusals: one line naming the feature


def _sliced():
    from core.models.modeling_sliced import SlicedLlamaConfig, SlicedLlamaForCausalLM
    from core.models.ref import tiny_config

    cfg = tiny_config(num_layers=2)
    cfg["num_hidden_layers"] = 2
    dims = {"attention_input": 48, "attention_output": 48, "mlp_output": 48}
    return SlicedLlamaForCausalLM(SlicedLlamaConfig(
        slicing={"embedding_dimension": 48, "lm_head_dimension": 48, "layers": [dims, dims]}, **cfg))


@pytest.mark.parametrize("fmt", ["gguf", "decilm", "hf"])
def test_sliced_and_mamba_models_are_refused_by_name(fmt):
    from llamba_helpers import tiny_hybrid

    from export.layout import ExportError, check_expressible

    with pytest.raises(ExportError, match="SliceGPT's shortcut rotations .* not expressible in") as e:
        check_expressible(_sliced(), fmt)
    assert "\n" not in str(e.value)
    hybrid, _ = tiny_hybrid(["attention", "mamba2", "attention"])
    with pytest.raises(ExportError, match=r"Mamba-2 .*mixer layers \[1\] are not expressible in") as e:
        check_expressible(hybrid, fmt)
    assert "\n" not in str(e.value)
    attention_only, _ = tiny_hybrid(["attention", "attention"])  # a hybrid whose replaced layers are attention
    check_expressible(attention_only, fmt)


def test_other_activations_and_rope_types_are_refused(tiny):
    from export.layout import ExportError, check_expressible

    model, _ = tiny
    model.config.hidden_act = "gelu"
    with pytest.raises(ExportError, match="hidden_act='gelu'"):
        check_expressible(model, "gguf")
    model.config.hidden_act = "silu"
    model.config.rope_parameters = {"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ExportError, match="RoPE type 'yarn'"):
        check_expressible(model, "gguf")


def test_existing_outputs_are_never_replaced(hetero, tmp_path):
    from export.decilm import write_decilm
    from export.hf import write_hf
    from export.layout import ExportError
    from export.to_gguf import write_gguf
    from export.tokenizer import from_hf

    model, tok = hetero
    taken = tmp_path / "taken.gguf"
    taken.write_text("someone's file")
    with pytest.raises(ExportError, match="already exists"):
        write_gguf(model, from_hf(tok), taken)
    assert taken.read_text() == "someone's file"
    (tmp_path / "d").mkdir()
    for writer in (write_decilm, write_hf):
        with pytest.raises(ExportError, match="already exists"):
            writer(model, tok, tmp_path / "d")


def test_unsupported_types_and_missing_tokenizers_are_one_line(hetero, tmp_path):
    from core.run.errors import ConfigError
    from export.hf import write_hf
    from export.layout import ExportError
    from export.options import DeciLMExport, GGUFExport
    from export.to_gguf import write_gguf
    from export.tokenizer import from_hf

    model, tok = hetero
    with pytest.raises(ConfigError, match="export.out_type='q3_xyz' is not a supported GGUF type"):
        GGUFExport(out_type="q3_xyz")
    with pytest.raises(ConfigError, match="export.dtype='int8'"):
        DeciLMExport(dtype="int8")
    with pytest.raises(ExportError, match="out_type='q4_k_m' is not written by the GGUF exporter"):
        write_gguf(model, from_hf(tok), tmp_path / "x.gguf", "q4_k_m")
    with pytest.raises(ExportError, match="the model has no tokenizer"):
        from_hf(None)
    with pytest.raises(ExportError, match="the model has no tokenizer"):
        write_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()


def test_unknown_pre_tokenizers_are_named_not_guessed():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from export.layout import ExportError
    from export.tokenizer import from_hf, pre_tokenizer_name

    tk = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(
        add_prefix_space=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    with pytest.raises(ExportError, match="export.tokenizer_pre=<name>"):
        from_hf(tok)
    assert from_hf(tok, pre="gpt-2").pre == "gpt-2"
    assert pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    spm = Tokenizer(models.BPE(vocab={"a": 0, "<0x00>": 1}, merges=[], byte_fallback=True))
    with pytest.raises(ExportError, match="SentencePiece-style"):
        from_hf(PreTrainedTokenizerFast(tokenizer_object=spm))


# --------------------------------------------------------------------------- task=export (the recipe)


def test_task_export_decilm_and_the_format_switch(hetero, tmp_path):
    from conftest import run_task
    from core.models.checkpoint import save_checkpoint

    model, tok = hetero
    ckpt = save_checkpoint(model, tok, tmp_path / "ckpt", {"method": "test"})
    _, m = run_task(["task=export", f"model={ckpt}", "export=decilm", "logger=none", "export.verify_tokens=64",
                     "eval.ppl.source=austen"], tmp_path / "run")
    assert m["status"] == "completed", m.get("error")
    assert m["verify"]["logit_error"] < 1e-6 and m["verify"]["greedy_agreement"] == 1.0
    assert (tmp_path / "run" / "decilm" / "modeling_decilm.py").is_file()
    # export.format=hf on top of the default (gguf) option file: conf/export/hf.yaml is used
    _, m = run_task(["task=export", f"model={ckpt}", "export.format=hf", "logger=none", "export.verify_tokens=64",
                     "eval.ppl.source=austen"], tmp_path / "run2")
    assert m["status"] == "completed", m.get("error")
    assert m["export"]["format"] == "hf" and m["verify"]["logit_error"] < 1e-6


@pytest.mark.parametrize("args,match", [
    (["export.out_type=q3_xyz"], "export.out_type='q3_xyz' is not a supported GGUF type"),
    (["export.format=onnx"], "export.format='onnx' is not one of decilm, gguf, hf"),
    (["export.output=/"], "export.output=/ already exists"),
    (["export.format=decilm", "export.out_type=q8_0"], "export.out_type: not an option of export.format=decilm"),
])
def test_task_export_bad_options_fail_before_loading(args, match, tmp_path):
    from conftest import run_task

    with pytest.raises(SystemExit):
        run_task(["task=export", "model=hf", "model.path=/nonexistent", "logger=none", *args], tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "failed" and match in m["error"]["message"], m["error"]["message"]


def test_task_export_model_without_tokenizer(hetero, tmp_path):
    from conftest import run_task
    from core.models.checkpoint import save_checkpoint

    ckpt = save_checkpoint(hetero[0], None, tmp_path / "ckpt", {"method": "test"})
    with pytest.raises(SystemExit):
        run_task(["task=export", f"model={ckpt}", "logger=none"], tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    lines = [l for l in m["error"]["message"].splitlines() if "tokenizer" in l]
    assert len(lines) == 1 and "has no tokenizer" in lines[0] and "copy the base model's tokenizer files" in lines[0]


def test_task_export_refuses_a_sliced_model(tmp_path):
    from conftest import run_task
    from core.models.checkpoint import save_checkpoint
    from core.models.load import byte_tokenizer

    model = _sliced()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.config.slicing = model.config.slicing  # saved as a sliced checkpoint
    ckpt = save_checkpoint(model, byte_tokenizer(), tmp_path / "ckpt", {"method": "slicegpt"})
    with pytest.raises(SystemExit):
        run_task(["task=export", f"model={ckpt}", "logger=none"], tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["status"] == "failed" and "SliceGPT's shortcut rotations" in m["error"]["message"]


def test_checking_export_options_needs_no_torch():
    """run.py validates before torch is imported: task=export's options included."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import compose; "
            "import run; cfg = compose(['task=export', 'export=gguf', 'export.out_type=q8_0'], Path('unused')); "
            "run.check(cfg); print([m for m in ('torch', 'transformers', 'gguf', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    from export.options import WRITTEN_TYPES
    from export.to_gguf import OUT_TYPES

    assert tuple(OUT_TYPES) == WRITTEN_TYPES


def test_without_llama_cpp_gguf_is_written_and_said_unverified(hetero, tmp_path, monkeypatch):
    """llama-cpp-python is optional: without it the file is still written, the record says why it was not run,
    and types only llama.cpp's quantiser writes are refused before loading."""
    import importlib.util

    from core.run.errors import ConfigError
    from export.options import GGUFExport
    from export.to_gguf import write_gguf
    from export.tokenizer import from_hf
    from recipes.export import _verify_gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(ConfigError, match="needs llama.cpp's quantiser: pip install llama-cpp-python"):
        GGUFExport(out_type="q4_k_m")
    model, tok = hetero
    write_gguf(model, from_hf(tok), tmp_path / "m.gguf")
    assert _verify_gguf(tmp_path / "m.gguf", model, tok, tokens(8), "f32", 1) == {
        "skipped": "llama-cpp-python is not installed (pip install llama-cpp-python)"}


def test_hf_export_of_a_model_with_no_attention_or_no_mlp_left(tmp_path):
    from transformers import AutoModelForCausalLM

    from export.hf import write_hf

    for i, layers in enumerate(([(0, 0, 64, False, False), (0, 0, 32, False, True)],
                                [(8, 2, 0, False, False), (4, 1, 0, True, False)])):
        model, tok = hetero_model(layers)
        write_hf(model, tok, tmp_path / f"hf{i}")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"hf{i}").eval()
        ids = tokens(24)
        torch.testing.assert_close(torch_logits(loaded, ids), torch_logits(model, ids), rtol=0, atol=1e-5)
