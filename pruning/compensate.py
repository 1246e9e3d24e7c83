"""The numeric kernel of compensated pruning: Gram matrices, OBS removal of input columns with the least-squares
update, least squares towards other targets, and the output error the held-out guard compares. Plain tensors in
and out; no options, no model (the compensated pruner, pruning/obs/fit.py, applies it to a model's projections).

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

Other targets (:func:`target_weights`): to fit the kept columns towards outputs ``T`` other than ``W x`` (the dense
model's), ``W`` is first replaced by the damped least-squares fit of all columns to ``T``; the OBS removal from it
then gives the least-squares fit of the kept columns to ``T``.

Held-out error (:class:`HeldOut`): a fit from too few tokens for its unknowns follows noise. The relative output
error of candidate weights on held-out tokens, from the tokens themselves (:func:`relative_error`) or from their
sums (many candidates from the same tokens), is what the guard of pruning/obs/fit.py compares.

Streaming (:class:`ProjectionSums`): the Gram matrix, the cross term of :func:`target_weights` and the guard's
held-out sums are all sums over tokens, so a caller folds each micro-batch of captured inputs into them and drops
it: memory is ``O(n^2 + n x out)`` float64 whatever the number of tokens. The fit from those sums equals the fit
from the kept tokens up to float rounding (the same float32 block products, summed in float64).

Imports: torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

BLOCK_TOKENS = 4096  # tokens per float32 product accumulated into the float64 Gram matrix


class Gram:
    """``H = sum x x^T`` (float64), ``sum x`` and the token count of ``[..., n]`` inputs, accumulated in blocks.

    ``H`` lives in the top-left block of one ``(n + 1)^2`` buffer, so the augmented matrix of :meth:`matrix`
    (``bias=True``) is that buffer, not a second copy."""

    def __init__(self, n: int, device: Optional[torch.device | str] = None):
        self.n = n
        self.tokens = 0
        self._augmented = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=device)
        self.xx = self._augmented[:n, :n]
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
        """``H``, or with ``bias`` the augmented ``[[H, sum x], [sum x^T, tokens]]`` of ``[x, 1]`` (a view of this
        Gram's buffer: read it, do not change it)."""
        if not bias:
            return self.xx
        n, a = self.n, self._augmented
        a[:n, n] = self.sum
        a[n, :n] = self.sum
        a[n, n] = float(self.tokens)
        return a

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
    d = max(float(damp), 1e-10)
    for _ in range(8):
        damped = h.clone(memory_format=torch.contiguous_format)  # (no identity matrix: one (n+1)^2 less at the peak)
        damped.diagonal().add_(d * scale)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs are multiplied in float64, anything else in float32 (sums always in float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _add_cross(cross: torch.Tensor, w_aug: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> None:
    """``cross += [x, 1]^T (t - [x, 1] W_aug^T)`` over tokens ``x`` ``[..., n]`` / targets ``t`` ``[..., out]``, in
    blocks of :data:`BLOCK_TOKENS` (float32 products, float64 sums); ``w_aug`` ``[out, n]`` or ``[out, n + 1]`` (a
    bias column: then ``cross`` has the ``n + 1``-th row of the residuals' sums)."""
    out, n = w_aug.shape[0], x.shape[-1]
    use_bias = w_aug.shape[1] == n + 1
    ct = _compute_dtype(x)
    wc = w_aug.to(ct)
    x2, t2 = x.reshape(-1, n), t.reshape(-1, out)
    for s in range(0, x2.shape[0], BLOCK_TOKENS):
        xb = x2[s:s + BLOCK_TOKENS].to(ct)
        r = t2[s:s + BLOCK_TOKENS].to(ct) - xb @ wc[:, :n].T
        if use_bias:
            r = r - wc[:, n]
        cross[:n] += (xb.T @ r).double()
        if use_bias:
            cross[n] += r.double().sum(0)


def _add_target_sums(c: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> float:
    """``c += [x, 1]^T t`` (``c``: ``[n + 1, out]``) in blocks; returns ``||t||^2`` of these tokens (float64)."""
    n, out = x.shape[-1], c.shape[1]
    ct = _compute_dtype(x)
    x2, t2 = x.reshape(-1, n), t.reshape(-1, out)
    tt = 0.0
    for s in range(0, x2.shape[0], BLOCK_TOKENS):
        xb, tb = x2[s:s + BLOCK_TOKENS].to(ct), t2[s:s + BLOCK_TOKENS].to(ct)
        c[:n] += (xb.T @ tb).double()
        tb = tb.double()
        c[n] += tb.sum(0)
        tt += float(tb.pow(2).sum())
    return tt


def augmented(w: torch.Tensor, bias0: Optional[torch.Tensor], use_bias: bool) -> torch.Tensor:
    """``[W, b]`` (float64, ``[out, n + 1]``) with ``use_bias``, else ``W`` (float64)."""
    w_aug = w.detach().double()
    return torch.cat([w_aug, bias0.detach().double().reshape(-1, 1)], 1) if use_bias else w_aug


def target_weights(w: torch.Tensor, bias0: Optional[torch.Tensor], xs: Sequence[torch.Tensor],
                   targets: Sequence[torch.Tensor], h: torch.Tensor, damp: float
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The weights (and bias, when ``h`` is augmented) whose outputs best match ``targets`` on all columns, damped
    towards ``w`` (not towards 0): ``W_eff^T = W^T + (H + d I)^-1 [X, 1]^T (T - [X, 1] W^T)``. Removing columns
    from ``W_eff`` with the OBS update then gives the least-squares fit of the kept columns to the targets.
    (:class:`ProjectionSums` folds the same cross term token block by token block.)"""
    n, out = w.shape[1], w.shape[0]
    use_bias = h.shape[0] == n + 1
    w_aug = augmented(w, bias0, use_bias)
    cross = torch.zeros(h.shape[0], out, dtype=torch.float64, device=w.device)
    for x, t in zip(xs, targets):  # float32 products of blocks of tokens, summed in float64 (as the Gram matrix)
        _add_cross(cross, w_aug, x, t)
    return _weights(w_aug, cross, h, damp, n)


def _weights(w_aug: torch.Tensor, cross: torch.Tensor, h: torch.Tensor, damp: float, n: int
             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    hinv, _ = damped_inverse(h, damp)
    w_eff = w_aug + (hinv @ cross).T
    return w_eff[:, :n], (w_eff[:, n] if w_eff.shape[1] == n + 1 else None)


class ProjectionSums:
    """What the fit of one projection ``y = W x (+ b)`` and its held-out guard read from the tokens, folded micro-batch
    by micro-batch and token block by token block, so no ``[tokens, n]`` input is ever kept whole (float64 sums of
    float32 block products, as :class:`Gram`):

    - the fit tokens' :class:`Gram` (``H``, ``sum x``, count);
    - with ``targets`` (the dense model's outputs ``T``), the cross term of :func:`target_weights`,
      ``[X, 1]^T (T - [X, 1] W_aug^T)`` (``W_aug = [W, b]`` with ``bias``, the bias 0 when ``b`` is None);
    - with ``held``, the held-out tokens' sums for the guard (:meth:`HeldOut.from_sums`): their Gram, and with
      ``targets`` ``[X, 1]^T T`` and ``||T||^2``.

    Memory: ``(n + 1)^2`` float64 per Gram (two with ``held``), ``(n + 1) x out`` float64 per cross term, whatever
    the number of tokens. ``add(x, t, fit=k)``: the first ``k`` samples of a micro-batch ``[samples, tokens, n]``
    are fitted on, the rest held out (the guard's samples are the last ones)."""

    def __init__(self, w: torch.Tensor, b: Optional[torch.Tensor], *, bias: bool, targets: bool, held: bool):
        self.w, self.b, self.use_bias = w, b, bias
        self.n, self.out = w.shape[1], w.shape[0]
        dev = w.device
        self.bias0 = b if b is not None else (torch.zeros(self.out, dtype=w.dtype, device=dev) if bias else None)
        self.w_aug = augmented(w, self.bias0, bias) if targets else None
        self.gram = Gram(self.n, device=dev)
        self.cross = (torch.zeros(self.n + int(bias), self.out, dtype=torch.float64, device=dev)
                      if targets else None)
        self.held_gram = Gram(self.n, device=dev) if held else None
        self.held_cross = (torch.zeros(self.n + 1, self.out, dtype=torch.float64, device=dev)
                           if held and targets else None)
        self.held_tt = 0.0

    @property
    def targets(self) -> bool:
        return self.cross is not None

    def add(self, x: torch.Tensor, t: Optional[torch.Tensor] = None, fit: Optional[int] = None) -> None:
        """Fold a micro-batch of inputs ``x`` (and targets ``t``): the first ``fit`` samples (dim 0; all when None)
        into the fit's sums, the rest into the held-out ones."""
        k = x.shape[0] if fit is None else fit
        if k > 0:
            self.add_fit(x[:k], None if t is None else t[:k])
        if k < x.shape[0]:
            self.add_held(x[k:], None if t is None else t[k:])

    def add_fit(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> None:
        self.gram.add(x)
        if self.cross is not None:
            if t is None:
                raise ValueError("these sums fit towards targets: give the targets of every token")
            _add_cross(self.cross, self.w_aug, x, t)

    def add_held(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> None:
        if self.held_gram is None:
            raise ValueError("these sums keep no held-out statistics (held=False)")
        self.held_gram.add(x)
        if self.held_cross is not None:
            if t is None:
                raise ValueError("these sums fit towards targets: give the targets of every token")
            self.held_tt += _add_target_sums(self.held_cross, x, t)

    def fit_weights(self, h: torch.Tensor, damp: float) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:func:`target_weights` from the folded cross term (``h``: the fit's Gram matrix, augmented with
        ``bias``)."""
        if self.cross is None:
            raise ValueError("these sums have no targets")
        return _weights(self.w_aug, self.cross, h, damp, self.n)

    def held_out(self) -> "HeldOut":
        """The guard's :class:`HeldOut` from the held-out sums."""
        if self.held_gram is None:
            raise ValueError("these sums keep no held-out statistics (held=False)")
        return HeldOut.from_sums(self.w, self.b, self.held_gram, self.held_cross,
                                 self.held_tt if self.held_cross is not None else None)

    @property
    def nbytes(self) -> int:
        ts = [self.gram.xx, self.gram.sum, self.cross, self.held_cross,
              *((self.held_gram.xx, self.held_gram.sum) if self.held_gram is not None else ())]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class HeldOut:
    """The relative output error ``||T - [x, 1] W'^T||^2 / ||T||^2`` of candidate weights ``W'`` (``[out, n]``, or
    ``[out, n + 1]`` with a bias column) on held-out tokens ``x`` (``[..., n]`` each): ``T`` is ``targets`` (the
    dense model's outputs for the same tokens) if given, else the reference ``x W^T (+ b)``.

    ``summed=False`` keeps the tokens and measures with :func:`relative_error` (exact; for one fit).
    ``summed=True`` keeps only ``H = [x, 1]^T [x, 1]``, ``C = [x, 1]^T T`` and ``||T||^2`` and expands the square
    (equal up to rounding and about 100x cheaper per candidate: for many fits from the same tokens, and for the
    streamed pass, which never keeps the tokens: :meth:`from_sums`, :class:`ProjectionSums`)."""

    def __init__(self, w: torch.Tensor, b: Optional[torch.Tensor], held: Sequence[torch.Tensor],
                 targets: Optional[Sequence[torch.Tensor]] = None, *, summed: bool = False):
        self.w, self.b, self.n = w, b, w.shape[1]
        self.inputs, self.targets = list(held), (list(targets) if targets else None)
        self.tokens = sum(x.reshape(-1, self.n).shape[0] for x in self.inputs)
        self.sums: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None  # H, C, ||T||^2
        if summed:
            g = Gram(self.n, device=w.device)
            for x in self.inputs:
                g.add(x)
            c, tt = None, None
            if self.targets:
                c = torch.zeros(self.n + 1, w.shape[0], dtype=torch.float64, device=w.device)
                tt = sum(_add_target_sums(c, x, t) for x, t in zip(self.inputs, self.targets))
            self._set_sums(g, c, tt)
            self.inputs, self.targets = [], None

    @classmethod
    def from_sums(cls, w: torch.Tensor, b: Optional[torch.Tensor], gram: Gram, cross: Optional[torch.Tensor] = None,
                  tt: Optional[float] = None) -> "HeldOut":
        """From the held-out tokens' :class:`Gram` and, when the error is towards targets, ``cross`` =
        ``[x, 1]^T T`` (``[n + 1, out]``) and ``tt`` = ``||T||^2``."""
        self = cls.__new__(cls)
        self.w, self.b, self.n = w, b, w.shape[1]
        self.inputs, self.targets = [], None
        self.tokens = gram.tokens
        self._set_sums(gram, cross, tt)
        return self

    def _set_sums(self, gram: Gram, c: Optional[torch.Tensor], tt: Optional[float]) -> None:
        w, b, out = self.w, self.b, self.w.shape[0]
        h = gram.matrix(True)
        if c is None:  # towards the projection's own outputs: C and ||T||^2 from H
            bias = b.detach().double() if b is not None else torch.zeros(out, dtype=torch.float64, device=w.device)
            ref = torch.cat([w.detach().double(), bias[:, None]], 1)
            c = h @ ref.T
            tt = float(((ref @ h) * ref).sum())
        self.sums = (h, c, float(tt))

    def errors(self, *candidates: torch.Tensor) -> list[float]:
        """The error of each candidate weight matrix, in order."""
        if self.sums is not None:
            return [self._from_sums(w) for w in candidates]
        n, out = self.n, self.w.shape[0]
        x = torch.cat([x.reshape(-1, n) for x in self.inputs])
        t = torch.cat([t.reshape(-1, out) for t in self.targets]) if self.targets else None
        return [relative_error(x, self.w, w, self.b, target=t) for w in candidates]

    def _from_sums(self, w_new: torch.Tensor) -> float:
        h, c, tt = self.sums
        wa = w_new.double()
        if wa.shape[1] == self.n:  # no bias column: a zero bias (as relative_error)
            wa = torch.cat([wa, torch.zeros_like(wa[:, :1])], 1)
        return float((tt - 2 * (wa * c.T).sum() + ((wa @ h) * wa).sum()) / max(tt, 1e-30))
