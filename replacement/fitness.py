"""How good a hybrid is, on calibration tokens: KL divergence to the donor (default) or perplexity. Lower is better.

    fit = HybridFitness(base, donor_layers, tokens, targets=donor_logprobs(donor_model, tokens))
    fit((13, 17), 1024)   # KL(donor || hybrid) per token, on the first 1024 calibration tokens

Every candidate shares the base model's computation up to its first swapped layer, so the base's hidden states
at every layer input are computed once and a candidate runs only the layers from its first swapped one
(``prefix_cache``): on average about a third of the forward is skipped for k = 2 of 30 layers. Donor targets
are the donor's next-token log-probabilities, computed once and kept in float16.

Memory (what this module holds): on the host, the donor targets (``rows x (seq - 1) x vocab`` float16) and the
prefix cache (``layers x rows x seq x hidden`` in the model's dtype); where the model runs, one batch of
``batch`` rows through the model (the prefix build: every layer's output of that batch) and ONE row's float32
logits and KL terms at a time (``seq x vocab x 4`` bytes each, a few of them), never the batch's.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from core.models.llama import cache_kwarg
from replacement.hybrid import swapped


def _windows(tokens: "torch.Tensor", fidelity: Optional[int]) -> "torch.Tensor":
    """The first ``fidelity`` tokens as whole rows of ``tokens`` ``[n, seq]`` (at least one row)."""
    if fidelity is None:
        return tokens
    rows = max(1, math.ceil(fidelity / tokens.shape[1]))
    return tokens[:rows]


def donor_logprobs(model: "nn.Module", tokens: "torch.Tensor", batch: int = 4) -> "torch.Tensor":
    """The donor's next-token log-probabilities ``[n, seq - 1, vocab]`` in float16 (CPU), one row's float32 logits
    at a time."""
    device = next(model.parameters()).device
    out = torch.empty(tokens.shape[0], tokens.shape[1] - 1, model.config.vocab_size, dtype=torch.float16)
    with torch.no_grad():
        for s in range(0, tokens.shape[0], batch):
            x = tokens[s:s + batch].to(device)
            for r, logits in enumerate(_row_logits(model, x)):
                out[s + r] = torch.log_softmax(logits[:-1].float(), -1).to(torch.float16).cpu()
    return out


def _row_logits(model: "nn.Module", ids: "torch.Tensor", hidden: Optional["torch.Tensor"] = None):
    """Each row's logits ``[seq, vocab]`` (the model's dtype), from the final hidden states (``hidden``, after the
    final norm, or the model's own forward of ``ids``): one row through the LM head at a time."""
    if hidden is None:
        if not (hasattr(model, "model") and hasattr(model, "lm_head")):
            yield from model(input_ids=ids, use_cache=False).logits
            return
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    for h in hidden:
        yield model.lm_head(h)


class HybridFitness:
    """``fitness(candidate, fidelity) -> float`` for the search engine: swap ``donor[i]`` for i in candidate."""

    def __init__(self, base: "nn.Module", donor: Mapping[int, "nn.Module"] | Sequence["nn.Module"],
                 tokens: "torch.Tensor", *, metric: str = "kl", targets: Optional["torch.Tensor"] = None,
                 prefix_cache: bool = True, batch: int = 4):
        if metric not in ("kl", "ppl"):
            raise ValueError(f"fitness metric {metric!r}: kl | ppl")
        if metric == "kl" and targets is None:
            raise ValueError("fitness=kl needs the donor's log-probabilities (donor_logprobs)")
        self.base, self.donor, self.tokens, self.metric = base, donor, tokens, metric
        self.targets, self.batch = targets, batch
        self.device = next(base.parameters()).device
        self.prefix: Optional[list[torch.Tensor]] = None  # per row batch: [layers + 1] hidden states
        if prefix_cache:
            self.prefix = []
            with torch.no_grad():
                for s in range(0, tokens.shape[0], batch):
                    out = base.model(input_ids=tokens[s:s + batch].to(self.device), use_cache=False,
                                     output_hidden_states=True)
                    # hidden_states[i] is the input of layer i (the last entry is after the final norm: dropped)
                    self.prefix.append(torch.stack(out.hidden_states[:-1]).cpu())

    def __call__(self, candidate: Sequence[int], fidelity: Optional[int] = None) -> float:
        x = _windows(self.tokens, fidelity)
        total, count = 0.0, 0
        with torch.no_grad(), swapped(self.base, {i: self.donor[i] for i in candidate}):
            for b, s in enumerate(range(0, x.shape[0], self.batch)):
                ids = x[s:s + self.batch].to(self.device)
                for r, logits in enumerate(self._logits(ids, b, min(candidate) if candidate else 0)):
                    logits = logits[:-1].float()  # one row: [seq - 1, vocab]
                    if self.metric == "kl":
                        p_log = self.targets[s + r].to(self.device).float()
                        q_log = torch.log_softmax(logits, -1)
                        total += (p_log.exp() * (p_log - q_log)).sum().item()
                    else:
                        total += F.cross_entropy(logits, ids[r, 1:], reduction="sum").item()
                count += ids[:, 1:].numel()
        mean = total / count
        return mean if self.metric == "kl" else math.exp(mean)

    def _logits(self, ids: "torch.Tensor", batch_index: int, first: int):
        """Each row's logits of the (swapped) model, one row at a time; with the prefix cache, only layers >=
        ``first`` run."""
        model = self.base
        if self.prefix is None or first == 0:
            return _row_logits(model, ids)
        inner = model.model
        h = self.prefix[batch_index][first, : ids.shape[0]].to(self.device)
        position_ids = torch_arange(ids.shape[1], self.device)
        mask = create_causal_mask(config=inner.config, inputs_embeds=h, attention_mask=None,
                                  position_ids=position_ids, **{cache_kwarg(): None})
        pos = inner.rotary_emb(h, position_ids=position_ids)
        for layer in inner.layers[first: inner.config.num_hidden_layers]:
            h = layer(h, attention_mask=mask, position_embeddings=pos, position_ids=position_ids, use_cache=False)
        return _row_logits(model, ids, inner.norm(h))


def torch_arange(n: int, device: "torch.device") -> "torch.Tensor":
    return torch.arange(n, device=device).unsqueeze(0)
