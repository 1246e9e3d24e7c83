"""Compensation and selection after compensation (pruning/compensate.py) on hand-built layers."""

from __future__ import annotations

import pytest
import torch

from pruning.compensate import Gram, column_scores, prune_columns, relative_error


def _gram(x: torch.Tensor, bias: bool = False) -> torch.Tensor:
    g = Gram(x.shape[-1])
    g.add(x)
    return g.matrix(bias)


def test_nothing_removed_changes_no_weight():
    torch.manual_seed(0)
    w, x = torch.randn(8, 16), torch.randn(500, 16)
    for select in ("obs", "wanda"):
        g = Gram(16)
        g.add(x)
        scores = None if select == "obs" else column_scores(w, g, select)
        res = prune_columns(w, g.matrix(), 0, select=select, scores=scores)
        assert res.removed == [] and torch.equal(res.weight, w.double())


def test_a_channel_that_is_a_combination_of_kept_ones_is_compensated_exactly():
    torch.manual_seed(0)
    x = torch.randn(2000, 12, dtype=torch.float64)
    x[:, 5] = 0.7 * x[:, 1] - 1.3 * x[:, 9]  # channel 5 carries nothing the others do not
    w = torch.randn(6, 12, dtype=torch.float64)
    res = prune_columns(w, _gram(x), 1, select="obs", damp=1e-9)
    assert res.removed[0] in (1, 5, 9)  # each of the three is the other two combined: removable at zero cost
    assert res.weight[:, res.removed[0]].abs().max() == 0
    torch.testing.assert_close(x @ res.weight.T, x @ w.T, rtol=1e-6, atol=1e-6)  # output unchanged
    plain = prune_columns(w, _gram(x), 1, select="obs", compensate=False)
    assert relative_error(x, w, plain.weight) > 1e-2  # without the update the output does change


def test_obs_selection_picks_the_provably_cheapest_group():
    """Three groups of two columns; group 1 is nearly a copy of group 0 (cheap once compensated) although its
    weights are the largest; magnitude would remove group 2."""
    torch.manual_seed(1)
    base = torch.randn(4000, 2, dtype=torch.float64)
    x = torch.cat([base, base + 0.01 * torch.randn(4000, 2, dtype=torch.float64),
                   torch.randn(4000, 2, dtype=torch.float64)], 1)
    w = torch.tensor([[1.0, 0.5, 3.0, 2.0, 0.3, 0.2], [0.4, 1.0, 2.5, 3.0, 0.2, 0.3]], dtype=torch.float64)
    h = _gram(x)
    exact = []
    for g in range(3):  # the true cost: least-squares refit of the other groups, on the same tokens
        keep = [c for c in range(6) if c // 2 != g]
        sol = torch.linalg.lstsq(x[:, keep], x @ w.T).solution
        exact.append(float((x[:, keep] @ sol - x @ w.T).pow(2).sum()))
    res = prune_columns(w, h, 1, group=2, select="obs", damp=1e-10)
    assert res.removed == [min(range(3), key=exact.__getitem__)] and res.removed != [2]
    assert res.costs[0] == pytest.approx(min(exact), rel=1e-4)
    g = Gram(6)
    g.add(x)
    assert column_scores(w, g, "magnitude", group=2).argmin().item() == 2


def test_rounds_remove_exactly_the_requested_count_and_refit_like_least_squares():
    torch.manual_seed(2)
    x = torch.randn(3000, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    w, b = torch.randn(5, 24, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    res = prune_columns(w, _gram(x, bias=True), 9, select="obs", rounds=4, damp=1e-10, bias=b)
    assert len(res.removed) == 9 == len(set(res.removed)) and len(res.costs) == 4
    keep = [c for c in range(24) if c not in res.removed]
    xa = torch.cat([x[:, keep], torch.ones(3000, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xa, x @ w.T + b).solution.T  # the least-squares refit of kept columns and bias
    torch.testing.assert_close(res.weight[:, keep + [24]], sol, rtol=1e-5, atol=1e-6)


def test_held_out_error_exposes_an_underdetermined_fit():
    """20 tokens for 64 unknowns per row: the fit reproduces its own tokens and fails on new ones; the held-out
    error is what a pruner's guard compares with plain removal."""
    torch.manual_seed(3)
    w = torch.randn(32, 64)
    fit, held = torch.randn(20, 64), torch.randn(2000, 64)
    comp = prune_columns(w, _gram(fit), 16, select="magnitude", damp=0.01,
                         scores=column_scores(w, _gram_obj(fit), "magnitude"))
    plain = prune_columns(w, _gram(fit), 16, select="magnitude", compensate=False,
                          scores=column_scores(w, _gram_obj(fit), "magnitude"))
    assert relative_error(fit, w, comp.weight) < relative_error(fit, w, plain.weight)  # in sample: better
    assert relative_error(held, w, comp.weight) > relative_error(held, w, plain.weight)  # held out: worse


def _gram_obj(x: torch.Tensor) -> Gram:
    g = Gram(x.shape[-1])
    g.add(x)
    return g


# --------------------------------------------------------------------------- folded sums (the streamed pass)


@pytest.mark.parametrize("bias", [False, True])
def test_sums_folded_micro_batch_by_micro_batch_equal_the_captured_fit_and_guard(bias):
    """ProjectionSums over micro-batches (fit rows first, the last samples held out) gives the weights of
    target_weights over the captured tokens and the guard's errors of relative_error over the held-out ones."""
    from pruning.compensate import HeldOut, ProjectionSums, target_weights

    torch.manual_seed(0)
    out, n = 6, 12
    w, b = torch.randn(out, n), torch.randn(out)
    batches = [torch.randn(3, 40, n) for _ in range(3)]  # 9 samples in micro-batches of 3
    targets = [x @ w.T + b + 0.1 * torch.randn(3, 40, out) for x in batches]
    fit_rows = [3, 3, 1]  # the last 2 samples are the guard's
    sums = ProjectionSums(w, b, bias=bias, targets=True, held=True)
    for x, t, k in zip(batches, targets, fit_rows):
        sums.add(x, t, fit=k)
    xs = [x[:k] for x, k in zip(batches, fit_rows)]
    ts = [t[:k] for t, k in zip(targets, fit_rows)]
    h = sums.gram.matrix(bias)
    assert sums.gram.tokens == 7 * 40 and sums.held_gram.tokens == 2 * 40
    assert h.shape == ((n + 1, n + 1) if bias else (n, n))
    w_ref, b_ref = target_weights(w, b if bias else None, xs, ts, _gram(torch.cat([x.reshape(-1, n) for x in xs]),
                                                                         bias), 0.01)
    w_got, b_got = sums.fit_weights(h, 0.01)
    torch.testing.assert_close(w_got, w_ref, rtol=1e-5, atol=1e-6)  # (float32 block products)
    if bias:
        torch.testing.assert_close(b_got, b_ref, rtol=1e-5, atol=1e-6)
    held_x, held_t = batches[2][1:], targets[2][1:]
    exact = HeldOut(w, b, [held_x], [held_t])
    summed = sums.held_out()
    cand = torch.randn(out, n + 1, dtype=torch.float64)
    assert summed.errors(cand) == [pytest.approx(exact.errors(cand)[0], rel=1e-5)]
    assert summed.tokens == exact.tokens == 80
    # no [tokens, n] tensor is kept: the sums' size does not depend on the tokens folded
    size = sums.nbytes
    sums.add(torch.randn(50, 40, n), torch.randn(50, 40, out), fit=40)
    assert sums.nbytes == size
