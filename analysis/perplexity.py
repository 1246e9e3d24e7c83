"""Perplexity over non-overlapping windows (the protocol is returned with the number)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 4,
               progress: bool = True, source: str = "") -> dict:
    """``tokens``: ``[1, n]``. Windows of ``seq_len`` tokens, each scored on its last ``seq_len - 1``.

    Returns ``{"value", "nll", "seq_len", "windows", "tokens", "source", "status"}``; a non-finite
    result is reported with ``status: "failed"`` and ``value: None``, never as a number.
    """
    device = next(model.parameters()).device
    n_win = tokens.shape[1] // seq_len
    if n_win == 0:
        raise ValueError(f"{tokens.shape[1]} evaluation tokens are fewer than one window of {seq_len}")
    windows = tokens[0, : n_win * seq_len].view(n_win, seq_len)
    nll, count = 0.0, 0
    for i in tqdm(range(0, n_win, batch_size), desc=f"perplexity ({n_win} x {seq_len})", disable=not progress):
        x = windows[i:i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()  # [b, seq_len - 1, vocab]
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
    mean = nll / count
    value = math.exp(mean) if math.isfinite(mean) else float("nan")
    ok = math.isfinite(value)
    return {"value": value if ok else None, "status": "ok" if ok else "failed", "nll": mean if ok else None,
            "seq_len": seq_len, "windows": n_win, "tokens": count, "source": source}
