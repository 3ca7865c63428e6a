"""Structured Optimal Brain Surgeon: greedy removal of column groups ("units") of a linear layer's
weight with the optimal least-squares correction of the remaining columns (docs/method.md, section 2).

Pure tensor math, no model or I/O. W has shape (out, in); H = X^T X / N over the layer's inputs X
(N x in). Unit u owns the columns u*g .. u*g+g-1 (g = unit_size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model.structure import unit_indices


@dataclass
class Snapshot:
    kept_units: torch.Tensor  # (k,) sorted unit indices still present
    weight: torch.Tensor  # (out, k*g) corrected weight restricted to the kept columns
    loss: float  # ||W X - W' X||^2 / N accumulated so far (the sum of the chosen rho's)


def prepare_hessian(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Give dead inputs (zero diagonal) a unit diagonal, then add damp * mean(diag) to the diagonal."""
    h = hessian.clone()
    diag = h.diagonal()
    dead = diag == 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag[dead] = 1
    diag += damp * diag.mean()
    return h


def removal_counts(units: int, levels: int) -> list[int]:
    """Units removed at each level k = 0..K: round(k/K * units) (level K removes the whole module)."""
    return [round(k * units / levels) for k in range(levels + 1)]


# For single-column units, this many rank-1 downdates are kept as factors and applied together as one
# matrix product: a rank-1 update of a d x d matrix is memory-bound (2 flops per element read and
# written), a rank-64 one is compute-bound: ~9x less time per removal at d = 3000, float64, one core.
LAZY_BATCH = 64


def greedy_obs(weight: torch.Tensor, hessian: torch.Tensor, unit_size: int, counts: list[int],
               lazy_batch: int = LAZY_BATCH) -> list[Snapshot]:
    """Remove units one at a time, always the one whose removal (with optimal correction of the
    rest) costs least, and snapshot after `counts[i]` removals for each i.

    `hessian` must already be prepared (invertible). Computation runs in hessian's dtype and on its
    device. `lazy_batch` (unit_size 1 only) is how many removals are applied to Hinv and W at once;
    it changes the speed, not the result (beyond float round-off).
    """
    if any(b < a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"removal counts must be non-decreasing, got {counts}")
    g = unit_size
    in_features = weight.shape[1]
    if in_features % g:
        raise ValueError(f"{in_features} input columns do not split into units of {g}")
    n_units = in_features // g
    if counts and counts[-1] > n_units:
        raise ValueError(f"cannot remove {counts[-1]} of {n_units} units")
    if lazy_batch < 1:
        raise ValueError(f"lazy_batch must be at least 1, got {lazy_batch}")
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    pruner = _SingleColumns(weight, hinv, lazy_batch) if g == 1 else _ColumnGroups(weight, hinv, g)
    removed, loss, snapshots = 0, 0.0, []
    for target in counts:
        while removed < target:
            loss += pruner.remove_cheapest()
            removed += 1
        kept, kept_weight = pruner.kept()
        snapshots.append(Snapshot(kept.cpu(), kept_weight.to(weight.dtype), loss))
    return snapshots


class _Pruner:
    """Hinv and W^T restricted to the alive units, packed at the front of their buffers: Hinv is the
    top-left n x n block of a d x d buffer and W^T the first n rows of a d x out one (n = alive * g;
    W is held transposed so that a unit's weights are contiguous rows).

    A removed unit's row and column of Hinv are zero after its downdate (up to round-off) and the updates
    of alive entries never read them, so they can go. Rather than copying the alive part into a smaller
    matrix, the last alive unit is moved into the removed one's place (O(d) work), so the work per removal
    follows the alive size a: sum of a^2 ~ d^3 / 3 in all, instead of d^3. Slots are then no longer in
    unit order, so ties are broken by unit index explicitly and snapshots sort by it."""

    def __init__(self, weight: torch.Tensor, hinv: torch.Tensor, g: int):
        self.g = g
        self.hinv_buffer = hinv
        self.wt_buffer = hinv.new_empty(weight.shape[1], weight.shape[0]).copy_(weight.T)
        self.units = torch.arange(weight.shape[1] // g, device=hinv.device)  # unit held by each slot
        self.alive = len(self.units)

    @property
    def n(self) -> int:
        return self.alive * self.g

    @property
    def hinv(self) -> torch.Tensor:
        return self.hinv_buffer[:self.n, :self.n]

    @property
    def wt(self) -> torch.Tensor:
        return self.wt_buffer[:self.n]

    def _cheapest(self, rho: torch.Tensor) -> int:
        """Slot of the least rho; among exact ties (e.g. zero-weight units) the lowest unit index, as a
        scan in unit order would pick."""
        slot = int(rho.argmin())
        ties = (rho == rho[slot]).nonzero().squeeze(1)
        if len(ties) > 1:
            slot = int(ties[self.units[ties].argmin()])
        return slot

    def _drop(self, slot: int) -> None:
        last = self.alive - 1
        if slot != last:
            dst = slice(slot * self.g, slot * self.g + self.g)
            src = slice(last * self.g, last * self.g + self.g)
            hinv = self.hinv
            hinv[dst] = hinv[src]  # rows first, then columns: the diagonal block lands on the diagonal
            hinv[:, dst] = hinv[:, src]
            self.wt[dst] = self.wt[src]
            self.units[slot] = self.units[last]
            self._move_extra(src, dst)
        self.alive -= 1

    def _move_extra(self, src: slice, dst: slice) -> None:
        """Move per-column state a subclass keeps from columns `src` to `dst`."""

    def _kept_order(self) -> torch.Tensor:
        return self.units[:self.alive].argsort()

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted indices of the alive units, W on their columns), W fully updated."""
        order = self._kept_order()
        return self.units[order], self.wt[unit_indices(order, self.g)].T.contiguous()


class _ColumnGroups(_Pruner):
    """Units of g > 1 columns: each removal's rank-g update of Hinv and W is a matrix product with inner
    size g, already compute-bound for g = head_dim, so it is applied at once, in place."""

    def remove_cheapest(self) -> float:
        g, a, hinv, wt = self.g, self.alive, self.hinv, self.wt
        # the units' diagonal blocks of Hinv, read in place: (a, g, g)
        row_stride, col_stride = hinv.stride()
        blocks = hinv.as_strided((a, g, g), (g * (row_stride + col_stride), row_stride, col_stride))
        w_units = wt.view(a, g, -1)  # (a, g, out)
        # rho(u) = trace(W[:,u] (Hinv[u,u])^-1 W[:,u]^T) = sum of (Hinv[u,u])^-1 * (W[:,u]^T W[:,u]):
        # g x g products instead of solving for `out` right-hand sides (and their (a, g, out) temporaries)
        block_invs = torch.linalg.inv(blocks)
        rho = (block_invs * (w_units @ w_units.mT)).sum((1, 2))
        slot = self._cheapest(rho)
        cols = slice(slot * g, slot * g + g)
        block_inv = block_invs[slot]
        rows = hinv[cols].clone()  # both updates use Hinv[M,:] from before the downdate
        # W -= W[:,M] Hinv[M,M]^-1 Hinv[M,:], transposed
        wt.addmm_(rows.T, (wt[cols].T @ block_inv).T, alpha=-1)
        hinv.addmm_(hinv[:, cols] @ block_inv, rows, alpha=-1)
        self._drop(slot)
        return float(rho[slot])


class _SingleColumns(_Pruner):
    """Single-column units (MLP neurons) with lazily applied downdates, as GPTQ does. After removals
    t = 1..T since the last flush, with u_t the (then current) row of Hinv at the removed column c_t,
    s_t = 1 / u_t[c_t] and w_t the (then current) column c_t of W:

        Hinv = Hinv_0 - sum_t s_t u_t u_t^T        W = W_0 - sum_t s_t w_t u_t^T

    Choosing the next unit needs only diag(Hinv) and the squared column norms of W, which are updated in
    O(d) and one pass over W_0 per step; the chosen row of Hinv and column of W are rebuilt from the
    factors. Every `batch` removals the factors are applied to Hinv_0 and W_0 as matrix products."""

    def __init__(self, weight: torch.Tensor, hinv: torch.Tensor, batch: int):
        super().__init__(weight, hinv, 1)
        self.batch = batch
        self.rows = hinv.new_empty(batch, len(self.units))  # u_t
        self.w_cols = hinv.new_empty(batch, weight.shape[0])  # w_t
        self.scales = hinv.new_empty(batch)  # s_t
        self.diag = hinv.diagonal().clone()
        self.sq_norms = torch.linalg.vector_norm(self.wt, dim=1) ** 2
        self.pending = 0

    def _flush(self) -> None:
        t, n = self.pending, self.n
        scaled = self.rows[:t, :n] * self.scales[:t, None]
        self.hinv.addmm_(self.rows[:t, :n].T, scaled, alpha=-1)
        self.wt.addmm_(scaled.T, self.w_cols[:t], alpha=-1)
        # recomputed rather than carried over, so the per-step updates' round-off does not accumulate
        self.diag[:n] = self.hinv.diagonal()
        self.sq_norms[:n] = torch.linalg.vector_norm(self.wt, dim=1) ** 2
        self.pending = 0

    def remove_cheapest(self) -> float:
        if self.pending == self.batch:
            self._flush()
        t, n = self.pending, self.n
        rows, w_cols, scales = self.rows[:t, :n], self.w_cols[:t], self.scales[:t]
        rho = self.sq_norms[:n] / self.diag[:n]
        slot = self._cheapest(rho)
        coef = rows[:, slot] * scales  # s_t u_t[c] of each pending removal
        u = self.hinv[slot] - coef @ rows  # current row c of Hinv (= column, by symmetry)
        w_col = self.wt[slot] - coef @ w_cols  # current column c of W
        scale = 1 / u[slot]
        # new W = W - w_col (scale * u)^T; its column norms need W^T w_col, from W_0 and the factors
        dots = self.wt @ w_col - rows.T @ (scales * (w_cols @ w_col))
        step = scale * u
        self.sq_norms[:n] += step * (step * w_col.dot(w_col) - 2 * dots)
        self.sq_norms[:n].clamp_(min=0)
        self.diag[:n] -= step * u
        self.rows[t, :n], self.w_cols[t], self.scales[t] = u, w_col, scale
        self.pending += 1
        cost = float(rho[slot])
        self._drop(slot)
        return cost

    def _move_extra(self, src: slice, dst: slice) -> None:
        self.rows[:self.pending, dst] = self.rows[:self.pending, src]
        self.diag[dst] = self.diag[src]
        self.sq_norms[dst] = self.sq_norms[src]

    def kept(self) -> tuple[torch.Tensor, torch.Tensor]:
        # pending removals applied to a copy of the kept columns only, so that where the snapshots fall
        # changes neither when the factors are flushed nor the round-off
        order = self._kept_order()
        t = self.pending
        kept_wt = self.wt[order]
        kept_wt.addmm_((self.rows[:t, order] * self.scales[:t, None]).T, self.w_cols[:t], alpha=-1)
        return self.units[order], kept_wt.T.contiguous()
