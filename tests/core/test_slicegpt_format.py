"""SliceGPT's own saved output, written here exactly as its run_slicegpt.py saves it, converts with its logits.

The reference model is SliceGPT's module structure rebuilt in this file (its RMSN and CompressedLlamaDecoderLayer,
slicegpt/modules.py and adapters/llama_adapter.py, adapted to transformers 5's layer call), independent of
core.models.modeling_sliced, with random weights and per-layer widths that differ (a non-constant SlicingConfig).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from analysis.structure import structure_of
from conftest import run_task
from core.run.errors import LoadError
from core.models.llama import count_params
from core.models.load import build_tiny, load_model
from core.models.ref import ModelRef, tiny_config
from core.models.slicegpt import load_slicegpt

HIDDEN = 64
# (attention input, attention output = MLP input, MLP output) per layer; the last output is the unsliced head's
DIMS = [(48, 40, 48), (48, 56, 56), (56, 48, 40), (40, 40, 64)]
X = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(3))


class RMSN(nn.Module):
    """slicegpt/modules.py: no weight, eps 1e-5, divides by the original hidden size."""

    def __init__(self, mean_dim: int):
        super().__init__()
        self.eps, self.mean_dim = 1e-5, mean_dim

    def forward(self, x):
        variance = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return x * torch.rsqrt(variance + self.eps)


class CompressedLlamaDecoderLayer(LlamaDecoderLayer):
    """slicegpt/adapters/llama_adapter.py: the residual is rotated by the shortcut matrices."""

    def forward(self, hidden_states, **kwargs):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
        hidden_states = torch.matmul(residual, self.attn_shortcut_Q) + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return torch.matmul(residual, self.mlp_shortcut_Q) + hidden_states


def slicegpt_model(seed: int = 0):
    """A tiny Llama after SliceGPT's replace_layers + fuse_modules + slicing, with random weights."""
    model, _ = build_tiny(num_layers=4, hidden_size=HIDDEN, seed=seed)
    g = torch.Generator().manual_seed(seed)

    def lin(i, o):
        layer = nn.Linear(i, o, bias=False)
        layer.weight.data = torch.randn(o, i, generator=g) / i ** 0.5
        return layer

    cfg = model.config
    model.model.embed_tokens = nn.Embedding(cfg.vocab_size, DIMS[0][0])
    model.model.embed_tokens.weight.data = torch.randn(cfg.vocab_size, DIMS[0][0], generator=g)
    for i, (d_in, d_attn, d_out) in enumerate(DIMS):
        layer = CompressedLlamaDecoderLayer(cfg, i)
        a, m = layer.self_attn, layer.mlp
        a.q_proj, a.k_proj, a.v_proj = lin(d_in, 64), lin(d_in, 16), lin(d_in, 16)
        a.o_proj = lin(64, d_attn)
        m.gate_proj, m.up_proj, m.down_proj = lin(d_attn, 128), lin(d_attn, 128), lin(128, d_out)
        layer.input_layernorm, layer.post_attention_layernorm = RMSN(HIDDEN), RMSN(HIDDEN)
        layer.attn_shortcut_Q = nn.Parameter(torch.randn(d_in, d_attn, generator=g) / d_in ** 0.5)
        layer.mlp_shortcut_Q = nn.Parameter(torch.randn(d_attn, d_out, generator=g) / d_attn ** 0.5)
        model.model.layers[i] = layer
    model.model.norm = RMSN(HIDDEN)
    model.lm_head = lin(DIMS[-1][2], cfg.vocab_size)
    return model.eval()


def slicing_config_json(dims=DIMS) -> str:
    """SlicingConfig(...).to_json_string(): asdict, then json.dumps (int keys become strings)."""
    conf = {"hidden_size": HIDDEN, "layers_num": len(dims), "do_slice_head": False, "parallel_blocks": False,
            "embedding_dimensions": {0: dims[0][0]},
            "attention_input_dimensions": {i: d[0] for i, d in enumerate(dims)},
            "attention_output_dimensions": {i: d[1] for i, d in enumerate(dims)},
            "mlp_input_dimensions": {i: d[1] for i, d in enumerate(dims)},
            "mlp_output_dimensions": {i: d[2] for i, d in enumerate(dims)},
            "head_dimension": HIDDEN, "const_dimension": None}
    return json.dumps(conf)


@pytest.fixture
def saved(tmp_path):
    """run_slicegpt.py --save-dir with a local --model-path: <name>_<sparsity>.pt/.json + the base's config.json."""
    model = slicegpt_model()
    out = tmp_path / "SliceGPT_2500"
    out.mkdir()
    torch.save(model.state_dict(), out / "Llama-tiny_0.25.pt")
    (out / "Llama-tiny_0.25.json").write_text(slicing_config_json())
    (out / "config.json").write_text(json.dumps({**tiny_config(), "model_type": "llama"}))
    return model, out


def test_state_dict_has_slicegpts_key_layout(saved):
    _, out = saved
    keys = set(torch.load(out / "Llama-tiny_0.25.pt", weights_only=True))
    assert {"model.layers.0.attn_shortcut_Q", "model.layers.3.mlp_shortcut_Q", "lm_head.weight",
            "model.embed_tokens.weight"} <= keys
    assert not [k for k in keys if "norm" in k]  # fused: what made the user's conversion to a Llama fail


def test_loaded_by_path_with_its_logits(saved):
    ref, out = saved
    with torch.no_grad():
        want = ref(X).logits
    for path in (out, out / "Llama-tiny_0.25.pt"):
        model, _ = load_model(ModelRef.at(path), cache_dir=out)
        assert type(model).__name__ == "SlicedLlamaForCausalLM"
        with torch.no_grad():
            torch.testing.assert_close(model(X).logits, want, rtol=0, atol=1e-5)
    assert model.config.slicing["layers"][1] == {"attention_input": 48, "attention_output": 56, "mlp_output": 56}


def test_half_precision_file_without_its_json(saved):
    """run_slicegpt.py's default --dtype fp16; without the slicing JSON the widths come from the tensors alone."""
    ref, out = saved
    torch.save(ref.half().state_dict(), out / "Llama-tiny_0.25.pt")
    (out / "Llama-tiny_0.25.json").unlink()
    model, _ = load_model(ModelRef.at(out, dtype="auto"), cache_dir=out)
    assert model.model.layers[2].attn_shortcut_Q.dtype == torch.float16
    assert model.config.slicing["layers"][2] == {"attention_input": 56, "attention_output": 48, "mlp_output": 40}
    model, _, info = load_slicegpt(out)  # default: the file's own dtype
    assert info["slicing_config"] is None and info["sparsity"] == 0.25 and model.lm_head.weight.dtype == torch.float16


def test_task_convert_writes_a_checkpoint_with_the_same_logits(saved, tmp_path):
    ref, out = saved
    pt = out / "Llama-tiny_0.25.pt"
    _, metrics = run_task(["task=convert", f"model={pt}", "base=tiny", "logger=none"], tmp_path / "run")
    assert metrics["status"] == "completed", metrics.get("error")
    assert metrics["compression"]["unit"] == "slicing" and metrics["compression"]["amount"] == 0.25
    assert metrics["params"]["pruned"] == count_params(ref)
    ckpt = Path(metrics["checkpoint"]["path"])  # <run dir>/<output_name>/: the file's name by default
    info = json.loads((ckpt / "checkpoint_info.json").read_text())
    assert info["method"] == "slicegpt" and info["source"]["weights"] == str(pt)
    assert info["base_model"]["kind"] == "tiny"
    model, tok = load_model(ModelRef.at(ckpt), cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, ref(X).logits, rtol=0, atol=1e-5)
    assert tok is not None and model.generate(X[:1, :3], max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_a_missing_shortcut_is_the_plain_residual(saved):
    ref, out = saved
    ref.model.layers[3].attn_shortcut_Q.data = torch.eye(40)  # layer 3: 40 -> 40 around its attention
    sd = ref.state_dict()
    del sd["model.layers.3.attn_shortcut_Q"]
    torch.save(sd, out / "Llama-tiny_0.25.pt")
    model, _, info = load_slicegpt(out)
    assert info["identity_shortcuts_added"] == ["model.layers.3.attn_shortcut_Q"]
    with torch.no_grad():
        torch.testing.assert_close(model(X).logits, ref(X).logits, rtol=0, atol=1e-5)


def test_analysis_counts_the_shortcuts(saved):
    ref, out = saved
    s = structure_of(out, name="slice")
    assert s.format == "slicegpt" and s.total_params == count_params(ref)
    layer = s.to_json()["layers"][1]
    assert layer["extra"]["attn_shortcut_Q"] == {"params": 48 * 56, "shape": [48, 56]}
    assert layer["hidden_dims"] == {"attention_input": 48, "attention_output": 56, "mlp_output": 56}
    assert layer["attention"]["num_heads"] == 8 and any("SliceGPT-sliced" in n for n in s.notes)


def _edit_json(out, **changes):
    conf = json.loads((out / "Llama-tiny_0.25.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            conf[key].update(value)
        else:
            conf[key] = value
    (out / "Llama-tiny_0.25.json").write_text(json.dumps(conf))


@pytest.mark.parametrize("changes,match", [
    ({"attention_output_dimensions": {"1": 40}}, r"Llama-tiny_0.25.pt: model.layers.1.attn_shortcut_Q has shape "
                                                 r"\[48, 56\] but Llama-tiny_0.25.json gives "
                                                 r"attention_output_dimensions\[1\]=40"),
    ({"embedding_dimensions": {"0": 56}}, r"model.embed_tokens.weight has shape \[259, 48\] but .* gives "
                                          r"embedding_dimensions\[0\]=56"),
    ({"layers_num": 5}, "has 4 layers but Llama-tiny_0.25.json gives layers_num=5"),
    ({"hidden_size": 128}, "gives hidden_size=128 but .*config.json gives 64"),
    ({"parallel_blocks": True}, "parallel_blocks=true .*prunelab reads SliceGPT's Llama layout"),
])
def test_slicing_config_that_contradicts_the_tensors(saved, changes, match):
    _, out = saved
    _edit_json(out, **changes)
    with pytest.raises(LoadError, match=match):
        load_model(ModelRef.at(out), cache_dir=out)


def test_tensors_that_contradict_each_other_or_the_base(saved):
    ref, out = saved
    sd = ref.state_dict()
    sd["model.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 40)
    torch.save(sd, out / "Llama-tiny_0.25.pt")
    with pytest.raises(LoadError, match=r"model.layers.2.mlp.up_proj.weight has shape \[128, 40\], but the stream "
                                        r"around it is 56 wide into layer 2, 48 after its attention"):
        load_slicegpt(out)
    torch.save(ref.state_dict(), out / "Llama-tiny_0.25.pt")
    (out / "config.json").write_text(json.dumps({**tiny_config(), "model_type": "llama", "intermediate_size": 96}))
    with pytest.raises(LoadError, match=r"model.layers.0.mlp.gate_proj.weight has shape \[128, 40\] but .*config.json "
                                        r"gives intermediate_size = 96 rows"):
        load_slicegpt(out)


def test_unknown_model_families_are_named(saved, tmp_path):
    ref, out = saved
    (out / "config.json").write_text(json.dumps({**tiny_config(), "model_type": "phi"}))
    with pytest.raises(LoadError, match="the base model is a 'phi' model .*prunelab reads SliceGPT's Llama layout"):
        load_slicegpt(out)
    opt = tmp_path / "opt"
    opt.mkdir()
    torch.save({"model.decoder.layers.0.attn_shortcut_Q": torch.eye(4), "model.decoder.embed_tokens.weight":
                torch.zeros(8, 4)}, opt / "opt-125m_0.25.pt")
    with pytest.raises(LoadError, match=r"not a Llama-layout SliceGPT output \(e.g. model.decoder.layers.0"):
        load_slicegpt(opt, base_config={**tiny_config(), "model_type": "llama"})


def test_without_a_base_config_the_user_is_told_what_to_give(saved, tmp_path):
    _, out = saved
    (out / "config.json").unlink()
    with pytest.raises(LoadError, match="SliceGPT saved no config.json beside it .* task=convert .* base=<"):
        load_model(ModelRef.at(out), cache_dir=out)
    with pytest.raises(SystemExit):
        run_task(["task=convert", f"model={out}", "logger=none"], tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "has no config.json beside it" in m["error"]["message"] and "base=<" in m["error"]["message"]
