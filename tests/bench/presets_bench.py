"""The compression presets' cost (issue 27): one JSON line per ``conf/experiment/compress_*.yaml``.

    .venv/bin/python tests/bench/presets_bench.py

For each preset, without reading a weight (the planner, ``recipes/_plan.py``, as ``dry_run=true`` prints it):

- ``smollm2``: the plan on the embedded model on this CPU (calibration tokens, decoder-layer passes, peak host RAM);
- ``llama3_8b_gpu``: the plan for Llama-3-8B's geometry (``model=llama3_8b_shape``, full depth, header only) on one
  80 GB GPU (``model.device=cuda plan.device_memory=80GB``): peak device and host memory, passes, and whether it fits;
- ``measured``: the newest ``tests/bench/results/quality.jsonl`` line that ran the preset's settings on SmolLM2 (its
  perplexity ratios, its 7-task zero-shot average where it measured one, pruning seconds on one thread, date and
  commit), or null when none did yet.

docs/quality.md renders the table from the newest line per preset.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, record  # noqa: E402

# the quality_bench row that runs each preset's settings on SmolLM2: (budget ratio, row, overrides)
MEASURED_BY = {
    "compress_25": (0.25, "obs:comp:uniform", []),
    "compress_40": (0.4, "joint:4", ["pruner.width.attention_ratio=0.34"]),
    "compress_50": (0.5, "joint:4", ["layers.attention.start=1", "layers.attention.end=30", "layers.mlp.start=1",
                                     "layers.mlp.end=30", "pruner.width.attention_ratio=0.34"]),
}


def plan(overrides: list[str]) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import run
    from recipes._launch import rewrite_model_args
    from recipes._plan import prepare

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*rewrite_model_args(overrides), "dry_run=true", "paths.output_dir=/tmp"])
    GlobalHydra.instance().clear()
    p = prepare(cfg, run.check(cfg)).plan
    fp, phase = p.peak()
    return {"device_gib": round(fp.device_bytes / 2**30, 2), "host_gib": round(fp.host_bytes / 2**30, 2),
            "phase": phase, "tokens": fp.tokens, "layer_forwards": fp.layer_forwards, "device_bytes": fp.device_bytes}


def measured(name: str) -> Optional[dict[str, Any]]:
    ratio, row, overrides = MEASURED_BY[name]
    found = None
    path = RESULTS / "quality.jsonl"
    for ln in (json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")) if path.is_file() else ():
        if (ln.get("budget") or {}).get("ratio") == ratio and ln.get("row") == row and \
                sorted(ln.get("overrides") or []) == sorted(overrides) and ln.get("tokens_option") == "auto" and \
                ln.get("status") != "failed":
            found = ln
    if found is None:
        return None
    return {"ppl_ratio": found.get("ppl_ratio"), "damage_vs_reference": found.get("damage_vs_reference"),
            "prune_s": found.get("prune_s"), "calibration_tokens": found.get("calibration_tokens"),
            "zeroshot": ({"average": found["zeroshot"].get("average"), "limit": found["zeroshot"].get("limit"),
                          "minus_dense": found.get("zeroshot_average_minus_dense")} if found.get("zeroshot") else None),
            "threads": found.get("threads"), "date": found.get("date"), "commit": found.get("commit")}


def main() -> None:
    import argparse

    argparse.ArgumentParser(description="The compression presets' plans and newest measurements: one JSON line per "
                            "conf/experiment/compress_*.yaml in tests/bench/results/presets.jsonl.").parse_args()
    for path in sorted((ROOT / "conf" / "experiment").glob("compress_*.yaml")):
        name = path.stem
        small = plan([f"experiment={name}"])
        big = plan([f"experiment={name}", "model=llama3_8b_shape", "model.device=cuda", "plan.device_memory=80GB"])
        record({"preset": name, "smollm2": small, "llama3_8b_gpu": {**big, "gpu_bytes": 80 * 10**9,
                                                                       "fits": big["device_bytes"] <= 80 * 10**9},
                "measured": measured(name)}, __file__)


if __name__ == "__main__":
    main()
