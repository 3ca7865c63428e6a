"""Allocation baselines: how the neighbouring methods spread a parameter budget over layers, as levels
in the search's format ({"attn": [...], "mlp": [...]}), all at the searched model's size (within
`search.budget_tolerance` of its attention+MLP parameters, measured with `prunable_params`).

| baseline | units chosen by (database) | allocation |
|---|---|---|
| uniform_magnitude | weight norm (magnitude) | every module alike |
| wanda_sp | Wanda-sp | every module alike |
| flap | fluctuation, bias compensation (flap) | FLAP: scores standardised per layer, ranked globally |
| cfsp | Wanda-sp | CFSP-like: block importance (1 - cos) sets each block's share, units within blocks |
| shortgpt | (whole blocks) | ShortGPT: the least influential blocks go whole |

A method's allocation is a removal fraction per module; `fit_levels` maps it onto the database's levels
(k/K) and nudges single modules by one level until the size is within tolerance.
"""
from __future__ import annotations

import math

import torch

from pipeline.model.structure import ATTN, MLP, MODULE_TYPES
from pipeline.pruning.database import Database
from pipeline.pruning.scores import standardize
from pipeline.search.evolution import Levels, params_table

# name -> the database method whose unit order and weights it uses ("main": the run's own database)
BASELINES = {"uniform_magnitude": "magnitude", "wanda_sp": "wanda_sp", "flap": "flap", "cfsp": "wanda_sp",
             "shortgpt": "main"}


def size_of(table: dict, levels: Levels) -> int:
    return sum(table[m][layer][lv] for m in MODULE_TYPES for layer, lv in enumerate(levels[m]))


def fit_levels(desired: dict[str, list[float]], table: dict, target: int, slack: float) -> Levels:
    """Levels whose size (`table`, see `params_table`) is within `slack` of `target`, following the
    desired removal fractions (0..1 per module): the fractions are scaled by one common factor (found by
    bisection) and rounded to levels; then, while the size is off, the module whose rounding was furthest
    in the needed direction moves one level. Returns the closest levels found if none is within `slack`."""
    K = len(table[ATTN][0]) - 1

    def rounded(scale: float) -> tuple[Levels, dict]:
        exact = {m: [min(K, scale * f * K) for f in desired[m]] for m in MODULE_TYPES}
        return {m: [min(K, max(0, round(x))) for x in exact[m]] for m in MODULE_TYPES}, exact

    low, high = 0.0, 1.0
    while size_of(table, rounded(high)[0]) > target and high < 1e6:
        high *= 2
    for _ in range(60):  # size decreases with the scale
        mid = (low + high) / 2
        low, high = (mid, high) if size_of(table, rounded(mid)[0]) > target else (low, mid)
    levels, exact = min((rounded(low), rounded(high)), key=lambda c: abs(size_of(table, c[0]) - target))
    best, seen = levels, set()
    while abs(size_of(table, levels) - target) > slack and _key(levels) not in seen:
        seen.add(_key(levels))
        size = size_of(table, levels)
        step = 1 if size > target else -1  # too large: remove more
        moves = []
        for m in MODULE_TYPES:
            for i, lv in enumerate(levels[m]):
                if 0 <= lv + step <= K:
                    after = size + table[m][i][lv + step] - table[m][i][lv]
                    moves.append((step * (exact[m][i] - lv), after, m, i))
        if not moves:
            break
        # the module the allocation wants moved most, among moves that do not overshoot past the tolerance;
        # when every move overshoots, the one that overshoots least
        safe = [mv for mv in moves if step * (mv[1] - target) >= -slack]
        _, _, m, i = max(safe, key=lambda mv: mv[0]) if safe else min(moves, key=lambda mv: abs(mv[1] - target))
        levels = {mm: list(v) for mm, v in levels.items()}
        levels[m][i] += step
        if abs(size_of(table, levels) - target) < abs(size_of(table, best) - target):
            best = levels
    return levels if abs(size_of(table, levels) - target) <= slack else best


def _key(levels: Levels) -> tuple:
    return tuple(tuple(levels[m]) for m in MODULE_TYPES)


def uniform_allocation(num_layers: int) -> dict[str, list[float]]:
    return {m: [1.0] * num_layers for m in MODULE_TYPES}


def flap_allocation(unit_scores: dict[str, list[torch.Tensor]], unit_params: dict[str, int],
                    remove_params: int) -> dict[str, list[float]]:
    """FLAP's adaptive structure (AL-AM): every module's unit scores standardised within its layer, all
    units of all layers and both module types ranked together, and the lowest removed until
    `remove_params` parameters are gone (a unit counts `unit_params[module]`). Returns the removed
    fraction of each module."""
    entries = []
    for m in MODULE_TYPES:
        for layer, scores in enumerate(unit_scores[m]):
            for z in standardize(scores).tolist():
                entries.append((z, m, layer))
    entries.sort(key=lambda e: e[0])
    removed = {m: [0] * len(unit_scores[m]) for m in MODULE_TYPES}
    gone = 0
    for _, m, layer in entries:
        if gone >= remove_params:
            break
        removed[m][layer] += 1
        gone += unit_params[m]
    return {m: [removed[m][i] / len(unit_scores[m][i]) for i in range(len(unit_scores[m]))] for m in MODULE_TYPES}


def cfsp_allocation(block_importance: list[float]) -> dict[str, list[float]]:
    """Coarse step in the spirit of CFSP: each block's share of the removal falls exponentially with its
    standardised importance (1 - cos between its input and output), exp(-z); `fit_levels` scales the
    shares to the budget. The fine step (which units within a block) is the database's unit order."""
    z = standardize(torch.tensor(block_importance, dtype=torch.float64)).tolist()
    share = [math.exp(-v) for v in z]
    top = max(share)
    return {m: [s / top for s in share] for m in MODULE_TYPES}


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


def unit_params(db: Database) -> dict[str, int]:
    """Parameters one database unit holds: a query head's q rows and o columns plus its share of its
    key/value head's k and v rows; a neuron's gate, up and down weights."""
    s = db.structure
    per_head = s.hidden_size * s.head_dim * (2 + 2 / s.group_size)
    return {ATTN: round(per_head * db.per_unit[ATTN]), MLP: s.mlp_params(1) * db.per_unit[MLP]}


def baseline_levels(name: str, db: Database, target: int, slack: float, block_influence: list[float]) -> Levels:
    """The levels of baseline `name` on `db` (the database `BASELINES[name]` names), at `target` attention+MLP
    parameters within `slack`."""
    table = params_table(db)
    L = db.structure.num_layers
    if name == "shortgpt":
        return shortgpt_levels(block_influence, table, target, slack)
    if name in ("uniform_magnitude", "wanda_sp"):
        desired = uniform_allocation(L)
    elif name == "flap":
        scores = {m: [db.unit_scores(i, m) for i in range(L)] for m in MODULE_TYPES}
        desired = flap_allocation(scores, unit_params(db), db.structure.dense_prunable_params - target)
    elif name == "cfsp":
        desired = cfsp_allocation(block_influence)
    else:
        raise ValueError(f"unknown baseline {name!r}: valid are {', '.join(BASELINES)}")
    return fit_levels(desired, table, target, slack)

