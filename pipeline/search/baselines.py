"""The neighbouring methods at the searched model's size (within `search.budget_tolerance` of its
attention+MLP parameters), each at its own granularity (docs/method.md, section 6). Pure functions of
weights, calibration statistics (`pruning/scores.py`) and, for the database-based rows, the run's database.

| baseline | units | allocation over layers |
|---|---|---|
| uniform_magnitude | query heads, neurons by column L2 norm (FLAP repo) | the same share in every layer |
| wanda_sp | query heads, neurons by Wanda-sp, on the pruned earlier layers' outputs | the same share in every layer |
| flap | query heads, neurons by standardised fluctuation; bias compensation | all units of all layers ranked together |
| cfsp | MLP neurons only, by CFSP's fine score | CFSP's sigmoid of the block's angular distance |
| minitron | key/value groups, query heads within groups, neurons by activation norm | one width for every layer |
| ziplm | the run's database levels | least summed database loss (exact dynamic programme) |
| shortgpt | whole blocks (the run's database for a partial one) | least influential blocks first |

A per-unit baseline gives `Kept`: {(layer, module): sorted kept query heads or neurons}; the database-based
ones give levels.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.model.structure import ATTN, MLP, MODULE_TYPES, Structure, unit_indices
from pipeline.pruning.scores import (
    column_scores,
    compensation_bias,
    flap_unit_scores,
    minitron_column_scores,
    minitron_head_scores,
    removal_order,
    standardize,
    unit_scores,
)
from pipeline.search.evolution import Levels

UNIT_BASELINES = ("uniform_magnitude", "wanda_sp", "flap", "cfsp", "minitron")
LEVEL_BASELINES = ("ziplm", "shortgpt")
BASELINES = UNIT_BASELINES + LEVEL_BASELINES
# CFSP sums its block importance over its calibration tokens (128 sequences of 1024) and divides by 1e4
# inside the sigmoid; the sums are rescaled to that token count so the allocation has the reference's shape.
CFSP_TOKENS, CFSP_TEMPERATURE = 128 * 1024, 1e4

Kept = dict  # (layer, module) -> LongTensor of kept query heads / neurons, sorted


def kept_params(structure: Structure, kept: Kept) -> int:
    """Attention + MLP parameters left (key/value heads without query heads count as removed), as
    `prunable_params` counts a database genotype."""
    total = 0
    for layer in range(structure.num_layers):
        total += structure.kept_attention_params(kept[(layer, ATTN)].tolist())
        total += structure.mlp_params(len(kept[(layer, MLP)]))
    return total


def removed_columns(structure: Structure, module: str, kept_units: torch.Tensor) -> torch.Tensor:
    """The output-projection columns of the units of `module` not in `kept_units`."""
    gone = sorted(set(range(structure.unit_count(module))) - set(kept_units.tolist()))
    return unit_indices(torch.tensor(gone, dtype=torch.long), structure.unit_size(module))


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` highest-scoring units, sorted by index (ties: the lower index is removed first)."""
    order = removal_order(scores)
    return order[len(scores) - count:].sort().values if count > 0 else order[:0]


class UniformShare:
    """FLAP's UL-UM rule (its magnitude and Wanda-sp baselines): every layer removes the lowest-scoring
    floor(r * units) query heads, r the target's removed share of attention+MLP parameters; the neurons
    removed per layer then land the running size on target * (layers done) / layers, which is floor(r * F)
    up to the heads' rounding and orphaned key/value heads. Layers are chosen in order, so Wanda-sp can
    score each layer on the already-pruned model's inputs."""

    def __init__(self, structure: Structure, target: int):
        self.structure, self.target = structure, target
        share = 1 - target / structure.dense_prunable_params
        self.heads_removed = math.floor(share * structure.num_heads + 1e-9)
        self.kept: Kept = {}
        self.size = 0

    def choose(self, layer: int, head_scores: torch.Tensor, neuron_scores: torch.Tensor) -> dict:
        s = self.structure
        heads = _top(head_scores, s.num_heads - self.heads_removed)
        size = self.size + s.kept_attention_params(heads.tolist())
        goal = self.target * (layer + 1) / s.num_layers - size
        neurons = _top(neuron_scores, min(s.intermediate_size, max(0, round(goal / s.mlp_params(1)))))
        self.kept[(layer, ATTN)], self.kept[(layer, MLP)] = heads, neurons
        self.size = size + s.mlp_params(len(neurons))
        return {ATTN: heads, MLP: neurons}

    def removed_columns(self, layer: int) -> dict:
        """The output-projection columns the layer's choice removes (to zero them for the next layer's inputs)."""
        return {m: removed_columns(self.structure, m, self.kept[(layer, m)]) for m in MODULE_TYPES}


def method_unit_scores(method: str, structure: Structure, o_proj: torch.Tensor, down: torch.Tensor,
                       stats: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(head scores, neuron scores) of one layer under magnitude or wanda_sp (heads sum their columns)."""
    attn = column_scores(method, o_proj, stats[ATTN] if stats else None, attention=True)
    return unit_scores(attn, structure.head_dim), column_scores(method, down, stats[MLP] if stats else None)


def flap_kept(structure: Structure, o_proj: list[torch.Tensor], down: list[torch.Tensor],
              stats: dict, target: int) -> Kept:
    """FLAP's AL-AM: fluctuation scores (squared for attention) standardised within each layer over its
    columns, a head scored by the mean of its standardised columns, then every head and neuron of every
    layer ranked together and kept from the top. The reference finds the cut with heads weighted by their
    parameter share (512/3 for LLaMA-7B); here the cut is where the exact size (orphaned key/value heads
    counted) comes closest to `target`."""
    s, L = structure, structure.num_layers
    attn = standardize(torch.stack([column_scores("flap", o_proj[i], stats[(i, ATTN)], attention=True)
                                    for i in range(L)]))
    mlp = standardize(torch.stack([column_scores("flap", down[i], stats[(i, MLP)]) for i in range(L)]))
    heads = torch.stack([flap_unit_scores(attn[i], s.head_dim) for i in range(L)])  # (L, H)
    values = torch.cat([heads.reshape(-1), mlp.reshape(-1)])
    order = torch.sort(values, descending=True, stable=True).indices
    n_heads = heads.numel()

    def kept_from(count: int) -> Kept:
        chosen = order[:count]
        attn_units, mlp_units = chosen[chosen < n_heads], chosen[chosen >= n_heads] - n_heads
        out = {}
        for i in range(L):
            out[(i, ATTN)] = (attn_units[attn_units // s.num_heads == i] % s.num_heads).sort().values
            out[(i, MLP)] = (mlp_units[mlp_units // s.intermediate_size == i] % s.intermediate_size).sort().values
        return out

    low, high = 0, len(values)  # the size grows with the count: the first count reaching the target
    while low < high:
        mid = (low + high) // 2
        low, high = (mid + 1, high) if kept_params(s, kept_from(mid)) < target else (low, mid)
    candidates = [kept_from(c) for c in {max(low - 1, 0), low}]
    return min(candidates, key=lambda k: abs(kept_params(s, k) - target))


def flap_biases(structure: Structure, kept: Kept, weights: dict, stats: dict, dense_biases: dict) -> dict:
    """FLAP's compensation per (layer, module) that lost units: the removed columns' mean contribution
    W[:, removed] @ mean(X[:, removed]) over the calibration tokens, plus the dense bias if the family has one."""
    out = {}
    for (layer, module), units in kept.items():
        columns = removed_columns(structure, module, units)
        if not len(columns):
            continue
        bias = compensation_bias(weights[(layer, module)], stats[(layer, module)].mean, columns)
        if dense_biases.get((layer, module)) is not None:
            bias = bias + dense_biases[(layer, module)].to(torch.float64)
        out[(layer, module)] = bias
    return out


def cfsp_keep_shares(importance: list[float], removed: float) -> list[float]:
    """CFSP's coarse step: each block's kept share of its MLP neurons from its importance (the summed angular
    distance between its input and output): sigmoid((importance - mean) / 1e4), stretched about its mean by
    avg * (1/(1-p) - 1) / (max - avg) / 1.05 when the largest share would reach 1, then scaled to mean 1 - p."""
    imp = torch.tensor(importance, dtype=torch.float64)
    shares = torch.sigmoid((imp - imp.mean()) / CFSP_TEMPERATURE)
    avg, top = shares.mean(), shares.max()
    if top / avg * (1 - removed) >= 1:
        shares = avg + (shares - avg) * (avg * (1 / (1 - removed) - 1) / (top - avg) / 1.05)
    return (shares / avg * (1 - removed)).tolist()


def cfsp_kept(structure: Structure, neuron_scores: list[torch.Tensor], block_angular: list[float],
              target: int) -> tuple[Kept, float]:
    """CFSP at `target`: attention untouched; the MLP neuron share p removed overall is found by bisection
    so the size comes closest to `target`; layer l keeps int(F * keep_l) + 1 neurons (the reference keeps
    every score at or above the sorted score at int(F * keep_l)), the highest-scoring ones.
    Returns (kept, p)."""
    s = structure
    importance = [a * CFSP_TOKENS for a in block_angular]

    def kept_at(p: float) -> Kept:
        out = {}
        for i, keep in enumerate(cfsp_keep_shares(importance, p)):
            out[(i, ATTN)] = torch.arange(s.num_heads)
            out[(i, MLP)] = _top(neuron_scores[i], min(s.intermediate_size, int(s.intermediate_size * keep) + 1))
        return out

    low, high = 0.0, 1 - 1e-9
    for _ in range(50):  # the size falls as p grows
        mid = (low + high) / 2
        low, high = (mid, high) if kept_params(s, kept_at(mid)) > target else (low, mid)
    p = min((low, high), key=lambda q: abs(kept_params(s, kept_at(q)) - target))
    return kept_at(p), p


def minitron_widths(structure: Structure, target: int, slack: float) -> list[tuple[int, int, int]]:
    """Minitron's homogeneous architectures at `target` within `slack`: (key/value groups kept, query heads
    kept per group, neurons kept), the same in every layer; the neurons are what lands the size."""
    s, out = structure, []
    for groups in range(1, s.num_kv_heads + 1):
        for per_group in range(1, s.group_size + 1):
            attn = s.attention_params(groups * per_group, groups)
            neurons = round((target / s.num_layers - attn) / s.mlp_params(1))
            if 1 <= neurons <= s.intermediate_size and \
                    abs(s.num_layers * (attn + s.mlp_params(neurons)) - target) <= slack:
                out.append((groups, per_group, neurons))
    return out


def minitron_kept(structure: Structure, stats: dict, width: tuple[int, int, int]) -> Kept:
    """Minitron's choice at one width: per layer, the key/value groups of largest importance (the L2 norm of
    their query heads' column scores), within each kept group the query heads of largest importance (L2 over
    the head's columns), and the neurons of largest importance (`minitron_column_scores`)."""
    s = structure
    groups, per_group, neurons = width
    out = {}
    for i in range(s.num_layers):
        columns = minitron_column_scores(stats[(i, ATTN)])
        heads = minitron_head_scores(columns, s.head_dim).reshape(s.num_kv_heads, s.group_size)
        chosen = []
        for g in _top(heads.norm(dim=1), groups).tolist():
            chosen += (g * s.group_size + _top(heads[g], per_group)).tolist()
        out[(i, ATTN)] = torch.tensor(sorted(chosen), dtype=torch.long)
        out[(i, MLP)] = _top(minitron_column_scores(stats[(i, MLP)]), neurons)
    return out


def size_of(table: dict, levels: Levels) -> int:
    return sum(table[m][layer][lv] for m in MODULE_TYPES for layer, lv in enumerate(levels[m]))


def ziplm_levels(losses: dict, table: dict, target: int, slack: float) -> Levels:
    """The levels of least summed per-module loss (`losses[module][layer][level]`, the database's own OBS
    losses) whose size (`table`) is within `slack` of `target`: the allocation ZipLM-style pipelines take
    ("error monotonicity": the model's error is the sum of its layers' errors), which EvoPress argues
    against. Exact: a knapsack over (layer, module, level), solved by dynamic programming on the parameter
    count divided by the gcd of all level sizes (integers, so no rounding)."""
    modules = [(m, layer) for m in MODULE_TYPES for layer in range(len(table[m]))]
    step = math.gcd(*(c for m, layer in modules for c in table[m][layer]))
    high = math.floor((target + slack) / step)
    low = math.ceil((target - slack) / step)
    if high < 0 or low > sum(max(table[m][layer]) for m, layer in modules) // step:
        raise ValueError(f"no levels reach {target:,} ± {slack:,.0f} parameters")
    best = np.full(high + 1, np.inf)  # best[c]: least loss of the modules so far keeping c * step parameters
    best[0] = 0.0
    choices = []
    for m, layer in modules:
        new, pick = np.full_like(best, np.inf), np.full(best.shape, -1, dtype=np.int16)
        for level, (kept, loss) in enumerate(zip(table[m][layer], losses[m][layer])):
            shift = kept // step
            if shift > high:
                continue
            trial = np.full_like(best, np.inf)
            trial[shift:] = best[:len(best) - shift] + loss
            better = trial < new  # ties keep the lower level (fewer removed) seen first
            new[better], pick[better] = trial[better], level
        best = new
        choices.append(pick)
    band = best[max(low, 0):]
    if not np.isfinite(band).any():
        raise ValueError(f"no levels reach {target:,} ± {slack:,.0f} parameters")
    cost = max(low, 0) + int(np.argmin(band))
    levels = {m: [0] * len(table[m]) for m in MODULE_TYPES}
    for (m, layer), pick in zip(reversed(modules), reversed(choices)):
        levels[m][layer] = int(pick[cost])
        cost -= table[m][layer][levels[m][layer]] // step
    return levels


def shortgpt_levels(block_influence: list[float], table: dict, target: int, slack: float) -> Levels:
    """ShortGPT: blocks in increasing influence lose attention and MLP both (level K) while the size stays
    above `target`; if whole blocks cannot land within `slack`, the next block is cut partly (the
    pair of levels closest to the target), so the size matches the other baselines'."""
    L, K = len(block_influence), len(table[ATTN][0]) - 1
    levels = {m: [0] * L for m in MODULE_TYPES}
    for layer in sorted(range(L), key=lambda i: (block_influence[i], i)):
        if abs(size_of(table, levels) - target) <= slack:
            break
        trial = {m: list(v) for m, v in levels.items()}
        trial[ATTN][layer] = trial[MLP][layer] = K
        if size_of(table, trial) >= target - slack:
            levels = trial
            continue
        options = []
        for a in range(K + 1):
            for b in range(K + 1):
                trial[ATTN][layer], trial[MLP][layer] = a, b
                options.append((abs(size_of(table, trial) - target), -(a + b), a, b))
        _, _, levels[ATTN][layer], levels[MLP][layer] = min(options)
        break
    return levels
