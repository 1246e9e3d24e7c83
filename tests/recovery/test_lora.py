"""LoRA through peft on every layout the project produces: targets, frozen weights, merge, loss, resume, early stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.run.errors import ConfigError
from recovery.data import heldout_rows, load_corpus, training_rows
from recovery.lora import LoRASpec, attach, decoder_linears, merge, resolve_targets, trainable_parameters
from recovery.train import is_checkpointing, latest_state, train
from llamba_helpers import randomize
from recovery_models import ARCHS, build, logits, memorisable_file, plain_transformers_run, varied_file

X = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _train(model, tok, spec: LoRASpec, **kw):
    """Attach adapters and train them on ``spec.data``; returns (peft model, TrainResult)."""
    corpus = load_corpus(spec.data, ".cache")
    steps = spec.steps
    rows = training_rows(tok, corpus, steps * spec.rows_per_step, spec.seq_len, packing=spec.packing, seed=spec.seed,
                         batch_tokens=spec.micro_batch * spec.seq_len)
    held = heldout_rows(tok, corpus, spec.seq_len, spec.eval_tokens)
    peft_model = attach(model, spec, resolve_targets(model, spec))
    return peft_model, train(peft_model, rows, held, spec, total_steps=steps, pad_id=tok.pad_token_id, progress=False,
                             **kw)


def _spec(path: Path, **kw) -> LoRASpec:
    base = dict(steps=6, lr=1e-2, micro_batch=2, seq_len=32, eval_every=2, eval_tokens=64, save_every=2,
                data={"source": "text_file", "path": str(path)})
    return LoRASpec(**{**base, **kw})


@pytest.mark.parametrize("arch,count,names", [
    ("llama", 28, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("pruned", 21, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),  # 2 sub-blocks gone
    ("sliced", 14, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("hybrid", 19, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj",
                    "out_proj"}),
])
def test_all_linear_targets_per_architecture(arch, count, names):
    model, _ = build(arch)
    targets = resolve_targets(model, LoRASpec())
    assert len(targets) == count and {t.rsplit(".", 1)[-1] for t in targets} == names
    assert all(t.startswith("model.layers.") for t in targets)  # never the LM head or embeddings
    if arch == "pruned":  # layer 0 has no attention, layer 2 no MLP: nothing of theirs is targeted
        assert not [t for t in targets if t.startswith("model.layers.0.self_attn")]
        assert not [t for t in targets if t.startswith("model.layers.2.mlp")]
    if arch == "hybrid":  # the Mamba-2 layer's projections, not its conv
        assert "model.layers.1.mixer.in_proj" in targets and "model.layers.1.mixer.out_proj" in targets


def test_named_targets_and_a_name_matching_nothing():
    model, _ = build("llama")
    assert len(resolve_targets(model, LoRASpec(targets=["q_proj", "v_proj"]))) == 8
    assert len(resolve_targets(model, LoRASpec(targets=["mlp.down_proj"]))) == 4
    hybrid, _ = build("hybrid")
    assert resolve_targets(hybrid, LoRASpec(targets=["in_proj"])) == ["model.layers.1.mixer.in_proj"]
    with pytest.raises(ConfigError, match=r"'qkv' matches no linear layer of this model \(its decoder's linear "
                                          r"layers: down_proj, gate_proj, k_proj"):
        resolve_targets(model, LoRASpec(targets=["q_proj", "qkv"]))


def test_rank_larger_than_a_layer_is_refused():
    model, _ = build("pruned")  # layer 1 keeps one KV group: k_proj is 64 -> 8
    with pytest.raises(ConfigError, match=r"recovery.rank=16 is larger than model.layers.1.self_attn.k_proj's width 8"):
        resolve_targets(model, LoRASpec(rank=16))
    assert resolve_targets(model, LoRASpec(rank=16, targets=["gate_proj", "up_proj"]))  # those are wide enough


@pytest.mark.parametrize("arch", ARCHS)
def test_only_adapters_train_and_the_merge_reproduces_the_adapted_model(arch, tmp_path):
    from core.models.checkpoint import save_checkpoint
    from core.models.load import load_model
    from core.models.ref import ModelRef

    model, tok = build(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n: m.weight for n, m in decoder_linears(model).items()}  # the tensors peft keeps as base layers
    peft_model, result = _train(model, tok, _spec(varied_file(tmp_path / "t.txt"), steps=4))
    trainable = trainable_parameters(peft_model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # lora_B starts at 0: every one of them moved
    assert all(float(p.detach().abs().sum()) > 0 for n, p in trainable.items() if ".lora_B." in n)
    for n, p in peft_model.get_base_model().named_parameters():  # every weight of the model bit-identical
        if ".lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, before[key]), n
    assert all(torch.equal(w, before[n + ".weight"]) for n, w in frozen.items())
    adapted = logits(peft_model, X)
    assert not torch.allclose(adapted, logits_of_copy(before, arch), atol=1e-4)  # training changed the outputs
    merged = merge(peft_model)
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in before.items()}
    torch.testing.assert_close(logits(merged, X), adapted, rtol=1e-5, atol=2e-5)
    out = save_checkpoint(merged, tok, tmp_path / "model", {"method": "test"})
    loaded, _ = load_model(ModelRef.at(out), cache_dir=".cache")
    assert torch.equal(logits(loaded, X), logits(merged, X))


def logits_of_copy(state: dict, arch: str) -> torch.Tensor:
    model, _ = build(arch)
    model.load_state_dict(state)
    return logits(model, X)


def test_merged_pruned_checkpoint_loads_in_plain_transformers(tmp_path):
    """Per-layer widths, removed sub-blocks and added biases survive the merge and load without prunelab."""
    from core.models.checkpoint import save_checkpoint

    model, tok = build("pruned")
    peft_model, _ = _train(model, tok, _spec(varied_file(tmp_path / "t.txt"), steps=3))
    merged = merge(peft_model)
    out = save_checkpoint(merged, tok, tmp_path / "model", {"method": "test"})
    kind, diff = plain_transformers_run(out, X, logits(merged, X), tmp_path)
    assert kind == "PrunedLlamaForCausalLM" and diff == 0.0


def test_loss_decreases_on_a_memorisable_text(tmp_path):
    model, tok = build("llama")
    randomize(model)  # weights on a scale where the LM head can express a peaked distribution (0.02-std init cannot)
    _, result = _train(model, tok, _spec(memorisable_file(tmp_path / "m.txt"), steps=30, lr=5e-3, rank=16,
                                         eval_every=10, schedule="constant"))
    losses = result.history.losses
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    ppl = [e["ppl"] for e in result.history.evals]
    assert ppl[-1] < 0.2 * ppl[0], ppl  # the held-out copy of the same sentence too


class Killed(Exception):
    pass


@pytest.mark.parametrize("arch", ["pruned", "hybrid"])
def test_resume_ends_with_the_adapters_of_an_uninterrupted_run(arch, tmp_path):
    text = varied_file(tmp_path / "t.txt")
    spec = _spec(text, steps=8, dropout=0.2, save_every=2, eval_every=3, lr=5e-3)
    model, tok = build(arch)
    straight, full = _train(model, tok, spec, state_dir=tmp_path / "a")
    expected = {n: p.detach().clone() for n, p in trainable_parameters(straight).items()}

    def kill_after_5(h):
        if h.step == 5:
            raise Killed  # the state of step 4 is on disk; step 5's work is lost, as in a kill
    model, tok = build(arch)
    with pytest.raises(Killed):
        _train(model, tok, spec, state_dir=tmp_path / "b", on_step=kill_after_5)
    assert latest_state(tmp_path / "b").name == "step-00000004"
    model, tok = build(arch)
    resumed, res = _train(model, tok, spec, state_dir=tmp_path / "b", resume_from=tmp_path / "b")
    got = trainable_parameters(resumed)
    assert all(torch.equal(got[n], expected[n]) for n in expected)  # bit for bit
    assert res.history.losses == full.history.losses and res.history.resumed_from == [4]
    assert [e["ppl"] for e in res.history.evals] == [e["ppl"] for e in full.history.evals]


def test_resume_refuses_a_state_of_another_configuration(tmp_path):
    text = varied_file(tmp_path / "t.txt")
    model, tok = build("llama")
    _train(model, tok, _spec(text, steps=2), state_dir=tmp_path / "s")
    model, tok = build("llama")
    with pytest.raises(ConfigError) as e:
        _train(model, tok, _spec(text, steps=2, lr=2e-2), resume_from=tmp_path / "s")
    msg = str(e.value)
    assert "saved by another configuration (spec.lr: 0.01 -> 0.02)" in msg and "\n" not in msg


def test_early_stopping_keeps_the_best_adapters(tmp_path):
    from recovery.train import heldout_ppl

    model, tok = build("llama")
    # lr far too high on purpose, so the held-out perplexity turns up (peft 0.21 + transformers 5.25 still improve at 3.0)
    spec = _spec(varied_file(tmp_path / "t.txt"), steps=20, lr=20.0, eval_every=1, patience=2, max_grad_norm=None)
    peft_model, result = _train(model, tok, spec)
    h = result.history
    assert h.stopped_early and h.step < 20 and h.bad_evals == 2
    assert result.adapter_step == h.best_step == h.step - 2  # two evaluations without improvement after the best
    held = heldout_rows(tok, load_corpus(spec.data, ".cache"), spec.seq_len, spec.eval_tokens)
    assert heldout_ppl(peft_model, held, spec.micro_batch, tok.pad_token_id) == pytest.approx(h.best_ppl, rel=1e-9)
    assert result.to_dict()["heldout_ppl_after"] == h.best_ppl


@pytest.mark.parametrize("kw,match", [
    ({"rank": 0}, "recovery.rank=0 must be a positive integer"),
    ({"rank": -4}, "recovery.rank=-4 must be a positive integer"),
    ({"dropout": 1.0}, "recovery.dropout=1.0 must be in [0, 1)"),
    ({"schedule": "step"}, "recovery.schedule='step' is not one of cosine, linear, constant"),
    ({"targets": []}, "a non-empty list of module names"),
    ({"targets": "attention"}, "'all-linear' or a list of module names"),
    ({"steps": 0}, "recovery.steps=0 must be >= 1"),
    ({"eval_tokens": 16, "seq_len": 32}, "recovery.eval_tokens=16 must be >= recovery.seq_len=32"),
    ({"precision": "fp16"}, "recovery.precision='fp16' is not one of auto, fp32, bf16"),
    ({"data": {"source": "piqa"}}, "recovery.data.source='piqa' is not one of"),
    ({"data": {"source": "text_file"}}, "needs recovery.data.path"),
    ({"data": {"source": "mix", "mix": {"boolq": 1.0}}}, "recovery.data.mix names boolq, an evaluation dataset"),
])
def test_bad_options_fail_when_bound(kw, match):
    with pytest.raises(ConfigError) as e:
        LoRASpec(**kw)
    assert match in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["pruned", "sliced", "hybrid"])
def test_gradient_checkpointing_trains_the_same_adapters(arch, tmp_path):
    """Recomputing activations in backward (dropout's RNG replayed) changes memory, not the result."""
    text = varied_file(tmp_path / "t.txt")
    out = []
    for checkpointing in (False, True):
        model, tok = build(arch)
        seen = []
        peft_model, _ = _train(model, tok, _spec(text, steps=3, dropout=0.1, gradient_checkpointing=checkpointing),
                               on_step=lambda h: seen.append(is_checkpointing(model)))
        assert seen == [checkpointing] * 3
        out.append({n: p.detach().clone() for n, p in trainable_parameters(peft_model).items()})
        assert not is_checkpointing(model)  # switched off again after training
    assert out[0].keys() == out[1].keys()
    for n in out[0]:
        torch.testing.assert_close(out[1][n], out[0][n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("setup", ["dense", "pruned", "blocks removed"])
def test_the_config_check_sees_the_linears_the_model_has(setup, tmp_path):
    """``config_linears`` (task=finetune's check before the weights load) names exactly the linear layers, with
    their widths, that ``decoder_linears`` finds on the loaded model, per-layer widths and removed blocks included."""
    from conftest import run_task
    from core.models.load import build_tiny, load_model
    from core.models.ref import ModelRef, read_config_json
    from recovery.lora import config_linears

    if setup == "dense":
        model, tok = build_tiny(num_layers=4)
        model.save_pretrained(tmp_path / "m")
        tok.save_pretrained(tmp_path / "m")
        path = tmp_path / "m"
    else:
        extra = ["pruner=shortgpt", "pruner.granularity=sublayer", "pruner.num_layers=3"] \
            if setup == "blocks removed" else ["ratio=0.5"]
        run_task(["model=tiny", "pruner=l2", "layers=all", "logger=none", "eval=none", *extra], tmp_path / "run")
        if setup == "blocks removed":  # some sub-block is gone: the config lists a 0 width
            lcs = read_config_json(tmp_path / "run" / "model").get("layer_configs") or []
            assert any(0 in (lc.get("num_attention_heads"), lc.get("intermediate_size")) for lc in lcs), lcs
        path = tmp_path / "run" / "model"
    model, _ = load_model(ModelRef.at(path), cache_dir=tmp_path)
    got = {n: (m.in_features, m.out_features) for n, m in decoder_linears(model).items()}
    assert config_linears(read_config_json(path)) == got
