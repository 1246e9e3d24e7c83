"""Every bad input the recovery issue names: one line, before any training (and before any evaluation), no model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CACHE_DIR, run_task
from recovery_models import varied_file

FAST = ["logger=none", "eval.ppl.max_tokens=512", "eval.generation.enabled=false", "eval.compare_base=false"]
LORA = ["recovery=lora", "recovery.steps=2", "recovery.seq_len=32", "recovery.micro_batch=2",
        "recovery.eval_tokens=64"]


def expect_failure(overrides, run_dir, match):
    with pytest.raises(SystemExit):
        run_task(overrides, run_dir)
    m = json.loads((run_dir / "metrics.json").read_text())
    msg = m["error"]["message"]
    # one line: the error itself, or one line of run.py's "invalid configuration:" list (errors found before loading)
    assert m["status"] == "failed" and any(match in line for line in msg.splitlines()), msg
    assert "\n" not in msg or msg.startswith("invalid configuration:\n  - "), msg
    for never in ("model", "adapter", "recovery/state"):  # nothing trained, nothing saved
        assert not (run_dir / never).exists(), never
    assert "pruned" not in (m.get("eval") or {}), "an evaluation ran before the error"
    return m


@pytest.mark.parametrize("task", ["finetune", "prune"])
def test_targets_that_match_no_module(task, tmp_path):
    extra = ["pruner=taylor", "layers=all", "data=austen", "data.num_samples=2", "data.seq_len=32"] if task == "prune" \
        else []
    expect_failure([f"task={task}", "model=tiny", *FAST, *LORA, *extra, "recovery.targets=[q_proj,qkv_proj]"],
                   tmp_path / "run", "recovery.targets: 'qkv_proj' matches no linear layer of this model")


@pytest.mark.parametrize("rank,match", [("0", "recovery.rank=0 must be a positive integer"),
                                        ("-2", "recovery.rank=-2 must be a positive integer"),
                                        ("32", "recovery.rank=32 is larger than model.layers.0.self_attn.k_proj's "
                                               "width 16")])
def test_rank_not_positive_or_wider_than_a_layer(rank, match, tmp_path):
    expect_failure(["task=finetune", "model=tiny", *FAST, *LORA, f"recovery.rank={rank}"], tmp_path / "run", match)


def test_text_shorter_than_one_batch(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Line {i} of a small file." for i in range(12)))
    expect_failure(["task=finetune", "model=tiny", *FAST, *LORA, "recovery.micro_batch=8", "recovery.seq_len=64",
                    "recovery.data.source=text_file", f"recovery.data.path={short}"], tmp_path / "run",
                   "fewer than one batch of 512 (recovery.micro_batch x recovery.seq_len)")


def test_text_overlapping_an_evaluation_text(tmp_path):
    from core.data.text import TextSpec, load_documents

    boolq = load_documents(TextSpec("boolq"), CACHE_DIR)
    f = varied_file(tmp_path / "mine.txt")
    f.write_text("\n\n".join(boolq.documents[:3]) + "\n\n" + f.read_text())
    expect_failure(["task=finetune", "model=tiny", *FAST, *LORA, "recovery.data.source=text_file",
                    f"recovery.data.path={f}"], tmp_path / "run",
                   "3 paragraph(s) of the training text text_file:mine.txt are also in the evaluation text boolq")


def test_zero_shot_boolq_passages_count_as_evaluation_text(tmp_path):
    """With BoolQ among the zero-shot tasks its passages are evaluation text even when perplexity reads Austen."""
    from core.data.text import TextSpec, load_documents

    f = varied_file(tmp_path / "mine.txt")
    f.write_text(load_documents(TextSpec("boolq"), CACHE_DIR).documents[7] + "\n\n" + f.read_text())
    expect_failure(["task=finetune", "model=tiny", *FAST, *LORA, "eval.ppl.source=austen", "eval.tasks=[boolq]",
                    "eval.limit=2", "recovery.data.source=text_file", f"recovery.data.path={f}"], tmp_path / "run",
                   "also in the evaluation text boolq")


@pytest.mark.parametrize("kind", ["state_dict_file", "dir_without_config"])
def test_a_base_that_is_not_a_checkpoint_or_hf_model(kind, tmp_path):
    if kind == "state_dict_file":
        target = tmp_path / "weights.pt"
        torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, target)
    else:
        target = tmp_path / "notes"
        target.mkdir()
        (target / "README.txt").write_text("not a model")
    expect_failure(["task=finetune", f"model={target}", *FAST, *LORA], tmp_path / "run",
                   "recovery fine-tunes a prunelab checkpoint or a HF model dir")


def test_finetune_needs_a_recovery_option(tmp_path):
    expect_failure(["task=finetune", "model=tiny", *FAST], tmp_path / "run", "task=finetune needs a recovery option")


def test_unknown_recovery_key(tmp_path):
    expect_failure(["task=finetune", "model=tiny", *FAST, *LORA, "+recovery.rnak=4"], tmp_path / "run",
                   "recovery.rnak: not an option of recovery.lora.LoRASpec")


def test_instruction_file_that_is_not_jsonl(tmp_path):
    f = tmp_path / "alpaca.json"
    f.write_text("[]")
    expect_failure(["task=finetune", "model=tiny", *FAST, *LORA, "recovery.data.source=instructions",
                    f"recovery.data.path={f}"], tmp_path / "run", "instruction data is JSONL")


def test_recovery_rows_longer_than_the_context(tmp_path):
    expect_failure(["task=finetune", "model=tiny", *FAST, *LORA, "recovery.seq_len=4096", "recovery.eval_tokens=4096"],
                   tmp_path / "run", "recovery.seq_len=4096 is longer than the model's context of 2048 tokens")


def test_rank_above_a_pruned_width_fails_before_the_pruned_model_is_evaluated(tmp_path):
    """Rank 12 fits the dense tiny model (k_proj: 16) but not after half of the KV groups are gone (8)."""
    m = expect_failure(["model=tiny", "pruner=taylor", "layers=all", "ratio=0.5", "data=austen", "data.num_samples=2",
                        "data.seq_len=32", *FAST, *LORA, "recovery.rank=12"], tmp_path / "run",
                       "recovery.rank=12 is larger than model.layers.0.self_attn.k_proj's width 8")
    assert "pruning" in m  # it failed after pruning, before any evaluation of the pruned model
