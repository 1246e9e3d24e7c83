"""Render the benchmark figures from their results files: ``docs/benchmarks.md`` and the README's brief table.

    python tests/bench/render.py            # write every generated file / block
    python tests/bench/render.py --check    # exit 1 with one line naming what is stale; write nothing
                                            # (exit 2, one line: a malformed results line, missing markers)

Each benchmark (``tests/bench/<bench>_bench.py``) appends its JSON lines to ``tests/bench/results/<bench>.jsonl``
(``_common.record``), each with ``bench``, ``date``, ``commit`` and ``machine``. Lines seeded from earlier sessions
also say where they were found (``source``), and are marked ``transcribed`` (a README table row written out as the
bench's fields) or ``abridged`` (a line quoted with only some of its keys). A table here shows, for each row and
settings, the latest line; every figure is a field of that line, printed as it is (floats of more than six
significant digits shortened to four). This script computes no figure of its own.

What it writes is a registry of blocks, one function each: a whole file (``@block("docs/benchmarks.md")``), or the
text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in a file someone else writes
(``@block("README.md", "results")``). Another generated block is one more function: ``ratio_table`` at the end
(``docs/options.md``, from the pruner classes) is one. ``--check`` and ``tests/test_benchmarks_rendered.py`` then
cover it too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
REQUIRED = {"bench": str, "date": str, "commit": str, "machine": dict}
MISSING = "—"


class RenderError(Exception):
    """Bad input: a malformed results line, or a file without its block's markers. One line, naming the place."""


# --------------------------------------------------------------------------- the registry of generated text


@dataclass(frozen=True)
class Block:
    path: str                    # relative to the repository root
    name: Optional[str]          # the markers' name; None: the block is the whole file
    render: Callable[[Path], str]  # results dir -> the block's text

    @property
    def markers(self) -> tuple[str, str]:
        return f"<!-- {self.name}:begin -->", f"<!-- {self.name}:end -->"


BLOCKS: list[Block] = []


def block(path: str, name: Optional[str] = None) -> Callable:
    """Register ``fn(results_dir) -> text`` (or ``fn()``) as the generated text of ``path`` (of its block
    ``name``)."""
    def register(fn: Callable) -> Callable:
        render = fn if fn.__code__.co_argcount else (lambda _results: fn())
        BLOCKS.append(Block(path, name, render))
        return fn

    return register


def apply(b: Block, text: Optional[str], results: Path) -> str:
    """``text`` (the file's current content; None: no such file) with ``b``'s generated text in place."""
    body = b.render(results).rstrip("\n") + "\n"
    if b.name is None:
        return body
    begin, end = b.markers
    if text is None:
        raise RenderError(f"{b.path}: no such file (its block {begin} ... {end} is generated)")
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise RenderError(f"{b.path}: needs one line {begin} and, after it, one line {end}; "
                          "the generated text goes between them")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def rendered(root: Path = ROOT, results: Path = RESULTS) -> dict[str, tuple[Optional[str], str]]:
    """path -> (current text or None, text with every block rendered)."""
    out: dict[str, tuple[Optional[str], str]] = {}
    for b in BLOCKS:
        path = root / b.path
        current = out[b.path][0] if b.path in out else (path.read_text(encoding="utf-8") if path.exists() else None)
        base = out[b.path][1] if b.path in out else current
        out[b.path] = (current, apply(b, base, results))
    return out


def stale(root: Path = ROOT, results: Path = RESULTS) -> list[str]:
    """The generated files whose committed text differs from what the results give."""
    return [p for p, (old, new) in rendered(root, results).items() if old != new]


def write(root: Path = ROOT, results: Path = RESULTS) -> list[str]:
    changed = []
    for p, (old, new) in rendered(root, results).items():
        if old != new:
            (root / p).parent.mkdir(parents=True, exist_ok=True)
            (root / p).write_text(new, encoding="utf-8")
            changed.append(p)
    return changed


# --------------------------------------------------------------------------- reading the results


def load(results: Path = RESULTS) -> dict[str, list[dict[str, Any]]]:
    """``<bench>.jsonl`` -> its lines, in file order; a malformed line is a RenderError naming file and line."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(results.glob("*.jsonl")):
        lines = []
        for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{_shown(path)}:{n}"
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as e:
                raise RenderError(f"{where}: not a JSON line ({e.msg})") from None
            if not isinstance(line, dict):
                raise RenderError(f"{where}: not a JSON object")
            for key, kind in REQUIRED.items():
                if not isinstance(line.get(key), kind) or not line[key]:
                    raise RenderError(f"{where}: no {key!r} ({kind.__name__}) in the line")
            try:
                datetime.fromisoformat(line["date"])
            except ValueError:
                raise RenderError(f"{where}: date {line['date']!r} is not ISO 8601") from None
            lines.append(line)
        out[path.stem] = lines
    return out


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def get(line: dict[str, Any], path: str) -> Any:
    """``get(line, "ppl_ratio.boolq")``: a nested field, None when absent."""
    value: Any = line
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def fmt(v: Any) -> str:
    """A field as a table cell: as written, floats of more than six significant digits shortened to four."""
    if v is None:
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        s = repr(v)
        digits = s.split("e")[0].replace("-", "").replace(".", "").lstrip("0")
        return s if len(digits) <= 6 else f"{v:.4g}"
    if isinstance(v, dict):
        return " · ".join(f"{k} {fmt(x)}" for k, x in v.items()) or MISSING
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v) or MISSING
    return str(v).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- the benchmarks


@dataclass(frozen=True)
class Row:
    group: str                   # a sub-table (e.g. the budget); "" for none
    row: str
    settings: str
    line: dict[str, Any]
    fields: dict[str, Any]       # the line, or the part of it this row reads (one method of several)


@dataclass(frozen=True)
class Bench:
    stem: str                    # results/<stem>.jsonl, tests/bench/<stem>_bench.py
    title: str
    what: str                    # what it measures
    reference: str               # what its ratios are ratios against
    columns: list[tuple[str, str]]  # (header, dotted field of Row.fields)
    rows: Callable[[dict[str, Any]], Iterable[Row]]
    # the README's brief table: each picks the newest line of one setting -> (setting, figure, line), or None
    headlines: tuple[Callable[[list[dict[str, Any]]], Optional[tuple[str, str, dict[str, Any]]]], ...] = ()


def _one(line: dict[str, Any], row: str, settings: str, group: str = "") -> list[Row]:
    return [] if line.get("status") == "failed" else [Row(group, row, settings, line, line)]


def _threads(line: dict[str, Any]) -> str:
    t = line.get("threads")
    return "" if t is None else f"{t} thread{'s' if t != 1 else ''}"


def _join(*parts: Optional[str]) -> str:
    return ", ".join(p for p in parts if p)


def latest(lines: list[dict[str, Any]], where: Callable[[dict[str, Any]], bool]) -> Optional[dict[str, Any]]:
    """The newest line (by date, then file order) that ``where`` accepts and that did not fail."""
    found = [(ln["date"], i, ln) for i, ln in enumerate(lines) if ln.get("status") != "failed" and where(ln)]
    return max(found, key=lambda t: (datetime.fromisoformat(t[0]), t[1]))[2] if found else None


def _prune_rows(line: dict[str, Any]) -> list[Row]:
    c = line.get("config") or {}
    label = c.get("importance", "taylor")
    if label == "taylor" and c.get("taylor"):
        label = f"taylor {c['taylor']}"
    extras = [f"global_ranking={str(c['global_ranking']).lower()}" if c.get("global_ranking") else None,
              f"group_reduction={c['group_reduction']}" if c.get("group_reduction", "sum") != "sum" else None,
              f"iterative_steps={c['iterative_steps']}" if c.get("iterative_steps", 1) != 1 else None,
              "mmap threshold off" if "mmap_threshold_mb" in c and c["mmap_threshold_mb"] is None else None]
    shape = f"{c['samples']} × {c['seq_len']}" if "samples" in c else ""
    group = ("Calibrated on the first 90% of Austen (`--holdout`): quality on two held-out texts"
             if c.get("calibration", "").endswith("first 90%") else "Calibrated on all of Austen: time and memory")
    return _one(line, _join(label, *extras), _join(shape, _threads(line)), group)


def _quality_rows(line: dict[str, Any]) -> list[Row]:
    ratio = get(line, "budget.ratio")
    if ratio is None:
        group = f"As stated where these lines were found: {line.get('note', 'settings not recorded')}"
    elif ratio == 0.1184:
        group = "Benchmark budget: ratio 0.1184 of all parameters (at most LLM-Pruner's 118,589,760 kept)"
    else:
        group = f"A true cut: ratio {ratio} of all parameters"
    tokens = line.get("calibration_tokens")
    settings = _join(f"{tokens:,} tokens" if tokens else None, *(line.get("overrides") or []), _budget_unit(line),
                     f"target={get(line, 'options.target')}" if get(line, "options.target") else None,
                     f"zero-shot limit {get(line, 'zeroshot.limit')}" if get(line, "zeroshot.limit") else None,
                     _threads(line))
    return _one(line, line.get("row", "?"), settings, group)


def _split(line: dict[str, Any], key_of: Callable[[dict[str, Any]], Iterable[tuple[str, dict[str, Any]]]],
           settings: str) -> list[Row]:
    if line.get("status") == "failed":
        return []
    return [Row("", name, settings, line, part) for name, part in key_of(line)]


def _peer_rows(line: dict[str, Any]) -> list[Row]:
    """One row per side of a peers line: the original, then each prunelab variant (``ours``, ``ours_*``)."""
    if line.get("status") == "failed":
        return []
    settings = _join(f"{get(line, 'calibration.samples')} × {get(line, 'calibration.seq_len')} "
                     f"{get(line, 'calibration.text')} tokens", f"PPL on {get(line, 'ppl_protocol.text')}",
                     _threads(line))
    sides = [("original", line.get("original") or {})]
    sides += [(k, v) for k, v in line.items() if k.startswith("ours") and isinstance(v, dict)]
    rows = []
    for name, part in sides:
        match = {k: part[k]["jaccard"] for k in ("heads", "channels") if isinstance(part.get(k), dict)} \
            or part.get("jaccard", part.get("same_mask"))
        rows.append(Row("", f"{line.get('method')}: {name}", settings, line,
                        {**part, "dense_ppl": part.get("dense_ppl", line.get("dense_ppl")), "match": match}))
    return rows


BENCHES: list[Bench] = [
    Bench("quality", "Compensated pruning quality (`quality_bench.py`)",
          "`pruner=obs` rows (selection × compensation × allocation; MLP channels of layers [3, 27) unless the "
          "settings say otherwise), `pruner=joint` rows (`joint:<layers>`), and the other methods at the same share "
          "of all parameters in their own unit (`method:<name>`, `depth:<selection>:comp|nocomp`) on "
          "SmolLM2-135M-Instruct: "
          "perplexity on Austen's held-out last 10% (in domain) and on BoolQ passages (out of domain), "
          "as × the dense model, with pruning time and peak RSS; with `--zeroshot-limit`, the 7-task zero-shot "
          "average.",
          "LLM-Pruner's Taylor `param_first` (the `reference` row, same run): `damage` is "
          "(× − 1) / (reference × − 1), below 1 is less damage; `× forward` is the prune time over one no-grad "
          "dense forward over the row's own calibration tokens.",
          [("Austen ×", "ppl_ratio.austen_holdout"), ("BoolQ ×", "ppl_ratio.boolq"),
           ("damage Austen", "damage_vs_reference.austen_holdout"), ("damage BoolQ", "damage_vs_reference.boolq"),
           ("params after", "params_after"), ("prune s", "prune_s"), ("× forward", "time_over_forward"),
           ("zero-shot avg", "zeroshot.average"), ("− dense", "zeroshot_average_minus_dense"),
           ("peak RSS GiB", "peak_rss_gib")],
          _quality_rows,
          (lambda lines: _quality_headline(lines, "obs default (`tokens=auto`), benchmark budget",
                                           "obs:comp:uniform", 0.1184, "auto"),
           lambda lines: _quality_headline(lines, "obs default (`tokens=auto`) at a true 25% cut",
                                           "obs:comp:uniform", 0.25, "auto"),
           lambda lines: _quality_headline(lines, "`experiment=obs_quality_131k`, benchmark budget",
                                           "obs:comp:uniform", 0.1184, 131072),
           lambda lines: _quality_headline(lines, "`experiment=obs_quality_196k pruner.allocation=search`, "
                                           "benchmark budget", "obs:comp:search", 0.1184, 196608),
           lambda lines: _quality_headline(lines, "obs default (`tokens=auto`) at a true 25% cut, with the 7-task "
                                           "zero-shot average", "obs:comp:uniform", 0.25, "auto", zeroshot=True))),
    Bench("prune", "LLM-Pruner criteria (`prune_bench.py`)",
          "Taylor pruning of SmolLM2-135M-Instruct at ratio 0.25, attention and MLP layers [3, 27): pruning time, "
          "peak RSS, parameters and BoolQ perplexity before/after; with `--holdout`, also perplexity on Austen's "
          "held-out last 10%.",
          "one plain forward+backward over the same calibration tokens, all parameters requiring grad "
          "(`fwd_bwd_reference_s`), measured in a forked child of the same process.",
          [("prune s", "prune_s"), ("fwd+bwd s", "fwd_bwd_reference_s"), ("÷ fwd+bwd", "prune_over_fwd_bwd"),
           ("peak RSS GiB", "peak_rss_gib"), ("params after", "params_after"), ("BoolQ PPL before", "ppl_before"),
           ("BoolQ PPL after", "ppl_after"), ("BoolQ ×", "ppl_ratio"),
           ("Austen holdout PPL before", "holdout_ppl_before"), ("Austen holdout PPL after", "holdout_ppl_after")],
          _prune_rows,
          (lambda lines: _headline(lines, "taylor `param_first`, 10 × 64, 1 thread",
                                  lambda ln: get(ln, "config.taylor") == "param_first" and ln.get("threads") == 1
                                  and get(ln, "config.calibration") == "austen" and get(ln, "config.samples") == 10
                                  and get(ln, "config.mmap_threshold_mb") and ln.get("prune_s") is not None,
                                  "prune {prune_s} s = {prune_over_fwd_bwd} × one fwd+bwd; "
                                  "peak RSS {peak_rss_gib} GiB"),)),
    Bench("process", "The prune command as a process (`process_bench.py`)",
          "the foundation issue's acceptance command (`python run.py pruner=taylor ratio=0.25 ...`, `eval=none "
          "logger=none`) as a child process, start to exit: wall time, peak RSS and the split recorded in its "
          "`metrics.json`.",
          "one plain forward+backward over the same calibration tokens in another child (`fwd_bwd_floor_s`); "
          "LLM-Pruner's own `llama3.py` on the same ids, run from its own environment in pairs with ours "
          "(`tests/peers/llm_pruner_*`; `÷ LLM-Pruner`: our median wall over its median, target ≤ 0.9); the "
          "targets (wall − floor, peak RSS) are the script's `targets`.",
          [("wall s", "wall_s"), ("LLM-Pruner s", "peer_reference.wall_s"), ("÷ LLM-Pruner", "wall_over_peer"),
           ("floor s", "fwd_bwd_floor_s"), ("wall − floor s", "wall_minus_floor_s"),
           ("wall ÷ floor", "wall_over_floor"), ("peak RSS GiB", "peak_rss_gib"), ("targets met", "targets.met"),
           ("split s", "split_s"), ("calibration tokens", "calibration.tokens"),
           ("prune ÷ forward", "prune_over_forward")],
          lambda ln: _one(ln, "`make run` (`python run.py`, every default)" if ln.get("mode") == "default"
                          else "acceptance command", _join(
              _threads(ln), f"{ln['repeats']} repeat{'s' if ln['repeats'] != 1 else ''}" if "repeats" in ln else None)),
          (lambda lines: _headline(lines, "acceptance command, 1 thread",
                                  lambda ln: ln.get("threads") == 1 and ln.get("mode") != "default",
                                  "wall {wall_s} s, {wall_minus_floor_s} s above one fwd+bwd; "
                                  "peak RSS {peak_rss_gib} GiB"),
           lambda lines: _headline(lines, "acceptance command against LLM-Pruner's llama3.py, same run, 1 thread",
                                  lambda ln: ln.get("mode") != "default" and "wall_over_peer" in ln,
                                  "{wall_over_peer} × its wall ({wall_s} s against {peer_reference.wall_s} s; "
                                  "target ≤ 0.9), peak RSS {peak_rss_over_peer} × its peak"),
           lambda lines: _headline(lines, "`make run`: every default (obs, `tokens=auto`, eval=quick)",
                                  lambda ln: ln.get("mode") == "default",
                                  "wall {wall_s} s ({threads} threads; target ≤ {targets.wall_s_max} s), pruning "
                                  "{split_s.prune} s on {calibration.tokens} tokens = {prune_over_forward} × one "
                                  "forward; peak RSS {peak_rss_gib} GiB"))),
    Bench("baselines", "Baselines (`baselines_bench.py`)",
          "every baseline (magnitude, Wanda, FLAP, ShortGPT, SliceGPT, Taylor) built from its own option file, "
          "all layers, each in a fresh process: pruning time, peak memory, parameters, non-zeros and BoolQ perplexity.",
          "one no-grad forward of the dense model over the same calibration tokens (`× forward`); the fp32 model "
          "bytes (`peak × model`: peak RSS while pruning above the RSS after imports). Targets: the line's `targets`.",
          [("× forward", "time_over_forward"), ("× forward without PCA", "time_over_forward_without_pca"),
           ("peak × model", "peak_over_model"), ("params after", "params_after"),
           ("non-zero kept %", "nonzero_kept_pct"), ("PPL after", "ppl_after")],
          lambda ln: _split(ln, lambda l: (l.get("methods") or {}).items(), _join(
              f"{get(ln, 'calibration.samples')} × {get(ln, 'calibration.seq_len')} "
              f"{get(ln, 'calibration.text')} tokens" if ln.get("calibration") else None, _threads(ln))),
          (lambda lines: _headline(lines, "wanda 50% (default), 1 thread",
                                  lambda ln: "wanda" in (ln.get("methods") or {}) and ln.get("threads") == 1,
                                  "{methods.wanda.time_over_forward} × one forward, "
                                  "peak {methods.wanda.peak_over_model} × the model, "
                                  "PPL {methods.wanda.ppl_after}"),)),
    Bench("peers", "Baselines against their original code (`peers_bench.py`)",
          "each baseline's original repository run from its own environment (`tests/peers/<method>_env.sh`; the "
          "patches each applies are listed in `tests/peers/<method>_original.py`) beside prunelab's pruner, on the "
          "same SmolLM2, the same calibration ids and the same held-out perplexity protocol: each side's "
          "perplexity, damage (× dense), and how much of what they removed is the same.",
          "the original's run in the same bench (`ours / original`: the ratio of the damages, 1.0 is the same; "
          "`same removal`: Jaccard of the removed layers / heads / channels, or the share of the original's zeros "
          "that are also ours). The dense perplexity is measured in both environments.",
          [("dense PPL", "dense_ppl"), ("PPL", "ppl"), ("damage (× dense)", "damage"),
           ("ours / original", "damage_ratio_vs_original"), ("same removal", "match"), ("prune s", "prune_s"),
           ("code", "repo")],
          lambda ln: _peer_rows(ln)),
    Bench("slicegpt_peer", "SliceGPT against Microsoft's code (`slicegpt_peer_bench.py`)",
          "github.com/microsoft/TransformerCompression's SliceGPT (`run_slicegpt.py`'s steps) run from its own "
          "environment (`tests/peers/slicegpt_env.sh`) and `pruner=slicegpt` on the same SmolLM2, the same "
          "calibration ids and the same held-out perplexity protocol (the original's saved model read back and "
          "scored by prunelab, and by its own process); `ours_before`: prunelab without the embedding's row-mean "
          "subtraction (`center_embeddings=false`), `ours_after`: the default.",
          "the original's run in the same bench (`damage / original's`: (PPL / dense) over the original's).",
          [("dense PPL", "ppl_dense"), ("PPL", "ppl"), ("damage / original's", "damage_ratio"),
           ("params", "params"), ("seconds", "seconds")],
          lambda ln: [] if ln.get("status") == "failed" else [
              Row("", f"{name}", _join(f"sparsity {ln.get('sparsity')}, round {ln.get('round_interval')}",
                                        f"{get(ln, 'calibration.samples')} × {get(ln, 'calibration.seq_len')} "
                                        f"{get(ln, 'calibration.text')} tokens",
                                        f"PPL on {get(ln, 'ppl_protocol.text')}", _threads(ln)), ln,
                  {**(ln.get(name) or {}), "ppl_dense": ln.get("ppl_dense"),
                   "damage_ratio": ln.get(f"damage_ratio_{name.removeprefix('ours_')}")
                   if name.startswith("ours") else None})
              for name in ("original", "ours_before", "ours_after") if isinstance(ln.get(name), dict)]),
    Bench("depth", "Depth pruning with a fitted linear map (`depth_bench.py`)",
          "whole decoder layers of SmolLM2-135M-Instruct removed (`pruner=depth`: a block by angular distance, or "
          "greedy one layer at a time; with `compensate=linear` a least-squares map merged into the preceding "
          "`down_proj`, no parameter added) beside ShortGPT at the same count, on quality_bench's calibration mix "
          "and held-out texts: perplexity × dense, the layers removed.",
          "ShortGPT at the same number of layers, same run (`damage vs ShortGPT`: (× − 1) / (ShortGPT's × − 1), "
          "below 1 is less damage).",
          [("× dense Austen", "ppl_ratio.austen_holdout"), ("× dense BoolQ", "ppl_ratio.boolq"),
           ("damage vs ShortGPT", "damage_vs_shortgpt"), ("layers removed", "removed_layers"),
           ("params after", "params_after"), ("prune s", "prune_s")],
          lambda ln: _one(ln, ln["row"] + "".join(f" {o}" for o in ln.get("overrides") or []), _join(
              f"{ln.get('num_layers')} of {ln.get('layers_of')} layers",
              f"{get(ln, 'calibration')[0]} × {get(ln, 'calibration')[1]} tokens" if ln.get("calibration") else None,
              _threads(ln))) if ln.get("row") != "dense" else []),
    Bench("recovery", "LoRA recovery (`recovery_bench.py`)",
          "SmolLM2 pruned by LLM-Pruner's Taylor, then the LoRA preset as `recovery=...` runs it: training speed, "
          "memory, held-out perplexity of the training text and BoolQ perplexity before and after.",
          "`damage closed` is (pruned − recovered) / (pruned − dense); training speed is against a plain "
          "forward+backward of the same pruned model over the same micro-batches (`fwd_bwd_tokens_per_s`).",
          [("damage closed held-out", "damage_closed.heldout"), ("damage closed BoolQ", "damage_closed.boolq"),
           ("held-out PPL dense", "dense.heldout"), ("pruned", "pruned.heldout"), ("recovered", "recovered.heldout"),
           ("train tok/s", "train_tokens_per_s"), ("÷ fwd+bwd", "train_over_fwd_bwd"), ("train s", "train_s"),
           ("peak RSS GiB (train)", "peak_rss_gib.train")],
          lambda ln: _one(ln, f"cut {ln.get('cut', '?')}", _join(ln.get("preset"), *(ln.get("overrides") or []),
                                                                 _threads(ln))),
          (lambda lines: _headline(lines, "`lora_cpu10` at the benchmark budget",
                                  lambda ln: ln.get("cut") == "benchmark" and ln.get("preset") == "lora_cpu10"
                                  and not ln.get("overrides"),
                                  "closes {damage_closed.heldout} of the held-out damage "
                                  "({damage_closed.boolq} on BoolQ); "
                                  "training {train_over_fwd_bwd} × a plain fwd+bwd"),)),
    Bench("export", "Export (`export_bench.py`)",
          "SmolLM2 pruned by Taylor (ratio 0.5) written as GGUF f32 / q8_0 (run in llama.cpp) and as a DeciLM "
          "directory (run in transformers): export time, size, logit error and greedy agreement on held-out "
          "tokens, and speed.",
          "one project (transformers) forward over the same tokens (`export ÷ forward`, `prompt speed`); the "
          "checkpoint's safetensors (`size`); the project's own greedy decoding (`decode speed`).",
          [("export ÷ forward", "export_over_forward"), ("size ÷ safetensors", "size_vs_safetensors"),
           ("logit error", "logit_error"), ("greedy agreement", "greedy_agreement"),
           ("prompt speed ÷ project", "llama_cpp_over_forward_speed"),
           ("decode speed ÷ project", "llama_cpp_over_project_decode_speed")],
          lambda ln: _split(ln, lambda l: [(k, v) for k, v in l.items() if k in ("gguf_f32", "gguf_q8_0", "decilm")],
                            _join(f"{ln['tokens']} tokens" if "tokens" in ln else None, _threads(ln))),
          (lambda lines: _headline(lines, "GGUF q8_0 in llama.cpp", lambda ln: "gguf_q8_0" in ln,
                                  "{gguf_q8_0.size_vs_safetensors} of the checkpoint's size, greedy agreement "
                                  "{gguf_q8_0.greedy_agreement}, decodes "
                                  "{gguf_q8_0.llama_cpp_over_project_decode_speed} × as fast as the project"),)),
    Bench("eval", "Evaluation (`eval_bench.py`)",
          "the perplexity loop's throughput, lm-eval's requests/s (ARC-e + PIQA), perplexity agreement with "
          "lm-eval's `loglikelihood_rolling`, and efficiency of the dense model against a copy with 25% of every "
          "MLP's channels removed.",
          "a bare forward over the same windows (`ppl_loop_overhead_pct`); lm-eval's rolling perplexity on the same "
          "tokens (`rel diff`); the dense model measured with the same protocol in the same process.",
          [("PPL loop overhead %", "ppl_loop_overhead_pct"), ("PPL tok/s", "ppl_tokens_per_s"),
           ("bare forward tok/s", "bare_forward_tokens_per_s"), ("rel diff to rolling", "ppl_vs_rolling_rel_diff"),
           ("lm-eval req/s", "lm_eval_requests_per_s"), ("prefill tok/s dense", "dense.prefill_tokens_per_s"),
           ("MLP −25%", "mlp_pruned_25pct.prefill_tokens_per_s"), ("decode ms dense", "dense.decode_latency_ms"),
           ("MLP −25%", "mlp_pruned_25pct.decode_latency_ms")],
          lambda ln: _one(ln, ln.get("model", "?"), _join(_threads(ln), f"lm-eval limit {ln['lm_eval_limit']}"
                                                          if "lm_eval_limit" in ln else None)),
          (lambda lines: _headline(lines, "SmolLM2", lambda ln: ln.get("ppl_loop_overhead_pct") is not None,
                                  "perplexity loop {ppl_loop_overhead_pct}% over bare forwards; lm-eval "
                                  "{lm_eval_requests_per_s} requests/s"),)),
    Bench("search", "Layer-replacement search (`search_bench.py`)",
          "the demo pair (SmolLM2 with 50% of every MLP's channels removed vs SmolLM2), KL fitness: evaluations each "
          "strategy needs to reach the exhaustive k = 2 optimum, best fitness at k = 4 at an equal budget, and the "
          "cost of one evaluation.",
          "the exhaustive optimum computed in the same run; `random` at the same budget; one bare forward over the "
          "same tokens (`evaluation ÷ forward`). Targets: the line's `targets`.",
          [("k=2 optimum", "k2.optimum"), ("seeds within 65 evaluations", "k2.seeds_within_65"),
           ("k=4 mean best KL", "k4.mean_best_fitness"), ("s per evaluation", "seconds_per_evaluation"),
           ("evaluation ÷ forward", "evaluation_over_forward"), ("targets", "targets")],
          lambda ln: _one(ln, "k = 2 and k = 4", _join(f"{ln['tokens']} tokens" if "tokens" in ln else None,
                                                       _threads(ln))),
          (lambda lines: _headline(lines, "k = 2 of 30 layers",
                                   lambda ln: ln.get("evaluation_over_forward") is not None,
                                  "seeds reaching the optimum within 65 evaluations: {k2.seeds_within_65}; one "
                                  "evaluation = {evaluation_over_forward} × a forward"),)),
    Bench("sweep", "Sweep launchers (`sweep_bench.py`)",
          "launch to model loaded, per job, of a small SmolLM2 sweep with the basic, joblib and submitit_local "
          "launchers (`first_s`: a cold process; `next_s`: each further job).",
          "the basic launcher in the same run (`next ÷ basic`, `sweep ÷ basic`); `load_s`, reading the model, is the "
          "floor no launcher goes under.",
          [("first s", "first_s"), ("next s", "next_s"), ("sweep s", "sweep_s"), ("load s", "load_s"),
           ("threads", "threads"), ("next ÷ basic", "next_vs_basic"), ("sweep ÷ basic", "sweep_vs_basic")],
          lambda ln: [] if ln.get("status") == "failed" else [
              Row("", name, f"{ln.get('jobs', '?')} jobs", ln,
                  {**ln[name], "next_vs_basic": get(ln, f"next_vs_basic.{name}"),
                   "sweep_vs_basic": get(ln, f"sweep_vs_basic.{name}")})
              for name in ("basic", "joblib", "submitit_local") if isinstance(ln.get(name), dict)],
          (lambda lines: _headline(lines, "launch to model loaded, next job", lambda ln: "next_vs_basic" in ln,
                                  "× the basic launcher: {next_vs_basic}"),)),
    Bench("analysis", "Model analysis (`analysis_bench.py`)",
          "structure of a SmolLM2 checkpoint from its safetensors headers against loading the model, with and "
          "without counting non-zeros; each mode in a fresh process (its own peak RSS).",
          "loading the model (`speedup` = load time ÷ headers time).",
          [("headers s", "headers_s"), ("headers peak MB", "headers_peak_rss_mb"),
           ("+ non-zero s", "headers_nonzero_s"), ("+ non-zero peak MB", "headers_nonzero_peak_rss_mb"),
           ("load s", "load_s"), ("load peak MB", "load_peak_rss_mb"), ("speedup", "speedup_headers_vs_load")],
          lambda ln: _one(ln, ln.get("model", "?"), _threads(ln) or "1 thread"),
          (lambda lines: _headline(lines, "SmolLM2, shapes only",
                                   lambda ln: ln.get("speedup_headers_vs_load") is not None,
                                  "headers {headers_s} s against loading {load_s} s ({speedup_headers_vs_load} ×)"),)),
]


GIB = 2 ** 30


def _gib(v: Any) -> Any:
    return round(v / GIB, 2) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _scale_fields(ln: dict[str, Any]) -> dict[str, Any]:
    """A scale line's figures as the tables show them (GiB, percent)."""
    err = ln.get("host_error")
    return {**ln, "measured_gib": _gib(ln.get("measured_host_bytes")),
            "predicted_gib": _gib(ln.get("predicted_host_bytes")),
            "error_pct": None if err is None else round(100 * err, 1),
            "full_host_gib": _gib(ln.get("full_depth_host_bytes")),
            "full_device_gib": _gib(get(ln, "full_depth_cuda_defaults.device_bytes"))}


def _scale_rows(ln: dict[str, Any]) -> list[Row]:
    if ln.get("status") != "completed":
        return []
    settings = f"{ln.get('shape')} shape, {ln.get('layers')} layer(s), {fmt(ln.get('tokens'))} tokens, 1 thread"
    return [Row("", str(ln.get("method")), settings, ln, _scale_fields(ln))]


BENCHES.append(
    Bench("presets", "Compression presets (`presets_bench.py`)",
          "`experiment=compress_25` / `compress_40` / `compress_50`: the planner's calibration tokens, decoder-layer "
          "passes and peak memory on SmolLM2 on this CPU and for Llama-3-8B on one 80 GB GPU (no weight read), and "
          "the newest quality_bench line that ran the preset's settings on SmolLM2.",
          "the planner (`dry_run=true`); the measured columns are quality_bench's (damage against LLM-Pruner at "
          "the same budget where it reaches it).",
          [("SmolLM2 tokens", "smollm2.tokens"), ("SmolLM2 passes", "smollm2.layer_forwards"),
           ("SmolLM2 peak host GiB", "smollm2.host_gib"), ("Austen ×", "measured.ppl_ratio.austen_holdout"),
           ("BoolQ ×", "measured.ppl_ratio.boolq"), ("prune s", "measured.prune_s"),
           ("8B tokens", "llama3_8b_gpu.tokens"), ("8B passes", "llama3_8b_gpu.layer_forwards"),
           ("8B peak GPU GiB", "llama3_8b_gpu.device_gib"), ("8B peak host GiB", "llama3_8b_gpu.host_gib"),
           ("fits 80 GB", "llama3_8b_gpu.fits")],
          lambda line: _one(line, line.get("preset", "?"), "")))

BENCHES.append(
    Bench("scale", "Scale: the real widths on this CPU (`scale_bench.py`)",
          "each method on the shape models (random weights with Llama-3-8B's and Llama-3-70B's geometry, 1 to 2 "
          "layers, bfloat16), one child process at a time, 1 thread: seconds per processed layer over one dense "
          "forward of that layer on the same tokens (`× dense layer`), the child's peak RSS against the model's "
          "bytes and against the planner's prediction for the run (`error` = measured ÷ predicted − 1), and the "
          "extrapolation to full depth (time: per layer × depth; memory: the planner's full-depth prediction, "
          "on the CPU with the run's settings, and on one GPU at the method's defaults).",
          "one dense decoder-layer forward over the same tokens, measured in the same child.",
          [("s / layer", "per_layer_s"), ("dense layer s", "dense_layer_s"), ("× dense layer", "layer_ratio"),
           ("peak RSS GiB", "measured_gib"), ("× model", "host_over_model"), ("predicted GiB", "predicted_gib"),
           ("error %", "error_pct"), ("full depth s", "full_depth_seconds"), ("full depth host GiB", "full_host_gib"),
           ("GPU at defaults GiB", "full_device_gib")],
          _scale_rows))


@block("docs/scale.md", "scale-table")
def scale_table(results: Path) -> str:
    """Per method: time and memory at Llama-3-8B's and Llama-3-70B's widths (the newest measured scale line per
    (method, shape)), and the planner's peak device memory at the method's defaults on the full models (the newest
    line that has it), on one GPU and, for a layer-streamed method, with offload."""
    newest: dict[tuple[str, str], dict[str, Any]] = {}  # the newest run (completed, or refused by its plan)
    planned: dict[tuple[str, str], dict[str, Any]] = {}  # the newest GPU prediction at defaults (measured or not)

    def newer(ln: dict[str, Any], store: dict, key: tuple[str, str]) -> bool:
        return key not in store or datetime.fromisoformat(ln["date"]) >= datetime.fromisoformat(store[key]["date"])

    for ln in load(results).get("scale", []):
        key = (str(ln.get("method")), str(ln.get("shape")))
        if (ln.get("status") == "completed" or _refused(ln)) and newer(ln, newest, key):
            newest[key] = ln
        if get(ln, "full_depth_cuda_defaults.device_bytes") is not None and newer(ln, planned, key):
            planned[key] = ln
    if not newest and not planned:
        return "No results yet (`python tests/bench/scale_bench.py`)."
    methods = list(dict.fromkeys(m for m, _ in [*newest, *planned]))
    header = ["method", "8B: × dense layer", "8B: peak RSS × model", "8B: measured / predicted",
              "70B: × dense layer", "70B: peak RSS × model", "70B: measured / predicted",
              "tokens at defaults (8B / 70B)", "GPU peak at defaults, Llama-3-8B (GiB)",
              "GPU peak at defaults, 70B (GiB)", "70B with offload: GPU / host (GiB)"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        cells = [m]
        for shape in ("8b", "70b"):
            ln = newest.get((m, shape))
            if ln is not None and _refused(ln):
                cells += [MISSING, MISSING, f"does not fit this host: {_refusal(ln)}"]
                continue
            f = _scale_fields(ln) if ln else {}
            cells += [fmt(f.get("layer_ratio")) if ln else MISSING, fmt(f.get("host_over_model")) if ln else MISSING,
                      (f"{fmt(f.get('measured_gib'))} / {fmt(f.get('predicted_gib'))} GiB"
                       f" ({'+' if (f.get('error_pct') or 0) >= 0 else ''}{fmt(f.get('error_pct'))}%)") if ln
                      else MISSING]
        tokens = [get(planned[(m, sh)], "full_depth_cuda_defaults.tokens") if (m, sh) in planned else None
                  for sh in ("8b", "70b")]
        shown = ["none" if t == 0 else fmt(t) for t in tokens]
        cells.append(MISSING if tokens == [None, None] else shown[0] if tokens[0] == tokens[1]
                     else f"{shown[0]} / {shown[1]}")
        for shape in ("8b", "70b"):
            ln = planned.get((m, shape))
            dev = get(ln, "full_depth_cuda_defaults.device_bytes") if ln else None
            cells.append(MISSING if dev is None else "on the CPU (base given as a path)" if dev == 0
                         else fmt(_gib(dev)))
        off = planned.get((m, "70b"))
        cells.append(f"{fmt(_gib(get(off, 'full_depth_offload_defaults.device_bytes')))} / "
                     f"{fmt(_gib(get(off, 'full_depth_offload_defaults.host_bytes')))}"
                     if off and get(off, "full_depth_offload_defaults.device_bytes") is not None else MISSING)
        out.append("| " + " | ".join(cells) + " |")
    used = [*newest.values(), *planned.values()]
    dates = sorted(ln["date"][:10] for ln in used)
    commits = sorted({str(ln["commit"]) for ln in used})
    runs = [ln for ln in newest.values() if ln.get("status") == "completed"]
    common = {}
    for shape in ("8b", "70b"):
        settings = [(ln.get("layers"), ln.get("tokens")) for ln in runs if ln.get("shape") == shape
                    and ln.get("unit") == "prune"]
        common[shape] = max(set(settings), key=settings.count) if settings else (None, None)
    odd = [f"{ln['method']} {str(ln['shape']).upper()}: {fmt(ln.get('layers'))} layer(s), {fmt(ln.get('tokens'))} "
           f"tokens" for ln in runs if ln.get("unit") == "prune"
           and (ln.get("layers"), ln.get("tokens")) != common[str(ln.get("shape"))]]
    shapes = ", ".join(f"{shape.upper()} with {fmt(common[shape][0])} layer(s) and {fmt(common[shape][1])} "
                       "calibration tokens" for shape in ("8b", "70b") if common[shape][0] is not None)
    out += ["", f"Measured {dates[0]}{'' if dates[0] == dates[-1] else ' to ' + dates[-1]} (commit "
            f"{', '.join(commits)}) on {_machine(used[0])}, shared with other jobs (the time is a ratio to a dense "
            f"forward measured in the same child); the shapes: {shapes}"
            f"{' (except ' + '; '.join(odd) + ')' if odd else ''}; LoRA and the search as their lines' notes say; "
            "— : not measured. \"does not fit this host\": the run's plan exceeded this machine's memory and it "
            "stopped before loading (the planner's prediction). The GPU columns are the planner's full-depth peak "
            "on one device (`model.device=cuda`, no offload) at the method's defaults, with the tokens those defaults "
            "draw (calibration; LoRA: its training tokens; none: the method reads no text); above 80 GiB a single 80 GB GPU does not hold it. With offload "
            "(`model.device=cpu pruner.offload=true pruner.device=cuda`, layer-streamed methods only): the "
            "weights in host RAM, one decoder layer at a time on the GPU. `joint` is planned at "
            "`experiment=compress_50` (its own defaults remove no whole layer); with offload, its layers are chosen "
            "greedily and both stages stream (`pruner.depth.selection=greedy`, `pruner.depth.offload`, "
            "`pruner.width.offload`: [the one-GPU command](quality.md#which-command)). Every line: "
            "`tests/bench/results/scale.jsonl`; all columns: [benchmarks](benchmarks.md)."]
    return "\n".join(out)


def _refused(ln: dict[str, Any]) -> bool:
    """A scale run its plan stopped before loading (the planner's one-line refusal)."""
    return ln.get("status") != "completed" and "cannot fit" in str(ln.get("error") or "")


def _refusal(ln: dict[str, Any]) -> str:
    """``predicted 45.01 GiB > 20.1 GiB available``: the figures of the refusal, as the run printed them."""
    text = str(ln.get("error") or "")
    return fmt(text.split("predicted peak ", 1)[-1].split(";", 1)[0] if "predicted peak " in text else text)


def _fill(template: str, line: dict[str, Any]) -> str:
    out, rest = [], template
    while "{" in rest:
        head, rest = rest.split("{", 1)
        key, rest = rest.split("}", 1)
        out += [head, fmt(get(line, key))]
    return "".join(out + [rest])


def _quality_headline(lines: list[dict[str, Any]], setting: str, row: str, ratio: float,
                      tokens: Any, zeroshot: bool = False) -> Optional[tuple[str, str, dict[str, Any]]]:
    """The newest line of ``row`` at ``ratio`` with no extra overrides. ``tokens``: a count (``--tokens N``), or
    ``"auto"`` (the pruner's rule; the figure names its count). ``zeroshot``: only lines that measured the 7-task
    average, which the figure gives instead of the damage."""
    auto = tokens == "auto"
    tail = ("zero-shot average {zeroshot.average} ({zeroshot_average_minus_dense} from dense, limit {zeroshot.limit})"
            if zeroshot else
            "{damage_vs_reference.austen_holdout} / {damage_vs_reference.boolq} of LLM-Pruner's damage")
    return _headline(lines, setting, lambda ln: ln.get("row") == row and get(ln, "budget.ratio") == ratio
                     and (ln.get("tokens_option") == "auto" if auto else
                          ln.get("calibration_tokens") == tokens and ln.get("tokens_option") in (None, tokens))
                     and not ln.get("overrides") and get(ln, "damage_vs_reference.boolq") is not None
                     and (not zeroshot or get(ln, "zeroshot.average") is not None),
                     ("{calibration_tokens} tokens: " if auto else "")
                     + "Austen × {ppl_ratio.austen_holdout}, BoolQ × {ppl_ratio.boolq}; " + tail)


def _headline(lines: list[dict[str, Any]], setting: str, where: Callable[[dict[str, Any]], bool],
              template: str) -> Optional[tuple[str, str, dict[str, Any]]]:
    line = latest(lines, where)
    return None if line is None else (setting, _fill(template, line), line)


def _machine(line: dict[str, Any]) -> str:
    m = line["machine"]
    if m.get("as_stated") or not m.get("cpu"):
        return f"as stated: {m['as_stated']}" if m.get("as_stated") else "not recorded"
    parts = [m["cpu"], f"{m['cores']} cores" if m.get("cores") else None,
             f"{m['torch_threads']} torch thread{'s' if m['torch_threads'] != 1 else ''}"
             if m.get("torch_threads") else None, m.get("gpu")]
    return fmt(", ".join(p for p in parts if p))


def _source(line: dict[str, Any]) -> str:
    src = line.get("source", "run")
    marks = [m for m, key in (("transcribed", "transcribed"), ("abridged", "abridged")) if line.get(key)]
    return fmt(src + (f" ({', '.join(marks)})" if marks else ""))


def _table(bench: Bench, lines: list[dict[str, Any]]) -> list[str]:
    """The latest line per (group, row, settings), grouped, in order of first appearance."""
    newest: dict[tuple[str, str, str], tuple[datetime, int, Row]] = {}  # insertion order: first appearance
    for i, line in enumerate(lines):
        for r in bench.rows(line):
            key = (r.group, r.row, r.settings)
            stamp = (datetime.fromisoformat(line["date"]), i)
            if key not in newest or stamp >= newest[key][:2]:
                newest[key] = (*stamp, r)
    groups: dict[str, list[Row]] = {}
    for _, _, r in newest.values():
        groups.setdefault(r.group, []).append(r)
    # the group with the newest line first (what was measured last is what the reader most likely looks for)
    newest_in = {g: max(datetime.fromisoformat(r.line["date"]) for r in rows) for g, rows in groups.items()}
    groups = dict(sorted(groups.items(), key=lambda kv: newest_in[kv[0]], reverse=True))
    out = []
    header = ["row", "settings", *(h for h, _ in bench.columns), "date", "commit", "machine", "source"]
    for group, rows in groups.items():
        if group:
            out += [f"**{group}**", ""]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in rows:
            cells = [fmt(r.row), fmt(r.settings) if r.settings else MISSING,
                     *(fmt(get(r.fields, f)) for _, f in bench.columns),
                     r.line["date"][:10], fmt(r.line["commit"]), _machine(r.line), _source(r.line)]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


@block("docs/benchmarks.md")
def benchmarks_page(results: Path) -> str:
    data = load(results)
    out = ["# Benchmarks", "",
           "<!-- Generated by tests/bench/render.py from tests/bench/results/*.jsonl: edit those (or run a "
           "benchmark), then `python tests/bench/render.py`. -->", "",
           "Each benchmark in `tests/bench/` prints one JSON line per measurement and appends it to "
           "`tests/bench/results/<bench>.jsonl` with its date, the commit it ran on (`+dirty`: with uncommitted "
           "changes) and the machine. The tables below show the newest line for each row and settings; every "
           "figure is a field of that line. Older lines stay in the results file (the history). "
           "`python tests/bench/render.py` rewrites this page and the README's brief table, and a test fails "
           "when either is out of date.", "",
           "Lines measured before the results files existed were seeded from where they had been written down: "
           "the closing notes of earlier work (`source: closing note of stop N`) and the README "
           "(`source: README at <commit>`), with that commit and its date. *transcribed*: a README table row "
           "written out as the benchmark's fields, at the table's precision; *abridged*: a line quoted with only "
           "some of its keys. Their machine is what the source said of it.", "",
           "Timings come from a small shared machine (2 cores, other jobs running): compare them within a row "
           "and against the reference measured in the same run, not across rows.", ""]
    for bench in BENCHES:
        lines = data.get(bench.stem, [])
        out += [f"## {bench.title}", "", f"**Measures:** {bench.what}", "", f"**Reference:** {bench.reference}", "",
                f"`python tests/bench/{bench.stem}_bench.py --help` lists its options.", ""]
        if not lines:
            out += ["No results yet.", ""]
            continue
        out += _table(bench, lines)
        dates = sorted(ln["date"][:10] for ln in lines)
        span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        out += [f"History: {len(lines)} line{'s' if len(lines) != 1 else ''} in "
                f"`tests/bench/results/{bench.stem}.jsonl`, {span}.", ""]
    unknown = sorted(set(data) - {b.stem for b in BENCHES})
    if unknown:
        raise RenderError(f"tests/bench/results: no section for {', '.join(unknown)} (add a Bench to render.py)")
    return "\n".join(out)


@block("README.md", "results")
def readme_results(results: Path) -> str:
    data = load(results)
    rows = ["| benchmark | setting | latest figure | measured |", "|---|---|---|---|"]
    for bench in BENCHES:
        for headline in bench.headlines:
            found = headline(data.get(bench.stem, []))
            if found:
                setting, figure, line = found
                rows.append(f"| {bench.stem} | {setting} | {figure} | {line['date'][:10]}, `{line['commit']}` |")
    return "\n".join(rows)


CURVE_BUDGETS = {0.1184: "Benchmark budget: ratio 0.1184 of all parameters (LLM-Pruner's size; its reference removes "
                         "0.25 of the groups)",
                 0.25: "A true 25% cut (`make run`'s ratio; the reference removes 25% of all parameters too)"}


@block("docs/methods/compensated.md", "token-curve")
def token_curve(results: Path) -> str:
    """Calibration tokens against quality and time: the quality bench's default row (``obs:comp:uniform``, no
    overrides) at each token count, the newest line per (budget, count); *auto*: the pruner's own rule chose it."""
    newest: dict[tuple[float, int], tuple[tuple[datetime, int], dict[str, Any]]] = {}
    for i, ln in enumerate(load(results).get("quality", [])):
        ratio = get(ln, "budget.ratio")
        if ln.get("status") == "failed" or ln.get("row") != "obs:comp:uniform" or ln.get("overrides") \
                or ratio not in CURVE_BUDGETS or get(ln, "damage_vs_reference.boolq") is None:
            continue
        key, stamp = (ratio, ln["calibration_tokens"]), (datetime.fromisoformat(ln["date"]), i)
        if key not in newest or stamp >= newest[key][0]:
            newest[key] = (stamp, ln)
    header = ["tokens", "Austen ×", "BoolQ ×", "damage Austen", "damage BoolQ", "prune s", "forward s",
              "× forward", "guard rejected", "wall s", "date", "commit"]
    out = []
    for ratio, label in CURVE_BUDGETS.items():
        rows = sorted((tokens, ln) for (r, tokens), (_, ln) in newest.items() if r == ratio)
        if not rows:
            continue
        out += [f"**{label}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for tokens, ln in rows:
            cells = [fmt(tokens) + (" (auto)" if ln.get("tokens_option") == "auto" else ""),
                     *(fmt(get(ln, f)) for f in ("ppl_ratio.austen_holdout", "ppl_ratio.boolq",
                                                 "damage_vs_reference.austen_holdout", "damage_vs_reference.boolq",
                                                 "prune_s", "forward_s", "time_over_forward", "updates_rejected",
                                                 "wall_s")),
                     ln["date"][:10], fmt(ln["commit"])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) if out else "No results yet."


# answer choices per document of the 7 zero-shot tasks (conf/eval/zeroshot.yaml; ARC has a few 3- and 5-choice
# questions): a uniform guess scores 1/choices on each, their mean is the average's chance level
ZEROSHOT_CHOICES = {"boolq": 2, "piqa": 2, "hellaswag": 4, "winogrande": 2, "arc_easy": 4, "arc_challenge": 4,
                    "openbookqa": 4}
ZEROSHOT_CHANCE = sum(1 / c for c in ZEROSHOT_CHOICES.values()) / len(ZEROSHOT_CHOICES)

REGIMES = {0.1184: "LLM-Pruner's budget (ratio 0.1184 of all parameters; the reference removes 25% of the groups)",
           0.25: "25% of all parameters", 0.4: "40% of all parameters", 0.5: "50% of all parameters"}


def _regime_settings(ln: dict[str, Any]) -> str:
    """Tokens and overrides, the four layer-range overrides shown as one range when they agree."""
    tokens = ln.get("calibration_tokens")
    overrides = list(ln.get("overrides") or [])
    ends = {k: v for k, _, v in (o.partition("=") for o in overrides) if k.startswith("layers.")}
    keys = [f"layers.{g}.{e}" for g in ("attention", "mlp") for e in ("start", "end")]
    if set(ends) == set(keys) and ends[keys[0]] == ends[keys[2]] and ends[keys[1]] == ends[keys[3]]:
        overrides = [o for o in overrides if not o.startswith("layers.")] + [f"layers [{ends[keys[0]]}, {ends[keys[1]]})"]
    return _join(f"{tokens:,} tokens" if tokens else None, *overrides, _budget_unit(ln))


def _budget_unit(ln: dict[str, Any]) -> Optional[str]:
    """A ``method:`` / ``depth:`` row's budget in the method's own unit (quality_bench's ``budget_unit``)."""
    unit = ln.get("budget_unit") or {}
    return (f"{unit['num_layers']} whole layers" if "num_layers" in unit else
            f"hidden {unit['sliced_width']} (sparsity {unit['sparsity']:g})" if "sliced_width" in unit else
            f"{unit['ratio_of_prunable']:g} of the prunable params" if "ratio_of_prunable" in unit else
            f"{len(ln['removed_layers'])} whole layers" if ln.get("removed_layers") and unit else
            unit.get("unit"))


def _same_budget(ref: dict[str, Any], ratio: float) -> bool:
    """Whether a reference line removed what the rows at ``ratio`` remove (LLM-Pruner's budget: 25% of its groups)."""
    if ratio == 0.1184:
        return (ref.get("ratio"), ref.get("ratio_target")) == (0.25, "groups")
    return (ref.get("ratio"), ref.get("ratio_target")) == (ratio, "params")


@block("docs/quality.md", "presets")
def quality_presets(results: Path) -> str:
    """The presets' cost: the newest presets_bench line per preset."""
    newest = newest_by(load(results).get("presets", []), lambda ln: ln["preset"])
    if not newest:
        return "No results yet."
    header = ["preset", "SmolLM2: Austen ×", "BoolQ ×", "zero-shot avg (− dense)", "prune s (1 thread)", "tokens",
              "Llama-3-8B on one 80 GB GPU: peak GPU GiB", "peak host GiB", "decoder-layer passes", "tokens"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sorted(newest):
        ln = newest[name]
        zs = get(ln, "measured.zeroshot")
        zeroshot = (f"{fmt(zs['average'])} ({fmt(zs['minus_dense'])}), limit {zs['limit']}" if zs else MISSING)
        cells = [f"`{name}`", *(fmt(get(ln, f)) for f in (
            "measured.ppl_ratio.austen_holdout", "measured.ppl_ratio.boolq")), zeroshot, *(fmt(get(ln, f)) for f in (
            "measured.prune_s",
            "smollm2.tokens", "llama3_8b_gpu.device_gib", "llama3_8b_gpu.host_gib", "llama3_8b_gpu.layer_forwards",
            "llama3_8b_gpu.tokens"))]
        out.append("| " + " | ".join(cells) + " |")
    dates = sorted({ln["date"][:10] for ln in newest.values()})
    out += ["", f"Planned {', '.join(dates)} (`tests/bench/results/presets.jsonl`); the SmolLM2 columns are the newest "
            "quality_bench line with the preset's settings (— : none yet). The planner predicts memory and work, not "
            "seconds: a GPU's time is the passes over the tokens at its speed."]
    return "\n".join(out)


@block("docs/quality.md", "regimes")
def quality_regimes(results: Path) -> str:
    """Every method at each budget of the quality page: the newest line per (row, settings) of quality_bench at that
    budget, with the damage against LLM-Pruner measured in the same run where it could reach the budget, and the
    50% goal (each text's ratio at most LLM-Pruner's at 25%)."""
    lines = load(results).get("quality", [])

    def key(ln: dict[str, Any]) -> Optional[tuple[float, str, str]]:
        ratio = get(ln, "budget.ratio")
        if ln.get("status") == "failed" or ratio not in REGIMES or ln.get("row") == "dense" \
                or get(ln, "ppl_ratio.boolq") is None or (ln.get("row") == "reference" and not _same_budget(ln, ratio)):
            return None
        return (ratio, ln["row"], _regime_settings(ln) if ln["row"] != "reference" else ln.get("ratio_target", ""))

    newest = newest_by(lines, key)
    ref25 = latest(lines, lambda ln: ln.get("row") == "reference" and get(ln, "budget.ratio") == 0.25
                   and ln.get("ratio_target") == "params")
    header = ["row", "settings", "Austen ×", "BoolQ ×", "damage Austen", "damage BoolQ", "params after", "prune s",
              "zero-shot avg (dense)", "date", "commit"]
    dense_zs = {get(ln, "zeroshot.limit"): get(ln, "zeroshot.average") for ln in lines
                if ln.get("row") == "dense" and get(ln, "zeroshot.average") is not None}

    def zeroshot(ln: dict[str, Any]) -> str:
        limit = get(ln, "zeroshot.limit")
        if limit is None:
            return MISSING
        avg, dense = get(ln, "zeroshot.average"), dense_zs.get(limit)
        kept = (f", above chance kept {fmt(round((avg - ZEROSHOT_CHANCE) / (dense - ZEROSHOT_CHANCE), 3))}"
                if avg is not None and dense is not None and ln.get("row") != "dense"
                and set(get(ln, "zeroshot.tasks") or ()) == set(ZEROSHOT_CHOICES) else "")
        return f"{fmt(avg)} ({fmt(dense)}), limit {limit}{kept}"

    out = []
    if dense_zs:
        out += [f"Zero-shot: a uniform guess on each of the 7 tasks averages {fmt(round(ZEROSHOT_CHANCE, 4))} "
                f"(1 / its answer choices); the dense model's average is in brackets. \"above chance kept\" is "
                "(row − chance) / (dense − chance).", ""]
    for ratio, label in REGIMES.items():
        rows = sorted(((row, settings), ln) for (r, row, settings), ln in newest.items() if r == ratio)
        if not rows:
            continue
        out += [f"**{label}**", ""]
        if ratio == 0.5 and ref25 is not None:
            out += [f"Goal: each ratio at most LLM-Pruner's at 25% (Austen × {fmt(get(ref25, 'ppl_ratio.austen_holdout'))}, "
                    f"BoolQ × {fmt(get(ref25, 'ppl_ratio.boolq'))}; its line of {ref25['date'][:10]}).", ""]
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        matched = any(row == "reference" for (row, _), _ in rows)  # else no damage column: no LLM-Pruner here
        for (row, settings), ln in rows:
            label_row = "LLM-Pruner (reference)" if row == "reference" else row
            if not matched:
                ln = {**ln, "damage_vs_reference": None}
            cells = [label_row, settings if row != "reference" else f"ratio {ln.get('ratio')} of the "
                     f"{ln.get('ratio_target')}, {fmt(ln.get('calibration_tokens'))} tokens",
                     *(fmt(get(ln, f)) for f in ("ppl_ratio.austen_holdout", "ppl_ratio.boolq",
                                                 "damage_vs_reference.austen_holdout", "damage_vs_reference.boolq",
                                                 "params_after", "prune_s")),
                     zeroshot(ln), ln["date"][:10], fmt(ln["commit"])]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) if out else "No results yet."


def _unit_kind(row: str) -> Optional[str]:
    """Which units a quality_bench row removes: ``joint`` (layers, then heads and channels) or one kind alone."""
    if row.startswith("joint:"):
        return "joint"
    if row.startswith(("depth:", "method:shortgpt")):
        return "whole layers"
    if row.startswith(("obs:", "wanda:", "flap:", "magnitude:", "method:flap")):
        return "width (heads, channels)"
    if row.startswith("method:slicegpt"):
        return "hidden size (SliceGPT)"
    return None


@block("docs/quality.md", "gains")
def quality_gains(results: Path) -> str:
    """The joint rows against the best row that removes one kind of unit, per budget (issue 27's report): each side
    the row of least geometric mean of its two perplexity ratios, and how much of that row's damage (× − 1) the
    joint row removes on each text."""
    lines = [ln for ln in load(results).get("quality", []) if ln.get("status") != "failed"
             and get(ln, "ppl_ratio.boolq") is not None and _unit_kind(ln.get("row", "")) is not None]
    score = lambda ln: math.sqrt(get(ln, "ppl_ratio.austen_holdout") * get(ln, "ppl_ratio.boolq"))  # noqa: E731
    header = ["budget", "best joint row", "Austen ×", "BoolQ ×", "best single-kind row", "Austen ×", "BoolQ ×",
              "damage removed: Austen", "BoolQ"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ratio, label in REGIMES.items():
        at = [ln for ln in lines if get(ln, "budget.ratio") == ratio]
        joint = min((ln for ln in at if _unit_kind(ln["row"]) == "joint"), key=score, default=None)
        single = min((ln for ln in at if _unit_kind(ln["row"]) != "joint"), key=score, default=None)
        if joint is None or single is None:
            continue
        cells = [label.split(" (")[0]]
        for ln in (joint, single):
            what = f"`{ln['row']}` ({_unit_kind(ln['row'])}" + (f"; {_regime_settings(ln)})" if _regime_settings(ln)
                                                                  else ")")
            cells += [what, fmt(get(ln, "ppl_ratio.austen_holdout")), fmt(get(ln, "ppl_ratio.boolq"))]
        for text in ("austen_holdout", "boolq"):
            j, o = get(joint, f"ppl_ratio.{text}"), get(single, f"ppl_ratio.{text}")
            cells.append(f"{1 - (j - 1) / (o - 1):+.0%}" if o != 1 else MISSING)
        out.append("| " + " | ".join(cells) + " |")
    if len(out) == 2:
        return "No results yet."
    return "\n".join(out) + ("\n\nEvery quality_bench line at the budget is a candidate (each side's best by the geometric mean "
                             "of its two ratios); \"damage removed\" is 1 − (joint × − 1) / (single-kind × − 1): "
                             "negative where the joint row does more damage.")


@block("docs/quality.md", "goals")
def quality_goals(results: Path) -> str:
    """Issue 27's goal rows against the best measured line of each (the newest line per setting, as the tables)."""
    lines = [ln for ln in load(results).get("quality", []) if ln.get("status") != "failed"
             and get(ln, "ppl_ratio.boolq") is not None and ln.get("row") not in ("dense", "reference")]
    ref25 = latest(load(results).get("quality", []), lambda ln: ln.get("row") == "reference"
                   and get(ln, "budget.ratio") == 0.25 and ln.get("ratio_target") == "params")

    def best(ratio: float, key: Callable[[dict[str, Any]], float]) -> Optional[dict[str, Any]]:
        found = [ln for ln in lines if get(ln, "budget.ratio") == ratio and key(ln) is not None]
        return min(found, key=key) if found else None

    def what(ln: dict[str, Any]) -> str:
        return f"`{ln['row']}`" + (f" ({_regime_settings(ln)})" if _regime_settings(ln) else "")

    rows = ["| goal | best measured | figures | met |", "|---|---|---|---|"]
    if ref25 is not None:
        ra, rb = get(ref25, "ppl_ratio.austen_holdout"), get(ref25, "ppl_ratio.boolq")
        ln = best(0.5, lambda l: max(get(l, "ppl_ratio.austen_holdout") / ra, get(l, "ppl_ratio.boolq") / rb))
        if ln:
            a, b = get(ln, "ppl_ratio.austen_holdout"), get(ln, "ppl_ratio.boolq")
            rows.append(f"| 50%: each ratio at most LLM-Pruner's at 25% (× {fmt(ra)} / × {fmt(rb)}) | {what(ln)} | "
                        f"× {fmt(a)} / × {fmt(b)} | {'yes' if a <= ra and b <= rb else 'no'} |")
    damage = lambda l: (max(get(l, "damage_vs_reference.austen_holdout"), get(l, "damage_vs_reference.boolq"))  # noqa: E731
                        if get(l, "damage_vs_reference.boolq") is not None else None)
    ln = best(0.25, damage)
    if ln:
        a, b = get(ln, "damage_vs_reference.austen_holdout"), get(ln, "damage_vs_reference.boolq")
        rows.append(f"| 25%: at most 0.15 of LLM-Pruner's damage on each text | {what(ln)} | {fmt(a)} / {fmt(b)} | "
                    f"{'yes' if max(a, b) <= 0.15 else 'no'} |")
    ln = best(0.1184, lambda l: get(l, "damage_vs_reference.austen_holdout"))
    default = latest(lines, lambda l: get(l, "budget.ratio") == 0.1184 and l.get("row") == "obs:comp:uniform"
                     and l.get("tokens_option") == "auto" and not l.get("overrides"))
    if ln:
        a = get(ln, "damage_vs_reference.austen_holdout")
        d = get(default, "damage_vs_reference.austen_holdout") if default else None
        rows.append(f"| LLM-Pruner's budget: the default at most 0.25 of its damage in domain, held-out text | "
                    f"{what(ln)}; the default: {fmt(d)} | {fmt(a)} (Austen holdout) | "
                    f"{'yes' if d is not None and d <= 0.25 else 'not by the default' if a <= 0.25 else 'no'} |")
    deep = [l for l in load(results).get("depth", []) if get(l, "damage_vs_shortgpt.boolq") is not None]
    if deep:
        ln = min(deep, key=lambda l: max(get(l, "damage_vs_shortgpt.austen_holdout"), get(l, "damage_vs_shortgpt.boolq")))
        a, b = get(ln, "damage_vs_shortgpt.austen_holdout"), get(ln, "damage_vs_shortgpt.boolq")
        rows.append(f"| 25% of the layers, at most 0.1 of ShortGPT's damage | `{ln['row']}` | {fmt(a)} / {fmt(b)} | "
                    f"{'yes' if max(a, b) <= 0.1 else 'no'} |")
    return "\n".join(rows) + "\n\nThe best line per goal over every quality_bench / depth_bench line."


def newest_by(lines: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[str, Any]]:
    """The newest line (by date, then file order) per ``key(line)``, over the lines whose key is not None."""
    found: dict[Any, tuple[tuple[datetime, int], dict[str, Any]]] = {}
    for i, ln in enumerate(lines):
        k = key(ln)
        stamp = (datetime.fromisoformat(ln["date"]), i)
        if k is not None and (k not in found or stamp >= found[k][0]):
            found[k] = (stamp, ln)
    return {k: ln for k, (_, ln) in found.items()}


@block("docs/quality.md", "depth")
def quality_depth(results: Path) -> str:
    """Depth alone: the newest line per row of depth_bench (ShortGPT and every pruner=depth rule)."""
    newest = newest_by(load(results).get("depth", []), lambda ln: ln["row"] if ln.get("status") != "failed" and
                       ln.get("row") != "dense" and get(ln, "ppl_ratio.boolq") is not None else None)
    if not newest:
        return "No results yet."
    header = ["row", "layers removed", "Austen ×", "BoolQ ×", "damage Austen", "damage BoolQ", "prune s", "date",
              "commit"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(newest, key=lambda r: (r != "shortgpt", r)):
        ln = newest[row]
        cells = [row, fmt(ln.get("removed_layers")),
                 *(fmt(get(ln, f)) for f in ("ppl_ratio.austen_holdout", "ppl_ratio.boolq",
                                             "damage_vs_shortgpt.austen_holdout", "damage_vs_shortgpt.boolq",
                                             "prune_s")),
                 ln["date"][:10], fmt(ln["commit"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


@block("docs/options.md", "ratio-table")
def ratio_table() -> str:
    """What ``ratio`` means for each pruner option and ``ratio_target`` unit, from the classes' ``RATIO``."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    sys.path.insert(0, str(ROOT))
    from pruning.options import ratio_table as table

    def target(path: Path) -> Optional[str]:  # an option's _target_, through its defaults chain (l1 -> taylor)
        node = OmegaConf.load(path)
        return node.get("_target_") or next((target(path.parent / f"{d}.yaml") for d in node.get("defaults", [])
                                             if d != "_self_"), None)

    files = sorted((ROOT / "conf" / "pruner").glob("*.yaml"), key=lambda p: ("_target_" not in p.read_text(), p.stem))
    return ("The unit marked *default* is what `ratio_target: null` resolves to where the other options allow it; "
            "otherwise it is the first unit they allow (its line says when).\n\n"
            + table({p.stem: get_class(target(p)) for p in files}))


def main(argv: Optional[list[str]] = None, root: Path = ROOT, results: Path = RESULTS) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated file differs; write nothing")
    args = ap.parse_args(argv)
    try:
        if args.check:
            bad = stale(root, results)
            if bad:
                print(f"stale: {', '.join(bad)} (run python tests/bench/render.py)", file=sys.stderr)
                return 1
            return 0
        for path in write(root, results):
            print(f"wrote {path}")
    except RenderError as e:
        print(f"render: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
