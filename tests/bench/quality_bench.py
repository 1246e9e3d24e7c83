"""Quality benchmark of the compensated pruner (issue 13) on SmolLM2-135M-Instruct: one JSON line per row.

    .venv/bin/python tests/bench/quality_bench.py                     # the issue's table at the benchmark budget
    .venv/bin/python tests/bench/quality_bench.py --rows obs:comp:uniform,wanda:nocomp:uniform
    .venv/bin/python tests/bench/quality_bench.py --ratio 0.25 --rows obs:comp:uniform --zeroshot-limit 200 \
        --matched-reference                                          # a true 25% cut; also --ratio 0.40
    .venv/bin/python tests/bench/quality_bench.py --rows obs:comp:uniform --override pruner.target=layer
    .venv/bin/python tests/bench/quality_bench.py --rows obs:comp:uniform --tokens 32768   # a point of the token curve

Joint rows (``--rows joint:2``): ``pruner=joint`` (``conf/pruner/joint.yaml``) removing that many whole layers first,
then KV groups and MLP channels to the same ``--ratio`` of all parameters; ``--joint-override`` adds Hydra overrides to
these rows only (e.g. ``pruner.width.attention_ratio=0.67``, ``layers.mlp.start=1``)::

    .venv/bin/python tests/bench/quality_bench.py --ratio 0.5 --rows joint:2 --joint-override layers.mlp.start=1 ...

Other methods at the same share of ALL parameters (``--rows method:shortgpt,method:slicegpt,method:flap`` and
``depth:<greedy|block|search>:comp|nocomp``): each pruner from its own option file, at its defaults (prunelab's
default layer ranges), calibrated on the obs rows' text and token count, with the budget put into its own unit
(``method_overrides``): ShortGPT's ``params`` target (the fewest layers reaching it), ``pruner=depth`` with
``num_layers`` = the layers whose parameters reach it (rounded up), FLAP's ``pruning_ratio`` = the share over the
attention + MLP parameters of its ranges, SliceGPT's sparsity = the widest multiple-of-8 hidden size whose
parameters (shortcuts and the untied LM head included) fit. Each line records ``budget_unit`` and ``budget_met``::

    .venv/bin/python tests/bench/quality_bench.py --ratio 0.4 --no-reference --rows method:shortgpt,depth:search:comp

Rows: ``pruner=obs`` (built from its real option file, ``conf/pruner/obs.yaml``) with ``selection`` obs / wanda /
flap / magnitude x ``compensate`` (``nocomp`` / ``comp``) x ``allocation`` (``uniform``, and ``search`` when
``pruning.obs.pruner.ALLOCATIONS`` offers it), MLP channels only (``attention_ratio=0``), layers [3, 27),
``ratio_target=params``. The benchmark budget ``--ratio 0.1184`` keeps <= 118,589,760 of 134,515,008 parameters:
what LLM-Pruner's ``--pruning_ratio 0.25`` keeps on this model. The reference row, in the same run, is that
LLM-Pruner: Taylor ``param_first``, ratio 0.25 of the KV groups / MLP channels of layers [3, 27), 10 x 64 tokens
(``--matched-reference``: the same LLM-Pruner removing ``--ratio`` of all parameters, for the 25% / 40% rows).

Calibration: the default ``mix`` text, with Austen's last 10% of paragraphs held out
(``core.data.text.calibration_and_eval_sources(TextSpec("mix"), TextSpec("austen"))``); the reference draws its
10 x 64 tokens from the same source. The obs rows draw ``--tokens``: ``auto`` (default) is the pruner's own rule
on this model, as ``make run`` draws (each row records it: ``calibration_rule``), a count is used as given; the
curve of tokens against quality and time is this script at several counts (docs/methods/compensated.md). Evaluation: perplexity (4096 tokens, seq_len 128) on the held-out Austen
paragraphs ("in domain") and on BoolQ's Wikipedia passages ("out of domain"), each as a ratio to the dense
model's and as damage relative to the reference: ``(ppl_ratio - 1) / (ref_ppl_ratio - 1)`` (< 1: less damage
than LLM-Pruner). ``--zeroshot-limit N`` adds the 7-task zero-shot average (``eval=zeroshot``'s tasks through
``analysis.evaluate.evaluate_model``, as ``task=evaluate`` runs them; first N examples of each task).

Each row runs in its own child process: ``peak_rss_gib`` is the child's peak RSS (``os.wait4``: load, calibration,
pruning, evaluation), ``peak_rss_gib_after_prune`` its peak up to the end of pruning. Times: ``prune_s`` and its
ratios to the reference row's pruning time (``time_over_reference``) and to one plain no-grad forward pass of the
dense model over the row's own calibration tokens (``time_over_forward``; micro-batches of 8), measured once per
run in the ``dense`` child, which also gives the dense perplexities (and zero-shot average). The first line is the
dense model, the second the reference, then one line per row as it ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from _common import record, run_child, zeroshot_average  # noqa: E402  (tests/bench/_common.py, next to this script)
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BENCHMARK_RATIO = 0.1184  # of 134,515,008: <= 118,589,760 kept, LLM-Pruner's size at --pruning_ratio 0.25
LAYERS = (3, 27)
SELECTIONS = ("obs", "wanda", "flap", "magnitude")
# method:<name> rows: the other pruners at their option files' defaults (prunelab's default layer ranges), the
# budget translated into each one's own unit (method_overrides); depth:<selection>:comp|nocomp rows: pruner=depth
METHODS = ("shortgpt", "slicegpt", "flap")
DEPTH_SELECTIONS = ("greedy", "block", "search")
REF_SAMPLES, REF_SEQ_LEN = 10, 64
PPL_TOKENS, PPL_SEQ_LEN = 4096, 128
TEXTS = ("austen_holdout", "boolq")
SOURCES = ("pruning/obs/pruner.py", "pruning/obs/fit.py", "pruning/obs/allocate.py", "pruning/obs/search.py",
           "pruning/compensate.py", "pruning/stats.py", "conf/pruner/obs.yaml")  # in domain (same register as a calibration component), out of domain


def allocations() -> tuple[str, ...]:
    """``uniform``, plus ``search`` once pruning/obs/pruner.py offers it."""
    from pruning.obs.pruner import ALLOCATIONS

    return ("uniform", "search") if "search" in ALLOCATIONS else ("uniform",)


def parse_rows(spec: Optional[str]) -> list[tuple[str, bool, str]]:
    """``obs:comp:uniform,wanda:nocomp:search`` -> [(selection, compensate, allocation)]; None: the whole table.
    ``joint:<layers>`` -> ("joint", True, layers); ``method:<name>`` -> ("method", False, name);
    ``depth:<selection>:comp|nocomp`` -> ("depth", compensate, selection)."""
    allowed = allocations()
    if not spec:
        return [(s, c, a) for s in SELECTIONS for c in (False, True) for a in allowed]
    rows = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) == 2 and parts[0] == "joint" and parts[1].isdigit():
            rows.append(("joint", True, parts[1]))  # pruner=joint removing that many whole layers first
            continue
        if len(parts) == 2 and parts[0] == "method" and parts[1] in METHODS:
            rows.append(("method", False, parts[1]))  # another pruner at its own defaults, budget in its unit
            continue
        if len(parts) == 3 and parts[0] == "depth" and parts[1] in DEPTH_SELECTIONS and parts[2] in ("comp", "nocomp"):
            rows.append(("depth", parts[2] == "comp", parts[1]))
            continue
        if len(parts) != 3 or parts[0] not in SELECTIONS or parts[1] not in ("comp", "nocomp") or parts[2] not in allowed:
            raise SystemExit(f"--rows: {item!r} is not selection:comp|nocomp:allocation with selection in "
                             f"{', '.join(SELECTIONS)} and allocation in {', '.join(allowed)}, joint:<layers>, "
                             f"method:<{'|'.join(METHODS)}> or depth:<{'|'.join(DEPTH_SELECTIONS)}>:comp|nocomp")
        rows.append((parts[0], parts[1] == "comp", parts[2]))
    return rows


def row_name(selection: str, compensate: bool, allocation: str) -> str:
    if selection == "joint":
        return f"joint:{allocation}"
    if selection == "method":
        return f"method:{allocation}"
    if selection == "depth":
        return f"depth:{allocation}:{'comp' if compensate else 'nocomp'}"
    return f"{selection}:{'comp' if compensate else 'nocomp'}:{allocation}"


# --------------------------------------------------------------------------- inside a child process


def _setup(threads: int) -> tuple[Any, Any, dict[str, Any], Any, str]:
    """Model, tokenizer, evaluation tokens per text, the calibration source and the cache dir."""
    import torch

    torch.set_num_threads(threads)
    from core.data.text import TextSpec, calibration_and_eval_sources, eval_tokens, load_documents
    from core.models.load import load_model
    from recipes._launch import set_mmap_threshold
    from recipes._common import resolve_model

    set_mmap_threshold(1.0)
    cache = os.environ.get("PRUNELAB_CACHE", str(ROOT / ".cache"))
    model, tok = load_model(resolve_model("smollm2"), cache_dir=cache)
    calib_src, austen_eval = calibration_and_eval_sources(TextSpec("mix"), TextSpec("austen"), cache)
    texts = {"austen_holdout": eval_tokens(tok, austen_eval, PPL_TOKENS),
             "boolq": eval_tokens(tok, load_documents(TextSpec("boolq"), cache), PPL_TOKENS)}
    return model, tok, texts, calib_src, cache


def _ppls(model: Any, texts: dict[str, Any]) -> dict[str, float]:
    from analysis.perplexity import perplexity

    return {name: perplexity(model, t, PPL_SEQ_LEN, 4, progress=False)["value"] for name, t in texts.items()}


def _zeroshot(model: Any, tok: Any, limit: int, cache: str) -> Any:
    return zeroshot_average(model, tok, limit, cache, ROOT)


def _forward_s(model: Any, batch: Any, micro: int = 8) -> float:
    """One plain no-grad forward of ``model`` over ``batch`` in micro-batches, after a warm-up."""
    import torch

    with torch.no_grad():
        model(input_ids=batch[:1, :8])
        t0 = time.perf_counter()
        for j in range(0, batch.shape[0], micro):
            model(input_ids=batch[j:j + micro], use_cache=False)
    return time.perf_counter() - t0


def source_digest() -> str:
    """The first 12 hex digits of sha256 over the pruner's sources: rows of one run that differ here ran different
    code (the files were edited during the run)."""
    import hashlib

    h = hashlib.sha256()
    for name in SOURCES:
        path = ROOT / name
        h.update(path.read_bytes() if path.is_file() else b"")
    return h.hexdigest()[:12]


def _build_pruner(overrides: list[str]) -> Any:
    """The pruner ``run.py`` would build from these Hydra overrides (its real option file, the schema's checks)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import run  # noqa: F401  (registers the schema and resolvers)
    from recipes._common import build

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "paths.output_dir=/tmp"])
    GlobalHydra.instance().clear()
    return build(cfg.pruner, "pruner")


def _ranges() -> list[str]:
    return [f"layers.attention.start={LAYERS[0]}", f"layers.attention.end={LAYERS[1]}",
            f"layers.mlp.start={LAYERS[0]}", f"layers.mlp.end={LAYERS[1]}"]


def _obs_pruner(selection: str, compensate: bool, allocation: str, ratio: float, tokens: Any,
                extra: tuple[str, ...] = ()) -> Any:
    """``pruner=obs`` from its real option file with this row's overrides (as ``run.py`` would build it), then
    ``extra`` (``--override``)."""
    return _build_pruner(["pruner=obs", f"ratio={ratio}", "ratio_target=params", *_ranges(),
                          "pruner.ratio_target=params", "pruner.attention_ratio=0", f"pruner.selection={selection}",
                          f"pruner.compensate={str(compensate).lower()}", f"pruner.allocation={allocation}",
                          f"pruner.tokens={tokens}", "pruner.progress=false", *extra])


def _joint_pruner(num_layers: int, ratio: float, tokens: Any, extra: tuple[str, ...] = ()) -> Any:
    """``pruner=joint`` from its real option file (conf/pruner/joint.yaml) with ``num_layers`` whole layers, this
    run's ratio and tokens, the benchmark's layer ranges, then ``extra`` (``--joint-override``)."""
    return _build_pruner(["pruner=joint", f"ratio={ratio}", f"pruner.num_layers={num_layers}", *_ranges(),
                          f"+pruner.width.tokens={tokens}", "+pruner.width.progress=false", *extra])


def sliced_params(model: Any, width: int) -> int:
    """Parameters of ``model`` after SliceGPT at hidden ``width`` (pruning/slicegpt.py, ``slice_head=false``): every
    weight dimension that reads or writes the residual stream becomes ``width``, each layer gains two
    ``width x width`` shortcuts; the last layer's output (its ``down_proj`` and MLP shortcut) and the LM head keep the
    full hidden size (the head an untied copy when the embedding was tied). Norm weights are counted whole (an upper
    bound by at most them: tests/test_bench_budgets.py; each row checks ``budget_met`` on the real model)."""
    d, inner = model.config.hidden_size, model.model
    total = inner.embed_tokens.weight.shape[0] * width + model.lm_head.weight.numel() + inner.norm.weight.numel()
    last = len(inner.layers) - 1
    for i, layer in enumerate(inner.layers):
        for name, p in layer.named_parameters():
            if p.dim() != 2 or d not in p.shape or (i == last and name.endswith("down_proj.weight")):
                total += p.numel()
            else:
                total += p.numel() // d * width
        total += width * width + width * (d if i == last else width)
    return total


def method_overrides(name: str, ratio: float, model: Any) -> tuple[list[str], dict[str, Any]]:
    """The Hydra overrides that make ``pruner=<name>`` (or ``depth:...``) remove at least ``ratio`` of ALL the
    model's parameters in its own unit, and how the unit's amount was derived (recorded)."""
    from core.models.llama import count_params

    total = count_params(model)
    want = ratio * total  # parameters to remove
    if name == "shortgpt":  # its own params unit: the fewest least influential layers reaching the share
        return ["pruner=shortgpt", f"ratio={ratio}", "ratio_target=params"], {"unit": "params (ShortGPT's own)"}
    if name == "depth":
        per_layer = count_params(model.model.layers[0])
        n = math.ceil(want / per_layer)
        return [f"pruner.num_layers={n}"], {"unit": "whole layers", "num_layers": n, "layer_params": per_layer}
    if name == "flap":
        ranges = _build_pruner(["pruner=flap", "ratio=0.5"]).ranges(len(model.model.layers))
        (a0, a1), (m0, m1) = ranges["attention"], ranges["mlp"]
        layers = model.model.layers
        prunable = sum(count_params(layers[l].self_attn) for l in range(a0, a1)) + \
            sum(count_params(layers[l].mlp) for l in range(m0, m1))
        # its bias compensation adds a hidden-size bias to each o_proj / down_proj in range: removed on top
        biases = model.config.hidden_size * ((a1 - a0) + (m1 - m0))
        if want + biases >= prunable:
            raise SystemExit(f"method:flap cannot remove {ratio} of all parameters: its layer ranges hold "
                             f"{prunable:,} prunable parameters")
        f = (want + biases) / prunable
        return ["pruner=flap", f"ratio={f:.6f}", "ratio_target=prunable_params"], \
            {"unit": "prunable_params (FLAP's pruning_ratio)", "ratio_of_prunable": round(f, 6), "prunable": prunable,
             "bias_params": biases}
    if name == "slicegpt":
        d, step = model.config.hidden_size, 8
        width = next((w for w in range(d - d % step, 0, -step) if sliced_params(model, w) <= total - want), None)
        if width is None:
            raise SystemExit(f"method:slicegpt cannot remove {ratio} of all parameters")
        sparsity = max(0.0, 1 - (width + 0.5) / d)  # int((1 - s) * d) == width, a multiple of the round interval
        return ["pruner=slicegpt", f"ratio={sparsity:.6f}"], \
            {"unit": "slicing (SliceGPT's sparsity)", "sliced_width": width, "sparsity": round(sparsity, 6)}
    raise SystemExit(f"no method {name!r}")


def child_dense(args: argparse.Namespace) -> dict[str, Any]:
    """The dense model's perplexities (and zero-shot), and the forward times the rows are compared with."""
    from core.data.text import calibration_batch
    from core.models.llama import count_params

    model, tok, texts, calib_src, cache = _setup(args.threads)
    obs = _obs_pruner("obs", True, "uniform", args.ratio, args.tokens, tuple(args.override))
    samples, seq_len = obs.calibration_plan(model.config.to_dict()).shape
    batch = calibration_batch(tok, calib_src, samples, seq_len, 0)
    ref_batch = calibration_batch(tok, calib_src, REF_SAMPLES, REF_SEQ_LEN, 0)
    return {"row": "dense", "params": count_params(model), "ppl": _ppls(model, texts), "tokens_option": args.tokens,
            "zeroshot": _zeroshot(model, tok, args.zeroshot_limit, cache),
            "forward_s": {"obs_calibration": round(_forward_s(model, batch), 3),
                          "reference_calibration": round(_forward_s(model, ref_batch), 3)},
            "calibration": {"source": calib_src.name, "obs": [samples, seq_len], "reference": [REF_SAMPLES, REF_SEQ_LEN]},
            "eval_tokens": {k: int(v.shape[1]) for k, v in texts.items()}}


def child_row(args: argparse.Namespace) -> dict[str, Any]:
    """One row: build the pruner (the reference or pruner=obs), calibrate, prune (timed), evaluate."""
    from core.data.text import calibration_batch
    from core.models.llama import count_params

    model, tok, texts, calib_src, cache = _setup(args.threads)
    params_before = count_params(model)
    if args.child == "reference":
        from pruning.llm_pruner import LLMPruner

        ratio, target = (args.ratio, "params") if args.matched_reference else (0.25, "groups")
        pruner = LLMPruner(ratio=ratio, ratio_target=target, importance="taylor", taylor="param_first",
                           attention_layers=LAYERS, mlp_layers=LAYERS, progress=False)
        samples, seq_len = REF_SAMPLES, REF_SEQ_LEN
        row: dict[str, Any] = {"row": "reference", "method": "llm_pruner taylor param_first", "ratio": ratio,
                               "ratio_target": target}
    elif args.child.startswith("joint:"):
        k = int(args.child.split(":")[1])
        pruner = _joint_pruner(k, args.ratio, args.tokens, tuple(args.joint_override))
        plan = pruner.calibration_plan(model.config.to_dict())
        samples, seq_len = plan.shape
        row = {"row": args.child, "method": "joint", "num_layers": k, "ratio": args.ratio, "ratio_target": "params",
               "overrides": list(args.joint_override), "source_sha256": source_digest(),
               "tokens_option": args.tokens, "calibration_rule": plan.rule,
               "depth_options": dict(pruner.depth), "width_options": dict(pruner.width)}
    elif args.child.startswith(("method:", "depth:")):
        selection, compensate, allocation = parse_rows(args.child)[0]
        obs = _obs_pruner("obs", True, "uniform", args.ratio, args.tokens, tuple(args.override))
        samples, seq_len = obs.calibration_plan(model.config.to_dict()).shape  # the obs rows' calibration
        if selection == "depth":
            extra, derived = method_overrides("depth", args.ratio, model)
            overrides = ["pruner=depth", f"pruner.selection={allocation}",
                         f"pruner.compensate={'linear' if compensate else 'none'}", *extra]
        else:
            overrides, derived = method_overrides(allocation, args.ratio, model)
        pruner = _build_pruner([*overrides, "pruner.progress=false"] if allocation == "slicegpt" else overrides)
        row = {"row": args.child, "method": allocation if selection == "method" else "depth",
               "ratio": args.ratio, "ratio_target": "params", "pruner_overrides": overrides, "budget_unit": derived,
               "tokens_option": args.tokens, "calibration_rule": "the obs rows' calibration (same text and count)"}
    else:
        selection, compensate, allocation = parse_rows(args.child)[0]
        digest = source_digest()
        pruner = _obs_pruner(selection, compensate, allocation, args.ratio, args.tokens, tuple(args.override))
        plan = pruner.calibration_plan(model.config.to_dict())
        samples, seq_len = plan.shape
        row = {"row": args.child, "method": "obs", "selection": selection, "compensate": compensate,
               "allocation": allocation, "ratio": args.ratio, "ratio_target": "params",
               "overrides": list(args.override), "source_sha256": digest, "tokens_option": args.tokens,
               "calibration_rule": plan.rule}
    batch = calibration_batch(tok, calib_src, samples, seq_len, 0)
    t0 = time.perf_counter()
    res = pruner(model, batch)
    prune_s = time.perf_counter() - t0
    peak_prune = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB -> GiB
    del batch
    row.update({"calibration_tokens": samples * seq_len, "calibration": [samples, seq_len],
                "params_before": params_before, "params_after": count_params(model),
                "prune_s": round(prune_s, 2), "peak_rss_gib_after_prune": round(peak_prune, 3),
                "timings": {k: round(v, 2) for k, v in res.timings.items()}})
    if args.child.startswith("joint:"):
        d = res.details
        w = d["width"]
        row.update({"removed_layers": d["removed_layers"], "width_ratio": round(d["width_ratio"], 6),
                    "params_removed_by": d["params_removed"],
                    "channels_removed": sum(w.get("channels_removed", {}).values()),
                    "channels_per_layer": {int(k): v for k, v in w.get("channels_removed", {}).items()},
                    "kv_groups_removed": w.get("kv_groups_removed", w.get("groups_removed")),
                    "depth_search": {k: (d["depth"] or {}).get("search", {}).get(k)
                                     for k in ("starts", "best_fitness", "evaluations", "search_s", "rerank")}})
    elif args.child.startswith(("method:", "depth:")):
        d = res.details
        row.update({k: d[k] for k in ("removed_layers", "kv_groups_removed", "channels_removed", "sliced_width",
                                      "shortcut_params", "untied_embeddings", "removed_prunable_params") if k in d})
    elif args.child != "reference":
        d = res.details
        row.update({"updates_kept": d.get("updates_kept"), "updates_rejected": d.get("updates_rejected"),
                    "channels_removed": sum(d.get("channels_removed", {}).values()),
                    "channels_per_layer": {int(k): v for k, v in d.get("channels_removed", {}).items()},
                    "options": {k: getattr(pruner, k) for k in ("target", "damp", "guard", "holdout", "rounds", "bias")
                                if hasattr(pruner, k)}})
    row["ppl"] = _ppls(model, texts)
    row["zeroshot"] = _zeroshot(model, tok, args.zeroshot_limit, cache)
    return row


# --------------------------------------------------------------------------- the parent


def _spawn(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one child (``dense``, ``reference`` or a row); its JSON result with the child's wall time and peak
    RSS (os.wait4) added, or ``status: failed`` with the last line of its stderr."""
    cmd = [sys.executable, __file__, "--child", name, "--ratio", str(args.ratio), "--tokens", str(args.tokens),
           "--zeroshot-limit", str(args.zeroshot_limit), "--threads", str(args.threads),
           *(f"--override={o}" for o in args.override), *(f"--joint-override={o}" for o in args.joint_override),
           *(["--matched-reference"] if args.matched_reference else [])]
    c = run_child(cmd, ROOT)
    lines = [ln for ln in c.stdout.splitlines() if ln.startswith("{")]
    if c.returncode or not lines:
        tail = (c.stderr.strip().splitlines() or ["no output"])[-1]
        return {"row": name, "status": "failed", "error": f"exit {c.returncode}: {tail}"}
    result = json.loads(lines[-1])
    result.update({"wall_s": round(c.wall_s, 1), "peak_rss_gib": round(c.peak_rss_gib, 3)})
    return result


def _round_ppl(ppl: dict[str, Optional[float]]) -> dict[str, Optional[float]]:
    return {k: (round(v, 3) if v is not None else None) for k, v in ppl.items()}


def finish_row(row: dict[str, Any], dense: dict[str, Any], ref: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Add the ratios to the dense model and the reference row."""
    if row.get("status") == "failed":
        return row
    ppl = row["ppl"]
    forward = dense["forward_s"]["reference_calibration" if row["row"] == "reference" else "obs_calibration"]
    row["time_over_forward"] = round(row["prune_s"] / forward, 3)
    row["forward_s"] = round(forward, 2)
    ppl_ratio = {k: (v / dense["ppl_raw"][k] if v is not None else None) for k, v in ppl.items()}
    row["ppl_ratio"] = {k: (round(v, 4) if v is not None else None) for k, v in ppl_ratio.items()}
    same_budget = ref is not None and ((ref.get("ratio"), ref.get("ratio_target")) == (row.get("ratio"), "params")
                                       or (row.get("ratio") == BENCHMARK_RATIO and ref.get("ratio_target") == "groups"))
    if ref is not None and ref.get("status") != "failed":
        row["time_over_reference"] = round(row["prune_s"] / ref["prune_s"], 3)
    if same_budget and ref.get("status") != "failed":  # damage only against LLM-Pruner at this row's budget
        ref_ratio = {k: ref["ppl_raw"][k] / dense["ppl_raw"][k] for k in TEXTS}
        row["damage_vs_reference"] = {k: (round((ppl_ratio[k] - 1) / (ref_ratio[k] - 1), 4)
                                          if ppl_ratio[k] is not None and ref_ratio[k] != 1 else None) for k in TEXTS}
        if row.get("zeroshot") and ref.get("zeroshot") and dense.get("zeroshot"):
            row["zeroshot_average_minus_reference"] = round(row["zeroshot"]["average"] - ref["zeroshot"]["average"], 4)
    if row.get("zeroshot") and dense.get("zeroshot"):
        row["zeroshot_average_minus_dense"] = round(row["zeroshot"]["average"] - dense["zeroshot"]["average"], 4)
    if row["ratio_target"] == "params":
        row["params_target"] = math.floor((1 - row["ratio"]) * row["params_before"])
        row["budget_met"] = row["params_after"] <= row["params_target"]
    if ref is not None and ref.get("status") != "failed":
        row["params_vs_reference"] = row["params_after"] - ref["params_after"]  # <= 0: no larger than LLM-Pruner's
    row["ppl_raw"] = row["ppl"]
    row["ppl"] = _round_ppl(row["ppl"])
    return row


def reused(args: argparse.Namespace, context: dict[str, Any]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The dense and reference lines of an earlier run's output (``--reuse``), checked against this run's settings;
    marked ``reused_from``. Their perplexities were rounded to 3 decimals: the ratios move in the 5th digit. The
    dense line does not depend on ``--ratio``; a reference measured at another budget is None (measured again)."""
    lines = [json.loads(ln) for ln in Path(args.reuse).read_text().splitlines() if ln.startswith("{")]
    found = {ln.get("row"): ln for ln in lines if ln.get("row") in ("dense", "reference")}
    if set(found) != {"dense", "reference"}:
        raise SystemExit(f"--reuse {args.reuse}: no dense and reference lines in it")
    dense, ref = found["dense"], found["reference"]
    want_ref = (args.ratio, "params") if args.matched_reference else (0.25, "groups")
    problems = []
    # the dense line depends on the threads and the calibration count (checked below), not on what the rows remove
    same = context["budget"].get("ratio_target")
    if (dense.get("budget") or {}).get("ratio_target") != same or dense.get("threads") != args.threads:
        problems.append(f"budget/threads {dense.get('budget')}, {dense.get('threads')}")
    if args.tokens == "auto" or "tokens_option" in dense:  # the rule's count: the same option, the same model
        if dense.get("tokens_option") != args.tokens:
            problems.append(f"--tokens {dense.get('tokens_option')} (calibration {dense['calibration']['obs']})")
    elif dense["calibration"]["obs"][0] * dense["calibration"]["obs"][1] < args.tokens or \
            (dense["calibration"]["obs"][0] - 1) * dense["calibration"]["obs"][1] >= args.tokens:
        problems.append(f"calibration {dense['calibration']['obs']} is not --tokens {args.tokens}")
    if (dense.get("zeroshot") or {}).get("limit", 0) != args.zeroshot_limit:
        problems.append("--zeroshot-limit")
    if problems:
        raise SystemExit(f"--reuse {args.reuse}: measured with other settings ({'; '.join(problems)})")
    if (ref.get("ratio"), ref.get("ratio_target")) != want_ref:
        ref = None
    for row in (dense, ref):
        if row is not None:
            row["reused_from"] = str(args.reuse)
            row["ppl_raw"] = row["ppl"]
    return dense, ref


def _tokens_arg(value: str) -> Any:
    """``--tokens``: ``auto`` or a positive integer."""
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not auto or a positive integer")
    return n


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "ppl_raw"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", help="selection:comp|nocomp:allocation,... (default: the whole table)")
    ap.add_argument("--ratio", type=float, default=BENCHMARK_RATIO, help="share of ALL parameters removed")
    ap.add_argument("--tokens", type=_tokens_arg, default="auto",
                    help="pruner.tokens of the obs rows: auto (the pruner's rule, as `make run`) or a count")
    ap.add_argument("--zeroshot-limit", type=int, default=0, help="examples per zero-shot task; 0 = skip")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--override", action="append", default=[],
                    help="an extra Hydra override of every obs row, e.g. pruner.target=layer (repeatable)")
    ap.add_argument("--no-reference", action="store_true",
                    help="measure no LLM-Pruner row (at 40%% and 50%% it cannot reach the budget; rows get no damage)")
    ap.add_argument("--joint-override", action="append", default=[],
                    help="an extra Hydra override of every joint:<layers> row, e.g. pruner.width.attention_ratio=0.67")
    ap.add_argument("--matched-reference", action="store_true",
                    help="the reference removes --ratio of all parameters too (ratio_target=params) instead of "
                         "LLM-Pruner's fixed 0.25 of the groups (the benchmark budget)")
    ap.add_argument("--reuse", metavar="OUTPUT",
                    help="take the dense and reference lines from an earlier run's output (same --ratio, --tokens, "
                         "--zeroshot-limit, --threads and reference) instead of measuring them again: for running "
                         "rows one at a time")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.zeroshot_limit < 0:
        raise SystemExit("--zeroshot-limit must be >= 0")
    if 0 < args.zeroshot_limit < 200 and not args.child:
        print(f"note: --zeroshot-limit {args.zeroshot_limit}: the issue's zero-shot averages use >= 200 examples per "
              "task (fewer: a standard error above ~3 points per task)", file=sys.stderr)
    if args.child:
        print(json.dumps(child_dense(args) if args.child == "dense" else child_row(args)))
        return
    rows = parse_rows(args.rows)
    joint_only = all(r[0] == "joint" for r in rows)
    probe = (_joint_pruner(int(rows[0][2]), args.ratio, args.tokens, tuple(args.joint_override)) if joint_only else
             _obs_pruner("obs", True, "uniform", args.ratio, args.tokens, tuple(args.override)))  # the rows' ranges
    attention = probe.width["attention_ratio"] if joint_only else probe.attention_ratio
    units = (("whole layers, " if joint_only else "") + "MLP channels"
             + (f" and KV groups ({attention:g} per layer)" if attention else ""))
    layers: Any = (list(probe.mlp_layers) if probe.attention_layers == probe.mlp_layers or not attention
                   else {"attention": list(probe.attention_layers), "mlp": list(probe.mlp_layers)})
    if all(r[0] in ("method", "depth") for r in rows):  # each method in its own unit and layer ranges
        units, layers = "each method's own unit (the line's budget_unit), at its option file's layer ranges", None
    context = {"bench": "quality", "model": "SmolLM2-135M-Instruct", "threads": args.threads,
               "budget": {"ratio": args.ratio, "ratio_target": "params", "layers": layers, "units": units},
               "ppl_protocol": {"seq_len": PPL_SEQ_LEN, "tokens": PPL_TOKENS,
                                "texts": {"austen_holdout": "in domain: Austen, last 10% of paragraphs",
                                          "boolq": "out of domain: BoolQ validation passages"}}}
    ref = None
    if args.reuse:
        dense, ref = reused(args, context)
    else:
        dense = _spawn("dense", args)
        if dense.get("status") == "failed":
            raise SystemExit(f"dense model failed: {dense['error']}")
        dense["ppl_raw"] = dense["ppl"]
        dense["ppl"] = _round_ppl(dense["ppl"])
    if ref is None and not args.no_reference:
        ref = finish_row(_spawn("reference", args), dense, None)
        if ref.get("status") != "failed":
            ref["damage_vs_reference"] = {k: 1.0 for k in TEXTS}
            ref["time_over_reference"] = 1.0
    for line in ({**context, **_public(dense)}, *([{**context, **_public(ref)}] if ref is not None else [])):
        if "reused_from" in line:  # measured by an earlier run, whose line is already in the results file
            print(json.dumps(line), flush=True)
        else:
            record(line, __file__)
    for selection, compensate, allocation in rows:
        row = finish_row(_spawn(row_name(selection, compensate, allocation), args), dense, ref)
        record({**context, **_public(row)}, __file__)


if __name__ == "__main__":
    main()
