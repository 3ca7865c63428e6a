"""The neighbouring methods' databases (pipeline/pruning/scores.py, activation_stats.py, scored.py) against
independent computations: scores straight from the captured activations and weights, FLAP's bias
compensation against the least-squares optimal bias, ShortGPT's block influence against a direct cosine,
and FLAP models with their new output biases equal to the masked dense model, exported and reloaded."""
import pytest
import torch
from helpers import masked_copy, scored_databases, tiny_llama

from pipeline.model.export import load_pruned, save_pruned
from pipeline.model.materialize import materialize
from pipeline.model.structure import ATTN, MLP, output_projection, structure_of
from pipeline.pruning.database import Database
from pipeline.pruning.scored import build_scored_database
from pipeline.pruning.scores import compensation_bias


def _captured(model, tokens):
    """Every output projection's input and every block's input and output, from one full forward pass."""
    seen, hooks = {}, []

    def projection_input(key):
        def hook(_module, args, _output):
            seen[key] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    def block_io(i):
        def hook(_module, args, kwargs, output):
            seen[("block", i)] = (args[0] if args else kwargs["hidden_states"], output)
        return hook

    for i, block in enumerate(model.model.layers):
        for module in (ATTN, MLP):
            hooks.append(output_projection(model, i, module).register_forward_hook(projection_input((i, module))))
        hooks.append(block.register_forward_hook(block_io(i), with_kwargs=True))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = tiny_llama()
    tokens = torch.randint(0, 64, (12, 16), generator=torch.Generator().manual_seed(1))
    stats, dbs = scored_databases(model, tokens, 4, tmp_path_factory, batch_size=5)
    return model, tokens, stats, dbs, _captured(model, tokens)


def _direct_unit_score(method, w, x, unit, attention):
    """The reference code's formula, column by column, summed over the unit's columns: magnitude the
    column's L2 norm, Wanda-sp the mean over rows of |W| times the column's RMS, FLAP the fluctuation
    (squared for attention columns)."""
    total = 0.0
    w, x = w.detach().double(), x.double()
    for j in range(*unit):
        col = w[:, j]
        if method == "magnitude":
            total += float(torch.sqrt(col @ col))
        elif method == "wanda_sp":
            total += float(col.abs().mean() * torch.sqrt((x[:, j] ** 2).mean()))
        else:
            total += float(torch.var(x[:, j], unbiased=True) * (col @ col)) ** (2 if attention else 1)
    return total


@pytest.mark.parametrize("method", ["magnitude", "wanda_sp", "flap"])
def test_scores_equal_the_formula_on_the_captured_activations(built, method):
    model, _, _, dbs, seen = built
    db = dbs[method]
    for layer in range(3):
        for module in (ATTN, MLP):
            w = output_projection(model, layer, module).weight
            g = db.structure.unit_size(module)
            direct = torch.tensor([_direct_unit_score(method, w, seen[(layer, module)], (u * g, u * g + g),
                                                      module == ATTN)
                                   for u in range(w.shape[1] // g)], dtype=torch.float64)
            torch.testing.assert_close(db.unit_scores(layer, module), direct, rtol=1e-6, atol=1e-9)
            # each level keeps the highest-scoring units
            for level in range(db.levels + 1):
                kept = db.level_weight(layer, module, level)[0]
                removed = sorted(set(range(len(direct))) - set(kept.tolist()))
                if kept.numel() and removed:
                    assert direct[kept].min() >= direct[removed].max()


def test_flap_bias_is_the_least_squares_optimal_constant(built):
    model, _, stats, dbs, seen = built
    db = dbs["flap"]
    for layer, module, level in ((0, MLP, 2), (1, ATTN, 1), (2, MLP, 4), (2, ATTN, 4)):
        w = output_projection(model, layer, module).weight.double()
        x = seen[(layer, module)].double()
        g = db.structure.unit_size(module)
        kept = db.level_weight(layer, module, level)[0].tolist()
        removed = [c for u in range(w.shape[1] // g) if u not in kept for c in range(u * g, u * g + g)]
        # b minimising sum_n || W x_n - (W_kept x_kept,n + b) ||^2, by lstsq on a column of ones
        residual = (x[:, removed] @ w[:, removed].T)
        optimal = torch.linalg.lstsq(torch.ones(len(x), 1, dtype=torch.float64), residual).solution[0]
        torch.testing.assert_close(db.level_bias(layer, module, level).double(), optimal, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compensation_bias(w, stats.channels[(layer, module)].mean, removed), optimal)
    assert db.level_bias(0, ATTN, 0).abs().max() == 0  # nothing removed, nothing to compensate
    assert dbs["wanda_sp"].level_bias(0, ATTN, 2) is None


def test_block_influence_is_one_minus_the_mean_cosine(built):
    model, _, stats, _, seen = built
    for layer in range(3):
        x, y = seen[("block", layer)]
        y = y[0] if isinstance(y, tuple) else y
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        assert stats.block_influence[layer] == pytest.approx(float(1 - cos.mean()), rel=1e-5)


@pytest.mark.parametrize("levels", [{ATTN: [1, 4, 2], MLP: [3, 0, 4]}, {ATTN: [4, 4, 4], MLP: [2, 2, 2]}])
def test_flap_model_equals_masked_dense_model_with_bias_and_survives_export(built, levels, tmp_path):
    model, tokens, _, dbs, _ = built
    db = dbs["flap"]
    pruned = materialize(model, db.structure, db.weights_for(levels))
    masked = masked_copy(model, db, levels)
    with torch.no_grad():
        for module in (ATTN, MLP):
            for layer, level in enumerate(levels[module]):
                output_projection(masked, layer, module).bias = torch.nn.Parameter(db.level_bias(layer, module, level))
    torch.testing.assert_close(pruned(tokens).logits, masked(tokens).logits, rtol=1e-5, atol=1e-5)
    assert pruned.config.layers[0].get("o_bias") and pruned.config.layers[1].get("down_bias")
    without_bias = materialize(model, db.structure, {k: v[:2] for k, v in db.weights_for(levels).items()})
    assert not torch.allclose(pruned(tokens).logits, without_bias(tokens).logits, atol=1e-3)
    save_pruned(pruned, _tokenizer(), tmp_path / "m", "card")
    reloaded = load_pruned(tmp_path / "m")
    torch.testing.assert_close(reloaded(tokens).logits, pruned(tokens).logits, rtol=1e-5, atol=1e-5)


def test_level_zero_of_every_method_is_the_dense_model(built):
    model, tokens, _, dbs, _ = built
    for db in dbs.values():
        dense = materialize(model, db.structure, db.weights_for({ATTN: [0] * 3, MLP: [0] * 3}))
        torch.testing.assert_close(dense(tokens).logits, model(tokens).logits, rtol=1e-5, atol=1e-5)


def test_magnitude_needs_no_statistics_and_others_do(tmp_path):
    model = tiny_llama()
    build_scored_database(model, structure_of(model), "magnitude", None, 2, tmp_path / "m", {})
    assert Database(tmp_path / "m").method == "magnitude"
    with pytest.raises(ValueError, match="needs calibration statistics"):
        build_scored_database(model, structure_of(model), "flap", None, 2, tmp_path / "f", {})


def _tokenizer():
    from helpers import byte_level_tokenizer
    return byte_level_tokenizer()


def test_level_swapper_gives_the_dense_shaped_model_flaps_bias(built):
    import copy

    from pipeline.search.evolution import LevelSwapper
    model, tokens, _, dbs, _ = built
    db = dbs["flap"]
    swapper = LevelSwapper(copy.deepcopy(model), db)
    for levels in ({ATTN: [1, 4, 2], MLP: [3, 0, 4]}, {ATTN: [0, 2, 3], MLP: [1, 1, 0]}):
        swapper.apply(levels)
        pruned = materialize(model, db.structure, db.weights_for(levels))
        torch.testing.assert_close(swapper.model(tokens).logits, pruned(tokens).logits, rtol=1e-5, atol=1e-5)
