"""Allocation baselines (pipeline/search/baselines.py): every baseline lands within the tolerance of a given
parameter count, ShortGPT removes the least influential whole blocks, FLAP's global ranking of standardised
scores matches a direct computation."""
import random

import pytest
import torch
from helpers import scored_databases, tiny_llama

from pipeline.model.structure import ATTN, MLP, structure_of
from pipeline.pruning.database import Database
from pipeline.search.baselines import (
    BASELINES,
    baseline_levels,
    cfsp_allocation,
    fit_levels,
    flap_allocation,
    shortgpt_levels,
)
from pipeline.search.evolution import params_table, prunable_params, uniform_levels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama(layers=4, intermediate=96)
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    stats, dbs = scored_databases(model, tokens, 8, tmp_path_factory, batch_size=4)
    dbs["main"] = dbs["magnitude"]
    return dbs, stats


def _searched_like(db, target, seed):
    """Levels as the search leaves them: uniform start, level sums kept, shuffled between layers."""
    rng = random.Random(seed)
    levels = uniform_levels(target, db.levels, db.structure.num_layers)
    for _ in range(20):
        m = rng.choice((ATTN, MLP))
        a, b = rng.sample(range(db.structure.num_layers), 2)
        if levels[m][a] > 0 and levels[m][b] < db.levels:
            levels[m][a] -= 1
            levels[m][b] += 1
    return levels


@pytest.mark.parametrize("target,seed", [(0.5, 0), (0.75, 1), (0.3, 2)])
def test_every_baseline_lands_within_tolerance_of_the_searched_size(setup, target, seed):
    dbs, stats = setup
    searched = prunable_params(dbs["main"], _searched_like(dbs["main"], target, seed))
    slack = 0.01 * dbs["main"].structure.dense_prunable_params
    for name, method in BASELINES.items():
        db = dbs[method]
        levels = baseline_levels(name, db, searched, slack, stats.block_influence)
        assert abs(prunable_params(db, levels) - searched) <= slack, name
        assert all(0 <= lv <= db.levels for m in (ATTN, MLP) for lv in levels[m])


def test_fit_levels_follows_the_desired_fractions(setup):
    db = setup[0]["magnitude"]
    table = params_table(db)
    target = db.structure.dense_prunable_params // 2
    levels = fit_levels({ATTN: [0.1, 0.2, 0.8, 0.9], MLP: [0.1, 0.2, 0.8, 0.9]}, table, target, 0.01 * target)
    for m in (ATTN, MLP):
        assert levels[m] == sorted(levels[m]) and levels[m][0] < levels[m][-1]


def test_shortgpt_removes_the_least_influential_whole_blocks(setup):
    db = setup[0]["magnitude"]
    table = params_table(db)
    per_block = db.structure.dense_prunable_params // 4
    levels = shortgpt_levels([0.3, 0.05, 0.2, 0.1], table, 2 * per_block, 10)
    assert levels == {ATTN: [0, 8, 0, 8], MLP: [0, 8, 0, 8]}
    partial = shortgpt_levels([0.3, 0.05, 0.2, 0.1], table, 2 * per_block + per_block // 2, 0.01 * per_block * 4)
    assert partial[ATTN][1] == partial[MLP][1] == 8  # the least influential block goes whole
    assert 0 < partial[ATTN][3] + partial[MLP][3] < 16  # the next one partly


def test_flap_allocation_ranks_standardised_scores_globally():
    torch.manual_seed(0)
    scores = {ATTN: [torch.rand(4) for _ in range(3)], MLP: [torch.rand(6) * (i + 1) for i in range(3)]}
    fractions = flap_allocation(scores, {ATTN: 1, MLP: 1}, remove_params=9)
    # direct: z-scores per layer and module, the 9 lowest of all 30 units
    z = [(float(v), m, i) for m in (ATTN, MLP) for i, s in enumerate(scores[m])
         for v in (s - s.mean()) / s.std()]
    lowest = sorted(z)[:9]
    for m in (ATTN, MLP):
        for i in range(3):
            assert fractions[m][i] == sum(1 for _, mm, ii in lowest if (mm, ii) == (m, i)) / len(scores[m][i])


def test_cfsp_gives_less_important_blocks_a_larger_share():
    shares = cfsp_allocation([0.4, 0.1, 0.2, 0.3])[MLP]
    assert shares[1] > shares[2] > shares[3] > shares[0] and max(shares) == 1


def test_the_stage_writes_one_row_per_method_at_the_searched_size(tmp_path, monkeypatch):
    """stages/baselines.py on a tiny model's outputs laid out as the earlier stages leave them (no DVC, no MLflow)."""
    import json

    from helpers import byte_level_tokenizer, shipped

    from pipeline.pruning.database import build_database
    from pipeline.run.distributed import SINGLE
    from stages import baselines as stage
    monkeypatch.chdir(tmp_path)
    model = tiny_llama(layers=4, intermediate=96)
    model.save_pretrained("base/model")
    byte_level_tokenizer().save_pretrained("base/model")
    g = torch.Generator().manual_seed(3)
    (tmp_path / "data/tokens").mkdir(parents=True)
    for name, rows in (("calib", 8), ("fitness", 4), ("train", 8), ("eval", 4)):
        torch.save(torch.randint(0, 64, (rows, 16), generator=g), f"data/tokens/{name}.pt")
    build_database(model, structure_of(model), torch.load("data/tokens/calib.pt"), 8, 0.01, tmp_path / "database",
                   {}, batch_size=4)
    db = Database(tmp_path / "database")
    searched = _searched_like(db, 0.5, 0)
    (tmp_path / "levels").mkdir()
    (tmp_path / "levels/searched.json").write_text(json.dumps(searched))
    (tmp_path / "levels/uniform.json").write_text(json.dumps(uniform_levels(0.5, 8, 4)))
    params = shipped()
    params = params.model_copy(update={
        "search": params.search.model_copy(update={"budget_tolerance": 0.01}),
        "finetune": params.finetune.model_copy(update={"steps": 2, "batch_size": 2}),
        "evaluate": params.evaluate.model_copy(update={"batch_size": 4, "finetune_baselines": ["flap"]})})
    metrics = stage.main(params, lambda message: None, SINGLE)
    panel = metrics["panel"]
    assert list(panel) == ["searched", "uniform", *params.evaluate.baselines]
    target = prunable_params(db, searched)
    assert metrics["target_params"] == target == panel["searched"]["prunable_params"]
    for name in params.evaluate.baselines:
        assert panel[name]["within_tolerance"] and 1 < panel[name]["ppl_oneshot"] < 1e4 and panel[name]["kl"] > 0
        levels = json.loads((tmp_path / f"levels/baselines/{name}.json").read_text())
        assert levels["prunable_params"] == panel[name]["prunable_params"]
    assert "ppl_finetuned" in panel["flap"] and "ppl_finetuned" not in panel["cfsp"]
    assert panel["flap"]["database"] == "flap" and panel["shortgpt"]["database"] == "obs"
    csv = (tmp_path / "plots/baselines.csv").read_text().splitlines()
    assert csv[0].startswith("method,database,prunable_params") and len(csv) == 1 + len(panel)
