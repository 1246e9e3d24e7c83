"""Scale benchmark (issue 24; not a timed test): each method at the real widths of Llama-3-8B and Llama-3-70B on
this CPU, through the shape models (core/models/shape.py: random weights, real geometry, few layers).

    python tests/bench/scale_bench.py                       # every (method, shape) pair, one child at a time
    python tests/bench/scale_bench.py --only obs --shapes 8b

One child process per (method, shape), ``OMP_NUM_THREADS=1``, small token counts. Each JSON line
(tests/bench/results/scale.jsonl, through _common.record) gives:

- ``layer_ratio``: seconds of the method's work per layer it processes, over one dense forward of that layer on
  the same tokens (``dense_layer_s``, measured in the same child after the run, on a layer built from the same
  config). Prune: ``timings.prune_s`` / pruned layers. Search: seconds per fitness evaluation / depth (an
  evaluation is at most one forward of the model). LoRA: seconds per optimizer step / depth.
- ``host_over_model``: the child's peak RSS (``os.wait4``) over the model's bytes.
- ``predicted_host_bytes`` (the planner's peak for this run, recorded in its metrics.json before loading, process
  baseline included) against ``measured_host_bytes``; ``host_error`` = measured / predicted - 1.
- ``full_depth``: the extrapolation: ``seconds`` = per-layer seconds x depth; the planner's peak host and device
  memory for the full-depth model with the same settings (``model.num_layers=null``, header only) on the CPU, and
  its peak device memory on one GPU at the method's defaults (``model.device=cuda``); ``--plan-only`` records
  that alone, and for a layer-streamed pruner also with offload (``full_depth_offload_defaults``: the weights in
  host RAM, one decoder layer at a time on the GPU).

Some pairs differ from the common settings (``VARIANTS``: ShortGPT needs two layers to drop one; obs at the 8B
width runs one layer on 8,192 tokens); a run whose plan does not fit this machine stops before loading, in one line,
and its line says so (status failed, the planner's refusal as its error).

The renderer (tests/bench/render.py) turns the newest line per (method, shape) into docs/benchmarks.md's scale
section and the table in docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench._common import record, run_child  # noqa: E402

ROWS, SEQ = 2, 512  # calibration: 2 x 512 tokens
SHAPES = {"8b": ("llama3_8b_shape", 2, 32), "70b": ("llama3_70b_shape", 1, 80)}
CAL = [f"data.num_samples={ROWS}", f"data.seq_len={SEQ}"]
# method -> (overrides, what its time is divided by, a note)
METHODS: dict[str, tuple[list[str], str, str]] = {
    "taylor": (["pruner=taylor", "ratio=0.25", *CAL], "prune", "LLM-Pruner's Taylor (full backward); l1, l2 and "
               "random run the same code path without the backward"),
    "l2": (["pruner=l2", "ratio=0.25"], "prune", "l1 and random: the same code path"),
    "magnitude": (["pruner=magnitude", "ratio=0.1"], "prune", ""),
    "wanda": (["pruner=wanda", "ratio=0.25", *CAL], "prune", ""),
    "flap": (["pruner=flap", "ratio=0.1", *CAL], "prune", ""),
    "shortgpt": (["pruner=shortgpt", "pruner.num_layers=1", *CAL], "prune", "removes 1 layer"),
    "slicegpt": (["pruner=slicegpt", "ratio=0.1", *CAL], "prune", ""),
    "depth": (["pruner=depth", "pruner.num_layers=1", *CAL], "prune",
              "removes 1 layer (greedy), the linear map fitted and merged into the previous down_proj"),
    "obs": (["pruner=obs", "ratio=0.05", f"pruner.tokens={ROWS * SEQ}", f"pruner.seq_len={SEQ}",
             "pruner.progress=false"], "prune", "uniform allocation"),
    "obs_search": (["pruner=obs", "ratio=0.05", f"pruner.tokens={2 * ROWS * SEQ}", f"pruner.seq_len={SEQ}",
                    "pruner.allocation=search", "pruner.search_budget=3", f"pruner.search_tokens={SEQ}",
                    "pruner.progress=false"], "prune", "allocation=search, budget 3"),
    "joint": (["pruner=joint", "ratio=0.2", "pruner.num_layers=1", "pruner.depth.search_budget=3",
               f"pruner.depth.search_tokens={SEQ}", f"+pruner.width.tokens={4 * SEQ}", f"+pruner.width.seq_len={SEQ}",
               "+pruner.width.progress=false", *CAL], "prune",
              "removes 1 whole layer (searched by KL, its map merged), then KV groups and MLP channels (obs) to 20% of "
              "all parameters"),
    "lora": (["task=finetune", "recovery=lora", "recovery.steps=2", "recovery.micro_batch=1",
              f"recovery.seq_len={SEQ}", "recovery.eval_every=0", "recovery.eval_tokens=512"], "step",
             "LoRA recovery (task=finetune), per optimizer step of 1 x 512 tokens"),
}
# (method, shape) -> the depth and overrides that differ from SHAPES / METHODS there, and why
VARIANTS: dict[tuple[str, str], dict] = {
    # ShortGPT removes whole layers: a 1-layer shape has none it may drop
    ("shortgpt", "70b"): {"layers": 2},
    ("depth", "70b"): {"layers": 2},  # the same for depth, which never drops layer 0 (it has no down_proj before it)
    # joint: one layer dropped (never layer 0), the width stage on the two left
    ("joint", "8b"): {"layers": 3, "tokens": 4 * SEQ},  # 4 samples: 1 for the depth search's fitness, 3 to fit
    ("joint", "70b"): {"layers": 2, "tokens": 4 * SEQ},
    # obs at the 8B width: one layer (one down_proj fit with n = 14,336 takes minutes on one thread) on 8,192
    # calibration tokens (16 x 512), otherwise its defaults (rounds 8, target dense, guard, holdout 0.1, batch 8)
    ("obs", "8b"): {"layers": 1, "args": ["pruner.tokens=8192"], "tokens": 8192},
}
SEARCH = ("search_kl", "replacement fitness (task=search, kl, prefix cache), per fitness evaluation; 8B: Llamba-8B's "
                       "shape <- Llama-3-8B's, 70B: the shape with itself; both given as paths, loaded in their checkpoints' "
                       "dtype (bfloat16)")


def _layers(method: str, shape: str) -> int:
    return VARIANTS.get((method, shape), {}).get("layers", SHAPES[shape][1])


def _tokens(method: str, shape: str, unit: str) -> int:
    return VARIANTS.get((method, shape), {}).get("tokens", ROWS * SEQ if unit != "step" else SEQ)


def _overrides(method: str, shape: str) -> tuple[list[str], str, str]:
    name, layers = SHAPES[shape][0], _layers(method, shape)
    if method == "search_kl":  # the shortened shapes' dirs, given as paths
        cache = ROOT / ".cache" / "models"
        donor = cache / f"shape-{name.removesuffix('_shape')}-L{layers}-bfloat16"
        base = cache / f"shape-llamba_8b-L{layers}-bfloat16" if shape == "8b" else donor
        return ([f"replacement.base={base}", f"replacement.donor={donor}", "task=search", "search.k=[1]", "search.strategies=[random]",
                 "search.budget=2", f"search.tokens={SEQ}", f"data.seq_len={SEQ}"], "evaluation", SEARCH[1])
    args, unit, note = METHODS[method]
    extra = VARIANTS.get((method, shape), {}).get("args", [])
    return ([f"model={name}", f"model.num_layers={layers}", "model.device=cpu", "layers=all", *args, *extra], unit, note)


def _defaults(method: str, shape: str) -> list[str]:
    """The method at its own defaults (ratio 0.25, default layers, default tokens) on the full model."""
    name = SHAPES[shape][0]
    if method == "search_kl":  # the shapes by name (full depth, header only), the search's defaults, on the GPU
        base, donor = ("llamba_8b_shape", "llama3_8b_shape") if shape == "8b" else (name, name)
        return [f"replacement.base={base}", f"replacement.donor={donor}", "task=search", "replacement.device=cuda"]
    first = METHODS[method][0][0]
    extra = {"obs_search": ["pruner.allocation=search"], "lora": ["recovery=lora"],
             "joint": ["experiment=compress_50"]}.get(method, [])  # joint at its 50% preset (its defaults: width only)
    return [f"model={name}", first, *extra]


OFFLOAD = ["model.device=cpu", "pruner.offload=true", "pruner.device=cuda"]  # weights on the host, one layer on the GPU
# pruner=joint streams through its stages' options; its searched depth stage needs whole-model forwards, so on one
# GPU the layers are chosen greedily (docs/quality.md)
OFFLOAD_ARGS = {"joint": ["model.device=cpu", "pruner.depth.selection=greedy", "+pruner.depth.offload=true",
                          "+pruner.depth.device=cuda", "+pruner.width.offload=true", "+pruner.width.device=cuda"]}


def _offloads(method: str) -> bool:
    """A layer-streamed pruner (its config has ``offload``) other than the allocation search (whole-model forwards)."""
    if method in OFFLOAD_ARGS:
        return True
    if method not in METHODS or method == "obs_search":
        return False
    group = METHODS[method][0][0].removeprefix("pruner=")
    path = ROOT / "conf" / "pruner" / f"{group}.yaml"
    return path.is_file() and any(line.startswith("offload:") for line in path.read_text().splitlines())


def _compose(args: list[str], run_dir: Path):
    from conftest import CACHE_DIR, compose

    return compose([*args, "logger=none", "eval=none", "save_model=false", "runtime.threads=1"], run_dir), CACHE_DIR


def _full_depth_plan(args: list[str], run_dir: Path, device: str, offload: tuple[str, ...] = tuple(OFFLOAD)) -> dict:
    import run
    from recipes._plan import prepare

    full = [a for a in args if not a.startswith(("model.num_layers=", "model.device="))]
    full += ["model.num_layers=null", f"model.device={device}", "dry_run=true", "plan.device_memory=80GB"]
    if device == "offload":  # the model on the host, its layers run on one GPU
        full = [a for a in full if not a.startswith("model.device=")] + list(offload)
    cfg, _ = _compose(full, run_dir)
    prepared = prepare(cfg, run.check(cfg))
    if prepared.error is not None or prepared.plan is None:
        return {"error": str(prepared.error)[:300]}
    fp, _ = prepared.plan.peak()
    return {"host_bytes": fp.host_bytes, "device_bytes": fp.device_bytes, "tokens": fp.tokens,
            "layer_forwards": fp.layer_forwards}


def _dense_layer_seconds(cfg_json: dict, tokens: int, batch_rows: int) -> float:
    """One dense Llama decoder layer of this config over ``tokens`` (in rows of SEQ), bfloat16, 1 thread: the
    median of 3 after one warm-up."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    keys = {k: v for k, v in cfg_json.items() if k not in ("architectures", "torch_dtype", "dtype")}
    config = LlamaConfig(**keys)
    config._attn_implementation = "sdpa"
    with torch.device("cpu"):
        layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16).eval()
        rope = LlamaRotaryEmbedding(config)
    rows = max(1, tokens // SEQ)
    x = torch.randn(min(rows, batch_rows), SEQ, config.hidden_size, dtype=torch.bfloat16)
    pos = torch.arange(SEQ).unsqueeze(0)
    emb = rope(x, pos)
    times = []
    with torch.no_grad():
        for _ in range(4):
            t0 = time.perf_counter()
            for _ in range(0, rows, x.shape[0]):
                layer(x, position_embeddings=emb, position_ids=pos, attention_mask=None)
            times.append(time.perf_counter() - t0)
    del layer
    return sorted(times[1:])[1]


def child(method: str, shape: str, out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    import run
    from core.run import plan as P

    args, unit, note = _overrides(method, shape)
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    cfg, _ = _compose(args, work / "run")
    t0 = time.perf_counter()
    error = None
    try:
        run.run(cfg)
    except BaseException as e:  # noqa: BLE001 - the line records the failure
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    wall = time.perf_counter() - t0
    m = json.loads((work / "run" / "metrics.json").read_text()) if (work / "run" / "metrics.json").is_file() else {}
    timings = m.get("timings") or {}
    plan = (m.get("plan") or {}).get("peak") or {}
    from recipes._plan import model_config
    from recipes._common import resolve_model

    name, depth = SHAPES[shape][0], SHAPES[shape][2]
    layers = _layers(method, shape)
    ref = resolve_model(name)
    import dataclasses

    ref = dataclasses.replace(ref, num_layers=layers)
    cfg_json, _ = model_config(ref, str(cfg.paths.cache_dir))
    work_s, count = None, None
    if unit == "prune":
        work_s, count = timings.get("prune_s"), layers
    elif unit == "step":
        steps = ((m.get("recovery") or {}).get("steps") or 2)
        work_s, count = timings.get("recovery_s"), steps * layers
    else:  # search: per fitness evaluation, each at most one forward of the `layers` layers
        res_f = work / "run" / "search" / "results.json"
        res = json.loads(res_f.read_text()) if res_f.is_file() else {}
        evals = sum(e.get("evaluations", 0) for k in (res.get("k") or {}).values() for e in k.values()) + 2
        work_s = wall - float(timings.get("load_s") or 0) if res else None
        count = evals * layers
    tokens = _tokens(method, shape, unit)
    # a run its plan stopped measured nothing to compare with
    dense = _dense_layer_seconds(cfg_json, tokens, batch_rows=ROWS if unit != "evaluation" else 4) \
        if m.get("status") == "completed" else None
    line = {"method": method, "shape": shape, "model": name, "layers": layers, "depth": depth, "unit": unit,
            "note": note, "tokens": tokens, "status": m.get("status"),
            # the run's own one line (a plan's refusal) before the exit it caused
            "error": (m.get("error") or {}).get("message") or error, "wall_s": round(wall, 2),
            "work_s": None if work_s is None else round(float(work_s), 2),
            "per_layer_s": None if not work_s else round(float(work_s) / count, 3),
            "dense_layer_s": None if dense is None else round(dense, 4),
            # at the dtype the plan says the run used (a base given as a path: its checkpoint's)
            "model_bytes": P.model_bytes(cfg_json, (m.get("plan") or {}).get("dtype")
                                         or ("float32" if unit == "evaluation" else "bfloat16")),
            "predicted_host_bytes": plan.get("host_bytes"), "predicted_parts": plan.get("host_parts"),
            # the run's own peak RSS after each stage (a peak so far: which stage set the child's peak)
            "stage_peaks_mib": m.get("memory"),
            "full_depth_cpu": _full_depth_plan(args, work / "full_cpu", "cpu"),
            "full_depth_cuda": _full_depth_plan(args, work / "full_cuda", "cuda"),
            "full_depth_cuda_defaults": _full_depth_plan(_defaults(method, shape), work / "full_defaults", "cuda")}
    line["layer_ratio"] = round(line["per_layer_s"] / dense, 2) if line["per_layer_s"] and dense else None
    out.write_text(json.dumps(line))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "SHAPE"))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only", default=None, help="comma-separated methods")
    ap.add_argument("--shapes", default="8b,70b")
    ap.add_argument("--skip", default="", help="comma-separated method:shape pairs to leave out")
    ap.add_argument("--plan-only", action="store_true",
                    help="no run: record the planner's full-depth GPU peak at each method's defaults, and with "
                         "offload where the method streams layers (status planned)")
    a = ap.parse_args()
    if a.child:
        child(*a.child, a.out)
        return 0
    methods = a.only.split(",") if a.only else [*METHODS, "search_kl"]
    skip = set(filter(None, a.skip.split(",")))
    if a.plan_only:
        work = Path(tempfile.mkdtemp(prefix="scale-plan-"))
        for shape in a.shapes.split(","):
            for method in methods:
                name, layers, depth = SHAPES[shape]
                line = {"method": method, "shape": shape, "model": name, "depth": depth, "status": "planned",
                        "full_depth_cuda_defaults": _full_depth_plan(_defaults(method, shape),
                                                                     work / f"{method}-{shape}", "cuda")}
                if _offloads(method):
                    line["full_depth_offload_defaults"] = _full_depth_plan(
                        _defaults(method, shape), work / f"{method}-{shape}-offload", "offload",
                        tuple(OFFLOAD_ARGS.get(method, OFFLOAD)))
                record(line, __file__, threads=1)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for shape in a.shapes.split(","):
        for method in methods:
            if f"{method}:{shape}" in skip:
                continue
            with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
                out = Path(f.name)
            c = run_child([sys.executable, __file__, "--child", method, shape, "--out", str(out)], ROOT, env)
            try:
                line = json.loads(out.read_text())
            except (OSError, ValueError):
                line = {"method": method, "shape": shape, "status": "child failed",
                        "error": (c.stderr.strip().splitlines() or [""])[-1][:300]}
            out.unlink(missing_ok=True)
            measured = int(c.peak_rss_gib * 1024**3)
            line.update({"measured_host_bytes": measured, "child_wall_s": round(c.wall_s, 1),
                         "child_returncode": c.returncode})
            done = line.get("status") == "completed"  # a run stopped by its plan measured only its start
            if line.get("model_bytes") and done:
                line["host_over_model"] = round(measured / line["model_bytes"], 2)
            pred = line.get("predicted_host_bytes")
            line["host_error"] = round(measured / pred - 1, 3) if pred and done else None
            fd = line.get("full_depth_cpu") or {}
            if line.get("per_layer_s"):
                line["full_depth_seconds"] = round(line["per_layer_s"] * line["depth"] *
                                                   (1 if line["unit"] == "prune" else 1), 1)
            line["full_depth_host_bytes"] = fd.get("host_bytes")
            line["full_depth_device_bytes"] = (line.get("full_depth_cuda") or {}).get("device_bytes")
            record(line, __file__, threads=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
