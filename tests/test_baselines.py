"""The baselines (pipeline/search/baselines.py, panel.py) against computations written from each reference's
formula on a tiny GQA Llama, with activations captured by hooks on a full forward pass (not through the
calibration pass or the score functions): which heads and neurons each method keeps, at the searched size.
Each method's choice differs from every other's on this model, so swapping a score for another's fails."""
import copy
import math
import random

import pytest
import torch
from helpers import scored_databases, tiny_llama

from pipeline.evaluate import units_perplexity
from pipeline.model.structure import ATTN, MLP, output_projection
from pipeline.run.distributed import SINGLE
from pipeline.search.baselines import (
    UNIT_BASELINES,
    cfsp_keep_shares,
    kept_params,
    minitron_kept,
    minitron_widths,
    shortgpt_levels,
    ziplm_levels,
)
from pipeline.search.evolution import params_table, prunable_params, uniform_levels
from pipeline.search.panel import choose

LAYERS, HEADS, KV, HIDDEN, FF, HEAD_DIM = 4, 4, 2, 32, 48, 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama(layers=LAYERS, heads=HEADS, kv_heads=KV, hidden=HIDDEN, intermediate=FF)
    with torch.no_grad():  # layer 0's heads ranked by summed column norms differ from summed squared norms
        w = output_projection(model, 0, ATTN).weight
        w.mul_(torch.tensor([4.0] + [0.1] * 7 + [1.0] * 8 + [0.9] * 8 + [1.5] * 8) / w.norm(dim=0))
    tokens = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(2))
    stats, dbs = scored_databases(model, tokens, 8, tmp_path_factory, batch_size=4)
    db = dbs["magnitude"]
    target = db.structure.dense_prunable_params // 2
    slack = 0.01 * db.structure.dense_prunable_params
    oneshot = units_perplexity(model, db.structure, tokens, 4)
    choices = {name: choose(name, db, model, stats, tokens, target, slack, 4, SINGLE, oneshot)
               for name in UNIT_BASELINES}
    return model, tokens, stats, dbs, target, slack, choices


def _inputs(model, tokens):
    """{(layer, module): the output projection's input (sequences, positions, columns)}, one full forward pass."""
    seen, hooks = {}, []
    for i in range(len(model.model.layers)):
        for module in (ATTN, MLP):
            def hook(_m, args, _out, key=(i, module)):
                seen[key] = args[0].detach().double()
            hooks.append(output_projection(model, i, module).register_forward_hook(hook))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return seen


def _weight(model, layer, module):
    return output_projection(model, layer, module).weight.detach().double()


def _lowest(scores, count):
    """Indices of the `count` lowest scores (ties: lower index first)."""
    return sorted(sorted(range(len(scores)), key=lambda u: (float(scores[u]), u))[:count])


def _kept_sets(choice):
    return {k: sorted(v.tolist()) for k, v in choice.chosen.items()}


def _uniform_reference(model, tokens, kept, score, sequential):
    """FLAP's UL-UM rule from its magnitude_sp / wanda_sp: every layer removes floor(r * heads) heads with the
    lowest score (a head sums its columns' scores) and, here, as many neurons as our choice (their count lands
    the size); with `sequential`, each layer is scored on the outputs of the earlier layers already pruned."""
    r = 0.5
    work = copy.deepcopy(model)
    x = _inputs(work, tokens)
    out = {}
    for i in range(LAYERS):
        if sequential:
            x = _inputs(work, tokens)
        heads = [sum(score(_weight(model, i, ATTN), x[(i, ATTN)], j) for j in range(h * HEAD_DIM, (h + 1) * HEAD_DIM))
                 for h in range(HEADS)]
        neurons = [score(_weight(model, i, MLP), x[(i, MLP)], j) for j in range(FF)]
        gone_heads = _lowest(heads, math.floor(r * HEADS))
        gone_neurons = _lowest(neurons, FF - len(kept[(i, MLP)]))
        out[(i, ATTN)] = sorted(set(range(HEADS)) - set(gone_heads))
        out[(i, MLP)] = sorted(set(range(FF)) - set(gone_neurons))
        with torch.no_grad():
            for h in gone_heads:
                output_projection(work, i, ATTN).weight[:, h * HEAD_DIM:(h + 1) * HEAD_DIM] = 0
            output_projection(work, i, MLP).weight[:, gone_neurons] = 0
    return out


def _column_norm(w, _x, j):
    return float(w[:, j].norm())


def _wanda(w, x, j):
    return float(w[:, j].abs().mean() * x[..., j].pow(2).sum().sqrt())  # reference: sqrt of the summed squares


def test_every_unit_baseline_lands_within_tolerance(setup):
    """Counted independently: the attention+MLP parameters the physically pruned model actually holds."""
    model, _, _, dbs, target, slack, choices = setup
    db = dbs["magnitude"]
    outside = sum(p.numel() for p in model.parameters()) - db.structure.dense_prunable_params
    for name, choice in choices.items():
        held = sum(p.numel() for n, p in choice.model(db, model).named_parameters() if not n.endswith("bias"))
        assert held - outside == kept_params(db.structure, choice.chosen), name
        assert abs(held - outside - target) <= slack, name


def test_magnitude_removes_the_heads_of_least_summed_column_norm_in_every_layer(setup):
    model, tokens, *_, choices = setup
    kept = _kept_sets(choices["uniform_magnitude"])
    assert kept == _uniform_reference(model, tokens, kept, _column_norm, sequential=False)
    assert all(len(kept[(i, ATTN)]) == HEADS // 2 for i in range(LAYERS))


def test_wanda_sp_scores_each_layer_on_the_pruned_earlier_layers(setup):
    model, tokens, *_, choices = setup
    kept = _kept_sets(choices["wanda_sp"])
    assert kept == _uniform_reference(model, tokens, kept, _wanda, sequential=True)
    assert kept != _uniform_reference(model, tokens, kept, _wanda, sequential=False)  # the order matters here


def test_flap_ranks_standardised_head_means_and_neurons_of_all_layers_together(setup):
    model, tokens, *_, choices = setup
    kept = _kept_sets(choices["flap"])
    x = _inputs(model, tokens)
    entries = []
    for i in range(LAYERS):
        for module, unit in ((ATTN, HEAD_DIM), (MLP, 1)):
            w, a = _weight(model, i, module), x[(i, module)].reshape(-1, x[(i, module)].shape[-1])
            cols = torch.stack([a[:, j].var() * (w[:, j] ** 2).sum() for j in range(w.shape[1])])
            cols = cols**2 if module == ATTN else cols
            z = (cols - cols.mean()) / cols.std()
            entries += [(float(z[u * unit:(u + 1) * unit].mean()), module, i, u) for u in range(len(z) // unit)]
    entries.sort(key=lambda e: -e[0])
    count = sum(len(v) for v in kept.values())
    top = entries[:count]
    assert kept == {(i, m): sorted(u for _, mm, ii, u in top if (mm, ii) == (m, i)) for i in range(LAYERS) for m in (ATTN, MLP)}
    # attention and MLP trade: the layers do not keep the same widths
    assert len({len(kept[(i, ATTN)]) for i in range(LAYERS)} | {len(kept[(i, MLP)]) for i in range(LAYERS)}) > 2


def test_flap_model_is_the_masked_dense_model_with_the_removed_channels_mean(setup):
    model, tokens, stats, dbs, *_, choices = setup
    choice, s = choices["flap"], dbs["magnitude"].structure
    pruned = choice.model(dbs["magnitude"], model)
    masked = copy.deepcopy(model)
    x = _inputs(model, tokens)
    with torch.no_grad():
        for (i, module), units in choice.chosen.items():
            unit = s.unit_size(module)
            gone = [c for u in range(s.unit_count(module)) if u not in units.tolist() for c in range(u * unit, (u + 1) * unit)]
            proj = output_projection(masked, i, module)
            mean = x[(i, module)].reshape(-1, proj.weight.shape[1]).mean(0)
            proj.bias = torch.nn.Parameter((proj.weight.double()[:, gone] @ mean[gone]).float())
            proj.weight[:, gone] = 0
    torch.testing.assert_close(pruned(tokens).logits, masked(tokens).logits, rtol=1e-4, atol=1e-4)


def test_cfsp_keeps_every_head_and_the_neurons_of_largest_activation_norm(setup):
    model, tokens, *_, choices = setup
    kept = _kept_sets(choices["cfsp"])
    x = _inputs(model, tokens)
    for i in range(LAYERS):
        assert kept[(i, ATTN)] == list(range(HEADS))
        norms = x[(i, MLP)].reshape(-1, FF).pow(2).mean(0).sqrt()
        assert kept[(i, MLP)] == sorted(set(range(FF)) - set(_lowest(norms, FF - len(kept[(i, MLP)]))))


def test_cfsp_allocation_has_the_published_shape():
    """CFSP's lib/prune.py: s = sigmoid((imp - mean) / 1e4); if max/avg * (1 - p) >= 1 the shares are pulled to
    their mean by avg * (1/(1-p) - 1) / (max - avg) / 1.05; kept share = s / avg * (1 - p)."""
    importance = [52000.0, 30000.0, 41000.0, 60000.0, 20000.0]
    for p in (0.2, 0.5, 0.8):
        sig = [1 / (1 + math.exp(-(v - sum(importance) / 5) / 1e4)) for v in importance]
        avg, top = sum(sig) / 5, max(sig)
        if top / avg * (1 - p) >= 1:
            sig = [avg + (v - avg) * avg * (1 / (1 - p) - 1) / (top - avg) / 1.05 for v in sig]
        expected = [v / avg * (1 - p) for v in sig]
        shares = cfsp_keep_shares(importance, p)
        assert shares == pytest.approx(expected, rel=1e-12)
        assert sum(shares) / 5 == pytest.approx(1 - p) and max(shares) < 1
        assert sorted(range(5), key=shares.__getitem__) == sorted(range(5), key=importance.__getitem__)


def test_minitron_keeps_groups_then_heads_then_neurons_of_largest_activation_norm(setup):
    model, tokens, stats, dbs, target, slack, choices = setup
    s = dbs["magnitude"].structure
    x = _inputs(model, tokens)
    for width in ((1, 2, 30), (2, 1, 20)):
        kept = {k: v.tolist() for k, v in minitron_kept(s, stats.channels, width).items()}
        for i in range(LAYERS):
            # per sequence the mean |x| over positions, then the L2 norm over the sequences
            cols = {m: x[(i, m)].abs().mean(1).pow(2).sum(0).sqrt() for m in (ATTN, MLP)}
            heads = cols[ATTN].reshape(HEADS, HEAD_DIM).norm(dim=1)
            groups = heads.reshape(KV, HEADS // KV).norm(dim=1)
            chosen = []
            for g in sorted(set(range(KV)) - set(_lowest(groups, KV - width[0]))):
                members = heads[g * 2:(g + 1) * 2]
                chosen += [g * 2 + h for h in sorted(set(range(2)) - set(_lowest(members, 2 - width[1])))]
            assert kept[(i, ATTN)] == sorted(chosen)
            assert kept[(i, MLP)] == sorted(set(range(FF)) - set(_lowest(cols[MLP], FF - width[2])))
    widths = minitron_widths(s, target, slack)
    assert widths and all(abs(kept_params(s, minitron_kept(s, stats.channels, w)) - target) <= slack for w in widths)
    assert tuple(choices["minitron"].detail["width"]) in widths
    assert len({len(v) for (i, m), v in choices["minitron"].chosen.items() if m == MLP}) == 1  # one width


def test_the_methods_choose_differently(setup):
    *_, choices = setup
    sets = {name: _kept_sets(c) for name, c in choices.items()}
    names = list(sets)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert sets[names[a]] != sets[names[b]], (names[a], names[b])


def test_shortgpt_removes_the_least_influential_whole_blocks(setup):
    db = setup[3]["magnitude"]
    table = params_table(db)
    per_block = db.structure.dense_prunable_params // 4
    levels = shortgpt_levels([0.3, 0.05, 0.2, 0.1], table, 2 * per_block, 10)
    assert levels == {ATTN: [0, 8, 0, 8], MLP: [0, 8, 0, 8]}
    partial = shortgpt_levels([0.3, 0.05, 0.2, 0.1], table, 2 * per_block + per_block // 2, 0.01 * per_block * 4)
    assert partial[ATTN][1] == partial[MLP][1] == 8  # the least influential block goes whole
    assert 0 < partial[ATTN][3] + partial[MLP][3] < 16  # the next one partly


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


def test_the_stage_writes_one_row_per_method_at_the_searched_size(tmp_path, monkeypatch):
    """stages/baselines.py on a tiny model's outputs laid out as the earlier stages leave them (no DVC, no MLflow)."""
    import json

    from helpers import shipped, stage_workspace

    from stages import baselines as stage
    monkeypatch.chdir(tmp_path)
    db = stage_workspace(tmp_path, tiny_llama(layers=4, intermediate=96))
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
    assert panel["flap"]["granularity"] == "units" and panel["shortgpt"]["granularity"] == "levels"
    flap = json.loads((tmp_path / "levels/baselines/flap.json").read_text())
    assert len(flap["kept"]["attn"]) == 4 and all(len(h) <= 4 for h in flap["kept"]["attn"])
    csv = (tmp_path / "plots/baselines.csv").read_text().splitlines()
    assert csv[0].startswith("label,method,training,ppl,kl") and len(csv) == 1 + len(panel) + 1
    assert csv[-1].startswith("flap (trained),flap,trained")


def test_ziplm_finds_the_least_summed_loss_in_the_band_as_brute_force_does():
    """The dynamic programme against every combination of levels of a tiny random database: 2 layers,
    2 module types, 5 levels each (625 genotypes); several targets, losses that are not monotone."""
    import itertools
    g = torch.Generator().manual_seed(4)
    for trial in range(6):
        table = {m: [sorted((int(x) * 6 for x in torch.randint(0, 40, (5,), generator=g)), reverse=True)
                     for _ in range(2)] for m in (ATTN, MLP)}
        losses = {m: [torch.rand(5, generator=g).tolist() for _ in range(2)] for m in (ATTN, MLP)}
        dense = sum(t[0] for m in (ATTN, MLP) for t in table[m])
        target, slack = int(dense * (0.3 + 0.1 * trial)), 0.05 * dense
        best = None
        for combo in itertools.product(range(5), repeat=4):
            levels = {ATTN: list(combo[:2]), MLP: list(combo[2:])}
            size = sum(table[m][i][lv] for m in (ATTN, MLP) for i, lv in enumerate(levels[m]))
            loss = sum(losses[m][i][lv] for m in (ATTN, MLP) for i, lv in enumerate(levels[m]))
            if abs(size - target) <= slack and (best is None or loss < best[0] - 1e-12):
                best = (loss, levels)
        if best is None:
            with pytest.raises(ValueError, match="no levels reach"):
                ziplm_levels(losses, table, target, slack)
            continue
        levels = ziplm_levels(losses, table, target, slack)
        size = sum(table[m][i][lv] for m in (ATTN, MLP) for i, lv in enumerate(levels[m]))
        loss = sum(losses[m][i][lv] for m in (ATTN, MLP) for i, lv in enumerate(levels[m]))
        assert abs(size - target) <= slack and loss == pytest.approx(best[0], abs=1e-12), trial
