"""The fitness of a compressed candidate: KL to the dense model's next-token distributions, at several fidelities.

Shared by the searched allocations (pruning/obs/search.py: MLP widths; pruning/depth.py ``selection=search``: the
set of removed layers). The dense model's log-probabilities on the fitness tokens are computed once
(:meth:`KLFitness.reference`, float32 on the CPU: ``tokens x vocab x 4`` bytes); a candidate is put into the model
by the caller's ``apply`` and scored by one forward of the layers from ``first`` on (the layers before it are the
same in every candidate: their output is computed once). Fidelities are prefixes of whole rows
(:func:`fidelity_rows`: 1/16, 1/4 and all), and the forward runs in chunks that never straddle one
(:func:`fitness_chunks`), so every fidelity sees the same shapes as the reference.

Imports: torch, ``core.models.llama`` and ``pruning.streaming``; never a pruner.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.models.llama import decoder_layers
from pruning.streaming import LayerStream


def fidelity_rows(rows: int) -> list[int]:
    """The fitness rows of each fidelity: 1/16, 1/4 and all (whole rows, distinct)."""
    return sorted({max(1, rows // 16), max(1, rows // 4), rows})


def fitness_chunks(rows: int, fidelity_rows: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """Row ranges ``[a, b)`` of at most ``batch`` rows that never straddle a fidelity's row count, so that every
    fidelity is a prefix of whole chunks (and the reference and a candidate see the same shapes)."""
    cuts = sorted({r for r in fidelity_rows if 0 < r < rows} | {rows})
    out, a = [], 0
    for cut in cuts:
        while a < cut:
            out.append((a, min(cut, a + max(1, batch))))
            a = out[-1][1]
    return out


class KLFitness:
    """``fitness(candidate, tokens) -> float``: mean per-token KL(dense || candidate) on the first ``tokens``
    fitness tokens (whole rows). ``reference`` is :meth:`reference` of the dense model on the same tokens."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, first: int, chunks: list[tuple[int, int]],
                 reference: list[torch.Tensor], apply: Optional[Callable[[Sequence[int]], None]] = None):
        self.model, self.tokens, self.first, self.chunks = model, tokens, first, chunks
        self.reference, self.apply = reference, apply
        self.prefix = _prefix(model, tokens, first, chunks)  # the layers every candidate shares, run once
        self.seconds: dict[int, list[float]] = {}  # tokens -> [evaluations, seconds]

    @staticmethod
    def reference(model: nn.Module, tokens: torch.Tensor, first: int, chunks: list[tuple[int, int]]
                  ) -> list[torch.Tensor]:
        """The dense model's next-token log-probabilities per row, ``[seq - 1, vocab]`` float32 (CPU)."""
        return [lp.cpu() for lp in _logprobs(model, _prefix(model, tokens, first, chunks), first)]

    def __call__(self, candidate: Sequence[int], fidelity: Optional[float] = None) -> float:
        t0 = time.perf_counter()
        if self.apply is not None:
            self.apply(candidate)
        value = self.kl(fidelity)
        spent = self.seconds.setdefault(self.tokens_of(fidelity), [0, 0.0])
        spent[0] += 1
        spent[1] += time.perf_counter() - t0
        return value

    def tokens_of(self, fidelity: Optional[float]) -> int:
        return self.rows_of(fidelity) * self.tokens.shape[1]

    def rows_of(self, fidelity: Optional[float]) -> int:
        rows = self.tokens.shape[0]
        return rows if fidelity is None else min(rows, max(1, math.ceil(fidelity / self.tokens.shape[1])))

    def kl(self, fidelity: Optional[float] = None) -> float:
        """KL of the model as it is now (no variant applied)."""
        rows = self.rows_of(fidelity)
        n = sum(1 for a, b in self.chunks if b <= rows)
        total, count = 0.0, 0
        with torch.no_grad():
            for q, p in zip(_logprobs(self.model, self.prefix[:n], self.first), self.reference):
                total += float(F.kl_div(q, p.to(q.device), reduction="sum", log_target=True))  # sum e^p (p - q)
                count += q.shape[0]
        return total / count


def _prefix(model: nn.Module, tokens: torch.Tensor, first: int, chunks: list[tuple[int, int]]
            ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Per chunk: the hidden states entering layer ``first`` and the keyword arguments the model passes a layer."""
    out = []
    for a, b in chunks:
        stream = LayerStream(model, tokens[a:b], batch_size=0)
        for i, _ in stream:
            if i >= first:
                break
            stream.advance()
        out.append((stream.hidden[0], stream.kwargs[0]))
    return out


def _logprobs(model: nn.Module, prefix: list[tuple[torch.Tensor, dict[str, Any]]], first: int
              ) -> Iterator[torch.Tensor]:
    """Next-token log-probabilities ``[seq - 1, vocab]`` (float32) of each row of the prefix chunks, in order, from
    layer ``first`` (one row's logits at a time: a chunk's would be ``rows x seq x vocab``)."""
    layers = decoder_layers(model)
    with torch.no_grad():
        for h, kw in prefix:
            for layer in layers[first:]:
                y = layer(h, **kw)
                h = y[0] if isinstance(y, tuple) else y
            h = model.model.norm(h)
            for r in h:
                yield torch.log_softmax(model.lm_head(r[:-1]).float(), -1)
