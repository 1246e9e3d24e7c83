"""The model card of a checkpoint (``README.md``): the Hub's metadata and what the run recorded, in Markdown.

    ---
    base_model: HuggingFaceTB/SmolLM2-135M-Instruct   the nearest model on the Hub it comes from, when one is known
    library_name: transformers
    license: apache-2.0                                only when every source model states the same one
    language: en                                       likewise
    pipeline_tag: text-generation
    tags: [prunelab, pruned, llama, taylor]
    ---
    # what it is; the method's fields (checkpoint_info.json); the parameters before / after; the settings;
    # the layers; the measured metrics with their protocol (the run record); how to load it; how it was made

:func:`model_card` is a pure function of plain dicts: ``checkpoint_info.json``, ``config.json``, the run record
(``metrics.json``) and what is known of the source models. It names no task and no method: a method's details
are the fields its recipe put in the record. :func:`source_facts` finds a source model's Hub id, license and
language in what it ships (a GGUF's metadata, a local dir's own card, a prunelab checkpoint's ``checkpoint_info``,
the Hub cache's ``models--org--name`` folder); nothing is fetched and no Hub id is guessed from a local path.
:func:`write_model_card` reads a checkpoint dir and writes its card atomically. ``save_checkpoint`` writes it
from ``checkpoint_info.json`` alone; a recipe refreshes it with the record once its evaluations are done.
"""

from __future__ import annotations

import json
import logging
import mmap
import re
import struct
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from core.models.ref import gguf_path
from core.run.errors import RunDirError
from core.run.io import atomic_write_text
from core.run.wandb_view import finite_number, get as _get

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
PIPELINE_TAG = "text-generation"
LIBRARY_NAME = "transformers"
# checkpoint_info.json keys the card shows in their own place, not in the "Method" table
_BOOKKEEPING = {"format", "creation_time", "git_commit", "config", "base_model", "donor_model", "params"}
_SOURCES = (("base_model", "Base model"), ("donor_model", "Donor model"))  # ModelRef dicts in checkpoint_info
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_MAX_VALUE = 300  # characters of one value in a table (the JSON files hold the rest)


# --------------------------------------------------------------------------- small pieces


def hub_id(name: Any) -> Optional[str]:
    """``name`` when it reads as a Hub repo id (``org/name``), else None: a local name or path is never one."""
    if not isinstance(name, str) or not _HUB_ID.match(name) or ".." in name or name.endswith((".", "-")):
        return None
    return name


def _fmt(v: Any) -> str:
    """One value as table text: 6 significant digits, lists and dicts as JSON, ``|`` escaped, long text cut."""
    if v is None:
        s = "null"
    elif isinstance(v, bool):
        s = str(v).lower()
    elif isinstance(v, int):
        s = str(v)
    elif isinstance(v, float):
        s = f"{v:.6g}"
    elif isinstance(v, str):
        s = v
    else:
        s = json.dumps(v, default=str)
    s = " ".join(s.split()).replace("|", "\\|")
    return s if len(s) <= _MAX_VALUE else s[:_MAX_VALUE - 1] + "…"


def _flatten(d: Mapping[str, Any], prefix: str = "", skip: frozenset = frozenset()) -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``; keys in ``skip`` (at any depth) and ``_target_`` left out."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if k in skip or k == "_target_":
            continue
        if isinstance(v, Mapping) and v:
            out += _flatten(v, f"{prefix}{k}.", skip)
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in row) + " |" for row in rows]
    return lines


def _words(name: Any) -> list[str]:
    """``PrunedLlamaForCausalLM`` -> [pruned, llama]; ``prunelab_sliced_llama`` -> [prunelab, sliced, llama]."""
    if not isinstance(name, str):
        return []
    name = re.sub(r"For(CausalLM|Causal|ConditionalGeneration)$", "", name)
    parts = re.findall(r"[A-Z]+(?=[A-Z][a-z]|\d|\b|_)|[A-Z]?[a-z]+\d*|[A-Z]+\d*|\d+", name.replace("-", "_"))
    return [p.lower() for p in parts if p]


def _tag(s: Any) -> Optional[str]:
    if not isinstance(s, str):
        return None
    t = re.sub(r"[^a-z0-9._-]+", "-", s.lower()).strip("-")
    return t or None


def _unique(items: Sequence[Any]) -> list:
    out: list = []
    for i in items:
        if i is not None and i not in out:
            out.append(i)
    return out


# --------------------------------------------------------------------------- what a source model says about itself


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_metadata(path: str | Path, prefix: str = "general.") -> dict[str, Any]:
    """The key/value metadata of a GGUF file whose keys start with ``prefix``, read from its header alone
    (gguf's GGUFReader also maps every tensor: seconds for a small model). Values under other keys are skipped
    unread (a tokenizer's 100k-string vocabulary costs a few ms, not a quarter of a second)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 0

        def read(fmt: str) -> Any:
            nonlocal pos
            v = struct.unpack_from(fmt, mm, pos)[0]
            pos += struct.calcsize(fmt)
            return v

        def string() -> str:
            nonlocal pos
            n = read("<Q")
            pos += n
            return bytes(mm[pos - n:pos]).decode("utf-8", errors="replace")

        def skip(kind: int) -> None:
            nonlocal pos
            if kind == 8:
                n = read("<Q")  # (read moves pos: not `pos += read(...)`)
                pos += n
            elif kind == 9:
                item, n = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    size = n * struct.calcsize(_GGUF_SCALARS[item])
                    pos += size
                else:
                    for _ in range(n):
                        skip(item)
            elif kind in _GGUF_SCALARS:
                pos += struct.calcsize(_GGUF_SCALARS[kind])
            else:
                raise ValueError(f"unknown GGUF value type {kind}")

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                item, n = read("<I"), read("<Q")
                return [value(item) for _ in range(n)]
            if kind not in _GGUF_SCALARS:
                raise ValueError(f"unknown GGUF value type {kind}")
            return read(_GGUF_SCALARS[kind])

        try:
            if mm[:4] != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file")
            pos = 4
            read("<I")  # version
            read("<Q")  # tensors
            out = {}
            for _ in range(read("<Q")):
                key = string()
                kind = read("<I")
                if key.startswith(prefix):
                    out[key] = value(kind)
                else:
                    skip(kind)
            return out
        except struct.error:
            raise ValueError(f"{path}: truncated GGUF header") from None


def _gguf_facts(path: Path) -> dict:
    """Hub id, license, language, architecture from a GGUF's ``general.*`` metadata."""
    meta = gguf_metadata(path)
    value = meta.get

    facts: dict[str, Any] = {"license": value("general.license"), "architecture": value("general.architecture")}
    langs = value("general.languages")
    if isinstance(langs, list) and langs:
        facts["language"] = [str(x) for x in langs]
    for key in ("general.source.huggingface.repository", "general.source.repo_url", "general.repo_url"):
        v = value(key)
        if isinstance(v, str):
            rid = hub_id(re.sub(r"^https?://(www\.)?(huggingface\.co|hf\.co)/", "", v).strip("/"))
            if rid:
                facts["hub_id"] = rid
                break
    org, base, size = value("general.organization"), value("general.basename"), value("general.size_label")
    if "hub_id" not in facts and isinstance(org, str) and isinstance(base, str) and isinstance(size, str):
        # GGUF's naming convention: <BaseName>-<SizeLabel>-<FineTune>[.-]<Encoding>.gguf; the stem before the
        # encoding is the model's repo name when it starts with the basename and holds the size label
        stem = re.sub(r"[.-](I?Q\d\w*|F16|BF16|F32)$", "", path.name.removesuffix(".gguf"), flags=re.IGNORECASE)
        if stem.lower().startswith(base.lower()) and size.lower() in stem.lower().split("-"):
            facts["hub_id"] = hub_id(f"{org.replace(' ', '')}/{stem}")
    return {k: v for k, v in facts.items() if v}


def _safetensors_params(folder: Path) -> Optional[int]:
    """Parameters stored in a folder's ``*.safetensors`` files, from their headers (no tensor is read)."""
    total, files = 0, sorted(folder.glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                size = 1
                for d in t.get("shape", []):
                    size *= int(d)
                total += size
    return total if files else None


def source_facts(ref: Optional[Mapping[str, Any]], _depth: int = 0) -> dict:
    """What a source model (a ``ModelRef`` dict of checkpoint_info.json) says about itself: ``name``, ``kind``,
    ``where`` (a phrase: its file, folder or origin), and when stated: ``hub_id``, ``license``, ``language``,
    ``architecture``, ``params``. Read from its own files only; anything unreadable is simply unknown."""
    if not isinstance(ref, Mapping):
        return {}
    facts: dict[str, Any] = {"name": ref.get("name"), "kind": ref.get("kind")}
    if hub_id(ref.get("name")):
        facts["hub_id"] = ref["name"]
    kind, path = ref.get("kind"), ref.get("path")
    try:
        if kind == "gguf" and ref.get("gguf_package") and ref.get("gguf_file"):
            facts["where"] = f"`{ref['gguf_file']}` of the Python package `{ref['gguf_package']}`, dequantised"
            facts.update({k: v for k, v in _gguf_facts(gguf_path(ref["gguf_package"], ref["gguf_file"])).items()
                          if k not in facts})
        elif kind == "tiny":
            facts["where"] = "random weights built in memory: a test model"
        elif path:
            p = Path(path)
            folder = p if p.is_dir() else p.parent
            facts["where"] = f"`{p}`"
            cache = next((part for part in reversed(p.parts) if part.startswith("models--")), None)
            if cache and "hub_id" not in facts:  # the Hub cache: .../models--org--name/snapshots/<sha>
                facts["hub_id"] = hub_id("/".join(cache.removeprefix("models--").split("--", 1)))
            info_file = folder / "checkpoint_info.json"
            if info_file.is_file() and _depth < 4:  # a prunelab checkpoint: not on the Hub; its own source is
                info = json.loads(info_file.read_text())
                parent = source_facts(info.get("base_model"), _depth + 1)
                facts["derived_from"] = {"method": info.get("method"), **{k: parent.get(k) for k in
                                                                          ("name", "hub_id", "where")}}
                facts.update({k: parent[k] for k in ("license", "language", "architecture")  # what carries over
                              if parent.get(k) and not facts.get(k)})
            card = folder / CARD_NAME
            if card.is_file():
                meta = _front_matter(card.read_text(encoding="utf-8"))
                for k in ("license", "language"):
                    if meta.get(k) and not facts.get(k):
                        facts[k] = meta[k]
            cfg_file = folder / "config.json"
            if cfg_file.is_file() and not facts.get("architecture"):
                facts["architecture"] = json.loads(cfg_file.read_text()).get("model_type")
            if folder.is_dir():
                facts["params"] = _safetensors_params(folder)
    except Exception as e:  # noqa: BLE001 - a card states what is known; an unreadable source adds nothing
        log.info("model card: %s not read (%s: %s)", ref.get("name"), type(e).__name__, e)
    if isinstance(facts.get("language"), str):
        facts["language"] = [facts["language"]]
    return {k: v for k, v in facts.items() if v is not None}


def _front_matter(text: str) -> dict:
    m = re.match(r"^\s*---\r?\n(.*?)\r?\n---\s*(\r?\n|$)", text, re.DOTALL)
    if not m:
        return {}
    data = yaml.safe_load(m.group(1))
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- the card


def _agreed(values: list[Any]) -> Any:
    """The value every source states, when they all state one and it is the same; else None."""
    if not values or any(v in (None, [], "") for v in values):
        return None
    first = values[0]
    return first if all(v == first for v in values) else None


def _eval_sides(record: Mapping[str, Any]) -> dict[str, dict]:
    """The record's ``eval`` as {label: result}: each evaluated model's result (a dict with ``ppl`` /
    ``tasks`` / ``mmlu`` ...); a perplexity over several models (``{"ppl": {label: value}, seq_len, tokens,
    source}``) becomes one side per label."""
    sides: dict[str, dict] = {}
    for label, result in (record.get("eval") or {}).items():
        if not isinstance(result, Mapping):
            continue
        ppl = result.get("ppl")
        if isinstance(ppl, Mapping) and "value" not in ppl and ppl and all(finite_number(v) is not None for v in ppl.values()):
            proto = {k: result.get(k) for k in ("seq_len", "tokens", "source", "windows") if k in result}
            for name, v in ppl.items():
                sides.setdefault(str(name), {})["ppl"] = {"value": v, **proto}
        elif any(k in result for k in ("ppl", "tasks", "mmlu", "task_average")):
            sides[str(label)] = dict(result)
    return sides


def _metric_rows(sides: Mapping[str, dict]) -> tuple[list[list[Any]], list[str]]:
    """Rows (metric, value per side) and the protocol notes, for the metrics at least one side measured."""
    labels = list(sides)
    rows: list[list[Any]] = []
    notes: list[str] = []
    if any(finite_number(_get(r, "ppl", "value")) is not None for r in sides.values()):
        rows.append(["perplexity ↓", *[_get(sides[s], "ppl", "value") for s in labels]])
        protocols = _unique([tuple((k, _get(r, "ppl", k)) for k in ("source", "seq_len", "tokens", "windows"))
                             for r in sides.values() if _get(r, "ppl", "value") is not None])
        for proto in protocols:
            p = dict(proto)
            windows = f" in {p['windows']} windows" if p.get("windows") else ""
            notes.append(f"Perplexity: text `{p.get('source')}`, {_fmt(p.get('tokens'))} tokens scored{windows} "
                         f"of `seq_len` {p.get('seq_len')} tokens (non-overlapping windows).")
    tasks = _unique([t for r in sides.values() for t in (r.get("tasks") or {})])
    for task in tasks:
        heads = _unique([(r.get("task_average_over") or {}).get(task, "acc") for r in sides.values()
                         if task in (r.get("tasks") or {})])
        metric = heads[0] if len(heads) == 1 else "acc"
        entries = [_get(r, "tasks", task) or {} for r in sides.values()]
        e = next((x for x in entries if x), {})
        shots = f", {e['num_fewshot']}-shot" if e.get("num_fewshot") is not None else ""
        n = f", n={_fmt(e['n'])}" if e.get("n") is not None else ""
        rows.append([f"{task} ({metric}{n}{shots}) ↑", *[x.get(metric) if x.get("status", "completed") == "completed"
                                                         else x.get("status") for x in entries]])
    if any(r.get("task_average") is not None for r in sides.values()):
        rows.append(["zero-shot average ↑", *[r.get("task_average") for r in sides.values()]])
    if any(_get(r, "mmlu", "average") is not None for r in sides.values()):
        m = next(r["mmlu"] for r in sides.values() if _get(r, "mmlu", "average") is not None)
        shots = f", {m['num_fewshot']}-shot" if m.get("num_fewshot") is not None else ""
        n = f", n={_fmt(m['n'])}" if m.get("n") is not None else ""
        rows.append([f"MMLU (acc{n}{shots}) ↑", *[_get(r, "mmlu", "average") for r in sides.values()]])
    effs = [r.get("efficiency") for r in sides.values() if isinstance(r.get("efficiency"), Mapping)]
    if effs:  # what every model shares is the protocol (a note); what differs, a row
        keys = _unique([k for e in effs for k in e])
        same = [k for k in keys if len(effs) > 1 and all(k in e and e[k] == effs[0][k] for e in effs)
                or isinstance(effs[0].get(k), str)]
        for k in keys:
            if k not in same and any(finite_number(_get(r, "efficiency", k)) is not None for r in sides.values()):
                rows.append([f"efficiency: {k}", *[_get(r, "efficiency", k) for r in sides.values()]])
        notes.append("Efficiency: measured on the run's own machine, the same way for every model"
                     + (f" ({', '.join(f'{k} {_fmt(effs[0].get(k))}' for k in same if k in effs[0])})" if same
                        else "") + ".")
    if tasks or any(r.get("mmlu") for r in sides.values()):
        notes.append("Accuracies: lm-evaluation-harness on the in-memory model, fractions in [0, 1]; `n` is the "
                     "number of examples per task (a limited run when smaller than the task).")
    return [[r[0], *["—" if v is None else v for v in r[1:]]] for r in rows], notes


def _layer_rows(config: Mapping[str, Any]) -> tuple[list[str], list[list[Any]], list[tuple[str, Any]]]:
    """(header, rows, notes) of a per-layer table from config.json's lists of one entry per layer (top level or
    one level down: ``layer_configs``, ``layer_types``, ``slicing.layers``). A list of dicts is shown whole
    when any of its columns varies over the layers or differs from the config's own value of that name (4 heads
    in every layer of an 8-head config), a list of values when it varies; ``notes`` are the scalars beside a
    shown list one level down (``slicing.embedding_dimension``)."""
    n = config.get("num_hidden_layers")
    if not isinstance(n, int) or n <= 0:
        return [], [], []
    columns: dict[str, list[Any]] = {}
    notes: list[tuple[str, Any]] = []
    places = [("", config)] + [(f"{k}.", v) for k, v in config.items() if isinstance(v, Mapping)]
    for prefix, node in places:
        shown = False
        for key, value in node.items():
            if not isinstance(value, list) or len(value) != n:
                continue
            if all(isinstance(x, Mapping) for x in value):
                group = {sub: [x.get(sub) for x in value] for sub in _unique([s for x in value for s in x])}
                if any(len({json.dumps(x, default=str) for x in v}) > 1 or (sub in config and v[0] != config[sub])
                       for sub, v in group.items()):
                    columns.update(group)
                    shown = True
            elif all(not isinstance(x, (list, Mapping)) for x in value) and len({json.dumps(x) for x in value}) > 1:
                name = key.removeprefix("layer_").removesuffix("s") if key.startswith("layer_") else key
                columns[name] = value
                shown = True
        if shown and prefix:
            notes += [(f"{prefix}{k}", v) for k, v in node.items() if not isinstance(v, (list, Mapping))]
    if not columns:
        return [], [], []
    return ["layer", *columns], [[i, *[columns[c][i] for c in columns]] for i in range(n)], notes


def model_card(info: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None,
               record: Optional[Mapping[str, Any]] = None, *, sources: Optional[Mapping[str, dict]] = None,
               settings: Sequence[str] = (), label: Optional[str] = None, command: Optional[str] = None,
               params: Optional[int] = None, sections: Optional[Mapping[str, str]] = None) -> str:
    """The README.md of a checkpoint, from plain dicts.

    info       its ``checkpoint_info.json``                   config   its ``config.json``
    record     the run's ``metrics.json`` (eval, params, data, config), or None (the card says what info does)
    sources    :func:`source_facts` of info's ``base_model`` / ``donor_model`` (by that key)
    settings   config groups (of the record's config, else info's) shown in full as the method's settings
    label      which evaluated model of the record this checkpoint is (default: the last one that is not
               ``base``)
    command    the command line that made it;  params: its parameter count when no record or info gives it
    sections   extra Markdown sections {title: body}, after "How to use"
    """
    config, record, sources = config or {}, record or {}, sources or {}
    method = info.get("method") or record.get("method")
    recovery = info.get("recovery") if isinstance(info.get("recovery"), Mapping) else {}
    n_params = {k: v for k, v in {**(info.get("params") or {}), **(record.get("params") or {})}.items()
                if finite_number(v) is not None}
    before = n_params.get("base") or _get(sources, "base_model", "params")
    after = n_params.get("pruned") or n_params.get("model") or params

    # --- metadata
    facts = [sources[k] for k, _ in _SOURCES if info.get(k) is not None and k in sources]
    hub_ids = _unique([f.get("hub_id") or _get(f, "derived_from", "hub_id") for f in facts])
    arch = config.get("architectures") or []
    tags = ["prunelab", *_words(arch[0] if arch else None), *_words(config.get("model_type"))]
    tags += [w for f in facts for w in _words(f.get("architecture"))]
    if finite_number(before) and finite_number(after) and after < before:
        tags.append("pruned")
    if len(facts) > 1:  # layers from more than one model
        tags.append("hybrid")
    tags += [_tag(method), _tag(recovery.get("method"))]
    tags += [_tag(t) for t in _unique(config.get("layer_types") or []) if isinstance(t, str) and "attention" not in t]
    tags = [t for t in _unique(tags) if t]
    meta: dict[str, Any] = {}
    ids = [h for h in hub_ids if h]  # the nearest models on the Hub it comes from (a local source: its own source)
    if ids:
        meta["base_model"] = ids[0] if len(ids) == 1 else ids
    meta["library_name"] = LIBRARY_NAME
    license_ = _agreed([f.get("license") for f in facts])
    if license_:
        meta["license"] = license_
    language = _agreed([f.get("language") for f in facts])
    if language:
        meta["language"] = language
    meta["pipeline_tag"] = PIPELINE_TAG
    meta["tags"] = tags

    # --- what it is
    base = sources.get("base_model") or {}
    base_name = base.get("hub_id") or base.get("name") or _get(info, "base_model", "name") or "a model"
    parent = base.get("derived_from") or {}
    if parent and not base.get("hub_id"):  # a local prunelab checkpoint: named by what it was made from
        base_name = f"{parent.get('hub_id') or parent.get('name')} ({parent.get('method')})"
    kind = "hybrid" if len(facts) > 1 else (
        " ".join(w for w in _words(arch[0] if arch else None) if w != "llama") or "compressed")
    title = f"{base_name}: {kind}" + (f" with {method}" if method else "") + (
        f" + {recovery['method']} recovery" if recovery.get("method") else "")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {title}", ""]
    lines.append(f"A checkpoint written by prunelab" + (f" with the method `{method}`" if method else "") +
                 f" from {base_name}. Every figure below comes from its `checkpoint_info.json`"
                 + (" and the run's record (`metrics.json`)" if record else "") + ".")
    lines.append("")
    for key, title_ in _SOURCES:
        f = sources.get(key)
        if info.get(key) is None or not f:
            continue
        parts = [f"**{title_}**: " + (f"[{f['hub_id']}](https://huggingface.co/{f['hub_id']})" if f.get("hub_id")
                                      else f"`{f.get('name')}`")]
        if f.get("where"):
            parts.append(f"({f.get('name')}: {f['where']})" if f.get("hub_id") else f"({f['where']})")
        d = f.get("derived_from")
        if d:
            parts.append(f"— a prunelab checkpoint (`{d.get('method')}`) of "
                         + (f"{d['hub_id']}" if d.get("hub_id") else f"`{d.get('name')}`"))
        lines.append("- " + " ".join(parts))
    if finite_number(after):
        if finite_number(before) and after <= before:
            lines.append(f"- **Parameters**: {int(before):,} → {int(after):,} "
                         f"({100.0 * after / before:.2f}% kept, {100.0 * (1 - after / before):.2f}% removed)")
        elif finite_number(before):
            lines.append(f"- **Parameters**: {int(before):,} → {int(after):,} "
                         f"({100.0 * (after / before - 1):.2f}% more than the base)")
        else:
            lines.append(f"- **Parameters**: {int(after):,}")
    nz, nz_base = n_params.get("nonzero"), n_params.get("nonzero_base")
    if finite_number(nz) and finite_number(nz_base) and nz != after:
        lines.append(f"- **Non-zero parameters**: {int(nz_base):,} → {int(nz):,} "
                     f"({100.0 * nz / nz_base:.2f}% kept; zeros kept in dense shapes)")
    made = [f"commit `{str(info['git_commit'])[:12]}`" if info.get("git_commit") else "commit unknown",
            f"{info['creation_time']}" if info.get("creation_time") else None]
    lines.append("- **Made by**: prunelab, " + ", ".join(m for m in made if m))
    lines.append("")

    # --- method
    fields = [(k, v) for k, v in info.items() if k not in _BOOKKEEPING and v != ""]
    rows = [(k, v) for key, value in fields for k, v in
            (_flatten(value, f"{key}.", frozenset({"config"})) if isinstance(value, Mapping) and value
             else [(key, value)]) if v != ""]
    if rows:
        lines += ["## Method", "", *_table(["field (checkpoint_info.json)", "value"],
                                           [[f"`{k}`", v] for k, v in rows]), ""]
    cfg_src = record.get("config") if isinstance(record.get("config"), Mapping) else info.get("config") or {}
    shown = [(g, cfg_src[g]) for g in settings if isinstance(cfg_src.get(g), Mapping)]
    if shown:
        lines += ["### Settings", "", *_table(["option", "value"], [[f"`{k}`", v] for g, node in shown
                                                                    for k, v in _flatten(node, f"{g}.") if v != ""]),
                  ""]
    data = record.get("data") if isinstance(record.get("data"), Mapping) else {}
    texts = [(part, d) for part, d in data.items() if isinstance(d, Mapping) and d.get("source")]
    if texts:
        lines += ["### Data", ""]
        for part, d in texts:
            counts = ", ".join(f"{k} {_fmt(v)}" for k, v in d.items()
                               if k not in ("source", "description") and finite_number(v) is not None)
            lines.append(f"- {part.capitalize()} text `{d['source']}`" + (f" ({counts})" if counts else "")
                         + (f": {_fmt(d['description'])}" if d.get("description") else ""))
        lines.append("")
    header, layer_rows, layer_notes = _layer_rows(config)
    if layer_rows:
        lines += ["### Layers", ""]
        if layer_notes:
            lines += [", ".join(f"`{k}` {_fmt(v)}" for k, v in layer_notes) + " (config.json)", ""]
        lines += ["<details><summary>Per decoder layer (config.json)</summary>", "", *_table(header, layer_rows), "",
                  "</details>", ""]

    # --- evaluation
    sides = _eval_sides(record)
    if sides:
        this = label if label in sides else next((s for s in reversed(list(sides)) if s != "base"), None)
        names = [f"{s} (this checkpoint)" if s == this else s for s in sides]
        metric_rows, notes = _metric_rows(sides)
        if metric_rows:
            lines += ["## Evaluation", "", *_table(["metric", *names], metric_rows), ""]
            lines += [f"- {n}" for n in notes]
            lines.append("")

    # --- use
    remote = bool(config.get("auto_map"))
    trc = ", trust_remote_code=True" if remote else ""
    lines += ["## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'path = "path/to/this/folder"  # or its Hub repo id once uploaded',
              f"model = AutoModelForCausalLM.from_pretrained(path{trc})",
              f"tokenizer = AutoTokenizer.from_pretrained(path{trc})", "```", ""]
    if remote:
        files = sorted({str(v).split(".")[0] + ".py" for v in config["auto_map"].values()})
        lines += [f"`config.json` maps the classes to {', '.join(f'`{f}`' for f in files)} in this folder "
                  "(torch and transformers only, no prunelab): hence `trust_remote_code=True`.", ""]
    else:
        lines += [f"A stock `{arch[0] if arch else 'transformers'}` checkpoint: no remote code.", ""]
    for title_, body in (sections or {}).items():
        lines += [f"## {title_}", "", body.strip(), ""]

    # --- provenance
    lines += ["## How it was made", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines.append("prunelab " + (f"commit `{info['git_commit']}`" if info.get("git_commit") else "(commit unknown)")
                 + ". The full resolved configuration is `config` in `checkpoint_info.json`"
                 + (", and the run's record is its `metrics.json`." if record else "."))
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(model_dir: str | Path, record: Optional[Mapping[str, Any]] = None, *, warn: bool = False,
                     **kwargs: Any) -> Optional[Path]:
    """Write ``<model_dir>/README.md`` (atomically) from its checkpoint_info.json, config.json, the source
    models' own files and ``record``; ``kwargs`` go to :func:`model_card`. ``warn``: a failure is a warning
    and None (the checkpoint is complete without its card), except a full disk (RunDirError)."""
    model_dir = Path(model_dir)
    try:
        info = json.loads((model_dir / "checkpoint_info.json").read_text())
        config_file = model_dir / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        sources = {key: source_facts(info.get(key)) for key, _ in _SOURCES if isinstance(info.get(key), Mapping)}
        kwargs.setdefault("params", _safetensors_params(model_dir))
        text = model_card(info, config, record, sources=sources, **kwargs)
        return atomic_write_text(model_dir / CARD_NAME, text)
    except RunDirError:
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        if not warn:
            raise
        log.warning("model card of %s not written: %s: %s", model_dir, type(e).__name__, e)
        return None
