"""Mutation and budget invariants, and the search loop on a real database."""
import random

import pytest
import torch
from helpers import shipped

from pipeline.config import SelectionStage
from pipeline.errors import ConfigError
from pipeline.model.structure import structure_of
from pipeline.pruning.database import Database, build_database
from pipeline.search.evolution import (
    LevelSwapper,
    SearchState,
    depth_levels,
    evolve,
    fitness_rank,
    level_sum,
    mutate,
    offspring,
    params_table,
    prunable_params,
    switch_count,
    uniform_at_size,
    uniform_levels,
)
from pipeline.search.fitness import fitness, teacher_targets


@pytest.mark.parametrize("target,levels,layers", [(0.5, 10, 4), (0.55, 10, 7), (0.13, 4, 3), (0.9, 10, 32)])
def test_uniform_levels_hit_the_level_sum_and_differ_by_at_most_one(target, levels, layers):
    u = uniform_levels(target, levels, layers)
    for v in u.values():
        assert sum(v) == level_sum(target, levels, layers)
        assert max(v) - min(v) <= 1 and min(v) >= 0 and max(v) <= levels


def test_mutation_keeps_level_sums_and_range():
    rng = random.Random(0)
    parent = {"attn": [0, 10, 5, 5], "mlp": [5, 5, 5, 5]}
    for _ in range(500):
        child = mutate(parent, 10, rng, 3)
        for m in parent:
            assert sum(child[m]) == sum(parent[m])
            assert all(0 <= lv <= 10 for lv in child[m])
        parent = child


def test_switch_count_follows_min_of_two_uniforms():
    rng = random.Random(1)
    counts = [switch_count(rng, 3) for _ in range(20000)]
    for n, prob in ((1, 5 / 9), (2, 3 / 9), (3, 1 / 9)):  # P(min = n) = (2(m-n)+1)/m^2
        assert abs(counts.count(n) / len(counts) - prob) < 0.015


def test_one_switch_moves_one_level_between_two_modules_of_one_type():
    class OneSwitch(random.Random):
        def randint(self, a, b):
            return 1
    parent = {"attn": [5] * 6, "mlp": [5] * 6}
    for seed in range(50):
        child = mutate(parent, 10, OneSwitch(seed), 3)
        diffs = {m: [c - p for c, p in zip(child[m], parent[m])] for m in parent}
        changed = [m for m in diffs if any(diffs[m])]
        assert len(changed) == 1 and sorted(diffs[changed[0]]) == [-1, 0, 0, 0, 0, 1]


def test_offspring_are_distinct_and_differ_from_parent():
    parent = {"attn": [2, 2, 2], "mlp": [2, 2, 2]}
    kids = offspring(parent, 16, 4, random.Random(2), 3)
    keys = {str(k) for k in kids}
    assert len(kids) == 16 and len(keys) == 16 and str(parent) not in keys


def test_offspring_of_a_tiny_space_stop_at_what_exists():
    parent = {"attn": [1, 1], "mlp": [1, 1]}  # K=2: each type can only become [0,2] or [2,0]
    kids = offspring(parent, 16, 2, random.Random(3), 1)
    assert 1 <= len(kids) <= 8 and all(k != parent for k in kids)


@pytest.fixture
def setup(tiny_model, tokens, tmp_path):
    structure = structure_of(tiny_model)
    build_database(tiny_model, structure, tokens, levels=4, damp=0.01, out_dir=tmp_path / "db", identity={},
                   batch_size=6)
    db = Database(tmp_path / "db")
    fitness_set = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(5))
    teacher = teacher_targets(tiny_model, fitness_set, 4, "kl")
    return db, fitness_set, teacher


def _params(**kw):
    base = dict(target=0.5, generations=6, offspring=6, seed=0,
                schedule=(SelectionStage(survivors=3, fitness_tokens=32),
                          SelectionStage(survivors=1, fitness_tokens=128)))
    base.update(kw)
    return shipped("search", **base)


def test_search_is_deterministic_never_worse_than_start_and_keeps_budget(tiny_model, setup):
    db, fitness_set, teacher = setup
    start = uniform_levels(0.5, db.levels, 3)
    swapper = LevelSwapper(tiny_model, db)
    swapper.apply(start)
    start_fitness = fitness(tiny_model, fitness_set, teacher, 4)
    a = evolve(swapper, start, _params(budget="levels"), fitness_set, teacher)
    b = evolve(LevelSwapper(tiny_model, db), start, _params(budget="levels"), fitness_set, teacher)
    assert a.parent == b.parent and [h["fitness"] for h in a.history] == [h["fitness"] for h in b.history]
    for m in start:
        assert sum(a.parent[m]) == sum(start[m])
    # the final stage scores on the whole fitness set (128 tokens = all 8 windows), with elitism:
    fitness_curve = [h["fitness"] for h in a.history]
    assert fitness_curve == sorted(fitness_curve, reverse=True)
    assert fitness_curve[-1] <= start_fitness + 1e-9
    swapper.apply(a.parent)
    assert fitness(tiny_model, fitness_set, teacher, 4) == pytest.approx(fitness_curve[-1], rel=1e-6)


def test_swapper_after_many_swaps_equals_an_independently_masked_model(tiny_model, setup, tokens):
    import copy

    from helpers import masked_copy
    db, _, _ = setup
    swapper = LevelSwapper(copy.deepcopy(tiny_model), db)
    rng = random.Random(4)
    levels = uniform_levels(0.5, 4, 3)
    for _ in range(20):
        levels = mutate(levels, 4, rng, 3)
        swapper.apply(levels)
    torch.testing.assert_close(swapper.model(tokens).logits, masked_copy(tiny_model, db, levels)(tokens).logits)


def test_training_aware_selection_trains_copies_and_changes_the_ranking(tiny_model, setup):
    db, fitness_set, teacher = setup
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    train_set = torch.randint(0, 64, (10, 16), generator=torch.Generator().manual_seed(6))
    schedule = (SelectionStage(survivors=2, fitness_tokens=32, train_tokens=64),
                SelectionStage(survivors=1, fitness_tokens=128, train_tokens=64))
    trained = evolve(LevelSwapper(tiny_model, db), uniform_levels(0.5, 4, 3),
                     _params(generations=2, schedule=schedule, train_lr=1e-2), fitness_set, teacher, train_set)
    plain = evolve(LevelSwapper(tiny_model, db), uniform_levels(0.5, 4, 3),
                   _params(generations=2, schedule=schedule, tas=False), fitness_set, teacher, train_set)
    for k, v in tiny_model.state_dict().items():  # training happened on copies: only swaps touched the model
        if "o_proj" not in k and "down_proj" not in k:
            torch.testing.assert_close(v, before[k], msg=k)
    assert [h["fitness"] for h in trained.history] != [h["fitness"] for h in plain.history]


def test_generations_choose_as_stage_by_stage_selection_does(tiny_model, setup):
    """The search scores the parent's last-stage entry early (to keep processes busy); the method is
    unchanged: each stage draws its minibatch in turn, trains and scores its candidates, keeps the best."""
    import math

    from pipeline.model.materialize import materialize
    from pipeline.train import train_causal_lm
    db, fitness_set, teacher = setup
    train_set = torch.randint(0, 64, (10, 16), generator=torch.Generator().manual_seed(6))
    schedule = tuple(SelectionStage(survivors=n, fitness_tokens=f, train_tokens=32) for n, f in ((3, 32), (2, 64), (1, 128)))
    p = _params(generations=3, budget="levels", schedule=schedule, train_lr=1e-2)
    start = uniform_levels(0.5, 4, 3)
    state = evolve(LevelSwapper(tiny_model, db), start, p, fitness_set, teacher, train_set)

    def trained_score(levels, train, seed, rows):
        model = materialize(tiny_model, db.structure, db.weights_for(levels))
        train_causal_lm(model, train, steps=math.ceil(len(train) / p.train_batch_size), batch_size=p.train_batch_size,
                        lr=p.train_lr, seed=seed, warmup_steps=0, constant_lr=True)
        return fitness(model, fitness_set[rows], teacher.subset(rows), p.batch_size)

    rng, parent, history = random.Random(p.seed), start, []
    for _ in range(p.generations):
        candidates = offspring(parent, p.offspring, db.levels, rng, p.max_level_switches)
        for s, stage in enumerate(schedule):
            if s == len(schedule) - 1 and parent not in candidates:
                candidates = candidates + [parent]
            rows = torch.tensor(sorted(rng.sample(range(len(fitness_set)), stage.fitness_tokens // 16)))
            train = train_set[torch.tensor(rng.sample(range(len(train_set)), stage.train_tokens // 16))]
            seed = rng.randrange(2**31)
            scores = [trained_score(c, train, seed, rows) for c in candidates]
            order = sorted(range(len(candidates)), key=lambda i: scores[i])
            candidates = [candidates[i] for i in order[: stage.survivors]]
        parent = candidates[0]
        history.append(scores[order[0]])
    assert state.parent == parent
    assert [h["fitness"] for h in state.history] == history  # same computations in one process: bit-equal


def test_interrupted_search_resumes_to_the_uninterrupted_result(tiny_model, setup, tmp_path):
    db, fitness_set, teacher = setup
    start = uniform_levels(0.5, 4, 3)
    p = _params(generations=7)
    full = evolve(LevelSwapper(tiny_model, db), start, p, fitness_set, teacher)

    class Killed(Exception):
        pass

    def die_at_4(record, parent):
        if record["generation"] == 4:
            raise Killed
    checkpoint = tmp_path / "ckpt.json"
    with pytest.raises(Killed):
        evolve(LevelSwapper(tiny_model, db), start, p, fitness_set, teacher, on_generation=die_at_4,
               checkpoint=checkpoint, checkpoint_key="k")
    assert SearchState.load(checkpoint, "k").generation == 4
    assert SearchState.load(checkpoint, "other search") is None
    resumed = evolve(LevelSwapper(tiny_model, db), start, p, fitness_set, teacher, checkpoint=checkpoint,
                     checkpoint_key="k")
    assert resumed.parent == full.parent and resumed.history == full.history


def test_params_budget_trades_attention_for_mlp_within_tolerance(tiny_model, setup):
    db, fitness_set, teacher = setup
    start = uniform_levels(0.5, 4, 3)
    table = params_table(db)
    target = prunable_params(db, start, table)
    p = _params(budget="params", budget_tolerance=0.05, generations=8, offspring=8)
    slack = 0.05 * db.structure.dense_prunable_params
    kids = offspring(start, 30, 4, random.Random(7), 3, across_types=True,
                     accept=lambda lv: abs(prunable_params(db, lv, table) - target) <= slack)
    assert kids and all(abs(prunable_params(db, k, table) - target) <= slack for k in kids)
    assert any(sum(k["attn"]) != sum(start["attn"]) for k in kids)  # level sums per type are free now
    state = evolve(LevelSwapper(tiny_model, db), start, p, fitness_set, teacher)
    assert abs(prunable_params(db, state.parent, table) - target) <= slack


def test_params_table_matches_materialized_models(tiny_model, setup):
    from pipeline.model.materialize import materialize
    db, _, _ = setup
    levels = {"attn": [1, 4, 3], "mlp": [2, 0, 4]}
    model = materialize(tiny_model, db.structure, db.weights_for(levels))
    prunable = sum(p.numel() for n, p in model.named_parameters() if "_proj" in n)
    assert prunable_params(db, levels) == prunable


def test_uniform_at_size_removes_the_target_share_of_parameters(setup):
    db, _, _ = setup
    table, dense = params_table(db), db.structure.dense_prunable_params
    for target in (0.3, 0.5, 0.7):
        levels = uniform_at_size(db, target, 0.05, table)
        removed = 1 - prunable_params(db, levels, table) / dense
        by_level_sums = 1 - prunable_params(db, uniform_levels(target, db.levels, 3), table) / dense
        assert abs(removed - target) <= min(0.05, abs(by_level_sums - target))
        for m in levels:
            assert max(levels[m]) - min(levels[m]) <= 1  # still uniform within each module type
        assert abs(sum(levels["attn"]) - sum(levels["mlp"])) <= 3  # and across types: within a level per layer


def test_a_diverged_candidate_sorts_last():
    scores = [0.3, float("nan"), 0.1, float("inf")]
    assert sorted(range(4), key=lambda i: fitness_rank(scores[i])) == [2, 0, 3, 1]


def test_a_search_with_nothing_to_move_says_so(tiny_model, setup):
    db, fitness_set, teacher = setup
    dense = {"attn": [0, 0, 0], "mlp": [0, 0, 0]}
    with pytest.raises(ConfigError, match="no offspring"):
        evolve(LevelSwapper(tiny_model, db), dense, _params(budget="levels"), fitness_set, teacher)


def test_the_level_cache_stays_within_its_byte_budget(setup):
    db, _, _ = setup
    small = Database(db.path, cache_bytes=2000)
    for layer in range(3):
        for level in range(db.levels + 1):
            for module in ("attn", "mlp"):
                kept, weight = small.level_weight(layer, module, level)
                ref_kept, ref_weight = db.level_weight(layer, module, level)
                assert torch.equal(kept, ref_kept) and torch.equal(weight, ref_weight)
                assert small._cached_bytes <= 2000 or len(small._cache) == 1


def test_search_prunes_a_planted_sensitive_layer_less_than_uniform(tokens, tmp_path):
    """Layer 1's MLP output is scaled up 6x, so removing its neurons costs far more than elsewhere:
    the search must move levels away from it; a search that never helps would keep it uniform."""
    from helpers import tiny_llama
    model = tiny_llama(seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(6.0)
    build_database(model, structure_of(model), tokens, levels=4, damp=0.01, out_dir=tmp_path / "db", identity={},
                   batch_size=6)
    db = Database(tmp_path / "db")
    fitness_set = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(5))
    teacher = teacher_targets(model, fitness_set, 4, "kl")
    start = uniform_levels(0.5, 4, 3)
    state = evolve(LevelSwapper(model, db), start, _params(budget="levels", generations=12, offspring=8),
                   fitness_set, teacher)
    assert state.parent["mlp"][1] < start["mlp"][1]
    assert sum(state.parent["mlp"]) == sum(start["mlp"])


def test_training_aware_candidates_train_their_steps_and_stay_pruned(tiny_model, setup, monkeypatch):
    from pipeline.search import evolution
    db, fitness_set, teacher = setup
    train_set = torch.randint(0, 64, (10, 16), generator=torch.Generator().manual_seed(6))
    calls, real = [], evolution.train_causal_lm

    def spy(model, sequences, **kw):
        shapes = {n: p.shape for n, p in model.named_parameters()}
        losses = real(model, sequences, **kw)
        assert {n: p.shape for n, p in model.named_parameters()} == shapes  # still the pruned widths
        calls.append((len(sequences), kw["steps"], kw["batch_size"], len(losses)))
        return losses
    monkeypatch.setattr(evolution, "train_causal_lm", spy)
    schedule = (SelectionStage(survivors=2, fitness_tokens=32, train_tokens=64),
                SelectionStage(survivors=1, fitness_tokens=128, train_tokens=96))
    evolve(LevelSwapper(tiny_model, db), uniform_levels(0.5, 4, 3),
           _params(generations=1, offspring=4, schedule=schedule, train_batch_size=2), fitness_set, teacher, train_set)
    # stage 1: 4 candidates on 64 tokens = 4 sequences = 2 steps of 2; stage 2: 2 + the parent on 6 sequences
    assert calls == [(4, 2, 2, 2)] * 4 + [(6, 3, 2, 3)] * 3


@pytest.mark.parametrize("target,layers", [(0.5, 4), (0.3, 7), (0.25, 32)])
def test_depth_start_removes_whole_modules_evenly(target, layers):
    start = depth_levels(target, 10, layers)
    for v in start.values():
        assert set(v) <= {0, 10} and v.count(10) == round(target * layers)


def test_depth_mutation_swaps_whole_modules_and_keeps_the_counts():
    rng = random.Random(3)
    parent = depth_levels(0.5, 10, 6)
    for _ in range(200):
        child = mutate(parent, 10, rng, 3, step=10)
        for m in parent:
            assert set(child[m]) <= {0, 10} and child[m].count(10) == parent[m].count(10)
        parent = child


def test_depth_search_stays_in_the_depth_space_and_never_worsens(tiny_model, setup):
    db, fitness_set, teacher = setup
    start = depth_levels(1 / 3, db.levels, 3)
    swapper = LevelSwapper(tiny_model, db)
    swapper.apply(start)
    start_fitness = fitness(tiny_model, fitness_set, teacher, 4)
    state = evolve(swapper, start, _params(space="depth", generations=4, tas=False), fitness_set, teacher)
    for m in start:
        assert set(state.parent[m]) <= {0, db.levels} and sum(state.parent[m]) == sum(start[m])
    assert state.history[-1]["fitness"] <= start_fitness + 1e-9
