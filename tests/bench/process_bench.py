"""Whole-process benchmark of the prune command: one JSON line.

    .venv/bin/python tests/bench/process_bench.py [--repeats 3] [--threads 1] [--no-peer | --peer-source GIT_DIR]

Runs the foundation issue's acceptance command (SmolLM2, taylor param_first, ratio 0.25, layers [3, 27),
10 x 64 calibration tokens; eval=none logger=none) as a child process: start, imports, load, prune, save,
analysis, exit. Reports the wall time and peak RSS of that child (os.wait4), the split recorded in its
metrics.json, and the floor it is compared with: one plain forward+backward over the same calibration tokens
(all parameters requiring grad, as a training step would), timed in another child after a warm-up.
Target (layout issue): wall <= floor + 5 s, peak RSS <= 1.6 GiB. Medians over --repeats. The line also gives what
was pruned (``outcome``: parameter counts, each layer's kept widths, a digest of the saved weights; the same in every
repeat, so a speed change can be checked to leave the result as it was) and the machine's load average at the end.

LLM-Pruner's own script on the same configuration is measured in the same run (``--peer``, on by default when its
environment exists or can be built; ``--no-peer`` skips it): ``tests/peers/llm_pruner_original.py`` runs the
original ``llama3.py`` (its ``main``, model load, torch_pruning fork and ``torch.save``; the patches are listed there
and recorded) in its own environment (``tests/peers/llm_pruner_env.sh``: ``.venv-peers/llm_pruner``, built from
``--peer-source``, a git directory of github.com/horseee/LLM-Pruner), on the same 10 x 64 calibration ids as ours
(drawn once, before the timed runs, by the same functions recipes/prune.py calls). Each repeat is a pair: ours and
the peer's whole process (python start to exit, OMP_NUM_THREADS and torch threads = ``--threads``), the order
alternating from pair to pair. ``peer_reference`` holds the peer's median wall, each wall, peak RSS, versions, the
original's commit and the patches; ``wall_over_peer`` = our median wall / the peer's median wall, and
``wall_over_peer_pairs`` the ratio within each pair (``wall_over_peer_pairs_median`` their median). Target (scale
issue): ``wall_over_peer`` <= 0.9. ``issue_reference`` keeps the scale issue's transcribed 13.3 s (not measured here).

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


ISSUE_PEER_WALL_S = 13.3  # LLM-Pruner's llama3.py on this config, as the scale issue states it (transcribed)
PEER_TARGET = 0.9  # scale issue: our whole process at most 0.9x LLM-Pruner's wall time
PEER_VENV = ROOT / ".venv-peers" / "llm_pruner"
PEER_SCRIPT = ROOT / "tests" / "peers" / "llm_pruner_original.py"

# The calibration ids the acceptance command draws (the functions recipes/prune.py calls, on its composed config),
# saved for the peer: argv ROOT, cache dir, output .pt, the hydra overrides; prints the HF dir of the model.
CALIB = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
import run
from core.data.text import calibration_and_eval_sources, calibration_batch
from core.models.load import cached_gguf_dir
from recipes._common import model_ref, text_spec
from transformers import AutoTokenizer
cfg, = run.compose_and_validate(sys.argv[4:])
cache = sys.argv[2]
src, _ = calibration_and_eval_sources(text_spec(cfg.data), text_spec(cfg.eval.ppl), cache, calibration=True,
                                      evaluation=bool(cfg.eval.ppl.enabled))
hf_dir = cached_gguf_dir(model_ref(cfg.model), cache)
tok = AutoTokenizer.from_pretrained(str(hf_dir))
torch.save(calibration_batch(tok, src, int(cfg.data.num_samples), int(cfg.data.seq_len), int(cfg.data.seed)),
           sys.argv[3])
print(hf_dir)
"""


def peer_python(source: Path | None, required: bool) -> tuple[str, str] | None:
    """(python of LLM-Pruner's environment, the original's commit); built from ``source`` when given (the env script
    does nothing when it holds that commit already), else the existing one; None when there is none and it is not
    ``required``."""
    import subprocess

    if source is not None:
        out = subprocess.run(["bash", str(ROOT / "tests" / "peers" / "llm_pruner_env.sh"), str(source)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            if required:
                raise SystemExit(f"llm_pruner_env.sh failed:\n{out.stderr[-2000:]}")
            print(f"no peer: llm_pruner_env.sh failed ({out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
            return None
        py = out.stdout.strip().splitlines()[-1]
    elif (PEER_VENV / "bin" / "python").is_file() and (PEER_VENV / "peer_commit").is_file():
        py = str(PEER_VENV / "bin" / "python")
    else:
        if required:
            raise SystemExit(f"--peer: no {PEER_VENV}; give --peer-source (a git directory of horseee/LLM-Pruner)")
        print(f"no peer: no {PEER_VENV} and no --peer-source (a git directory of horseee/LLM-Pruner)",
              file=sys.stderr)
        return None
    return py, (Path(py).parents[1] / "peer_commit").read_text().strip()


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
    ap.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                    help="pair each run with LLM-Pruner's llama3.py (default: when its environment exists or "
                         "--peer-source builds it)")
    ap.add_argument("--peer-source", type=Path, default=os.environ.get("LLM_PRUNER_SOURCE") or None,
                    help="git directory of horseee/LLM-Pruner: (re)builds .venv-peers/llm_pruner from its HEAD "
                         "(default: $LLM_PRUNER_SOURCE)")
    args = ap.parse_args()
    if args.default:
        return default_run(args)
    if args.threads is None:
        args.threads = 1
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    # the same threads for both sides: torch's (runtime.threads / the peer wrapper) and OpenMP's
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    py = sys.executable
    peer = None if args.peer is False else peer_python(args.peer_source, required=bool(args.peer))
    walls, peaks, floors, splits, outcomes, loads = [], [], [], [], [], []
    peer_walls, peer_peaks, peer_out, order = [], [], None, []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.pt"
        if peer is not None:  # drawn once, not timed: the ids our run draws, for the peer's get_examples
            _, _, out = _child([py, "-c", CALIB, str(ROOT), cache, str(calib), *ACCEPTANCE], env)
            hf_dir = Path(tmp) / "model_tf441"  # its config and tokenizer files as transformers 4.41 reads them
            _child([peer[0], str(PEER_SCRIPT), "--src", str(Path(peer[0]).parents[1] / "src"),
                    "--model", out.strip().splitlines()[-1], "--prepare", str(hf_dir)], env)

        def ours(i: int) -> None:
            run_dir = Path(tmp) / f"run{i}"
            loads.append(round(os.getloadavg()[0], 2))
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

        def theirs(i: int) -> None:
            nonlocal peer_out
            cwd = Path(tmp) / f"peer{i}"  # llama3.py writes prune_log/ (its log and pytorch_model.bin) here
            cwd.mkdir()
            loads.append(round(os.getloadavg()[0], 2))
            c = run_child([peer[0], str(PEER_SCRIPT), "--src", str(Path(peer[0]).parents[1] / "src"),
                           "--model", str(hf_dir), "--prepared", "--calib", str(calib),
                           "--threads", str(args.threads)], cwd, env)
            if c.returncode != 0:
                raise SystemExit(f"LLM-Pruner's llama3.py failed ({c.returncode}):\n{c.stderr[-3000:]}")
            peer_out = json.loads(c.stdout.strip().splitlines()[-1])
            assert peer_out["saved"], "llama3.py saved no model"
            peer_walls.append(c.wall_s)
            peer_peaks.append(c.peak_rss_gib)

        for i in range(args.repeats):
            sides = [("ours", ours), ("peer", theirs)] if peer is not None else [("ours", ours)]
            if i % 2:  # alternate which side goes first: neither always runs after the other
                sides.reverse()
            for name, side in sides:
                side(i)
            order.append([name for name, _ in sides])
            _, _, out = _child([py, "-c", FLOOR, str(ROOT), str(args.threads), cache], env)
            floors.append(json.loads(out.strip().splitlines()[-1])["fwd_bwd_s"])
    wall, floor = statistics.median(walls), statistics.median(floors)
    split = {k: round(statistics.median(s[k] for s in splits), 3) for k in splits[0]}
    line = {
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
    }
    if peer is not None:
        pw, pairs = statistics.median(peer_walls), [w / p for w, p in zip(walls, peer_walls)]
        line.update({
            "wall_over_peer": round(wall / pw, 3),
            "wall_over_peer_pairs": [round(r, 3) for r in pairs],
            "wall_over_peer_pairs_median": round(statistics.median(pairs), 3),
            "peak_rss_over_peer": round(statistics.median(peaks) / statistics.median(peer_peaks), 3),
            "peer_reference": {
                "source": "measured in this run: LLM-Pruner's llama3.py (tests/peers/llm_pruner_original.py) in "
                          "its own environment, the same model, configuration and calibration ids, paired with "
                          "ours, whole process, same threads",
                "wall_s": round(pw, 3), "walls_s": [round(w, 2) for w in peer_walls],
                "peak_rss_gib": round(statistics.median(peer_peaks), 3),
                "transformers": peer_out["transformers"], "torch": peer_out["torch"], "commit": peer[1],
                "params": peer_out["params"], "same_params_as_ours": peer_out["params"] == outcomes[0]["params"],
                "argv": ["HF_DIR" if a.startswith(tempfile.gettempdir()) else a for a in peer_out["argv"]],
                "patches": peer_out["patches"],
                "target_ratio_max": PEER_TARGET, "met": wall / pw <= PEER_TARGET},
            "pair_order": order,
        })
    line.update({
        "issue_reference": {"source": "transcribed from the scale issue (its paired measurement on a quiet machine, "
                                      "1 thread), not measured by this bench",
                            "wall_s": ISSUE_PEER_WALL_S, "wall_over_issue": round(wall / ISSUE_PEER_WALL_S, 3)},
        "load_average_1min_at_start": loads,  # before each timed child, in the order they ran
        "host_load": [round(x, 2) for x in os.getloadavg()],
    })
    record(line, __file__)


if __name__ == "__main__":
    main()
