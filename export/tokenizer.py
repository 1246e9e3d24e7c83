"""The ``tokenizer.ggml.*`` metadata of a GGUF file: copied from a source GGUF, or built from an HF tokenizer.

llama.cpp tokenizes with the vocabulary, merges and special ids stored in the file, and picks its pre-tokenizer
(the regex that splits text before BPE) by the *name* in ``tokenizer.ggml.pre``. A source GGUF (the embedded
SmolLM2) already has all of it: :func:`from_gguf` copies every ``tokenizer.*`` field with its type. An HF
tokenizer is translated by :func:`from_hf` the way llama.cpp's converter does for byte-level BPE vocabularies
(GPT-2, Llama 3, Qwen 2, SmolLM): tokens with their types (normal / control / user-defined / unused padding),
merges, special ids, whether BOS is added, the chat template. The pre-tokenizer name is read off the tokenizer's
own ``pre_tokenizer`` description (:func:`pre_tokenizer_name`), never guessed: one llama.cpp does not know is an
error unless the caller names it. SentencePiece / byte-fallback vocabularies are refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gguf import GGUFReader, GGUFValueType, GGUFWriter, TokenType

from export.layout import ExportError

# The split regexes of tokenizers llama.cpp implements, as their tokenizer.json writes them, and llama.cpp's
# name for each (its llama-vocab.cpp). ByteLevel(use_regex=True) alone is GPT-2's split.
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
NO_MERGE = "[no-merges] [no-merges]"  # a merge of two multi-character symbols no merge ever builds: never applies


@dataclass
class Field:
    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: Optional[GGUFValueType] = None


@dataclass
class GGUFTokenizer:
    """``tokenizer.*`` fields for a GGUF file, and where they came from."""

    fields: list[Field]
    source: str  # "gguf:<file>" | "hf"
    pre: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def get(self, key: str) -> Any:
        return next((f.value for f in self.fields if f.key == key), None)

    @property
    def tokens(self) -> list[str]:
        return list(self.get("tokenizer.ggml.tokens") or [])

    def padded_to(self, n_vocab: int) -> "GGUFTokenizer":
        """Token list (and per-token arrays) padded with unused ``[PAD<i>]`` entries up to the embedding's rows."""
        n = len(self.tokens)
        if n == n_vocab:
            return self
        if n > n_vocab:
            raise ExportError(f"the tokenizer has {n} tokens but the model's embedding only {n_vocab} rows")
        extra = range(n, n_vocab)
        out = []
        for f in self.fields:
            if f.key == "tokenizer.ggml.tokens":
                f = Field(f.key, list(f.value) + [f"[PAD{i}]" for i in extra], f.vtype, f.sub_type)
            elif f.key == "tokenizer.ggml.token_type":
                f = Field(f.key, list(f.value) + [int(TokenType.UNUSED)] * len(extra), f.vtype, f.sub_type)
            elif f.key == "tokenizer.ggml.scores":
                f = Field(f.key, list(f.value) + [-1000.0] * len(extra), f.vtype, f.sub_type)
            out.append(f)
        return GGUFTokenizer(out, self.source, self.pre, [*self.notes, f"{len(extra)} unused tokens padded"])

    def write(self, writer: GGUFWriter) -> None:
        for f in self.fields:
            writer.add_key_value(f.key, f.value, f.vtype, sub_type=f.sub_type)


def from_gguf(path: str | Path) -> GGUFTokenizer:
    """Every ``tokenizer.*`` field of the GGUF file at ``path``, with its type, unchanged."""
    reader = GGUFReader(str(path))
    fields = []
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = GGUFValueType(f.types[0])
        sub = GGUFValueType(f.types[-1]) if vtype == GGUFValueType.ARRAY else None
        fields.append(Field(key, f.contents(), vtype, sub))
    if not any(f.key == "tokenizer.ggml.tokens" for f in fields):
        raise ExportError(f"{path} has no tokenizer.ggml.tokens to copy")
    pre = next((f.value for f in fields if f.key == "tokenizer.ggml.pre"), None)
    return GGUFTokenizer(fields, f"gguf:{Path(path).name}", pre)


def _canonical(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _canonical(v) for k, v in node.items() if k not in ("trim_offsets", "prepend_scheme")}
    if isinstance(node, list):
        return [_canonical(v) for v in node]
    return node


def pre_tokenizer_name(pre: Optional[dict]) -> Optional[str]:
    """llama.cpp's name for a byte-level BPE ``pre_tokenizer`` (tokenizer.json), or None if it is not one it has."""
    if not pre:
        return None
    pre = _canonical(pre)
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _adds(tokenizer: Any, token_id: Optional[int], at_start: bool) -> bool:
    """Does encoding a plain text add ``token_id`` at its start (BOS) or end (EOS)?"""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0 if at_start else -1] == token_id and len(ids) > 1


def from_hf(tokenizer: Any, pre: Optional[str] = None) -> GGUFTokenizer:
    """``tokenizer.ggml.*`` fields for a fast HF tokenizer with a byte-level BPE model.

    ``pre`` names llama.cpp's pre-tokenizer when :func:`pre_tokenizer_name` cannot tell it from the tokenizer.
    """
    if tokenizer is None:
        raise ExportError("the model has no tokenizer: GGUF needs one (save the checkpoint with its tokenizer, or "
                          "export a model whose base is the embedded GGUF)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{type(tokenizer).__name__} is a slow tokenizer: the GGUF exporter reads a fast "
                          "(tokenizers) one's tokenizer.json")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
        raise ExportError(f"tokenizer model {kind} (SentencePiece-style) is not supported by this GGUF exporter: "
                          "byte-level BPE only (GPT-2, Llama 3, Qwen 2, SmolLM vocabularies)")
    detected = pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None and detected is None:
        raise ExportError("llama.cpp has no pre-tokenizer known to match this tokenizer's pre_tokenizer "
                          f"{json.dumps(spec.get('pre_tokenizer'))[:200]}: name one with export.tokenizer_pre=<name> "
                          "(llama.cpp's tokenizer.ggml.pre values, e.g. gpt-2, llama-bpe, qwen2, smollm)")
    pre = pre or detected
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
        elif tok in added:
            tokens.append(tok)
            types.append(int(TokenType.CONTROL if added[tok].special else TokenType.USER_DEFINED))
        else:
            tokens.append(tok)
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    notes = []
    if not merges:
        merges = [NO_MERGE]  # llama.cpp requires the key; an empty array cannot be written
        notes.append("the vocabulary has no merges: one merge that never applies written in their place")
    fields = [Field("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING),
              Field("tokenizer.ggml.pre", pre, GGUFValueType.STRING),
              Field("tokenizer.ggml.tokens", tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
              Field("tokenizer.ggml.token_type", types, GGUFValueType.ARRAY, GGUFValueType.INT32),
              Field("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING)]
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            key = "unknown" if name == "unk" else ("padding" if name == "pad" else name)
            fields.append(Field(f"tokenizer.ggml.{key}_token_id", int(tid), GGUFValueType.UINT32))
    fields.append(Field("tokenizer.ggml.add_bos_token", _adds(tokenizer, tokenizer.bos_token_id, True),
                        GGUFValueType.BOOL))
    fields.append(Field("tokenizer.ggml.add_eos_token", _adds(tokenizer, tokenizer.eos_token_id, False),
                        GGUFValueType.BOOL))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields.append(Field("tokenizer.chat_template", template, GGUFValueType.STRING))
    return GGUFTokenizer(fields, "hf", pre, notes)


def same_vocabulary(gguf_tok: GGUFTokenizer, tokenizer: Any) -> bool:
    """True when a GGUF token list spells the HF tokenizer's vocabulary id for id (the model was not re-tokenized)."""
    if tokenizer is None:
        return True
    vocab = tokenizer.get_vocab()
    tokens = gguf_tok.tokens
    return all(i < len(tokens) and tokens[i] == t for t, i in vocab.items())
