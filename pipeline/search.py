"""Evolutionary search over per-module levels (DESIGN.md 2.3): level-switch mutation, multi-step
selection with KL fitness against the dense model, elitism, level sums fixed per module type.

A genotype ("levels") is {"attn": [level per layer], "mlp": [level per layer]}. Candidates are
scored on one dense-shaped model whose output projections are swapped per module, never copied.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import SearchParams, SelectionStage
from pipeline.database import Database
from pipeline.modeling import MODULE_TYPES, masked_weight, output_projection
from pipeline.obs import column_indices
from pipeline.train import kl_per_token, train_causal_lm

Levels = dict[str, list[int]]


def level_sum(target: float, levels: int, num_layers: int) -> int:
    return round(target * levels * num_layers)


def uniform_levels(target: float, levels: int, num_layers: int) -> Levels:
    """Every module at the level nearest the target; when target*K is not whole, the remainder
    is spread over evenly spaced layers so each type's level sum is round(target*K*L)."""
    total = level_sum(target, levels, num_layers)
    base, extra = divmod(total, num_layers)
    per_layer = [base + ((i + 1) * extra // num_layers - i * extra // num_layers) for i in range(num_layers)]
    return {m: list(per_layer) for m in MODULE_TYPES}


def mutate(parent: Levels, max_level: int, rng: random.Random, max_switches: int) -> Levels:
    """Level switch: n = min(U{1..m}, U{1..m}) times, within one module type move one level from
    one module to another (sum per type unchanged, every level within 0..K)."""
    child = {m: list(v) for m, v in parent.items()}
    for _ in range(switch_count(rng, max_switches)):
        module = rng.choice(MODULE_TYPES)
        levels = child[module]
        lower = [i for i, lv in enumerate(levels) if lv > 0]
        raise_ = [i for i, lv in enumerate(levels) if lv < max_level]
        pairs = [(a, b) for a in lower for b in raise_ if a != b]
        if not pairs:
            continue
        a, b = rng.choice(pairs)
        levels[a] -= 1
        levels[b] += 1
    return child


def switch_count(rng: random.Random, max_switches: int) -> int:
    """min(U{1..m}, U{1..m}): mostly small steps, sometimes larger ones."""
    return min(rng.randint(1, max_switches), rng.randint(1, max_switches))


def offspring(parent: Levels, count: int, max_level: int, rng: random.Random, max_switches: int) -> list[Levels]:
    """`count` distinct children, none equal to the parent (fewer if the space is too small)."""
    children, seen = [], {_key(parent)}
    for _ in range(count * 50):
        child = mutate(parent, max_level, rng, max_switches)
        if _key(child) not in seen:
            seen.add(_key(child))
            children.append(child)
            if len(children) == count:
                break
    return children


def _key(levels: Levels) -> tuple:
    return tuple(tuple(levels[m]) for m in MODULE_TYPES)


def prunable_params(db: Database, levels: Levels) -> int:
    """Attention + MLP parameters left by `levels` (orphaned key/value heads counted as removed)."""
    s = db.structure
    total = 0
    for layer in range(s.num_layers):
        heads = db.level_weight(layer, "attn", levels["attn"][layer])[0].tolist()
        total += s.attention_params(len(heads), len(s.kv_heads_used(heads)))
        total += s.mlp_params(db.kept_units("mlp", levels["mlp"][layer]))
    return total


class LevelSwapper:
    """Holds one dense-shaped model and puts each module at a requested level by replacing only
    the output projections whose level changed (pruned columns zero, kept ones OBS-corrected)."""

    def __init__(self, model, db: Database):
        self.model, self.db = model, db
        self.current: Levels = {m: [0] * db.structure.num_layers for m in MODULE_TYPES}
        self.swaps = 0

    def apply(self, levels: Levels) -> None:
        for module in MODULE_TYPES:
            for layer, level in enumerate(levels[module]):
                if self.current[module][layer] != level:
                    self._set(layer, module, level)
                    self.current[module][layer] = level

    def reload(self) -> None:
        """Rewrite every module at its current level (after training changed the weights)."""
        for module in MODULE_TYPES:
            for layer, level in enumerate(self.current[module]):
                self._set(layer, module, level)

    @torch.no_grad()
    def zero_pruned(self) -> None:
        """Keep pruned columns at zero (called after every training step)."""
        for module in MODULE_TYPES:
            for layer, level in enumerate(self.current[module]):
                if level:
                    proj = output_projection(self.model, layer, module)
                    proj.weight[:, self._pruned_columns(layer, module, level)] = 0

    def _pruned_columns(self, layer: int, module: str, level: int) -> torch.Tensor:
        kept = column_indices(self.db.level_weight(layer, module, level)[0], self.db.structure.unit_size(module))
        mask = torch.ones(output_projection(self.model, layer, module).in_features, dtype=torch.bool)
        mask[kept] = False
        return mask.nonzero().squeeze(1)

    @torch.no_grad()
    def _set(self, layer: int, module: str, level: int) -> None:
        units, weight = self.db.level_weight(layer, module, level)
        proj = output_projection(self.model, layer, module)
        cols = column_indices(units, self.db.structure.unit_size(module))
        proj.weight.copy_(masked_weight(proj.weight.shape, cols, weight.to(proj.weight.dtype)))
        self.swaps += 1


@torch.no_grad()
def teacher_logprobs(model, sequences: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Dense log-probabilities for every position of the fitness set, computed once."""
    out = [F.log_softmax(model(input_ids=b).logits.float(), dim=-1) for b in torch.split(sequences, batch_size)]
    return torch.cat(out)


@torch.no_grad()
def kl_fitness(model, sequences: torch.Tensor, teacher: torch.Tensor, batch_size: int) -> float:
    """Mean per-token KL(P_dense || P_candidate): lower is better."""
    total, count = 0.0, 0
    for batch, target in zip(torch.split(sequences, batch_size), torch.split(teacher, batch_size)):
        kl = kl_per_token(target, model(input_ids=batch).logits)
        total += float(kl.sum())
        count += kl.numel()
    return total / count


@dataclass
class SearchState:
    parent: Levels
    generation: int
    rng: random.Random
    history: list[dict]


def evolve(swapper: LevelSwapper, start: Levels, p: SearchParams, fitness_set: torch.Tensor,
           teacher: torch.Tensor, train_set: torch.Tensor | None = None,
           on_generation: Callable[[dict], None] | None = None) -> SearchState:
    """Run `p.generations` generations from `start`; returns the final state (parent = result)."""
    state = SearchState(parent=start, generation=0, rng=random.Random(p.seed), history=[])
    max_level = swapper.db.levels
    while state.generation < p.generations:
        children = offspring(state.parent, p.offspring, max_level, state.rng, p.max_level_switches)
        candidates = children
        record = {"generation": state.generation + 1, "offspring": len(children)}
        for s, stage in enumerate(p.schedule):
            last = s == len(p.schedule) - 1
            if last and state.parent not in candidates:  # elitism: the parent competes in the final stage
                candidates = candidates + [state.parent]
            scores = _score_stage(swapper, candidates, stage, p, fitness_set, teacher, train_set, state.rng)
            order = sorted(range(len(candidates)), key=lambda i: scores[i])
            candidates = [candidates[i] for i in order[: stage.survivors]]
            record[f"stage{s + 1}_best"] = scores[order[0]]
        parent_kept = candidates[0] == state.parent
        state.parent = candidates[0]
        state.generation += 1
        record.update(fitness=record[f"stage{len(p.schedule)}_best"], parent_kept=parent_kept)
        state.history.append(record)
        if on_generation:
            on_generation(record)
    swapper.apply(state.parent)
    return state


def _score_stage(swapper, candidates, stage: SelectionStage, p: SearchParams, fitness_set, teacher, train_set,
                 rng: random.Random) -> list[float]:
    seq_len = fitness_set.shape[1]
    n_fit = min(len(fitness_set), max(1, stage.fitness_tokens // seq_len))
    picked = torch.tensor(sorted(rng.sample(range(len(fitness_set)), n_fit)))
    batch, target = fitness_set[picked], teacher[picked]
    train_batch = None
    if stage.train_tokens > 0:
        n_train = min(len(train_set), max(1, stage.train_tokens // seq_len))
        train_batch = train_set[torch.tensor(rng.sample(range(len(train_set)), n_train))]
        train_seed = rng.randrange(2**31)
    scores = []
    for levels in candidates:
        swapper.apply(levels)
        if train_batch is None:
            scores.append(kl_fitness(swapper.model, batch, target, p.batch_size))
            continue
        scores.append(_trained_fitness(swapper, train_batch, train_seed, batch, target, p))
    return scores


def _trained_fitness(swapper: LevelSwapper, train_batch, seed: int, batch, target, p: SearchParams) -> float:
    """Training-aware selection: train the candidate briefly with its pruned structure held at zero,
    score it, then restore the untrained weights."""
    model = swapper.model
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    steps = math.ceil(len(train_batch) / p.train_batch_size)
    train_causal_lm(model, train_batch, steps=steps, batch_size=p.train_batch_size, lr=p.train_lr,
                    seed=seed, after_step=swapper.zero_pruned)
    model.eval()
    score = kl_fitness(model, batch, target, p.batch_size)
    model.load_state_dict(saved)
    return score
