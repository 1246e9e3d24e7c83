"""End to end on the embedded SmolLM2-135M-Instruct: prune (LLM-Pruner's settings), recover with LoRA, merge, save."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_task

pytestmark = pytest.mark.integration


def test_prune_with_lora_recovery_on_smollm2(tmp_path):
    run_dir = tmp_path / "run"
    value, m = run_task(["pruner=taylor", "ratio=0.25", "pruner.taylor=param_first", "data=austen",
                         "data.num_samples=10", "data.seq_len=64", "logger=none", "eval.ppl.max_tokens=1024",
                         "eval.generation.max_new_tokens=6",
                         "recovery=lora", "recovery.steps=8", "recovery.micro_batch=2", "recovery.seq_len=64",
                         "recovery.eval_every=4", "recovery.eval_tokens=512", "recovery.lr=1e-3"], run_dir)
    assert m["status"] == "completed", m.get("error")
    assert m["params"]["pruned"] == 118_589_760
    rec = m["recovery"]
    before, after = rec["heldout_ppl_before"], rec["heldout_ppl_after"]
    assert rec["heldout_ppl_dense"] < before and after < before, (rec["heldout_ppl_dense"], before, after)
    assert 0 < rec["heldout_damage_closed"] <= 1.5
    assert [e["step"] for e in rec["series"]["heldout"]] == [0, 4, 8] and rec["tokens"] == 8 * 2 * 64
    ev = m["eval"]
    assert math.isfinite(ev["recovered"]["ppl"]["value"]) and value == ev["recovered"]["ppl"]["value"]
    assert "Paris" in ev["base"]["generation"]["output"]
    assert rec["targets"]["modules"] == 30 * 7 and rec["targets"]["trainable_params"] > 0
    cfg = json.loads((run_dir / "model" / "config.json").read_text())
    assert [lc["intermediate_size"] for lc in cfg["layer_configs"]] == [1536] * 3 + [1152] * 24 + [1536] * 3
    info = json.loads((run_dir / "model" / "checkpoint_info.json").read_text())
    assert info["recovery"]["heldout_ppl_after"] == after and info["recovery"]["data"]["source"].startswith("mix(")

    from core.models.load import load_model
    from core.models.ref import ModelRef

    model, tok = load_model(ModelRef.at(run_dir / "model"), cache_dir=".cache")
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3
