"""Depth pruning benchmark (issue 27, "depth alone"): SmolLM2-135M-Instruct with a quarter of its 30 layers removed,
ShortGPT against ``pruner=depth`` (pruning/depth.py, ReplaceMe's fitted linear map) with and without the map, at the
same layer count. One JSON line per row in ``tests/bench/results/depth.jsonl``.

    .venv/bin/python tests/bench/depth_bench.py                                  # dense, shortgpt, depth none/linear
    .venv/bin/python tests/bench/depth_bench.py --rows depth:linear:greedy --reuse <an earlier output>
    .venv/bin/python tests/bench/depth_bench.py --rows depth:linear:block --override pruner.damp=0.01

Rows: ``shortgpt`` (``conf/pruner/shortgpt.yaml``, ``pruner.num_layers=N``) and ``depth:<compensate>:<selection>``
(``conf/pruner/depth.yaml`` with those options), all with ``layers=all`` and ``N = --num-layers`` (8 = ceil(25% of
30)), each built from its real option file as ``run.py`` builds it. Calibration: ``--samples`` x ``--seq-len``
tokens (default 128 x 128) drawn from quality_bench's source, the default ``mix`` text with Austen's last 10% of
paragraphs held out, the same batch for every row. Evaluation: quality_bench's protocol and texts (perplexity over
4096 tokens, seq_len 128, on the held-out Austen paragraphs and BoolQ's passages), as a ratio to the dense model's,
and as damage relative to ShortGPT's in the same run: ``(ppl_ratio - 1) / (shortgpt_ppl_ratio - 1)`` (the issue's
goal: at most 0.1 with the map). Each row runs in its own child process (``peak_rss_gib``, ``wall_s``);
``prune_s`` is the pruner's own time. The first line is the dense model, the second ShortGPT, then the depth rows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import record, run_child  # noqa: E402  (tests/bench/_common.py, next to this script)
import quality_bench as qb  # noqa: E402  (its model, texts, calibration source and perplexity protocol)

ROWS = ("shortgpt", "depth:none:block", "depth:linear:block")
SELECTIONS, COMPENSATIONS = ("block", "greedy", "search"), ("none", "linear")


def parse_rows(spec: Optional[str]) -> list[str]:
    if not spec:
        return list(ROWS)
    rows = [r.strip() for r in spec.split(",")]
    for r in rows:
        parts = r.split(":")
        if r != "shortgpt" and not (len(parts) == 3 and parts[0] == "depth" and parts[1] in COMPENSATIONS
                                    and parts[2] in SELECTIONS):
            raise SystemExit(f"--rows: {r!r} is not shortgpt or depth:none|linear:block|greedy|search")
    return rows


def _pruner(row: str, num_layers: int, extra: tuple[str, ...]) -> Any:
    """ShortGPT or pruner=depth from its real option file, as run.py builds it (quality_bench's builder)."""
    if row == "shortgpt":
        overrides = ["pruner=shortgpt"]
    else:
        _, compensate, selection = row.split(":")
        overrides = ["pruner=depth", f"pruner.compensate={compensate}", f"pruner.selection={selection}", *extra]
    return qb._build_pruner([*overrides, "layers=all", f"pruner.num_layers={num_layers}"])


def child(args: argparse.Namespace) -> dict[str, Any]:
    from core.data.text import calibration_batch
    from core.models.llama import count_params

    model, tok, texts, calib_src, _cache = qb._setup(args.threads)
    params_before = count_params(model)
    if args.child == "dense":
        return {"row": "dense", "params": params_before, "ppl": qb._ppls(model, texts),
                "eval_tokens": {k: int(v.shape[1]) for k, v in texts.items()}}
    pruner = _pruner(args.child, args.num_layers, tuple(args.override))
    batch = calibration_batch(tok, calib_src, args.samples, args.seq_len, 0)
    t0 = time.perf_counter()
    res = pruner(model, batch)
    prune_s = time.perf_counter() - t0
    d = res.details
    row: dict[str, Any] = {"row": args.child, "method": pruner.name, "params_before": params_before,
                           "params_after": count_params(model), "prune_s": round(prune_s, 2),
                           "removed_layers": d["removed_layers"],
                           "timings": {k: round(v, 2) for k, v in res.timings.items()}}
    if pruner.name == "depth":
        row.update({"selection": pruner.selection, "compensate": pruner.compensate,
                    "damp": pruner.damp if pruner.compensate == "linear" else None,
                    "overrides": list(args.override),
                    "cuts": [{k: v for k, v in c.items() if k in ("layers", "distance", "merged_into", "fit")}
                             for c in d["cuts"]]})
        if "search" in d:  # selection=search: the starts' and the best set's KL, and what the search cost
            row["search"] = {k: d["search"][k] for k in ("fitness_tokens", "fit_tokens", "starts", "best_start",
                                                         "best_start_fitness", "best_fitness", "gain", "evaluations",
                                                         "full_fidelity_evaluations", "search_s",
                                                         "seconds_per_full_evaluation")}
            if "rerank" in d["search"]:  # the finalists' KL plain and with their maps, and the chosen one's rank
                row["search"]["rerank"] = d["search"]["rerank"]
    row["ppl"] = qb._ppls(model, texts)
    return row


def _spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--num-layers", str(args.num_layers), "--samples",
           str(args.samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads),
           *(f"--override={o}" for o in args.override)]
    c = run_child(cmd, ROOT)
    lines = [ln for ln in c.stdout.splitlines() if ln.startswith("{")]
    if c.returncode or not lines:
        tail = (c.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": name, "status": "failed", "error": f"exit {c.returncode}: {tail}"}
    out = json.loads(lines[-1])
    out.update({"wall_s": round(c.wall_s, 1), "peak_rss_gib": round(c.peak_rss_gib, 3)})
    return out


def finish(row: dict[str, Any], dense: dict[str, Any], ref: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the dense model's perplexities and damage relative to ShortGPT's (``ref``)."""
    if row.get("status") == "failed":
        return row
    ratio = {k: row["ppl"][k] / dense["ppl"][k] for k in qb.TEXTS}
    row["ppl_ratio"] = {k: round(v, 4) for k, v in ratio.items()}
    if ref is not None and ref.get("status") != "failed":
        ref_ratio = {k: ref["ppl"][k] / dense["ppl"][k] for k in qb.TEXTS}
        row["damage_vs_shortgpt"] = {k: round((ratio[k] - 1) / (ref_ratio[k] - 1), 4) if ref_ratio[k] != 1 else None
                                     for k in qb.TEXTS}
    row["params_removed"] = round(1 - row["params_after"] / row["params_before"], 4)
    row["ppl"] = {k: round(v, 3) for k, v in row["ppl"].items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", help="shortgpt,depth:none|linear:block|greedy|search,... (default: " + ",".join(ROWS) + ")")
    ap.add_argument("--num-layers", type=int, default=8, help="layers removed by every row (8 = ceil(25%% of 30))")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--override", action="append", default=[], help="an extra override of the depth rows")
    ap.add_argument("--reuse", metavar="OUTPUT", help="the dense and shortgpt lines of an earlier run's output (same "
                                                        "--num-layers, --samples, --seq-len) instead of measuring them")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = parse_rows(args.rows)
    context = {"bench": "depth", "model": "SmolLM2-135M-Instruct", "threads": args.threads,
               "num_layers": args.num_layers, "layers_of": 30, "calibration": [args.samples, args.seq_len],
               "calibration_source": "mix (Austen's last 10% held out), as quality_bench",
               "ppl_protocol": {"seq_len": qb.PPL_SEQ_LEN, "tokens": qb.PPL_TOKENS, "texts": list(qb.TEXTS)}}
    dense = ref = None
    if args.reuse:
        found = {}
        for ln in Path(args.reuse).read_text().splitlines():
            if ln.startswith("{"):
                line = json.loads(ln)
                if line.get("row") in ("dense", "shortgpt"):
                    found[line["row"]] = line
        if "dense" not in found or any(found["dense"].get(k) != context[k] for k in ("num_layers", "calibration")):
            raise SystemExit(f"--reuse {args.reuse}: no dense line measured with these settings")
        dense, ref = found["dense"], found.get("shortgpt")
        for line in (dense, ref):
            if line is not None:
                print(json.dumps({**line, "reused_from": args.reuse}), flush=True)
        rows = [r for r in rows if r != "shortgpt" or ref is None]
    else:
        dense = _spawn("dense", args)
        if dense.get("status") == "failed":
            raise SystemExit(f"dense model failed: {dense['error']}")
        record({**context, **dense}, __file__)
    if ref is None:
        ref = finish(_spawn("shortgpt", args), dense, None)
        record({**context, **ref}, __file__)
        rows = [r for r in rows if r != "shortgpt"]
    for name in rows:
        record({**context, **finish(_spawn(name, args), dense, ref)}, __file__)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
