"""Evolutionary search over per-module levels (docs/method.md, section 3): level-switch mutation, multi-step
selection with fitness against the dense model, optional training-aware selection, elitism, a fixed
budget (level sums per module type, or a total parameter count), and a checkpoint every generation
so an interrupted search resumes and ends with the same result.

A genotype ("levels") is {"attn": [level per layer], "mlp": [level per layer]}. Candidates are
scored on one dense-shaped model whose output projections are swapped per module, never copied;
candidates that are trained first are built as physically smaller models.
"""
from __future__ import annotations

import json
import math
import random
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config import SearchParams, SelectionStage
from pipeline.errors import ConfigError
from pipeline.model.materialize import materialize
from pipeline.model.structure import MODULE_TYPES, masked_weight, output_projection, unit_indices
from pipeline.pruning.database import Database
from pipeline.run.distributed import SINGLE, Group, balanced_owners
from pipeline.run.outputs import write_text
from pipeline.search.fitness import Teacher, fitness
from pipeline.train import train_causal_lm

Levels = dict[str, list[int]]


def level_sum(target: float, levels: int, num_layers: int) -> int:
    return round(target * levels * num_layers)


def uniform_levels(target: float, levels: int, num_layers: int) -> Levels:
    """Every module at the level nearest target*K; when target*K is not whole, the remainder
    is spread over evenly spaced layers so each type's level sum is round(target*K*L)."""
    per_layer = spread(level_sum(target, levels, num_layers), num_layers)
    return {m: list(per_layer) for m in MODULE_TYPES}


def depth_levels(target: float, levels: int, num_layers: int) -> Levels:
    """The start of a depth search (`search.space: depth`): round(target*L) modules of each type removed
    whole (level K), at evenly spaced layers, the others dense (level 0)."""
    removed = [levels * whole for whole in spread(round(target * num_layers), num_layers)]
    return {m: list(removed) for m in MODULE_TYPES}


def spread(total: int, num_layers: int) -> list[int]:
    """`total` levels over the layers as evenly as possible, the extra ones on evenly spaced layers."""
    base, extra = divmod(total, num_layers)
    return [base + ((i + 1) * extra // num_layers - i * extra // num_layers) for i in range(num_layers)]


def uniform_at_size(db: Database, target: float, tolerance: float, table: dict | None = None) -> Levels:
    """The uniform baseline at `target` read as the fraction of attention+MLP *parameters* removed.

    Level steps remove unequal parameter counts (a key/value head goes only with its last query head),
    so level sums alone miss the size (the demo's "50%" removed 46.9%). Each type's levels are spread
    evenly (`spread`), and the two types' level sums differ by at most one level per layer, so that both
    remove about the same share of their units. Of those pairs, the ones whose size lies within `tolerance`
    (a fraction of the dense attention+MLP parameters) of the target come first, closest to equal shares
    first; if none lies within, the closest size."""
    table = table or params_table(db)
    layers, top = db.structure.num_layers, db.levels * db.structure.num_layers
    dense = db.structure.dense_prunable_params
    sizes = {m: [sum(table[m][i][lv] for i, lv in enumerate(spread(total, layers))) for total in range(top + 1)]
             for m in MODULE_TYPES}
    goal, slack = (1 - target) * dense, tolerance * dense

    def rank(pair):
        off = abs(sizes["attn"][pair[0]] + sizes["mlp"][pair[1]] - goal)
        return (off > slack, abs(pair[0] - pair[1]) if off <= slack else 0, off)
    pairs = [(a, m) for a in range(top + 1) for m in range(top + 1) if abs(a - m) <= layers]
    attn, mlp = min(pairs, key=rank)
    return {"attn": spread(attn, layers), "mlp": spread(mlp, layers)}


def mutate(parent: Levels, max_level: int, rng: random.Random, max_switches: int, across_types: bool = False,
           step: int = 1) -> Levels:
    """Level switch, n = min(U{1..m}, U{1..m}) times: lower one module's level by `step` and raise
    another's by `step`, within 0..K. Within one module type (level sums fixed) unless `across_types`
    (the parameter budget then decides what is acceptable). With step K (EvoPress's depth search) a
    switch brings one removed module back and removes another: levels stay 0 or K."""
    child = {m: list(v) for m, v in parent.items()}
    for _ in range(switch_count(rng, max_switches)):
        modules = MODULE_TYPES if across_types else (rng.choice(MODULE_TYPES),)
        slots = [(m, i) for m in modules for i in range(len(child[m]))]
        lower = [(m, i) for m, i in slots if child[m][i] >= step]
        raise_ = [(m, i) for m, i in slots if child[m][i] <= max_level - step]
        pairs = [(a, b) for a in lower for b in raise_ if a != b]
        if not pairs:
            continue
        (ma, a), (mb, b) = rng.choice(pairs)
        child[ma][a] -= step
        child[mb][b] += step
    return child


def switch_count(rng: random.Random, max_switches: int) -> int:
    """min(U{1..m}, U{1..m}): mostly small steps, sometimes larger ones."""
    return min(rng.randint(1, max_switches), rng.randint(1, max_switches))


def offspring(parent: Levels, count: int, max_level: int, rng: random.Random, max_switches: int,
              across_types: bool = False, accept: Callable[[Levels], bool] | None = None,
              step: int = 1) -> list[Levels]:
    """`count` distinct acceptable children, none equal to the parent (fewer if the space is too small)."""
    children, seen = [], {genotype_key(parent)}
    for _ in range(count * 50):
        child = mutate(parent, max_level, rng, max_switches, across_types, step)
        if genotype_key(child) not in seen and (accept is None or accept(child)):
            seen.add(genotype_key(child))
            children.append(child)
            if len(children) == count:
                break
    return children


def fitness_rank(score: float) -> tuple[bool, float]:
    """Sort key: lower fitness first, a diverged (NaN) candidate after every other."""
    return math.isnan(score), score


def genotype_key(genotype: dict) -> tuple:
    """Levels, and the per-tensor types of a byte search's genotype (`pipeline.search.joint`)."""
    types = tuple((g, tuple(v)) for g, v in sorted(genotype.get("types", {}).items()))
    return (*(tuple(genotype[m]) for m in MODULE_TYPES), types)


def params_table(db: Database) -> dict[str, list[list[int]]]:
    """table[module][layer][level] = attention or MLP parameters that module keeps at that level
    (key/value heads left without query heads count as removed). Computed once per database: the uniform
    baseline, the budget check and every size report read the same table."""
    if db not in _PARAMS_TABLES:
        _PARAMS_TABLES[db] = _count_params(db)
    return _PARAMS_TABLES[db]


_PARAMS_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _count_params(db: Database) -> dict[str, list[list[int]]]:
    s = db.structure
    table = {"attn": [], "mlp": []}
    for layer in range(s.num_layers):
        heads = [db.level_units(layer, "attn", k).tolist() for k in range(db.levels + 1)]  # indices, no weights
        table["attn"].append([s.kept_attention_params(h) for h in heads])
        table["mlp"].append([s.mlp_params(db.kept_count("mlp", k)) for k in range(db.levels + 1)])
    return table


def prunable_params(db: Database, levels: Levels, table: dict | None = None) -> int:
    """Attention + MLP parameters left by `levels`."""
    table = table or params_table(db)
    return sum(table[m][layer][lv] for m in MODULE_TYPES for layer, lv in enumerate(levels[m]))


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

    @torch.no_grad()
    def _set(self, layer: int, module: str, level: int) -> None:
        units, weight = self.db.level_weight(layer, module, level)
        proj = output_projection(self.model, layer, module)
        cols = unit_indices(units, self.db.structure.unit_size(module))
        proj.weight.copy_(masked_weight(proj.weight.shape, cols, weight.to(proj.weight.dtype)))
        bias = self.db.level_bias(layer, module, level)  # FLAP's compensation: the dense model gains a bias
        if bias is not None:
            if proj.bias is None:
                proj.bias = torch.nn.Parameter(torch.zeros_like(proj.weight[:, 0]))
            proj.bias.copy_(bias)
        self.swaps += 1


@dataclass
class SearchState:
    parent: Levels
    generation: int
    rng: random.Random
    history: list[dict] = field(default_factory=list)

    def save(self, path: Path, key: str) -> None:
        """Atomically, so a kill mid-write leaves the previous generation's checkpoint."""
        version, internal, gauss = self.rng.getstate()
        data = {"key": key, "parent": self.parent, "generation": self.generation,
                "rng": [version, list(internal), gauss], "history": self.history}
        write_text(path, json.dumps(data))

    @classmethod
    def load(cls, path: Path, key: str) -> SearchState | None:
        """The checkpointed state if it belongs to this exact search (same `key`), else None."""
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        rng = random.Random()
        version, internal, gauss = data["rng"]
        rng.setstate((version, tuple(internal), gauss))
        return cls(data["parent"], data["generation"], rng, data["history"])


def budget_check(p: SearchParams, db: Database, start: Levels) -> Callable[[Levels], bool] | None:
    """For `budget: params`, accept genotypes whose size is within the tolerance of the start's."""
    if p.budget == "levels":
        return None
    table = params_table(db)
    target = prunable_params(db, start, table)
    slack = p.budget_tolerance * db.structure.dense_prunable_params
    return lambda levels: abs(prunable_params(db, levels, table) - target) <= slack


def evolve(swapper: LevelSwapper, start: Levels, p: SearchParams, fitness_set: torch.Tensor, teacher: Teacher,
           train_set: torch.Tensor | None = None, on_generation: Callable[[dict, Levels], None] | None = None,
           checkpoint: Path | None = None, checkpoint_key: str = "", group: Group = SINGLE,
           propose: Callable[[dict, random.Random], list[dict]] | None = None) -> SearchState:
    """Run generations until `p.generations`; resumes from `checkpoint` when it holds this search.
    `propose(parent, rng)`: the offspring of a generation, instead of level switches within the parameter
    or level budget (the byte search's mutation and repair).

    With several processes each scores its share of every stage's candidates; the scores are
    gathered, so every rank makes the same choices from the same random state (rank 0 checkpoints)."""
    state = (SearchState.load(checkpoint, checkpoint_key) if checkpoint else None) or \
        SearchState(parent=start, generation=0, rng=random.Random(p.seed))
    accept = None if propose else budget_check(p, swapper.db, start)
    max_level = swapper.db.levels
    while state.generation < p.generations:
        children = propose(state.parent, state.rng) if propose else offspring(
            state.parent, p.offspring, max_level, state.rng, p.max_level_switches, across_types=p.budget == "params",
            accept=accept, step=max_level if p.space == "depth" else 1)
        if not children and propose:
            break  # nothing reachable from the parent within the budget (e.g. the dense model already fits)
        if not children:
            raise ConfigError(f"search: no offspring of {state.parent} lies within the budget ({p.budget}); "
                              "every module sits at level 0 or K, or search.budget_tolerance is too tight: "
                              "choose a search.target further from 0 and 1, or a larger budget_tolerance")
        # Every stage's minibatch is drawn now, in the order stage-by-stage scoring would draw them. The parent
        # always competes in the last stage (elitism) on those draws, so it is scored there during the first
        # stage, keeping every process busy in the last stage, which has few candidates.
        draws = [_draw(stage, p, fitness_set, train_set, state.rng) for stage in p.schedule]
        last = len(p.schedule) - 1
        scored: dict[tuple, float] = {}
        candidates = children
        record = {"generation": state.generation + 1, "offspring": len(children)}
        for s, stage in enumerate(p.schedule):
            if s == last and state.parent not in candidates:
                candidates = candidates + [state.parent]
            jobs = [(s, c) for c in candidates] + ([(last, state.parent)] if s == 0 < last else [])
            todo = {(t, genotype_key(c)): (t, c) for t, c in jobs if (t, genotype_key(c)) not in scored}
            scored.update(zip(todo, _score_jobs(swapper, list(todo.values()), draws, p, fitness_set, teacher, group)))
            scores = [scored[(s, genotype_key(c))] for c in candidates]
            order = sorted(range(len(candidates)), key=lambda i: fitness_rank(scores[i]))
            candidates = [candidates[i] for i in order[: stage.survivors]]
            record[f"stage{s + 1}_best"] = scores[order[0]]
            record[f"stage{s + 1}_survivors"] = len(candidates)
        record.update(fitness=record[f"stage{len(p.schedule)}_best"], parent_kept=candidates[0] == state.parent)
        state.parent = candidates[0]
        state.generation += 1
        state.history.append(record)
        if checkpoint and group.is_main:
            state.save(checkpoint, checkpoint_key)
        if on_generation:
            on_generation(record, state.parent)
    swapper.apply(state.parent)
    return state


@dataclass(frozen=True)
class Draw:
    """One selection stage's minibatch, shared by all its candidates: fitness rows, and the training
    sequences and seed when the stage trains (training-aware selection)."""
    fitness_rows: torch.Tensor
    train_batch: torch.Tensor | None
    train_seed: int | None

    @property
    def cost(self) -> int:
        """For sharing work between processes: a trained sequence costs about 4 scored ones."""
        return len(self.fitness_rows) + 4 * (0 if self.train_batch is None else len(self.train_batch))


def _draw(stage: SelectionStage, p: SearchParams, fitness_set: torch.Tensor, train_set, rng: random.Random) -> Draw:
    seq_len = fitness_set.shape[1]
    n_fit = min(len(fitness_set), max(1, stage.fitness_tokens // seq_len))
    rows = torch.tensor(sorted(rng.sample(range(len(fitness_set)), n_fit)))
    if not (p.tas and stage.train_tokens > 0):
        return Draw(rows, None, None)
    n_train = min(len(train_set), max(1, stage.train_tokens // seq_len))
    train_batch = train_set[torch.tensor(rng.sample(range(len(train_set)), n_train))]
    return Draw(rows, train_batch, rng.randrange(2**31))


def _score_jobs(swapper: LevelSwapper, jobs: list[tuple[int, Levels]], draws: list[Draw], p: SearchParams,
                fitness_set: torch.Tensor, teacher: Teacher, group: Group) -> list[float]:
    """Scores of (stage, candidate) jobs on their stage's draw (trained first when it trains); each rank
    scores its share, balanced by cost, and every rank gets all the scores."""
    mine, stage_targets = {}, {}
    for i, owner in enumerate(balanced_owners([draws[s].cost for s, _ in jobs], group.world)):
        if owner != group.rank:
            continue
        s, levels = jobs[i]
        draw = draws[s]
        if s not in stage_targets:  # copies (rows picked by index): made once per stage, not per candidate
            stage_targets[s] = fitness_set[draw.fitness_rows], teacher.subset(draw.fitness_rows)
        batch, target = stage_targets[s]
        if draw.train_batch is not None:  # built from the database: the swapped dense-shaped model is not read
            mine[i] = _trained_fitness(swapper, levels, draw.train_batch, draw.train_seed, batch, target, p)
        else:
            swapper.apply(levels)
            mine[i] = fitness(swapper.model, batch, target, p.batch_size)
    scores = {i: s for part in group.gather(mine) for i, s in part.items()}
    return [scores[i] for i in range(len(jobs))]


def _trained_fitness(swapper: LevelSwapper, levels: Levels, train_batch, seed: int, batch, target: Teacher,
                     p: SearchParams) -> float:
    """Training-aware selection: build the candidate as a physically smaller model from its database
    weights (pruned structure cannot drift back), train it briefly, score it, discard it."""
    candidate = materialize(swapper.model, swapper.db.structure, swapper.db.weights_for(levels))
    steps = math.ceil(len(train_batch) / p.train_batch_size)
    train_causal_lm(candidate, train_batch, steps=steps, batch_size=p.train_batch_size, lr=p.train_lr,
                    seed=seed, warmup_steps=0, constant_lr=True)
    return fitness(candidate, batch, target, p.batch_size)
