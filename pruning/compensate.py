"""Structured removal of input columns with optimal compensation (OBS / least squares), usable by any pruner.

A projection ``y = W x (+ b)`` (``o_proj``, ``down_proj``: ``W`` is ``[out, n]``) loses whole input columns when
a KV group or an MLP channel is removed. Given ``H = sum_t x_t x_t^T`` over calibration tokens (float64,
:class:`Gram`), the kept columns ``K`` can absorb what the removed ones did:

    W_K' = argmin sum_t ||W x_t - W'_K x_t,K||^2 = (W H_{:,K}) (H_KK)^-1      (least squares, closed form)

computed here as the OBS update: with ``Hinv = (H + damp * mean(diag H) * I)^-1``, removing a set ``S`` changes
the weights by ``dW = -W_S (Hinv_SS)^-1 Hinv_S,:`` (the removed columns become exactly 0) and ``Hinv`` is
downdated by ``Hinv -= Hinv_:,S (Hinv_SS)^-1 Hinv_S,:``; after all removals ``W_K`` equals the damped least-squares
solution. The damping is relative to the mean diagonal of ``H`` and regularises the *change*, not the weights.

Selection after compensation (``select="obs"``): the cost of removing a group ``g`` (its columns ``C``) with the
optimal update of all others is ``tr(W_C (Hinv_CC)^-1 W_C^T)`` (``sum_i W_ij^2 / Hinv_jj`` for one column); the
cheapest groups go first, in ``rounds`` shrinking steps, ``Hinv`` downdated between steps (SlimGPT / ZipLM). Other
criteria give fixed scores instead (:func:`column_scores`: Wanda-sp, FLAP's WIFV, magnitude); compensation then
applies the same update for the chosen set.

Bias: with ``bias=True`` a constant input 1 is appended (``H`` augmented by ``sum x`` and the token count), so the
update also refits the output bias: the removed columns' mean contribution is absorbed (FLAP's bias compensation
is the special case of no other change).

Guard: a fit from too few tokens for its unknowns follows noise. :func:`relative_error` measures the output error
on held-out calibration tokens, and a pruner keeps the compensated weights only when they beat plain removal there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

SELECTIONS = ("obs", "wanda", "flap", "magnitude")
BLOCK_TOKENS = 4096  # tokens per float32 product accumulated into the float64 Gram matrix


class Gram:
    """``H = sum x x^T`` (float64), ``sum x`` and the token count of ``[..., n]`` inputs, accumulated in blocks."""

    def __init__(self, n: int, device: Optional[torch.device | str] = None):
        self.n = n
        self.tokens = 0
        self.xx = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.n)
        for s in range(0, x.shape[0], BLOCK_TOKENS):
            b = x[s:s + BLOCK_TOKENS]
            b = b if b.dtype == torch.float64 else b.float()
            self.xx += (b.T @ b).to(self.xx)  # float32 products of one block (float64 inputs: float64), summed in float64
            self.sum += b.sum(0).to(self.sum)
        self.tokens += x.shape[0]

    def matrix(self, bias: bool = False) -> torch.Tensor:
        """``H``, or with ``bias`` the augmented ``[[H, sum x], [sum x^T, tokens]]`` of ``[x, 1]``."""
        if not bias:
            return self.xx
        top = torch.cat([self.xx, self.sum[:, None]], 1)
        bottom = torch.cat([self.sum, self.sum.new_tensor([float(self.tokens)])])[None]
        return torch.cat([top, bottom], 0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-column variance over tokens (FLAP's fluctuation)."""
        n = max(self.tokens, 1)
        return (self.xx.diagonal() / n - self.mean.pow(2)).clamp_min(0) * (n / max(n - 1, 1))


def damped_inverse(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``(H + d * mean(diag H) * I)^-1`` by Cholesky (float64) and the ``d`` used: raised tenfold until positive
    definite (a column that never fired makes ``H`` singular)."""
    h = h.double()
    scale = float(h.diagonal().mean()) or 1.0
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    d = max(float(damp), 1e-10)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + d * scale * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol), d
        d *= 10
    raise ValueError("the Gram matrix is not positive definite even with 1e7 x the damping")


def column_scores(w: torch.Tensor, gram: Gram, select: str, group: int = 1) -> torch.Tensor:
    """Importance of each group of ``group`` consecutive input columns (higher = keep), for fixed criteria:
    ``wanda`` (Wanda-sp: sum_i |W_ij| * ||x_j||), ``flap`` (WIFV: Var(x_j) * ||W_:,j||^2), ``magnitude``
    (||W_:,j||^2). Groups sum their columns' scores."""
    w = w.detach().double()
    if select == "wanda":
        s = w.abs().sum(0) * gram.xx.diagonal().clamp_min(0).sqrt()
    elif select == "flap":
        s = gram.variance * w.pow(2).sum(0)
    elif select == "magnitude":
        s = w.pow(2).sum(0)
    else:
        raise ValueError(f"no fixed scores for selection {select!r}")
    return s.view(-1, group).sum(1)


@dataclass
class ColumnPrune:
    """The outcome of :func:`prune_columns`."""

    removed: list[int]  # removed groups, sorted
    weight: torch.Tensor  # [out, n (+1 with bias)] float64: removed columns zero, kept ones (compensated)
    costs: list[float] = field(default_factory=list)  # OBS cost of each removal step (obs selection)
    damp: float = 0.0  # the damping used (relative to mean diag H)


def _block_update(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor, compensate: bool) -> None:
    """Remove columns ``cols`` from ``w`` (in place) with the OBS update, and downdate ``hinv`` (in place)."""
    h_ss = hinv[cols][:, cols]
    m = torch.linalg.solve(h_ss, hinv[cols])  # [|S|, n]
    if compensate:
        w -= w[:, cols] @ m
    w[:, cols] = 0
    hinv -= hinv[:, cols] @ m
    hinv[cols] = 0
    hinv[:, cols] = 0


def prune_columns(w: torch.Tensor, h: torch.Tensor, remove: int, *, group: int = 1, select: str = "obs",
                  scores: Optional[torch.Tensor] = None, compensate: bool = True, rounds: int = 8,
                  damp: float = 0.01, bias: Optional[torch.Tensor] = None) -> ColumnPrune:
    """Remove ``remove`` groups of ``group`` consecutive input columns of ``w`` ``[out, n]``.

    ``h``: the Gram matrix of the inputs (``[n, n]``, or ``[n+1, n+1]`` augmented by a constant input when ``bias``
    is given: then ``bias`` ``[out]`` is the last column and is never removed, only refitted). ``select="obs"``
    chooses by the cost after compensation in ``rounds`` steps; otherwise ``scores`` (one per group, lower goes)
    choose, all at once. ``compensate=False`` zeroes the removed columns and changes nothing else.
    """
    out, n = w.shape
    if n % group:
        raise ValueError(f"{n} columns do not split into groups of {group}")
    groups = n // group
    if not 0 <= remove < groups:
        raise ValueError(f"cannot remove {remove} of {groups} groups (at least one must stay)")
    wa = w.detach().double().clone()
    if bias is not None:
        wa = torch.cat([wa, bias.detach().double().reshape(out, 1)], 1)
    if h.shape != (wa.shape[1], wa.shape[1]):
        raise ValueError(f"Gram matrix {tuple(h.shape)} does not match {wa.shape[1]} inputs")
    hinv, used = damped_inverse(h, damp)
    alive = torch.ones(groups, dtype=torch.bool)
    removed: list[int] = []
    costs: list[float] = []
    cols_of = torch.arange(n).view(groups, group)
    if select == "obs":
        left, steps = remove, min(max(1, rounds), remove)
        for r in range(steps):
            take = math.ceil(left / (steps - r))
            idx = alive.nonzero().squeeze(1)
            c = cols_of[idx]  # [alive, group]
            if group == 1:
                cost = wa[:, c[:, 0]].pow(2).sum(0) / hinv.diagonal()[c[:, 0]].clamp_min(1e-30)
            else:
                blocks = hinv[c[:, :, None], c[:, None, :]]  # [alive, group, group]
                wc = wa[:, c].permute(1, 0, 2)  # [alive, out, group]
                sol = torch.linalg.solve(blocks, wc.transpose(1, 2))  # [alive, group, out]
                cost = (wc.transpose(1, 2) * sol).sum((1, 2))
            pick = idx[torch.topk(cost, take, largest=False).indices]
            costs.append(float(cost.sort().values[:take].sum()))
            _block_update(wa, hinv, cols_of[pick].reshape(-1), compensate)
            alive[pick] = False
            removed += pick.tolist()
            left -= take
    else:
        if scores is None or scores.numel() != groups:
            raise ValueError(f"selection {select!r} needs one score per group ({groups})")
        pick = torch.topk(scores.double(), remove, largest=False).indices if remove else torch.empty(0, dtype=torch.long)
        if remove:
            _block_update(wa, hinv, cols_of[pick].reshape(-1), compensate)
        removed = pick.tolist()
    return ColumnPrune(sorted(removed), wa, costs, used)


def relative_error(x: torch.Tensor, w_ref: torch.Tensor, w_new: torch.Tensor, bias_ref: Optional[torch.Tensor] = None,
                   target: Optional[torch.Tensor] = None) -> float:
    """``||ref - [x, 1] W_new^T||^2 / ||ref||^2`` over tokens ``x`` ``[..., n]``, ``ref`` = ``target`` if given (the
    dense model's outputs) else ``x W_ref^T (+ b_ref)``; ``w_new`` is ``[out, n]`` or ``[out, n + 1]`` (last column
    a bias)."""
    n = w_ref.shape[1]
    x = x.reshape(-1, n)
    t = None if target is None else target.reshape(x.shape[0], -1)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32  # float32 blocks, sums in float64
    w_new_c, w_ref_c = w_new.to(ct), w_ref.to(ct)
    err = norm = 0.0
    for s in range(0, x.shape[0], BLOCK_TOKENS):
        xb = x[s:s + BLOCK_TOKENS].to(ct)
        if t is not None:
            ref = t[s:s + BLOCK_TOKENS].to(ct)
        else:
            ref = xb @ w_ref_c.T
            if bias_ref is not None:
                ref = ref + bias_ref.to(ct)
        new = xb @ w_new_c[:, :n].T
        if w_new.shape[1] == n + 1:
            new = new + w_new_c[:, -1]
        err += float((ref - new).double().pow(2).sum())
        norm += float(ref.double().pow(2).sum())
    return err / max(norm, 1e-30)
