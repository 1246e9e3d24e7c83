"""Every bad input named by the foundation issue: one clear error, before the model loads, no checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ValidationError

from conftest import ROOT, compose, run_task


def expect_failure(overrides, tmp_path, match):
    with pytest.raises(SystemExit):
        run_task(overrides, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert match in metrics["error"]["message"], metrics["error"]["message"]
    assert not (tmp_path / "model").exists()
    return metrics


TINY = ["model=tiny", "pruner=taylor", "logger=none", "eval=none"]


@pytest.mark.parametrize("override", ["ratio=1.0", "ratio=-0.1", "pruner.mlp_ratio=1.5"])
def test_ratio_outside_unit_interval(tmp_path, override):
    expect_failure([*TINY, "layers=all", override], tmp_path, "must be in [0, 1)")


@pytest.mark.parametrize("overrides,match", [
    (["layers.attention.start=3", "layers.attention.end=1"], "is after end"),
    (["layers.mlp.start=2", "layers.mlp.end=2"], "is empty"),
    (["layers.mlp.start=0", "layers.mlp.end=12"], "beyond the model's depth of 4"),
    (["layers=default"], "is after end"),  # 3..-3 on a 4-layer model
])
def test_bad_layer_ranges(tmp_path, overrides, match):
    expect_failure([*TINY, "layers=all", *overrides], tmp_path, match)


def test_unknown_pruner_and_model_fail_at_composition(tmp_path):
    with pytest.raises(MissingConfigException, match="pruner/obc"):
        compose(["pruner=obc"], tmp_path)
    with pytest.raises(MissingConfigException):
        compose(["model=gpt5"], tmp_path)


def test_wrong_type_fails_at_composition(tmp_path):
    with pytest.raises((ValidationError, ConfigCompositionException)):
        compose(["data.num_samples=many"], tmp_path)


def test_unknown_task_names_the_recipes(tmp_path):
    expect_failure(["task=train", "logger=none"], tmp_path, "task='train' is not one of analyze, batch_analyze")


def test_unknown_importance_value(tmp_path):
    expect_failure([*TINY, "layers=all", "pruner.taylor=third_order"], tmp_path, "pruner.taylor='third_order'")


def test_model_path_missing(tmp_path):
    expect_failure(["model=hf", "model.path=/nonexistent/llama", "logger=none"], tmp_path / "a", "does not exist")
    expect_failure(["model=hf", "logger=none"], tmp_path / "b", "needs model.path")


def test_model_path_not_a_model(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "readme.txt").write_text("nothing here")
    expect_failure([f"model={folder}", "logger=none", "layers=all"], tmp_path / "run", "not a model")


def test_data_path_missing_or_too_short(tmp_path):
    expect_failure([*TINY, "layers=all", "data=text_file", f"data.path={tmp_path / 'nope.txt'}"], tmp_path / "a",
                   "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n\nAnd a second paragraph.")
    expect_failure([*TINY, "layers=all", "data=text_file", f"data.path={short}", "data.num_samples=8",
                    "data.seq_len=128"], tmp_path / "b", "too short")
    expect_failure([*TINY, "layers=all", "data=text_file"], tmp_path / "c", "needs data.path")


def test_params_target_unreachable_for_head_layout(tmp_path):
    # Only attention pruned (MLP ratio fixed at 0) in one layer: 30% of all parameters is out of reach.
    expect_failure([*TINY, "layers=all", "layers.attention.start=1", "layers.attention.end=2", "ratio=0.3",
                    "ratio_target=params", "pruner.mlp_ratio=0"], tmp_path, "cannot be removed")


def test_all_errors_reported_at_once(tmp_path):
    m = expect_failure([*TINY, "layers=all", "ratio=2", "pruner.round_to=0", "eval.limit=0"], tmp_path, "ratio=2")
    assert "round_to" in m["error"]["message"] and "eval.limit" in m["error"]["message"]


def test_cli_prints_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "model=tiny", "pruner=taylor", "logger=none", "ratio=1.5",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "ratio=1.5 must be in [0, 1)" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


def test_mmap_threshold_out_of_range(tmp_path):
    expect_failure([*TINY, "runtime.mmap_threshold_mb=64"], tmp_path, "mmap_threshold_mb")


def test_mmap_threshold_applies_on_glibc():
    import platform

    from recipes._launch import set_mmap_threshold

    assert set_mmap_threshold(None) is False and set_mmap_threshold(0) is False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert set_mmap_threshold(1) is True
