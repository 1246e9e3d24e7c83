"""Whole-process benchmark of the prune command: one JSON line.

    .venv/bin/python tests/bench/process_bench.py [--repeats 3] [--threads 1]

Runs the foundation issue's acceptance command (SmolLM2, taylor param_first, ratio 0.25, layers [3, 27),
10 x 64 calibration tokens; eval=none logger=none) as a child process: start, imports, load, prune, save,
analysis, exit. Reports the wall time and peak RSS of that child (os.wait4), the split recorded in its
metrics.json, and the floor it is compared with: one plain forward+backward over the same calibration tokens
(all parameters requiring grad, as a training step would), timed in another child after a warm-up.
Target (layout issue): wall <= floor + 5 s, peak RSS <= 1.6 GiB. Medians over --repeats. The line also gives what
was pruned (``outcome``: parameter counts, each layer's kept widths, a digest of the saved weights; the same in every
repeat, so a speed change can be checked to leave the result as it was) and the ratio to LLM-Pruner's own script as
the scale issue measured it (``peer_reference``; target <= 0.9), with the machine's load average at the end.

``--default`` times ``make run``'s command instead: ``python run.py`` with every default (``pruner=obs`` at ratio
0.25 of all parameters with its token rule, ``eval=quick``, the offline W&B logger, the checkpoint saved), torch's
own thread count unless ``--threads`` is given. It reports the wall time and peak RSS of that child, the split
from its metrics.json, the calibration it drew (tokens and the rule that derived them), the pruning time over one
plain no-grad forward of the dense model over the same tokens (``floor_forward_s``, in another child), the CPU
seconds the run used and the 1-minute load average when it started (the machine may be shared), and the target
of the scale issue: wall <= 180 s after setup.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

from _common import record, run_child  # tests/bench/_common.py, next to this script

ROOT = Path(__file__).resolve().parents[2]
ACCEPTANCE = ["pruner=taylor", "ratio=0.25", "layers.attention.start=3", "layers.attention.end=27",
              "layers.mlp.start=3", "layers.mlp.end=27", "data.num_samples=10", "data.seq_len=64",
              "pruner.taylor=param_first", "eval=none", "logger=none"]

FLOOR = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from core.data.text import TextSpec, calibration_batch, load_documents
from core.models.load import load_model
from recipes._common import resolve_model
model, tok = load_model(resolve_model("smollm2"), cache_dir=sys.argv[3])
batch = calibration_batch(tok, load_documents(TextSpec("austen"), cache_dir=sys.argv[3]), 10, 64, 0)
with torch.no_grad():
    model(input_ids=batch[:1, :8])  # warm-up
t0 = time.perf_counter()
model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
print(json.dumps({"fwd_bwd_s": time.perf_counter() - t0}))
"""


PEER_WALL_S = 13.3  # LLM-Pruner's llama3.py on this config, as the scale issue measured it (see peer_reference)


def outcome(m: dict) -> dict:
    """What one run pruned, from its metrics.json: parameter counts and each layer's kept widths."""
    return {"params": [m["params"]["base"], m["params"]["pruned"]], "nonzero": m["params"]["nonzero"],
            "widths": [[l["heads"][1], l["kv_heads"][1], l["intermediate_size"][1]] for l in m["pruning"]["layers"]]}


def weights_digest(model_dir: Path) -> str:
    """sha256 of the saved weights (first 16 hex digits): the same channels chosen, the same bytes."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def _child(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall s, peak RSS GiB, stdout) of one child process."""
    c = run_child(cmd, ROOT, env)
    if c.returncode != 0:
        raise SystemExit(f"child failed ({c.returncode}): {' '.join(cmd)}")
    return c.wall_s, c.peak_rss_gib, c.stdout


FORWARD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
if int(sys.argv[2]):
    torch.set_num_threads(int(sys.argv[2]))
from core.data.text import TextSpec, calibration_and_eval_sources, calibration_batch
from core.models.load import load_model
from recipes._common import resolve_model
model, tok = load_model(resolve_model("smollm2"), cache_dir=sys.argv[3])
src, _ = calibration_and_eval_sources(TextSpec("mix"), TextSpec("boolq"), sys.argv[3])
batch = calibration_batch(tok, src, int(sys.argv[4]), int(sys.argv[5]), 42)
with torch.no_grad():
    model(input_ids=batch[:1, :8])  # warm-up
    t0 = time.perf_counter()
    for j in range(0, batch.shape[0], 8):
        model(input_ids=batch[j:j + 8], use_cache=False)
print(json.dumps({"forward_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}))
"""


def default_run(args: argparse.Namespace) -> None:
    """``--default``: ``make run``'s command, once per repeat, each followed by the forward floor."""
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    threads = [f"runtime.threads={args.threads}"] if args.threads else []
    walls, peaks, splits, forwards, runs, cpus, loads = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            run_dir = Path(tmp) / f"run{i}"
            loads.append(round(os.getloadavg()[0], 2))  # the machine is shared: how busy it was when this started
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, peak, _ = _child([sys.executable, "run.py", *threads, f"paths.cache_dir={cache}",
                                    f"hydra.run.dir={run_dir}"], env)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            m = json.loads((run_dir / "metrics.json").read_text())
            assert m["status"] == "completed", m.get("error")
            t = m["timings"]
            known = {"startup": t["startup_s"], "validate_and_imports": t["validate_s"], "load": t["load_s"],
                     "eval": t["eval_s"], "prune": t["prune_s"], "save_and_analysis": t["save_and_analysis_s"]}
            known["other"] = wall - sum(known.values())
            cal = m["data"]["calibration"]
            _, _, out = _child([sys.executable, "-c", FORWARD, str(ROOT), str(args.threads or 0), cache,
                                str(cal["num_samples"]), str(cal["seq_len"])], env)
            forwards.append(json.loads(out.strip().splitlines()[-1])["forward_s"])
            walls.append(wall)
            peaks.append(peak)
            splits.append(known)
            runs.append(m)
    m = runs[-1]
    wall, peak, forward = statistics.median(walls), statistics.median(peaks), statistics.median(forwards)
    split = {k: round(statistics.median(s[k] for s in splits), 3) for k in splits[0]}
    record({
        "bench": "process", "mode": "default", "model": "SmolLM2-135M-Instruct",
        "threads": m["runtime"]["threads"], "repeats": args.repeats, "command": "python run.py" + "".join(
            f" {o}" for o in threads), "pruner": m["method"], "ratio": m["config"]["ratio"],
        "calibration": {k: m["data"]["calibration"].get(k) for k in ("num_samples", "seq_len", "tokens", "rule")},
        "wall_s": round(wall, 3), "peak_rss_gib": round(peak, 3), "split_s": split,
        "floor_forward_s": round(forward, 3), "prune_over_forward": round(split["prune"] / forward, 3),
        "ppl": {side: (m["eval"].get(side) or {}).get("ppl", {}).get("value") for side in ("base", "pruned")},
        "targets": {"wall_s_max": 180.0, "met": wall <= 180.0},
        "walls_s": [round(w, 2) for w in walls], "floors_s": [round(f, 2) for f in forwards],
        "cpu_s": [round(c, 1) for c in cpus], "load_average_1min_at_start": loads,
    }, __file__)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1; --default: torch's own)")
    ap.add_argument("--default", action="store_true", help="time `make run` (python run.py, every default)")
    args = ap.parse_args()
    if args.default:
        return default_run(args)
    if args.threads is None:
        args.threads = 1
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    walls, peaks, floors, splits, outcomes = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            run_dir = Path(tmp) / f"run{i}"
            wall, peak, _ = _child([py, "run.py", *ACCEPTANCE, f"runtime.threads={args.threads}",
                                    f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}"], env)
            m = json.loads((run_dir / "metrics.json").read_text())
            assert m["status"] == "completed", m.get("error")
            outcomes.append({**outcome(m), "weights_sha256": weights_digest(run_dir / "model")})
            t = m["timings"]
            known = {"startup": t["startup_s"], "validate_and_imports": t["validate_s"], "load": t["load_s"],
                     "prune": t["prune_s"], "save_and_analysis": t["save_and_analysis_s"]}
            known["other"] = wall - sum(known.values())
            walls.append(wall)
            peaks.append(peak)
            splits.append(known)
            _, _, out = _child([py, "-c", FLOOR, str(ROOT), str(args.threads), cache], env)
            floors.append(json.loads(out.strip().splitlines()[-1])["fwd_bwd_s"])
    wall, floor = statistics.median(walls), statistics.median(floors)
    split = {k: round(statistics.median(s[k] for s in splits), 3) for k in splits[0]}
    record({
        "bench": "process", "model": "SmolLM2-135M-Instruct", "threads": args.threads, "repeats": args.repeats,
        "command": "python run.py " + " ".join(ACCEPTANCE),
        "wall_s": round(wall, 3), "peak_rss_gib": round(statistics.median(peaks), 3),
        "fwd_bwd_floor_s": round(floor, 3), "wall_minus_floor_s": round(wall - floor, 3),
        "wall_over_floor": round(wall / floor, 3), "split_s": split,
        "targets": {"wall_minus_floor_s_max": 5.0, "peak_rss_gib_max": 1.6,
                    "met": wall - floor <= 5.0 and statistics.median(peaks) <= 1.6},
        "walls_s": [round(w, 2) for w in walls], "floors_s": [round(f, 2) for f in floors],
        # What was pruned, identical in every repeat (a speed change must leave it as it was).
        "outcome": outcomes[0], "outcome_same_each_repeat": all(o == outcomes[0] for o in outcomes),
        # LLM-Pruner's own llama3.py is not run here: it loads its calibration text from the Hub (bookcorpus) and
        # needs the transformers 4.x attention attributes its pruner edits; this venv has transformers 5 and no
        # network. Its time is the scale issue's paired measurement (quiet machine, 1 thread), not this machine's.
        "peer_reference": {"source": "scale issue: LLM-Pruner's llama3.py, same model and config, paired runs on "
                                     "a quiet machine, 1 thread (not measured by this bench)",
                           "wall_s_quiet": PEER_WALL_S, "target_ratio_max": 0.9,
                           "wall_over_peer": round(wall / PEER_WALL_S, 3),
                           "met": wall / PEER_WALL_S <= 0.9,
                           "note": "this bench's wall is from this machine as it was (load in host_load); the "
                                   "peer's from a quiet one"},
        "host_load": [round(x, 2) for x in os.getloadavg()],
    }, __file__)


if __name__ == "__main__":
    main()
