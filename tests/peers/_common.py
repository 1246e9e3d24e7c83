"""What every peer script (tests/peers/<method>_original.py) needs the same way, in the peer's own environment
(torch and an older transformers; never prunelab): the model folder as transformers 4.41 reads it, and prunelab's
perplexity protocol, so both sides of a comparison are scored alike. The scripts run as files, so this module is
found next to them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


def local_model_dir(src: Path, tmp: Path, tokenizer: bool = False) -> Path:
    """``src``'s files linked into ``tmp``, with a config.json that transformers 4.41 reads as the same model;
    ``tokenizer``: also the tokenizer files as 4.41 / tokenizers 0.19 read them (a peer that loads the tokenizer)."""
    cfg = json.loads((src / "config.json").read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"{src}: rope_type {rope['rope_type']!r} is not translated for transformers 4.41")
    cfg.pop("rope_parameters", None)
    cfg["torch_dtype"] = cfg.pop("dtype", cfg.get("torch_dtype", "float32"))
    written = {"config.json": cfg, **(_tokenizer_files(src) if tokenizer else {})}
    for f in src.iterdir():
        if f.is_file() and written.get(f.name) is None:
            os.symlink(f.resolve(), tmp / f.name)
    for name, content in written.items():
        if content is not None:
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False))
    return tmp


def _tokenizer_files(src: Path) -> dict[str, Any]:
    """tokenizer_config.json and tokenizer.json as transformers 4.41 / tokenizers 0.19 read them (None: absent)."""
    tok = json.loads((src / "tokenizer_config.json").read_text()) if (src / "tokenizer_config.json").is_file() else None
    if tok is not None and tok.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name for it
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    fast = json.loads((src / "tokenizer.json").read_text()) if (src / "tokenizer.json").is_file() else None
    merges = (fast or {}).get("model", {}).get("merges") or []
    if merges and isinstance(merges[0], list):  # tokenizers >= 0.20 writes pairs; 0.19 (for 4.41) reads "a b"
        if any(" " in part for pair in merges for part in pair):
            raise SystemExit(f"{src}: a BPE merge holds a space; it cannot be written for tokenizers 0.19")
        fast["model"]["merges"] = [" ".join(pair) for pair in merges]
    return {"tokenizer_config.json": tok, "tokenizer.json": fast}


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 4) -> float:
    """prunelab's analysis.perplexity.perplexity (value only)."""
    n_win = tokens.shape[1] // seq_len
    windows = tokens[0, : n_win * seq_len].view(n_win, seq_len)
    nll, count = 0.0, 0
    for i in range(0, n_win, batch_size):
        x = windows[i:i + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(nll / count)
