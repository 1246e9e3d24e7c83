"""Run a list of prunelab runs in ONE process (one torch import, one CUDA context) and write one JSON line per run:
its status, wall time, the peak device memory it allocated (``torch.cuda.max_memory_allocated``, reset before each
run), its peak host memory (VmHWM, reset before each run through /proc/self/clear_refs) and what the planner
predicted for it (the ``plan`` section of its metrics.json, recorded before loading), with their ratio.

    python tests/gpu/measure.py STEPS_FILE RESULTS.jsonl [--dry-run] [--step-timeout 120]

STEPS_FILE: one run a line, ``<label> <override> <override> ...`` (``#`` comments, blank lines skipped); a
``{run:<label>}`` inside an override is replaced by that earlier run's directory (e.g. its saved model). With
``--dry-run`` (or PRUNELAB_GPU_DRYRUN=1) every run gets ``dry_run=true`` and ``plan.device_memory=80GB``: the plan
is composed, validated and printed, nothing is loaded, so the whole list can be checked on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


class StepTimeout(Exception):
    pass


def read_steps(path: Path, dry_run: bool) -> list[tuple[str, list[str]]]:
    """``[real:|dry:]<label> <override> ...`` lines: ``real:`` only on a GPU run, ``dry:`` only with --dry-run (a
    stand-in for a run that needs an earlier run's output, which a dry run does not write)."""
    steps = []
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        mode, _, rest = line.partition(":") if line.startswith(("real:", "dry:")) else ("", "", line)
        if (mode == "real" and dry_run) or (mode == "dry" and not dry_run):
            continue
        label, *args = shlex.split(rest)
        steps.append((label, args))
    return steps


def shape_dir(name: str, layers: int, cache_dir: Path, header_only: bool) -> Path:
    """``{shape:llamba_8b:2}``: the cached dir of a shape with real random layers, or (``header_only``, the dry
    run: it plans from config.json and the safetensors header) its header-only twin, which costs no disk."""
    from core.models.ref import ModelRef
    from core.models.shape import shape_path

    return Path(shape_path(ModelRef(name=f"{name}_shape", kind="shape", shape=name, num_layers=layers,
                                    dtype="bfloat16", header_only=header_only), cache_dir, header_ok=header_only))


def _reset_host_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _host_peak_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("steps", type=Path)
    ap.add_argument("results", type=Path)
    ap.add_argument("--dry-run", action="store_true", default=os.environ.get("PRUNELAB_GPU_DRYRUN") == "1")
    ap.add_argument("--step-timeout", type=int, default=int(os.environ.get("PRUNELAB_GPU_STEP_TIMEOUT", "150")))
    ap.add_argument("--only", default=None, help="run only labels containing this string")
    a = ap.parse_args()

    import torch

    from conftest import CACHE_DIR, compose  # the offline environment and composition the tests use
    from core.run import plan as P

    import run

    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    work = Path(os.environ.get("PRUNELAB_GPU_WORK") or tempfile.mkdtemp(prefix="prunelab-gpu-"))
    a.results.parent.mkdir(parents=True, exist_ok=True)
    dirs: dict[str, Path] = {}
    failures = 0

    def on_alarm(_sig, _frame):
        raise StepTimeout(f"step ran past {a.step_timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    for label, args in read_steps(a.steps, a.dry_run):
        if a.only and a.only not in label:
            continue
        run_dir = work / label
        dirs[label] = run_dir
        args = [re.sub(r"\{run:([\w.-]+)\}", lambda mt: str(dirs[mt.group(1)]), x) for x in args]
        shapes = {mt.group(0): shape_dir(mt.group(1), int(mt.group(2)), Path(CACHE_DIR), header_only=a.dry_run)
                  for x in args for mt in re.finditer(r"\{shape:(\w+):(\d+)\}", x)}
        for k, v in shapes.items():
            args = [x.replace(k, str(v)) for x in args]
        if a.dry_run:
            args = [*args, "dry_run=true", "plan.device_memory=80GB"]
        line: dict = {"label": label, "args": args, "dry_run": a.dry_run, "cuda": cuda,
                      "device_name": torch.cuda.get_device_name(0) if cuda else None}
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        _reset_host_peak()
        t0 = time.perf_counter()
        signal.alarm(a.step_timeout)
        try:
            cfg = compose(args, run_dir)
            run.run(cfg)
            line["error"] = None
        except BaseException as e:  # noqa: BLE001 - SystemExit from a failed run, OOM, timeout: one line each
            if isinstance(e, KeyboardInterrupt):
                raise
            line["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
            if not isinstance(e, (SystemExit, StepTimeout)):
                line["traceback_tail"] = traceback.format_exc().splitlines()[-3:]
        finally:
            signal.alarm(0)
        line["wall_s"] = round(time.perf_counter() - t0, 2)
        line["peak_host_bytes"] = _host_peak_bytes()
        line["peak_device_bytes"] = int(torch.cuda.max_memory_allocated()) if cuda else None
        metrics = run_dir / "metrics.json"
        m = json.loads(metrics.read_text()) if metrics.is_file() else {}
        line["status"] = m.get("status", "no record")
        if m.get("error") and not line["error"]:
            line["error"] = str(m["error"].get("message", ""))[:400]
        plan = m.get("plan") or {}
        peak = plan.get("peak") or {}
        line["predicted_device_bytes"] = peak.get("device_bytes")
        line["predicted_host_bytes"] = peak.get("host_bytes")
        line["plan_devices"] = plan.get("devices")
        # max_memory_allocated counts tensors only: compare with the prediction less the CUDA context
        pred = peak.get("device_bytes")
        if pred and plan.get("devices"):
            pred -= P.CUDA_CONTEXT_DEVICE_BYTES
        line["predicted_device_tensor_bytes"] = pred
        meas = line["peak_device_bytes"]
        line["device_measured_over_predicted"] = round(meas / pred, 3) if meas and pred else None
        ok = line["status"] in ("completed", "dry_run") and not line["error"]
        failures += not ok
        line["ok"] = ok
        with open(a.results, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        dev = f"{(meas or 0) / 2**30:.2f} GiB" if meas else "-"
        pr = f"{pred / 2**30:.2f} GiB" if pred else "-"
        print(f"[{'ok' if ok else 'FAIL'}] {label:<28} {line['wall_s']:7.1f} s  device peak {dev:>10} "
              f"(planned {pr:>10})  {line['status']}{'  ' + line['error'] if line['error'] else ''}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
