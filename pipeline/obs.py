"""Structured Optimal Brain Surgeon: greedy removal of column groups ("units") of a linear layer's
weight with the optimal least-squares correction of the remaining columns (DESIGN.md 2.2).

Pure tensor math, no model or I/O. W has shape (out, in); H = X^T X / N over the layer's inputs X
(N x in). Unit u owns the columns u*g .. u*g+g-1 (g = unit_size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


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


def column_indices(units: torch.Tensor, unit_size: int) -> torch.Tensor:
    return (units[:, None] * unit_size + torch.arange(unit_size)).reshape(-1)


def greedy_obs(weight: torch.Tensor, hessian: torch.Tensor, unit_size: int, counts: list[int]) -> list[Snapshot]:
    """Remove units one at a time, always the one whose removal (with optimal correction of the
    rest) costs least, and snapshot after `counts[i]` removals for each i.

    `hessian` must already be prepared (invertible). Computation runs in hessian's dtype.
    """
    if any(b < a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"removal counts must be non-decreasing, got {counts}")
    g = unit_size
    out_features, in_features = weight.shape
    if in_features % g:
        raise ValueError(f"{in_features} input columns do not split into units of {g}")
    n_units = in_features // g
    if counts and counts[-1] > n_units:
        raise ValueError(f"cannot remove {counts[-1]} of {n_units} units")
    w = weight.to(hessian.dtype).clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    alive = torch.ones(n_units, dtype=torch.bool)
    removed, loss, snapshots = 0, 0.0, []
    for target in counts:
        while removed < target:
            candidates = alive.nonzero().squeeze(1)
            rho = _removal_costs(w, hinv, candidates, g)
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
        snapshots.append(Snapshot(kept.clone(), w[:, column_indices(kept, g)].to(weight.dtype).clone(), loss))
    return snapshots


def _removal_costs(w: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor, g: int) -> torch.Tensor:
    """rho(u) = trace(W[:,u] (Hinv[u,u])^-1 W[:,u]^T) for each unit u in `units`."""
    if g == 1:
        return (w[:, units] ** 2).sum(0) / hinv.diagonal()[units]
    cols = column_indices(units, g).view(-1, g)  # (n, g)
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # (n, g, g)
    w_units = w[:, cols].permute(1, 2, 0)  # (n, g, out)
    solved = torch.linalg.solve(blocks, w_units)
    return (w_units * solved).sum((1, 2))
