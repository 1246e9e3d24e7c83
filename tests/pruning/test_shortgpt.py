"""ShortGPT on tiny random GQA Llamas: the layers (sub-blocks) of least Block Influence go, computed independently
here from the plain model; the pruned model generates with its KV cache and saves as a loadable checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from core.models.checkpoint import save_checkpoint
from core.run.errors import ConfigError
from core.models.llama import count_params
from core.models.load import build_tiny, load_model
from core.models.ref import ModelRef
from core.models.modeling_pruned import RemovedAttention, RemovedMLP
from pruning import PruneError
from pruning.shortgpt import ShortGPT
from pruning.streaming import layer_pieces
from pruning.streaming import LayerStream

ALL = (0, None)


def pruner(**kw) -> ShortGPT:
    return ShortGPT(**{"attention_layers": ALL, "mlp_layers": ALL, **kw})


def _hidden_states(model, ids) -> tuple[torch.Tensor, ...]:
    """Every layer's input, then the last layer's raw output (output_hidden_states ends with the final norm's output,
    so a copy of the model without that norm is asked)."""
    plain = copy.deepcopy(model)
    plain.model.norm = torch.nn.Identity()
    with torch.no_grad():
        return plain(ids, output_hidden_states=True).hidden_states


def _bi(a: torch.Tensor, b: torch.Tensor) -> float:
    return 1.0 - F.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def reference_layer_bi(model, ids) -> list[float]:
    hs = _hidden_states(model, ids)
    return [_bi(hs[i], hs[i + 1]) for i in range(len(hs) - 1)]


def reference_sublayer_bi(model, ids) -> tuple[list[float], list[float]]:
    """(attention BI, MLP BI) per layer: 1 - cos(h, h + f(h)), h the residual stream entering the sub-block, with
    f(h) the sub-block's output caught by forward hooks of the plain model."""
    plain = copy.deepcopy(model)
    plain.model.norm = torch.nn.Identity()
    attn_out, mlp_out = {}, {}
    for i, layer in enumerate(plain.model.layers):
        layer.self_attn.register_forward_hook(lambda _m, _a, out, i=i: attn_out.__setitem__(i, out[0]))
        layer.mlp.register_forward_hook(lambda _m, _a, out, i=i: mlp_out.__setitem__(i, out))
    with torch.no_grad():
        hs = plain(ids, output_hidden_states=True).hidden_states
    attn, mlp = [], []
    for i in range(len(hs) - 1):
        h = hs[i] + attn_out[i]
        attn.append(_bi(hs[i], h))
        mlp.append(_bi(h, h + mlp_out[i]))
        torch.testing.assert_close(h + mlp_out[i], hs[i + 1])
    return attn, mlp


def rebuilt(model, kept: list[int]):
    """A fresh Llama of ``len(kept)`` layers holding ``model``'s weights of layers ``kept``."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(kept)
    fresh = LlamaForCausalLM(cfg).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i not in kept:
                continue
            k = k.replace(f"model.layers.{i}.", f"model.layers.{kept.index(i)}.", 1)
        sd[k] = v
    fresh.load_state_dict(sd)
    return fresh


def generate(model, ids: torch.Tensor, use_cache: bool) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache, pad_token_id=0)


@pytest.fixture
def deep():
    model, tok = build_tiny(num_layers=6, seed=1)
    return model, tok


def test_removes_the_layers_of_least_block_influence(deep, calib):
    model, _ = deep
    ref = copy.deepcopy(model)
    bi = reference_layer_bi(model, calib)
    res = pruner(num_layers=2)(model, calib)
    assert res.details["block_influence"] == pytest.approx(bi, abs=1e-5)
    lowest = sorted(sorted(range(6), key=lambda i: bi[i])[:2])
    assert res.details["removed_layers"] == lowest and model.config.removed_layers == lowest
    assert [u["layer"] for u in res.details["removed"]] == sorted(lowest, key=lambda i: bi[i])
    assert res.compression["unit"] == "layers" and res.compression["amount"] == 2
    kept = [i for i in range(6) if i not in lowest]
    assert len(model.model.layers) == model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert [r["new_index"] for r in res.layers] == [kept.index(i) if i in kept else None for i in range(6)]
    assert res.params_after == count_params(model) == count_params(ref) - 2 * count_params(ref.model.layers[0])

    # Same logits and tokens as a fresh model built with the remaining layers; the cache gives the same tokens.
    fresh = rebuilt(ref, kept)
    prompt = calib[:2, :6]
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, fresh(calib).logits, rtol=0, atol=0)
    cached = generate(model, prompt, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, use_cache=False))
    assert torch.equal(cached, generate(fresh, prompt, use_cache=True))


def test_ratio_removes_the_fewest_layers_that_reach_it(deep, calib):
    model, _ = deep
    bi = reference_layer_bi(model, calib)
    total, per_layer = count_params(model), count_params(model.model.layers[0])
    ratio = 2.5 * per_layer / total  # 2 layers fall short, 3 reach it
    res = pruner(ratio=ratio)(model, calib)
    assert res.details["removed_layers"] == sorted(sorted(range(6), key=lambda i: bi[i])[:3])
    assert res.params_before - res.params_after == 3 * per_layer
    assert "rounds up" in res.notes[0] and res.details["ratio"] == ratio


def test_layer_range_limits_the_candidates(deep, calib):
    model, _ = deep
    bi = reference_layer_bi(model, calib)
    res = pruner(num_layers=2, attention_layers=(1, 5), mlp_layers=(2, 6))(model, calib)  # candidates 2, 3, 4
    assert res.details["removed_layers"] == sorted(sorted((2, 3, 4), key=lambda i: bi[i])[:2])
    assert res.ranges == {"attention": [1, 5], "mlp": [2, 6]}


def test_piecewise_layer_equals_the_layer(tiny, calib):
    model, _ = tiny
    stream = LayerStream(model, calib, batch_size=3)
    for _i, layer in stream:
        whole = stream.forward()
        pieces = stream.run(lambda x, kw: sum(layer_pieces(layer, x, kw)))  # the layer's output h + m
        for a, b in zip(whole, pieces):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        stream.advance(whole)


def test_micro_batches_and_offload_give_the_same_scores(tiny, calib):
    model, _ = tiny
    from pruning.shortgpt import block_influence

    whole = block_influence(model, calib, sublayer=True)
    split = block_influence(model, calib, sublayer=True, batch_size=3, device="cpu", offload=True)
    for k in ("layer", "attention", "mlp"):
        assert split[k] == pytest.approx(whole[k], abs=1e-6)


def test_sublayer_removes_sub_blocks_by_their_own_influence(deep, calib):
    model, _ = deep
    ref = copy.deepcopy(model)
    attn_bi, mlp_bi = reference_sublayer_bi(model, calib)
    res = pruner(num_layers=8, granularity="sublayer")(model, calib)
    assert res.details["attention_bi"] == pytest.approx(attn_bi, abs=1e-5)
    assert res.details["mlp_bi"] == pytest.approx(mlp_bi, abs=1e-5)
    units = sorted([(b, i, "attention") for i, b in enumerate(attn_bi)] + [(b, i, "mlp") for i, b in enumerate(mlp_bi)])
    lowest = {(i, kind) for _b, i, kind in units[:8]}
    assert {(u["layer"], u["kind"]) for u in res.details["removed"]} == lowest
    assert {kind for _i, kind in lowest} == {"attention", "mlp"}  # (random weights: MLPs change the stream least)
    assert res.compression == {"unit": "sublayers", "amount": 8, "params_removed": pytest.approx(res.removed_fraction)}

    # The pruned model computes what the original does with the removed sub-blocks' outputs zeroed
    # (o_proj / down_proj = 0), a layer losing both being removed.
    for i, kind in lowest:
        layer = ref.model.layers[i]
        (layer.self_attn.o_proj if kind == "attention" else layer.mlp.down_proj).weight.data.zero_()
    gone = sorted(i for i in range(6) if {(i, "attention"), (i, "mlp")} <= lowest)
    assert gone and res.details["removed_layers"] == gone and len(model.model.layers) == 6 - len(gone)
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, ref(calib).logits, rtol=1e-5, atol=1e-5)
    prompt = calib[:2, :6]
    cached = generate(model, prompt, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, use_cache=False))
    assert torch.equal(cached, generate(ref, prompt, use_cache=True))


def test_sublayer_generation_with_the_first_attention_removed(tiny, calib, tmp_path):
    model, tok = tiny
    res = pruner(num_layers=1, granularity="sublayer", attention_layers=(0, 1), mlp_layers=(0, 0))(model, calib)
    assert res.details["removed_attention"] == [0] and isinstance(model.model.layers[0].self_attn, RemovedAttention)
    prompt = calib[:2, :6]
    cached = generate(model, prompt, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, use_cache=False))

    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "shortgpt"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "prunelab_llama" and cfg["layer_configs"][0]["num_attention_heads"] == 0
    loaded, _ = load_model(ModelRef.at(out), cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, model(calib).logits, rtol=0, atol=0)
    assert torch.equal(generate(loaded, prompt, use_cache=True), cached)


def test_sublayer_both_sub_blocks_remove_the_layer(tiny, calib):
    model, _ = tiny
    # every candidate goes: the attention of layer 1, the MLPs of layers 1 and 2
    res = pruner(num_layers=3, granularity="sublayer", attention_layers=(1, 2), mlp_layers=(1, 3))(model, calib)
    assert res.details["removed_layers"] == [1] and model.config.removed_layers == [1]
    assert res.details["removed_mlp"] == [2] and res.compression["amount"] == 3
    assert len(model.model.layers) == 3 and [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2]
    assert isinstance(model.model.layers[1].mlp, RemovedMLP)  # layer 2's MLP, renumbered to 1
    prompt = calib[:2, :6]
    assert torch.equal(generate(model, prompt, use_cache=True), generate(model, prompt, use_cache=False))


def test_checkpoint_is_a_plain_llama(deep, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = deep
    res = pruner(num_layers=2)(model, calib)
    out = save_checkpoint(model, tok, tmp_path / "model", {"method": "shortgpt"})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "auto_map" not in cfg and not (out / "modeling_prunelab.py").exists()
    assert cfg["num_hidden_layers"] == 4 and cfg["removed_layers"] == res.details["removed_layers"]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # no remote code
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib).logits, model(calib).logits, rtol=0, atol=0)
    prompt = calib[:1, :6]
    assert torch.equal(generate(loaded, prompt, use_cache=True), generate(model, prompt, use_cache=True))


def test_a_second_removal_records_original_indices(deep, calib):
    model, _ = deep
    first = pruner(num_layers=1)(model, calib).details["removed_layers"]
    second = pruner(num_layers=1)(model, calib).details["removed_layers"]  # indices of the 5-layer model
    kept = [i for i in range(6) if i not in first]
    assert model.config.removed_layers == sorted(first + [kept[second[0]]])


@pytest.mark.parametrize("kw,match", [
    ({"num_layers": 0}, r"pruner.num_layers=0 removes no layers: it must be >= 1"),
    ({"num_layers": -2}, r"pruner.num_layers=-2 removes no layers"),
    ({"num_layers": 2.5}, r"pruner.num_layers=2.5 must be a whole number"),
    ({"ratio": 0.0}, r"ratio=0.0 with pruner.num_layers=null removes no layers"),
    ({"ratio": 1.0}, r"ratio=1.0 with pruner.num_layers=null would remove every parameter"),
    ({"granularity": "block"}, r"pruner.granularity='block' is not one of layer, sublayer"),
    ({"offload": True}, r"pruner.offload=true needs pruner.device"),
    ({"batch_size": -1}, r"pruner.batch_size=-1 must be an integer >= 0"),
    ({"attention_layers": (5, 2)}, r"layers.attention: start=5 is after end=2"),
])
def test_bad_options_fail_at_build(kw, match):
    with pytest.raises(ConfigError, match=match):
        pruner(**kw)


@pytest.mark.parametrize("kw,match", [
    ({"num_layers": 4}, r"pruner.num_layers=4 would remove all 4 layers of the model .*at most 3"),
    ({"num_layers": 9}, r"would remove all 4 layers"),
    ({"num_layers": 3, "attention_layers": (1, 3)}, r"more layers than the layer ranges hold \(2 candidates\)"),
    ({"num_layers": 1, "attention_layers": (0, 2), "mlp_layers": (2, 4)},
     r"no layer is inside both layers.attention \[0, 2\] and layers.mlp \[2, 4\]"),
    ({"num_layers": 8, "granularity": "sublayer"}, r"would remove all 8 sub-blocks"),
    ({"num_layers": 4, "granularity": "sublayer", "attention_layers": (0, 1), "mlp_layers": (3, 5)},
     r"layers.mlp: \[3, 5\) is beyond the model's depth of 4"),
])
def test_impossible_requests_fail_in_check(kw, match):
    with pytest.raises(PruneError, match=match):
        pruner(**kw).check(4)


def _unchanged(model, ref, ids) -> None:
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert not hasattr(model.config, "removed_layers")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_ratio_beyond_the_range_fails_before_pruning(tiny, calib):
    model, _ = tiny
    ref = copy.deepcopy(model)
    with pytest.raises(PruneError, match=r"ratio=0.5 of all parameters would need about n=3 layers .*hold 2 cand"):
        pruner(ratio=0.5, attention_layers=(1, 3))(model, calib)
    _unchanged(model, ref, calib)
    every = sum(count_params(layer) for layer in model.model.layers) - 1
    with pytest.raises(PruneError, match=r"would remove all 4 layers"):
        pruner(ratio=every / count_params(model))(model, calib)
    _unchanged(model, ref, calib)


def test_devices_are_checked_before_pruning(tiny, calib):
    model, _ = tiny
    ref = copy.deepcopy(model)
    with pytest.raises(PruneError, match=r"pruner.device=meta differs from the model's device cpu: set pruner.offload"):
        pruner(num_layers=1, device="meta")(model, calib)
    with pytest.raises(PruneError, match=r"pruner.device='gpu0' is not a device"):
        pruner(num_layers=1, device="gpu0", offload=True)(model, calib)
    if not torch.cuda.is_available():
        with pytest.raises(PruneError, match=r"pruner.device='cuda': this machine has no CUDA device"):
            pruner(num_layers=1, device="cuda", offload=True)(model, calib)
    _unchanged(model, ref, calib)


def test_needs_calibration(tiny):
    model, _ = tiny
    with pytest.raises(PruneError, match="needs calibration tokens"):
        pruner(num_layers=1)(model, None)
    assert len(model.model.layers) == 4


@pytest.mark.integration
def test_smollm2_seven_layers_removed_still_generates():
    """The seed's ShortGPT_remove_7 on the embedded SmolLM2-135M: 23 layers left, the same greedy tokens with and
    without the KV cache, perplexity degraded but finite."""
    from analysis.perplexity import perplexity
    from conftest import CACHE_DIR
    from core.data.text import TextSpec, calibration_batch, eval_tokens, load_documents
    from recipes._common import resolve_model

    model, tok = load_model(resolve_model("smollm2"), cache_dir=CACHE_DIR)
    calib = calibration_batch(tok, load_documents(TextSpec("austen"), cache_dir=CACHE_DIR), 8, 64, 0)
    tokens = eval_tokens(tok, load_documents(TextSpec("boolq"), cache_dir=CACHE_DIR), 512)
    base = perplexity(model, tokens, 128, progress=False)["value"]
    res = pruner(num_layers=7)(model, calib)
    assert len(model.model.layers) == 23 and len(res.details["removed_layers"]) == 7
    assert 0 not in res.details["removed_layers"]  # the first layer rewrites the embeddings (BI near 1)
    assert res.params_before - res.params_after == 7 * 3_540_096
    pruned = perplexity(model, tokens, 128, progress=False)["value"]
    assert base < pruned < 10 * base
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.equal(generate(model, prompt, use_cache=True), generate(model, prompt, use_cache=False))
