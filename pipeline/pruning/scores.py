"""Importance scores of the neighbouring structured-pruning methods, the baselines every run reports
(docs/method.md, section 6). Pure tensor math, no model or I/O.

Each score is per input column of an output projection W (out x in: `o_proj` or `down_proj`), from W
and the calibration statistics of that projection's input X (N tokens x in): the per-column sum and
sum of squares. A unit's score (a query head: head_dim columns; a neuron or block of neurons) is the
sum of its columns' scores; the lowest-scoring units are removed first.

- magnitude: the squared norm of the column, ||W[:, j]||^2 (a unit: its Frobenius norm squared).
- Wanda-sp (An et al., FLAP, arXiv 2312.11983, its structured Wanda baseline): sum_i |W_ij| * ||X_j||,
  with ||X_j|| the column's RMS over the calibration tokens.
- fluctuation (FLAP): Var(X_j) * ||W[:, j]||^2, the variance of the input channel over the tokens
  times the squared norm of its weight column. FLAP then compensates a removed channel with its mean:
  the output bias gains W[:, removed] @ mean(X[:, removed]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("magnitude", "wanda_sp", "flap")


@dataclass
class ChannelStats:
    """Per-column statistics of a projection's input over the calibration tokens (float64)."""
    total: torch.Tensor  # (in,) sum over tokens
    squares: torch.Tensor  # (in,) sum of squares over tokens
    count: int  # tokens

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance per column (0 for a single token)."""
        centred = (self.squares - self.total * self.mean).clamp(min=0)
        return centred / max(self.count - 1, 1)

    @property
    def rms(self) -> torch.Tensor:
        return (self.squares / self.count).sqrt()


def column_scores(method: str, weight: torch.Tensor, stats: ChannelStats | None) -> torch.Tensor:
    """(in,) float64 score of each input column of `weight` (out x in) under `method`."""
    w = weight.detach().to(torch.float64)
    if method == "magnitude":
        return (w**2).sum(0)
    if stats is None:
        raise ValueError(f"{method} scores need the input's calibration statistics")
    if method == "wanda_sp":
        return w.abs().sum(0) * stats.rms.to(w.device)
    if method == "flap":
        return stats.variance.to(w.device) * (w**2).sum(0)
    raise ValueError(f"unknown scoring method {method!r}: valid are {', '.join(METHODS)}")


def unit_scores(columns: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Sum of the column scores of each unit of `unit_size` consecutive columns."""
    if columns.numel() % unit_size:
        raise ValueError(f"{columns.numel()} columns do not split into units of {unit_size}")
    return columns.reshape(-1, unit_size).sum(1)


def removal_order(scores: torch.Tensor) -> torch.Tensor:
    """Units from least to most important; ties go to the lower index first (a stable sort)."""
    return torch.sort(scores, stable=True).indices


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, removed_columns: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: the removed columns' mean contribution to the output,
    W[:, removed] @ mean[removed] (the least-squares optimal constant in their place)."""
    w = weight.detach().to(torch.float64)
    cols = torch.as_tensor(removed_columns, dtype=torch.long, device=w.device)
    return w[:, cols] @ mean.to(w)[cols]


def standardize(scores: torch.Tensor) -> torch.Tensor:
    """(s - mean) / std over the last dimension: FLAP's per-layer standardisation before ranking
    units globally across layers (a layer whose scores are all equal gets zeros)."""
    s = scores.to(torch.float64)
    std = s.std(-1, keepdim=True) if s.shape[-1] > 1 else torch.zeros_like(s[..., :1])
    return (s - s.mean(-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def cosine_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """ShortGPT's block influence per token: 1 - cos(block input, block output) over the hidden
    dimension (the last one). A block that barely changes its input has influence near 0."""
    x, y = inputs.to(torch.float64), outputs.to(torch.float64)
    return 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
