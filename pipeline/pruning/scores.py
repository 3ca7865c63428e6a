"""Importance scores of the neighbouring structured-pruning methods, as their reference code computes
them (docs/method.md, section 6). Pure tensor math, no model or I/O.

Scores are per input column j of an output projection W (out x in: `o_proj`, whose columns are the
attention heads' outputs, or `down_proj`, whose columns are the MLP neurons), from W and statistics of
that projection's input X over the calibration tokens. Higher is more important.

- magnitude (FLAP repository, `prune_magnitude_sp`): ||W[:, j]||_2; a head sums its columns' norms.
- Wanda-sp (FLAP repository, `prune_wanda_sp`): mean_i |W_ij| * ||X_j|| (||X_j||: the column's RMS over
  the tokens; the reference's sqrt of the summed squares differs by a constant); a head sums its columns.
- FLAP's fluctuation (WIFV): Var(X_j) * ||W[:, j]||^2, squared for attention columns; standardised per
  layer and module type, a head's score is the mean of its columns' standardised scores.
- CFSP's fine score (`three_w_one_wa`): see `cfsp_neuron_scores`.
- Minitron (ModelOpt): per calibration sequence the mean of |X_j| over its positions, then the L2 norm
  of that over the sequences; a head is the L2 norm of its columns' scores.
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
    sequence_abs_means: torch.Tensor | None = None  # (in,) sum over sequences of (mean over positions of |x|)^2

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


def column_scores(method: str, weight: torch.Tensor, stats: ChannelStats | None, attention: bool = False
                  ) -> torch.Tensor:
    """(in,) float64 score of each input column of `weight` (out x in) under `method`; `attention`: the
    columns are attention heads' outputs (FLAP squares their fluctuation)."""
    w = weight.detach().to(torch.float64)
    if method == "magnitude":
        return w.norm(dim=0)
    if stats is None:
        raise ValueError(f"{method} scores need the input's calibration statistics")
    if method == "wanda_sp":
        return w.abs().mean(0) * stats.rms.to(w.device)
    if method == "flap":
        fluctuation = stats.variance.to(w.device) * (w**2).sum(0)
        return fluctuation**2 if attention else fluctuation
    raise ValueError(f"unknown scoring method {method!r}: valid are {', '.join(METHODS)}")


def unit_scores(columns: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Sum of the column scores of each unit of `unit_size` consecutive columns."""
    if columns.numel() % unit_size:
        raise ValueError(f"{columns.numel()} columns do not split into units of {unit_size}")
    return columns.reshape(-1, unit_size).sum(1)


def flap_unit_scores(standardised_columns: torch.Tensor, unit_size: int) -> torch.Tensor:
    """FLAP's head score: the mean of its columns' standardised fluctuation scores (neurons: unit_size 1)."""
    return standardised_columns.reshape(-1, unit_size).mean(1)


def cfsp_neuron_scores(down: torch.Tensor, up: torch.Tensor, gate: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """CFSP's default fine score (`three_w_one_wa`) of each MLP neuron j, with a_j = sqrt(mean over tokens
    of x_j^2) of down_proj's input: the mean over the hidden rows of
    (|W_down * a| / colsum + |W_up^T| / colsum + |W_gate^T| / colsum) * a, each term normalised by its
    column's sum over the hidden rows. Each normalised term sums to 1 down a column, so the score is
    3 * a_j / hidden: the reference ranks neurons by their activation norm alone."""
    a = stats.rms.to(torch.float64)

    def normalised(m: torch.Tensor) -> torch.Tensor:
        m = m.abs()
        return m / m.sum(0, keepdim=True).clamp(min=torch.finfo(m.dtype).tiny)

    terms = (normalised(down.detach().to(torch.float64) * a) + normalised(up.detach().to(torch.float64).T)
             + normalised(gate.detach().to(torch.float64).T))
    return (terms * a).mean(0)


def minitron_column_scores(stats: ChannelStats) -> torch.Tensor:
    """Minitron's activation importance per column: the L2 norm over the calibration sequences of each
    sequence's mean |x_j| (ModelOpt's aggregation: mean over the sequence, L2 over the batch)."""
    if stats.sequence_abs_means is None:
        raise ValueError("Minitron scores need the per-sequence mean |x| of the calibration statistics")
    return stats.sequence_abs_means.to(torch.float64).sqrt()


def minitron_head_scores(columns: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A head's Minitron importance: the L2 norm of its columns' scores."""
    return columns.reshape(-1, head_dim).norm(dim=1)


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
    """(s - mean) / std over the last dimension (unbiased std, as torch.std and FLAP's reference; a row
    whose scores are all equal gets zeros)."""
    s = scores.to(torch.float64)
    std = s.std(-1, keepdim=True) if s.shape[-1] > 1 else torch.zeros_like(s[..., :1])
    return (s - s.mean(-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def cosine_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """ShortGPT's block influence per token: 1 - cos(block input, block output) over the hidden
    dimension (the last one). A block that barely changes its input has influence near 0."""
    x, y = inputs.to(torch.float64), outputs.to(torch.float64)
    return 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)


def angular_distance(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """CFSP's block importance per token: arccos(cos(block input, block output)) / pi."""
    x, y = inputs.to(torch.float64), outputs.to(torch.float64)
    cos = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12).clamp(-1, 1)
    return torch.arccos(cos) / torch.pi
