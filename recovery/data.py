"""Training text for recovery fine-tuning: rows of token ids, and a held-out split of the same text.

Sources (``recovery.data.source``):
- the project's offline texts (``austen``, ``boolq``, ``sciq``, ``qa``, ``news``, ``mix``; :mod:`core.data.text`) and a
  local ``text_file`` (``.txt`` paragraphs or ``.jsonl`` with ``text_field``): running text, packed into rows of
  ``seq_len`` tokens (documents joined by EOS) or one document per row (``packing=false``);
- ``instructions``: a local JSONL of ``{"instruction", "input", "output"}`` records (Alpaca's layout), each turned
  into a chat with the tokenizer's chat template (Alpaca's prompt when it has none); by default the loss is on
  the response only (LLM-Pruner's ``post_training.py`` default).

Every text is split once: training reads the first 90% of its paragraphs (of each component of a mix; of the
records of an instruction file) and the held-out text (validation perplexity, early stopping) the last 10%, the
same cut :mod:`core.data.text` uses for evaluation, so when the evaluation text is the training source itself, it is
the held-out split, which training never reads. :func:`check_disjoint` refuses training text that also occurs in
an evaluation text. Rows are a deterministic function of the text, the tokenizer and the seed: a resumed run
rebuilds them and continues at its step.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from core.data.text import (HOLDOUT_FRACTION, TextSource, TextSpec, eval_tokens, load_documents,
                       mix_counts, mix_weights)
from core.run.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

TEXT_SOURCES = ("austen", "boolq", "sciq", "qa", "news", "mix", "text_file")
SOURCES = (*TEXT_SOURCES, "instructions")
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclass(frozen=True)
class DataSpec:
    """Which text recovery trains on (``recovery.data``); checked without reading it (a missing file fails here)."""

    source: str = "mix"  # austen | boolq | sciq | qa | news | mix | text_file | instructions
    path: Optional[str] = None  # text_file (.txt / .jsonl) or instructions (.jsonl)
    text_field: str = "text"  # .jsonl text files
    mix: dict[str, float] = field(default_factory=dict)  # source=mix only: component -> weight ({}: DEFAULT_MIX)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"recovery.data.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.source in ("text_file", "instructions"):
            if not self.path:
                raise ConfigError(f"recovery.data.source={self.source} needs recovery.data.path=<a local "
                                  f"{'.jsonl' if self.source == 'instructions' else '.txt or .jsonl'} file>")
            p = Path(self.path).expanduser()
            if not p.is_file():
                raise DataError(f"recovery.data.path={self.path}: no such file")
            if self.source == "instructions" and p.suffix != ".jsonl":
                raise DataError(f"recovery.data.path={self.path}: instruction data is JSONL (one {{instruction, "
                                "input, output} object per line)")
        if self.source == "mix":
            try:
                mix_weights(self.text_spec())
            except DataError as e:
                raise ConfigError(str(e).replace("data.mix", "recovery.data.mix")) from None

    def text_spec(self) -> TextSpec:
        """The :class:`core.data.text.TextSpec` of a running-text source (instructions have none)."""
        if self.source == "instructions":
            raise ValueError("instruction data is not a core text source")
        mix = tuple((str(k), float(v)) for k, v in self.mix.items()) if self.source == "mix" else ()
        return TextSpec(self.source, self.path, self.text_field, mix)

    def to_dict(self) -> dict[str, Any]:
        """The spec as recorded (the mix only where it is read)."""
        return {"source": self.source, "path": self.path, "text_field": self.text_field,
                "mix": dict(self.mix) if self.source == "mix" else {}}


@dataclass(frozen=True)
class Example:
    """One instruction record."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Corpus:
    """A training text split into what training reads and the held-out rest (disjoint by construction).

    Running text: ``train`` / ``heldout`` are :class:`TextSource` (a mix keeps its ``parts`` and ``weights``).
    Instructions: tuples of :class:`Example`.
    """

    name: str
    description: str
    kind: str  # "text" | "instructions"
    train: Any
    heldout: Any

    def train_paragraphs(self) -> list[str]:
        if self.kind == "instructions":
            return [t for e in self.train for t in (e.instruction, e.input, e.output) if t]
        return list(self.train.documents)


def _split(src: TextSource) -> tuple[TextSource, TextSource]:
    """(first 90%, last 10%) of the paragraphs: :meth:`TextSource.split`'s cut, named for training."""
    cal, ev = src.split("calibration"), src.split("evaluation")
    return (TextSource(f"{src.name}[train]", f"{src.description}; training split ({len(cal.documents)} paragraphs)",
                       cal.documents),
            TextSource(f"{src.name}[held-out]", f"{src.description}; held-out split ({len(ev.documents)} paragraphs)",
                       ev.documents))


def _read_instructions(path: Path) -> list[Example]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ex = Example(str(rec["instruction"]).strip(), str(rec.get("input") or "").strip(),
                         str(rec["output"]).strip())
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{i + 1}: not a JSON object with 'instruction' and 'output' (and optional "
                            "'input') fields") from None
        if ex.instruction and ex.output:
            out.append(ex)
    if len(out) < 2:
        raise DataError(f"{path} has {len(out)} usable instruction records: at least 2 are needed (the last 10% are "
                        "held out for validation)")
    return out


def load_corpus(spec: DataSpec, cache_dir: str | Path) -> Corpus:
    """Read the text and split it into training and held-out parts."""
    if spec.source == "instructions":
        path = Path(spec.path or "").expanduser()
        examples = _read_instructions(path)
        cut = len(examples) - max(1, int(len(examples) * HOLDOUT_FRACTION))
        return Corpus(f"instructions:{path.name}", f"instruction records {path.resolve()} ({len(examples)} records; "
                      f"training {cut}, held-out {len(examples) - cut})", "instructions",
                      tuple(examples[:cut]), tuple(examples[cut:]))
    ts = spec.text_spec()
    if ts.source != "mix":
        train, held = _split(load_documents(ts, cache_dir))
        return Corpus(train.name.removesuffix("[train]"), train.description, "text", train, held)
    trains, helds, weights = [], [], []
    for name, weight in mix_weights(ts):
        t, h = _split(load_documents(TextSpec(name), cache_dir))
        trains.append(t)
        helds.append(h)
        weights.append(weight)
    label = "mix(" + ",".join(f"{n}={w:.3g}" for n, w in zip((p.name.split("[")[0] for p in trains), weights)) + ")"
    desc = "mix, each row from one component by weight: " + "; ".join(
        f"{t.name} {w:.0%} ({len(t.documents):,} paragraphs; held out {len(h.documents):,})"
        for t, h, w in zip(trains, helds, weights))
    def merged(parts: list[TextSource], suffix: str) -> TextSource:
        return TextSource(f"{label}[{suffix}]", desc, tuple(d for p in parts for d in p.documents), tuple(parts),
                          tuple(weights))
    return Corpus(label, desc, "text", merged(trains, "train"), merged(helds, "held-out"))


_WS = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def check_disjoint(corpus: Corpus, evaluation: Sequence[TextSource]) -> None:
    """DataError when a training paragraph is also a paragraph of an evaluation text (whitespace and case aside).

    The built-in sources never share text with the evaluation texts, and a source that is also the evaluation text
    is split (training reads its first 90%); this catches a local file that copies evaluation text.
    """
    train = {_norm(p) for p in corpus.train_paragraphs() if len(p) >= 40}  # short strings ("Yes.") prove nothing
    for src in evaluation:
        shared = [d for d in src.documents if _norm(d) in train]
        if shared:
            raise DataError(f"recovery.data: {len(shared)} paragraph(s) of the training text {corpus.name} are also in "
                            f"the evaluation text {src.name} (e.g. {shared[0][:60]!r}...): training must never see "
                            "evaluation text; remove them or evaluate on another text")


# --------------------------------------------------------------------------- rows


@dataclass
class Rows:
    """Training rows in the order training reads them: token ids and, per row, how many leading tokens carry no
    loss (an instruction's prompt; 0 for running text). ``epochs``: how many passes over the training split the
    rows take (a fraction: the share of it they read)."""

    ids: list[list[int]]
    prompt_len: list[int]
    epochs: float
    tokens: int  # tokens in all rows
    target_tokens: int  # tokens that carry loss (next-token targets)


class _Stream:
    """Rows cut from a text, document after document in a seeded order, re-shuffled for every pass."""

    def __init__(self, tokenizer: Any, docs: Sequence[str], seq_len: int, packing: bool, rng: random.Random,
                 name: str):
        if not docs:
            raise DataError(f"recovery.data: {name} has no paragraphs to train on: use a longer text")
        self.tok, self.docs, self.seq_len, self.packing = tokenizer, docs, seq_len, packing
        self.rng, self.name = rng, name
        self.eos = tokenizer.eos_token_id
        self.order: list[int] = []
        self.buf: list[int] = []
        self.passes, self.done_docs = 0, 0
        self.pass_tokens = 0  # tokens in one full pass (known once a pass ended)
        self._tokens_this_pass = 0

    def _next_doc(self) -> list[int]:
        if not self.order:
            if self.passes and self._tokens_this_pass == 0:
                raise DataError(f"recovery.data: {self.name} tokenises to nothing")
            if self.passes:
                self.pass_tokens = self.pass_tokens or self._tokens_this_pass
            self.order = list(range(len(self.docs)))
            self.rng.shuffle(self.order)
            self.order.reverse()  # pop() from the end reads the shuffled order front to back
            self.passes += 1
            self._tokens_this_pass = 0
        ids = self.tok(self.docs[self.order.pop()], add_special_tokens=False)["input_ids"]
        if self.eos is not None:
            ids = ids + [self.eos]
        self._tokens_this_pass += len(ids)
        self.done_docs += 1
        return ids

    def row(self) -> list[int]:
        if not self.packing:
            return self._next_doc()[: self.seq_len]
        while len(self.buf) < self.seq_len:
            self.buf += self._next_doc()
        out, self.buf = self.buf[: self.seq_len], self.buf[self.seq_len:]
        return out

    def epochs(self) -> float:
        """Passes read so far, the current one as the share of its documents already read."""
        if not self.docs:
            return 0.0
        return (self.passes - 1) + (len(self.docs) - len(self.order)) / len(self.docs) if self.passes else 0.0


def _check_one_batch(tokenizer: Any, docs: Sequence[str], need: int, name: str) -> None:
    """DataError when all of ``docs`` hold fewer than ``need`` tokens (reads only as much as it takes to know)."""
    total = 0
    for d in docs:
        total += len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1
        if total >= need:
            return
    raise DataError(f"recovery.data: the training text {name} has {total:,} tokens, fewer than one batch of "
                    f"{need:,} (recovery.micro_batch x recovery.seq_len): use a longer text or a smaller batch")


def text_rows(tokenizer: Any, corpus: Corpus, n_rows: int, seq_len: int, *, packing: bool, seed: int,
              batch_tokens: int) -> Rows:
    """``n_rows`` rows of running text; a mix gives each component its share of the rows (:func:`core.data.text.mix_counts`)
    in a seeded order, each component a stream of its own (seeded by its name, so one component's rows stay the same
    when another's weight changes)."""
    src: TextSource = corpus.train
    _check_one_batch(tokenizer, src.documents, batch_tokens, src.name)
    parts = src.parts or (src,)
    weights = src.weights or (1.0,)
    streams = [_Stream(tokenizer, p.documents, seq_len, packing, random.Random(f"{seed}/{p.name.split('[')[0]}"),
                       p.name) for p in parts]
    counts = mix_counts(weights, n_rows, seed) if len(parts) > 1 else [n_rows]
    order = [i for i, n in enumerate(counts) for _ in range(n)]
    random.Random(seed).shuffle(order)
    ids = [streams[i].row() for i in order]
    epochs = sum(w * s.epochs() for w, s in zip(weights, streams))
    tokens = sum(map(len, ids))
    return Rows(ids, [0] * len(ids), epochs, tokens, sum(max(0, len(r) - 1) for r in ids))


def _chat(tokenizer: Any, ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, full ids) of one record: the tokenizer's chat template (user turn, assistant turn), or
    Alpaca's prompt with EOS after the response when the tokenizer has no template."""
    user = ex.instruction + (f"\n\n{ex.input}" if ex.input else "")
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                               tokenize=False)
        full = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                              {"role": "assistant", "content": ex.output}], tokenize=False)
    else:
        prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if ex.input else "",
                                      instruction=ex.instruction,
                                      input=f"### Input:\n{ex.input}\n\n" if ex.input else "")
        full = prompt + ex.output + (tokenizer.eos_token or "")
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    f = tokenizer(full, add_special_tokens=False)["input_ids"]
    if f[: len(p)] != p:  # the template's text does not tokenise at the boundary the same way: build it from parts
        f = p + tokenizer(full[len(prompt):] if full.startswith(prompt) else ex.output,
                          add_special_tokens=False)["input_ids"]
    return p, f


def instruction_rows(tokenizer: Any, examples: Sequence[Example], n_rows: int, seq_len: int, *, seed: int,
                     train_on_inputs: bool, name: str) -> Rows:
    """``n_rows`` rows, one record each (seeded order, re-shuffled every pass), truncated to ``seq_len``; the prompt
    carries no loss unless ``train_on_inputs``. Records whose prompt alone fills ``seq_len`` are left out."""
    encoded = []
    for ex in examples:
        p, f = _chat(tokenizer, ex)
        f = f[:seq_len]
        if len(p) < len(f):
            encoded.append((f, 0 if train_on_inputs else len(p)))
    if not encoded:
        raise DataError(f"recovery.data: every record of {name} has a prompt of recovery.seq_len={seq_len} tokens or "
                        "more, leaving no response to train on: raise recovery.seq_len")
    rng = random.Random(seed)
    ids, prompt_len, order, passes = [], [], [], 0
    while len(ids) < n_rows:
        if not order:
            order = list(range(len(encoded)))
            rng.shuffle(order)
            passes += 1
        f, p = encoded[order.pop(0)]
        ids.append(f)
        prompt_len.append(p)
    epochs = (passes - 1) + (len(encoded) - len(order)) / len(encoded)
    return Rows(ids, prompt_len, epochs, sum(map(len, ids)),
                sum(len(f) - max(p, 1) for f, p in zip(ids, prompt_len)))


def training_rows(tokenizer: Any, corpus: Corpus, n_rows: int, seq_len: int, *, packing: bool, seed: int,
                  batch_tokens: int, train_on_inputs: bool = False) -> Rows:
    if corpus.kind == "instructions":
        return instruction_rows(tokenizer, corpus.train, n_rows, seq_len, seed=seed, train_on_inputs=train_on_inputs,
                                name=corpus.name)
    return text_rows(tokenizer, corpus, n_rows, seq_len, packing=packing, seed=seed, batch_tokens=batch_tokens)


def rows_per_epoch(tokenizer: Any, corpus: Corpus, seq_len: int, packing: bool) -> int:
    """Rows in one pass over the training split (tokenises all of it: used for ``recovery.epochs``)."""
    if corpus.kind == "instructions":
        return len(corpus.train)
    docs = corpus.train.documents
    if not packing:
        return len(docs)
    total = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    return max(1, total // seq_len)


def heldout_rows(tokenizer: Any, corpus: Corpus, seq_len: int, max_tokens: int) -> Rows:
    """Validation rows from the held-out split: running text as non-overlapping windows of ``seq_len`` tokens (a
    mix: each component its weight's share of ``max_tokens``, from the start of its held-out paragraphs, as
    :func:`core.data.text.eval_tokens` reads an evaluation text); instructions as one row per record (prompt masked)
    until ``max_tokens``."""
    if corpus.kind == "instructions":
        ids, plen, total = [], [], 0
        for ex in corpus.heldout:
            p, f = _chat(tokenizer, ex)
            f = f[:seq_len]
            if len(p) >= len(f):
                continue
            if ids and total + len(f) > max_tokens:
                break
            ids.append(f)
            plen.append(len(p))
            total += len(f)
        if not ids:
            raise DataError(f"recovery.data: no held-out record of {corpus.name} fits recovery.seq_len={seq_len}")
        return Rows(ids, plen, 0.0, total, sum(len(f) - p for f, p in zip(ids, plen)))
    src: TextSource = corpus.heldout
    parts = src.parts or (src,)
    weights = src.weights or (1.0,)
    ids = []
    for part, w in zip(parts, weights):
        budget = max(seq_len, int(round(max_tokens * w / seq_len)) * seq_len)
        t = eval_tokens(tokenizer, part, budget)[0].tolist()
        ids += [t[i:i + seq_len] for i in range(0, len(t) - seq_len + 1, seq_len)]
    if not ids:
        raise DataError(f"recovery.data: the held-out 10% of {corpus.name} is shorter than one window of "
                        f"recovery.seq_len={seq_len} tokens: use a longer text")
    return Rows(ids, [0] * len(ids), 0.0, sum(map(len, ids)), sum(len(r) - 1 for r in ids))


def collate(rows: Rows, start: int, size: int,
            pad_id: int) -> tuple["torch.Tensor", "torch.Tensor", Optional["torch.Tensor"]]:
    """(input_ids, labels, attention_mask) of rows ``start .. start + size``, right-padded to the longest; labels
    are -100 on padding and on prompts; the mask is None when no row is padded."""
    import torch  # not at config validation, which reads DataSpec from this module

    chunk = rows.ids[start:start + size]
    plen = rows.prompt_len[start:start + size]
    width = max(map(len, chunk))
    ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    for i, (r, p) in enumerate(zip(chunk, plen)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        labels[i, p: len(r)] = ids[i, p: len(r)]
        mask[i, : len(r)] = 1
    return ids, labels, (None if bool(mask.all()) else mask)


def describe_rows(rows: Rows) -> dict[str, Any]:
    return {"rows": len(rows.ids), "tokens": rows.tokens, "target_tokens": rows.target_tokens,
            "epochs": round(rows.epochs, 4)}


def steps_for(tokens: Optional[int], epochs: Optional[float], steps: Optional[int], *, rows_per_step: int,
              seq_len: int, rows_in_epoch: Optional[int] = None) -> int:
    """Optimizer steps from ``epochs`` (needs ``rows_in_epoch``), else ``tokens`` (rows of ``seq_len``), else
    ``steps``."""
    if epochs is not None:
        return max(1, math.ceil(epochs * (rows_in_epoch or 0) / rows_per_step))
    if tokens is not None:
        return max(1, math.ceil(tokens / (rows_per_step * seq_len)))
    return int(steps or 0)
