"""Shared fixtures: offline env, compose the real config into a temp run dir, tiny models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PRUNELAB_ROOT", str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
for _p in (ROOT, ROOT / "tests"):  # the project, and helpers shared by tests (analysis_helpers)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

CACHE_DIR = Path(os.environ.get("PRUNELAB_CACHE", ROOT / ".cache"))


def compose(overrides: list[str], run_dir: Path):
    """The config run.py would see for these overrides, with outputs in ``run_dir``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import run  # noqa: F401  (registers the schema)
    from recipes._launch import rewrite_model_args

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[*rewrite_model_args(overrides),
                                                 f"paths.output_dir={run_dir}", f"paths.cache_dir={CACHE_DIR}"])
    GlobalHydra.instance().clear()
    return cfg


def run_task(overrides: list[str], run_dir: Path):
    """Compose and run like ``python run.py <overrides>``; returns (result, metrics dict)."""
    import json

    import run

    cfg = compose(overrides, run_dir)
    result = run.run(cfg)
    return result, json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture
def tiny():
    from core.models.load import build_tiny

    return build_tiny(num_layers=4, hidden_size=64, intermediate_size=128, num_heads=8, num_kv_heads=2, seed=0)


@pytest.fixture
def calib(tiny):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 24), generator=g)


@pytest.fixture(scope="module", autouse=True)
def _module_scratch(request, tmp_path_factory):
    """Disk: a module's fixtures write whole checkpoints (GBs at 8B widths) into ``tmp_path_factory`` dirs, and pytest
    keeps those to the session's end. When every test of the module passed, what the module added is removed as it
    ends, so the suite's disk peak is one module's, not the sum of all of them; a failing module keeps its files."""
    import shutil

    base = tmp_path_factory.getbasetemp()
    before, failed = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
