"""Structured OBS against independent least-squares solutions and brute force."""

import pytest
import torch

from pipeline.model.structure import unit_indices
from pipeline.pruning.obs import Snapshot, greedy_obs, prepare_hessian, removal_counts


def reference_greedy_obs(weight, hessian, unit_size, counts):
    """The straightforward algorithm of docs/method.md (section 2), as `greedy_obs` first implemented it: every removal
    downdates the full-size Hinv and W, removed columns stay in place. `greedy_obs` must agree with it."""
    g = unit_size
    n_units = weight.shape[1] // g
    w = weight.to(hessian.dtype).clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    alive = torch.ones(n_units, dtype=torch.bool)
    removed, loss, snapshots = 0, 0.0, []
    for target in counts:
        while removed < target:
            candidates = alive.nonzero().squeeze(1)
            if g == 1:  # rho(u) = trace(W[:,u] (Hinv[u,u])^-1 W[:,u]^T)
                rho = (w[:, candidates] ** 2).sum(0) / hinv.diagonal()[candidates]
            else:
                cand_cols = unit_indices(candidates, g).view(-1, g)
                w_units = w[:, cand_cols].permute(1, 2, 0)  # (n, g, out)
                blocks = hinv[cand_cols[:, :, None], cand_cols[:, None, :]]  # (n, g, g)
                rho = (w_units * torch.linalg.solve(blocks, w_units)).sum((1, 2))
            best = int(rho.argmin())
            unit = int(candidates[best])
            cols = slice(unit * g, unit * g + g)
            block_inv = torch.linalg.inv(hinv[cols, cols])
            w -= w[:, cols] @ block_inv @ hinv[cols, :]
            w[:, cols] = 0
            hinv -= hinv[:, cols] @ block_inv @ hinv[cols, :]
            alive[unit] = False
            loss += float(rho[best])
            removed += 1
        kept = alive.nonzero().squeeze(1)
        snapshots.append(Snapshot(kept.clone(), w[:, unit_indices(kept, g)].to(weight.dtype).clone(), loss))
    return snapshots


def _problem(seed, out=6, units=5, g=3, n=200):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, units * g, generator=gen, dtype=torch.float64)
    x[:, 1] += 0.8 * x[:, 0]  # correlated inputs make the correction matter
    w = torch.randn(out, units * g, generator=gen, dtype=torch.float64)
    return x, w


def _lstsq_fit(x, w, kept_cols):
    """Best weights on the kept columns for reproducing x @ w.T, and the squared error."""
    target = x @ w.T
    if len(kept_cols) == 0:
        return w[:, :0], float((target ** 2).sum())
    sol = torch.linalg.lstsq(x[:, kept_cols], target).solution
    return sol.T, float(((target - x[:, kept_cols] @ sol) ** 2).sum())


@pytest.mark.parametrize("g", [1, 3])
def test_every_snapshot_is_the_least_squares_optimum_for_its_kept_columns(g):
    x, w = _problem(0, g=g)
    n_units = w.shape[1] // g
    h = x.T @ x
    snaps = greedy_obs(w, h, g, removal_counts(n_units, n_units))
    assert [len(s.kept_units) for s in snaps] == list(range(n_units, -1, -1))
    for s in snaps[:-1]:
        cols = unit_indices(s.kept_units, g)
        best, err = _lstsq_fit(x, w, cols)
        torch.testing.assert_close(s.weight, best, rtol=1e-7, atol=1e-8)
        assert s.loss == pytest.approx(err, rel=1e-6, abs=1e-8)  # sum of rho's = exact error
    assert snaps[-1].weight.shape == (w.shape[0], 0)
    assert snaps[-1].loss == pytest.approx(float(((x @ w.T) ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("g", [1, 2])
def test_each_greedy_step_removes_the_unit_a_brute_force_search_would(g):
    x, w = _problem(1, units=4, g=g)
    h = x.T @ x
    snaps = greedy_obs(w, h, g, list(range(5)))
    for before, after in zip(snaps, snaps[1:]):
        kept = before.kept_units.tolist()
        errors = {u: _lstsq_fit(x, w, unit_indices(torch.tensor([k for k in kept if k != u], dtype=torch.long), g))[1]
                  for u in kept}
        removed = (set(kept) - set(after.kept_units.tolist())).pop()
        assert errors[removed] == pytest.approx(min(errors.values()), rel=1e-9)


def test_damped_hessian_equals_ridge_least_squares():
    x, w = _problem(2, g=2)
    damp = 0.05
    h = prepare_hessian(x.T @ x, damp)
    lam = damp * float((x.T @ x).diagonal().mean())
    snaps = greedy_obs(w, h, 2, [2])
    cols = unit_indices(snaps[0].kept_units, 2)
    # ridge on the kept columns == lstsq on x augmented with sqrt(lam) * I rows, target from all columns
    x_aug = torch.cat([x, lam ** 0.5 * torch.eye(x.shape[1], dtype=x.dtype)])
    target = x_aug @ w.T
    sol = torch.linalg.lstsq(x_aug[:, cols], target).solution
    torch.testing.assert_close(snaps[0].weight, sol.T, rtol=1e-7, atol=1e-8)


def test_dead_inputs_get_unit_diagonal_and_no_nan():
    x, w = _problem(3, g=1)
    x[:, 4] = 0
    h = prepare_hessian(x.T @ x, 0.01)
    assert h[4, 4] > 0 and h[4, :4].abs().sum() == 0
    snaps = greedy_obs(w, h, 1, [0, 3, 5])
    assert all(torch.isfinite(s.weight).all() for s in snaps)


def test_removal_counts_cover_dense_to_empty():
    assert removal_counts(8, 10) == [0, 1, 2, 2, 3, 4, 5, 6, 6, 7, 8]
    assert removal_counts(100, 4) == [0, 25, 50, 75, 100]


def test_bad_counts_are_refused():
    x, w = _problem(4, g=1)
    with pytest.raises(ValueError, match="non-decreasing"):
        greedy_obs(w, x.T @ x, 1, [3, 1])
    with pytest.raises(ValueError, match="cannot remove"):
        greedy_obs(w, x.T @ x, 1, [0, 99])


def _reference_problem(seed, out, units, g, dead_zero_units=()):
    """Correlated inputs (so corrections matter and Hinv is far from diagonal); units listed in
    `dead_zero_units` get dead inputs and zero weights, so their costs tie at exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    d = units * g
    mixing = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    x = torch.randn(4 * d, d, generator=gen, dtype=torch.float64) @ mixing
    w = torch.randn(out, d, generator=gen, dtype=torch.float64)
    for u in dead_zero_units:
        x[:, u * g:(u + 1) * g] = 0
        w[:, u * g:(u + 1) * g] = 0
    return w, prepare_hessian(x.T @ x / x.shape[0], 0.01)


@pytest.mark.parametrize("g, units, lazy_batch", [
    (1, 100, 1),  # compaction every few removals, downdates applied at once
    (1, 100, 3),  # flushes between snapshots and at them
    (1, 100, 64),
    (1, 300, 16),  # several compactions, each after a flush of a part-filled batch
    (1, 7, 64),  # fewer units than one batch
    (3, 40, 64),
    (8, 12, 64),
])
def test_same_units_in_the_same_order_and_same_weights_as_the_reference(g, units, lazy_batch):
    w, h = _reference_problem(5, out=9, units=units, g=g, dead_zero_units=(2, 5))
    for counts in (list(range(units + 1)), removal_counts(units, 10)):  # every removal; the database's levels
        ours = greedy_obs(w, h, g, counts, lazy_batch=lazy_batch)
        ref = reference_greedy_obs(w, h, g, counts)
        assert len(ours) == len(ref) == len(counts)
        for mine, theirs in zip(ours, ref):
            assert torch.equal(mine.kept_units, theirs.kept_units)
            torch.testing.assert_close(mine.weight, theirs.weight, rtol=1e-9, atol=1e-10)
            assert mine.loss == pytest.approx(theirs.loss, rel=1e-9, abs=1e-12)
        assert ours[-1].weight.shape == (9, 0) and len(ours[-1].kept_units) == 0
    # the dead zero-weight units cost exactly 0 and go first, lowest index first, as in the reference
    assert greedy_obs(w, h, g, [1])[0].kept_units.tolist() == [u for u in range(units) if u != 2]


def test_lazy_batch_must_be_positive():
    w, h = _reference_problem(6, out=3, units=4, g=1)
    with pytest.raises(ValueError, match="lazy_batch"):
        greedy_obs(w, h, 1, [1], lazy_batch=0)
