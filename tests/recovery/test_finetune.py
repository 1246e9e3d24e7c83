"""task=finetune and task=prune recovery=lora end to end on the tiny model: record, checkpoint, adapters, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, compose, run_task
from recovery_models import plain_transformers_run

FAST = ["logger=none", "eval.ppl.max_tokens=512", "eval.generation.enabled=false"]
LORA = ["recovery=lora", "recovery.steps=4", "recovery.seq_len=32", "recovery.micro_batch=2", "recovery.eval_every=2",
        "recovery.eval_tokens=128", "recovery.save_every=2", "recovery.lr=1e-2"]


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory):
    """A Taylor-pruned tiny model saved as a prunelab checkpoint (per-layer widths)."""
    run_dir = tmp_path_factory.mktemp("prune") / "run"
    _, m = run_task(["model=tiny", "pruner=taylor", "layers=all", "ratio=0.5", "data=austen", "data.num_samples=4",
                     "data.seq_len=32", *FAST], run_dir)
    assert m["status"] == "completed"
    return run_dir / "model"


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "recovery").glob("*.yaml")))
def test_every_recovery_option_composes_and_binds(name, tmp_path):
    from recipes import _recovery as finetune

    cfg = compose([f"recovery={name}"], tmp_path)
    if name == "none":
        assert not finetune.enabled(cfg)
    else:
        spec = finetune.spec_of(cfg)
        assert spec.name == name.split("_")[0] or spec.name == name


def test_mix_weights_are_overrides_and_only_read_for_a_mix(tmp_path):
    from recipes import _recovery as finetune

    spec = finetune.spec_of(compose(["recovery=lora", "recovery.data.mix.qa=0"], tmp_path))
    assert spec.data.text_spec().mix == (("austen", 0.4), ("sciq", 0.3), ("qa", 0.0), ("news", 0.1))
    spec = finetune.spec_of(compose(["recovery=lora", "recovery.data.source=austen"], tmp_path))
    assert spec.data.text_spec().mix == () and spec.fingerprint()["data"]["mix"] == {}


def test_finetune_a_pruned_checkpoint(pruned_ckpt, tmp_path):
    run_dir = tmp_path / "ft"
    value, m = run_task(["task=finetune", f"model={pruned_ckpt}", *FAST, *LORA], run_dir)
    assert m["status"] == "completed", m.get("error")
    ev = m["eval"]
    assert {"base", "pruned", "recovered"} <= set(ev)  # the dense base named by the checkpoint, before, after
    assert value == m["metrics"]["ppl"] == ev["recovered"]["ppl"]["value"]
    assert m["metrics"]["ppl_before_recovery"] == ev["pruned"]["ppl"]["value"]
    assert m["method"] == "taylor" and m["compression"]["unit"] == "groups"
    rec = m["recovery"]
    assert rec["steps"] == 4 and rec["tokens"] == 4 * 2 * 32 and rec["final_loss"] > 0
    assert [e["step"] for e in rec["series"]["heldout"]] == [0, 2, 4] and len(rec["series"]["loss"]) == 4
    assert rec["heldout_ppl_dense"] is not None and "heldout_damage_closed" in rec  # (None: no damage to close)
    assert rec["data"]["source"].startswith("mix(") and rec["targets"]["trainable_params"] > 0
    assert m["data"]["recovery"]["train"]["rows"] == 8 and m["data"]["evaluation"]["source"] == "boolq"
    for f in ("recovery/loss.png", "recovery/heldout_ppl.png", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors", "model/model.safetensors"):
        assert (run_dir / f).is_file(), f
    info = json.loads((run_dir / "model" / "checkpoint_info.json").read_text())
    assert info["method"] == "taylor" and info["base_model"]["kind"] == "tiny"  # the input's, kept
    r = info["recovery"]
    assert (r["method"], r["steps"], r["tokens"]) == ("lora", 4, 256) and r["final_loss"] == rec["final_loss"]
    assert r["data"]["source"] == rec["data"]["source"] and r["eval_ppl"]["after"] == ev["recovered"]["ppl"]["value"]
    assert json.loads((run_dir / "model" / "config.json").read_text())["layer_configs"] == \
        json.loads((pruned_ckpt / "config.json").read_text())["layer_configs"]  # same architecture
    _plain_transformers_loads(run_dir / "model", tmp_path)


def _plain_transformers_loads(out, tmp_path):
    """The merged checkpoint loads without prunelab and gives prunelab's logits."""
    from core.models.load import load_model
    from core.models.ref import ModelRef

    model, _ = load_model(ModelRef.at(out), cache_dir=".cache")
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    _, diff = plain_transformers_run(out, x, ref, tmp_path)
    assert diff == 0.0


def test_prune_with_recovery_records_before_and_after(tmp_path):
    run_dir = tmp_path / "run"
    value, m = run_task(["model=tiny", "pruner=taylor", "layers=all", "ratio=0.5", "data=austen", "data.num_samples=4",
                         "data.seq_len=32", *FAST, *LORA], run_dir)
    assert m["status"] == "completed", m.get("error")
    ev = m["eval"]
    assert value == ev["recovered"]["ppl"]["value"] == m["metrics"]["ppl"]
    assert m["metrics"]["ppl_before_recovery"] == ev["pruned"]["ppl"]["value"]
    assert m["metrics"]["damage_closed"] == pytest.approx(
        (ev["pruned"]["ppl"]["value"] - ev["recovered"]["ppl"]["value"])
        / (ev["pruned"]["ppl"]["value"] - ev["base"]["ppl"]["value"]))
    assert m["method"] == "taylor" and m["recovery"]["method"] == "lora" and m["timings"]["recovery_s"] > 0
    info = json.loads((run_dir / "model" / "checkpoint_info.json").read_text())
    assert info["method"] == "taylor" and info["recovery"]["steps"] == 4
    assert info["recovery"]["eval_ppl"]["before"] == ev["pruned"]["ppl"]["value"]
    assert "the taylor-pruned model of this run" in (run_dir / "adapter" / "README.txt").read_text()
    assert (run_dir / "analysis" / "model_structure.json").is_file()


def test_finetune_resumes_a_killed_run_to_the_same_adapters(pruned_ckpt, tmp_path):
    first = tmp_path / "outputs" / "first"
    _, m = run_task(["task=finetune", f"model={pruned_ckpt}", *FAST, *LORA, "eval.compare_base=false"], first)
    assert m["status"] == "completed"
    record = json.loads((first / "metrics.json").read_text())
    record["status"] = "killed"  # as a SIGTERM'd run leaves it (its last state: step 4 of 4)
    (first / "metrics.json").write_text(json.dumps(record))
    second = tmp_path / "outputs" / "second"
    _, m = run_task(["task=finetune", f"model={pruned_ckpt}", *FAST, *LORA, "eval.compare_base=false",
                     "recovery.resume=true", f"paths.outputs_root={tmp_path / 'outputs'}"], second)
    assert m["status"] == "completed", m.get("error")
    assert m["recovery"]["resumed_from"] == [4]
    assert m["recovery"]["resume_source"] == str(first / "recovery" / "state" / "step-00000004")
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "recovery" / "state" / "latest.json").is_file()  # the earlier run is left as it was


def test_resume_from_another_configuration_is_one_line(pruned_ckpt, tmp_path):
    first = tmp_path / "first"
    run_task(["task=finetune", f"model={pruned_ckpt}", *FAST, *LORA, "eval.compare_base=false"], first)
    with pytest.raises(SystemExit):
        run_task(["task=finetune", f"model={pruned_ckpt}", *FAST, *LORA, "eval.compare_base=false",
                  "recovery.rank=4", f"recovery.resume={first}"], tmp_path / "second")
    m = json.loads((tmp_path / "second" / "metrics.json").read_text())
    msg = m["error"]["message"]
    assert "was saved by another configuration (spec.rank: 8 -> 4" in msg and "\n" not in msg
    assert not (tmp_path / "second" / "model").exists()
    assert "pruned" not in (m.get("eval") or {})  # refused before any evaluation


def test_interrupted_prune_with_recovery_resumes_to_the_same_adapters(tmp_path, monkeypatch):
    """Ctrl-C during step 5 of task=prune recovery=lora (state saved at step 4); `recovery.resume=true` prunes the
    same way, continues at step 4 and ends with the adapters of an uninterrupted run."""
    import recovery.train

    prune = ["model=tiny", "pruner=taylor", "layers=all", "ratio=0.5", "data=austen", "data.num_samples=4",
             "data.seq_len=32", *FAST, *LORA, "recovery.steps=6", "recovery.dropout=0.2", "eval.compare_base=false",
             f"paths.outputs_root={tmp_path}"]
    straight = tmp_path / "straight"
    run_task(prune, straight)
    real_train = recovery.train.train

    def interrupted(*args, **kw):
        def on_step(h):
            kw["on_step"](h)
            if h.step == 5:
                raise KeyboardInterrupt
        return real_train(*args, **{**kw, "on_step": on_step})
    monkeypatch.setattr(recovery.train, "train", interrupted)
    with pytest.raises(SystemExit):
        run_task(prune, tmp_path / "killed")
    monkeypatch.setattr(recovery.train, "train", real_train)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["status"] == "interrupted"
    _, m = run_task([*prune, "recovery.resume=true"], tmp_path / "resumed")
    assert m["status"] == "completed", m.get("error")
    assert m["recovery"]["resumed_from"] == [4]
    assert m["recovery"]["resume_source"] == str(tmp_path / "killed" / "recovery" / "state" / "step-00000004")
    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (straight, tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m["eval"]["recovered"]["ppl"]["value"] == json.loads(
        (straight / "metrics.json").read_text())["eval"]["recovered"]["ppl"]["value"]


def test_finetune_on_instruction_data(tmp_path):
    """Alpaca-layout JSONL through the tokenizer's chat template; the loss is on the responses."""
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Add {i} and {i}.", "input": "",
                                          "output": f"The sum is {2 * i}."}) for i in range(40)))
    run_dir = tmp_path / "run"
    _, m = run_task(["task=finetune", "model=tiny", *FAST, *LORA, "recovery.seq_len=96", "recovery.eval_tokens=4096",
                     "recovery.data.source=instructions", f"recovery.data.path={data}"], run_dir)
    assert m["status"] == "completed", m.get("error")
    d = m["recovery"]["data"]
    assert d["kind"] == "instructions" and d["source"] == "instructions:alpaca.jsonl"
    assert d["train"]["target_tokens"] < d["train"]["tokens"] - d["train"]["rows"]  # prompts carry no loss
    assert d["heldout"]["windows"] == 4  # the last 10% of the 40 records
    info = json.loads((run_dir / "model" / "checkpoint_info.json").read_text())
    assert info["recovery"]["data"]["kind"] == "instructions"
